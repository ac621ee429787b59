"""The open segment on disk, second by second, so a crash costs at most a second of video.

A segment becomes evidence when it closes (``Outbox``). Until then its fragmented MP4
lives in the encoder's memory — up to ``segment_s`` of footage that a kill -9, a kernel
panic or a flat battery would take with it. So while recording, every completed fMP4
fragment (one per keyframe, about a second) is appended to a spool file and fsync'd.

Spool file: a sequence of records ``len (u32 BE) | payload``; with a data key each
payload is AES-256-GCM sealed (``nonce (12) | ciphertext+tag``, associated data = the
spool's id and the record's index, so records cannot be reordered or moved between
spools). Record 0 is the segment's metadata (JSON), the rest are fMP4 bytes in order.
A torn last record (the crash hit mid-append) fails its length or tag check and is
dropped; everything before it is intact.

When the segment closes normally, its commit records the spool's id (``kv``
``spool:<id>``) in the same transaction, and the spool is deleted; at start, a spool
whose id is not committed is turned into a segment marked ``recovered`` (``recover``).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.db import fsync_dir

LEN = struct.Struct(">I")
MAX_RECORD = 256 * 1024 * 1024


class SpoolWriter:
    def __init__(self, directory: Path, key: bytes | None, meta: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex
        self.path = directory / f"{self.id}.spool"
        self._aes = AESGCM(key) if key is not None else None
        self._index = 0
        self._file = open(self.path, "xb")  # noqa: SIM115 - closed in close()
        self.flushed = 0  # bytes of media appended so far
        self._append(json.dumps({**meta, "spool_id": self.id}).encode())
        # The spool's name durable in its directory, once: fsyncing the file alone does
        # not promise that on every filesystem, and a power cut would take the whole
        # open segment, not the last second of it.
        self._file.flush()
        os.fsync(self._file.fileno())
        fsync_dir(directory)

    def _append(self, data: bytes) -> None:
        if self._aes is not None:
            nonce = os.urandom(12)
            data = nonce + self._aes.encrypt(nonce, data, _aad(self.id, self._index))
        self._file.write(LEN.pack(len(data)) + data)
        self._index += 1

    def append(self, media: bytes) -> None:
        """Append the next bytes of the segment and make them durable."""
        if not media:
            return
        self._append(media)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.flushed += len(media)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _aad(spool_id: str, index: int) -> bytes:
    return spool_id.encode() + struct.pack(">I", index)


@dataclass
class Spooled:
    path: Path
    meta: dict[str, Any]
    media: bytes
    torn: bool  # the last record was cut short (the crash hit mid-append)


def _records(data: bytes) -> Iterator[tuple[bytes, bool]]:
    pos = 0
    while pos + LEN.size <= len(data):
        (n,) = LEN.unpack_from(data, pos)
        if n > MAX_RECORD or pos + LEN.size + n > len(data):
            yield b"", True
            return
        yield data[pos + LEN.size : pos + LEN.size + n], False
        pos += LEN.size + n
    if pos != len(data):
        yield b"", True


def read(path: Path, key: bytes | None) -> Spooled | None:
    """What survived in a spool file; None if not even its metadata did."""
    aes = AESGCM(key) if key is not None else None
    spool_id = path.stem
    meta: dict[str, Any] | None = None
    media = bytearray()
    torn = False
    for index, (record, cut) in enumerate(_records(path.read_bytes())):
        if cut:
            torn = True
            break
        if aes is not None:
            try:
                record = aes.decrypt(record[:12], record[12:], _aad(spool_id, index))
            except (InvalidTag, ValueError):
                torn = True
                break
        if index == 0:
            try:
                meta = json.loads(record)
            except ValueError:
                return None
        else:
            media += record
    if meta is None:
        return None
    return Spooled(path, meta, bytes(media), torn)
