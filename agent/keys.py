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
    def signing_key(self) -> SigningKey: ...


class FileKeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def signing_key(self) -> SigningKey:
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise KeyStoreError(f"device key {self.path} is missing; re-enroll the device") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyStoreError(
                f"device key {self.path} is readable by others (mode {oct(st.st_mode & 0o777)}); "
                "run chmod 600 on it"
            )
        seed = self.path.read_bytes()
        if len(seed) != 32:
            raise KeyStoreError(f"device key {self.path} is not a 32-byte Ed25519 seed")
        return SigningKey.from_seed(seed)

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
