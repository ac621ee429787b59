"""Content-addressed evidence storage: ``blobs/ab/cd/<sha256>``.

A blob is moved into place only after its bytes are fsync'd and verified against the
signed manifest; the directory is fsync'd after the rename, so a receipt never names a
file that a power cut could take back. Blobs are never rewritten: storing content that
already exists leaves the existing file alone, but makes it durable first (``settle``):
it may have been renamed in just before a crash.
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

    def path(self, sha256_hex: str) -> Path:
        return self.root / sha256_hex[:2] / sha256_hex[2:4] / sha256_hex

    def exists(self, sha256_hex: str) -> bool:
        return self.path(sha256_hex).exists()

    def _make_dirs(self, leaf: Path) -> None:
        """Create ``ab/cd`` so that the directories themselves survive a power cut: each
        new one is recorded durably in its parent before anything is put in it."""
        for directory in (leaf.parent, leaf):
            if not directory.exists():
                directory.mkdir(exist_ok=True)
                fsync_dir(directory.parent)

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
        for directory in (target.parent, target.parent.parent, self.root):
            fsync_dir(directory)

    def adopt(self, verified_file: Path, sha256_hex: str) -> Path:
        """Move an fsync'd, verified file into the store (or drop it if already stored)."""
        target = self.path(sha256_hex)
        if target.exists():
            self.settle(sha256_hex)
            verified_file.unlink()
            return target
        self._make_dirs(target.parent)
        os.chmod(verified_file, 0o440)
        os.rename(verified_file, target)
        fsync_dir(target.parent)
        return target
