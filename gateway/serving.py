"""How evidence bytes are handed to a browser without letting them act in it.

A media type is the device's word (its signed manifest; ``custody agent add report.html``
guesses ``text/html``). Served inline on the gateway's origin, an HTML or SVG file ran as
a page in the viewer's session: a tester's file created a see-everything user when an
admin opened it from the dashboard. So only types a browser shows without running
anything (video, audio, raster images) are served inline, and everything else as a
download; every response says ``nosniff`` (no guessing a type from the bytes) and carries
a ``sandbox`` policy (opened anyway, a document gets an opaque origin and no scripts).
The bytes and the ``Content-Type`` are unchanged: an integrator downloads what the device
sent, exactly.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from fastapi.responses import FileResponse

from protocol.journal import valid_media_type

#: Shown inline (the dashboard's player and image views); anything else is an attachment.
INLINE = frozenset(
    {
        "video/mp4",
        "video/webm",
        "audio/mp4",
        "audio/mpeg",
        "audio/aac",
        "audio/wav",
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
    }
)


#: The extension a download gets, by media type: passive formats only. A name the
#: device chose (``evil.html``, ``run.desktop``) or a type that runs when opened
#: (``text/html``, ``image/svg+xml``) must not make a saved file that acts on a double-click.
EXTENSIONS = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "audio/mp4": ".m4a",
    "audio/mpeg": ".mp3",
    "audio/aac": ".aac",
    "audio/wav": ".wav",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "application/pdf": ".pdf",
    "text/plain": ".txt",
}


def download_name(base: str, name: str | None, media_type: str) -> str:
    """``base``, the stem of the device's own file name when it has one, and an extension
    for the media type (``cam-7-1-notice.pdf``; a download called ``cam-7-1`` lost
    both). Only letters, digits, ``.``, ``-`` and ``_`` of the device's name are kept
    (it is the device's word, and ends up in a header and on the downloader's disk), and
    never its own extension: ``.bin`` for anything not known to be passive."""
    stem = PurePosixPath(name or "").stem if name and "." in name.strip(".") else name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem or "").strip("._")[:100]
    ext = EXTENSIONS.get(media_type.split(";", 1)[0].strip().lower(), ".bin")
    return (f"{base}-{safe}" if safe else base) + ext


def evidence_response(
    path: Path, media_type: str, name: str, headers: dict[str, str] | None = None
) -> FileResponse:
    """The file at ``path`` as ``media_type``: inline if harmless, else a download.

    A media type that is not well formed (stored before ingest refused them: a line break,
    a NUL, a character outside Latin-1) is served as ``application/octet-stream``: used as
    the header it dropped the connection or raised, and the evidence could not be fetched.
    """
    if not valid_media_type(media_type):
        media_type = "application/octet-stream"
    base = media_type.split(";", 1)[0].strip().lower()
    safe = {
        **(headers or {}),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if base in INLINE:
        return FileResponse(path, media_type=media_type, headers=safe)
    return FileResponse(
        path,
        media_type=media_type,
        headers=safe,
        filename=name,
        content_disposition_type="attachment",
    )
