"""Where the device's signing key lives.

A ``KeyStore`` hands out a ``SigningKey``; ``FileKeyStore`` keeps the 32-byte seed in a
0600 file and refuses to use one that others can read. A secure element behind the
firmware bridge can implement the same interface later. Keys are never logged.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from agent.errors import KeyStoreError
from protocol.signing import SigningKey


class KeyStore(Protocol):
    """Where a device keeps its secrets: a 0600 file today, a secure element later."""

    def signing_key(self) -> SigningKey: ...

    def data_key(self) -> bytes | None: ...


def _read_private(path: Path, what: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"{what} {path} is missing; re-enroll the device") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(
            f"{what} {path} is readable by others (mode {oct(st.st_mode & 0o777)}); "
            "run chmod 600 on it"
        )
    data = path.read_bytes()
    if len(data) != 32:
        raise KeyStoreError(f"{what} {path} is not a 32-byte key")
    return data


class FileKeyStore:
    def __init__(self, path: Path, data_key_path: Path | None = None) -> None:
        self.path = path
        self.data_key_path = data_key_path

    def signing_key(self) -> SigningKey:
        return SigningKey.from_seed(_read_private(self.path, "device key"))

    def data_key(self) -> bytes | None:
        """The AES-256 key for media and records at rest (None: stored in the clear)."""
        if self.data_key_path is None:
            return None
        return _read_private(self.data_key_path, "data key")

    @staticmethod
    def create(path: Path) -> SigningKey:
        """Generate a key and write it 0600, atomically. Refuses to overwrite."""
        key = SigningKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KeyStoreError(f"{path} already exists; refusing to overwrite a key") from exc
        try:
            os.write(fd, key.seed())
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
