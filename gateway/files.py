"""Writing the gateway's files safely: secrets 0600 and fsync'd, everything atomically.

One place for it, so that no key, token or certificate is ever written half or readable by
others because one caller forgot a flag.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def write_secret(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` with mode 0600. Without ``replace`` an existing file is an error
    (``FileExistsError``); with it the file is swapped in atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = _tmp_name(path) if replace else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)  # a full disk must not leave half a secret behind
        raise


def write_public(path: Path, data: bytes) -> None:
    """Swap in a non-secret file (certificate, CRL, ACL) atomically: readers never see
    half of it (the broker reloads these while it runs)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # a power cut must not leave an empty file renamed in
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tmp_name(path: Path) -> Path:
    """A temporary name of this writer's own: two processes writing the same file (the
    gateway reissuing the CRL while ``custody revoke`` writes it) shared one, and one's
    ``os.replace`` then found it gone."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created 0600) for the block: one
    process at a time, across processes (a crash lets go)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
