"""Content-addressed evidence storage: ``blobs/ab/<sha256>``.

A blob is moved into place only after its bytes are fsync'd and verified against the
signed manifest; the directory is fsync'd after the rename, so a receipt never names a
file that a power cut could take back. Blobs are never rewritten: storing content that
already exists leaves the existing file alone, but makes it durable first (``settle``):
it may have been renamed in just before a crash.

One level of 256 directories, as git does. Releases before 2026-11-27 stored blobs two
levels deep (``blobs/ab/cd/<sha256>``): with 65,536 second-level directories nearly
every new blob made a directory of its own, a ``mkdir`` and one more directory fsync
per file until the store held about a million blobs (``perf`` put the ``mkdir`` alone at
≈ 5 % of the gateway's CPU while it took a backlog). Blobs already stored that way stay
where they are and are found there; nothing is moved.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _flat(self, sha256_hex: str) -> Path:
        return self.root / sha256_hex[:2] / sha256_hex

    def _nested(self, sha256_hex: str) -> Path:
        """Where releases before 2026-11-27 stored a blob."""
        return self.root / sha256_hex[:2] / sha256_hex[2:4] / sha256_hex

    def path(self, sha256_hex: str) -> Path:
        """Where the blob is, in either layout; where it goes when it is not stored yet."""
        flat = self._flat(sha256_hex)
        if flat.exists():
            return flat
        nested = self._nested(sha256_hex)
        return nested if nested.exists() else flat

    def exists(self, sha256_hex: str) -> bool:
        return self._flat(sha256_hex).exists() or self._nested(sha256_hex).exists()

    def _make_dir(self, directory: Path) -> None:
        """Create ``ab`` so that it survives a power cut: recorded durably in the root
        before anything is put in it (256 of them, then never again)."""
        if not directory.exists():
            directory.mkdir(exist_ok=True)
            fsync_dir(self.root)

    def settle(self, sha256_hex: str) -> None:
        """Make a blob found already in the store durable before anything rests on it.

        It may have been renamed in just before a crash, with its directories not yet
        fsync'd; a receipt naming it must not be undone by a power cut. A few fsyncs,
        only when content is stored twice or after a crash.
        """
        target = self.path(sha256_hex)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        directory = target.parent
        while True:
            fsync_dir(directory)
            if directory == self.root:
                break
            directory = directory.parent

    def adopt(self, verified_file: Path, sha256_hex: str) -> Path:
        """Move an fsync'd, verified file into the store (or drop it if already stored)."""
        target = self.path(sha256_hex)
        if target.exists():
            self.settle(sha256_hex)
            verified_file.unlink()
            return target
        self._make_dir(target.parent)
        os.chmod(verified_file, 0o440)
        os.rename(verified_file, target)
        fsync_dir(target.parent)
        return target
