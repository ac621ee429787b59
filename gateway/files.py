"""Writing the gateway's files safely: secrets 0600 and fsync'd, everything atomically.

One place for it, so that no key, token or certificate is ever written half or readable by
others because one caller forgot a flag.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` with mode 0600. Without ``replace`` an existing file is an error
    (``FileExistsError``); with it the file is swapped in atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)


def write_public(path: Path, data: bytes) -> None:
    """Swap in a non-secret file (certificate, CRL, ACL) atomically: readers never see
    half of it (the broker reloads these while it runs)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
