"""Where the device's signing key lives.

A ``KeyStore`` hands out a ``SigningKey``; ``FileKeyStore`` keeps the 32-byte seed in a
0600 file and refuses to use one that others can read. A secure element behind the
firmware bridge can implement the same interface later. Keys are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from agent.db import fsync_dir
from agent.errors import KeyStoreError
from protocol.signing import SigningKey


class KeyStore(Protocol):
    """Where a device keeps its secrets: a 0600 file today, a secure element later."""

    def signing_key(self) -> SigningKey: ...

    def data_key(self) -> bytes | None: ...


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that is missing or that others may read (it must be 0600)."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"{what} {path} is missing; re-enroll the device") from exc
    if not stat.S_ISREG(st.st_mode):  # a directory was told to chmod 600, which cannot help
        raise KeyStoreError(f"{what} {path} is not a file; restore the key file there")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(
            f"{what} {path} is readable by others (mode {oct(st.st_mode & 0o777)}); "
            "run chmod 600 on it"
        )


def _read_private(path: Path, what: str) -> bytes:
    check_private(path, what)
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

    @property
    def next_path(self) -> Path:
        return self.path.with_name(self.path.name + ".next")

    @contextlib.contextmanager
    def _rotation_lock(self) -> Iterator[None]:
        """Held for a whole rotation, and by ``finish_rotation`` in every other process.

        Without it, ``custody agent add`` (or ``status``) started while the agent was
        between writing ``.next`` and journalling the hand-over found a ``.next`` the
        journal did not name yet and deleted it as a crash's leftover; the agent then
        journalled a hand-over to a key that existed only in its memory, and no record
        could be signed again.
        """
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def rotate(self, hand_over: Callable[[SigningKey], None]) -> SigningKey:
        """Replace the signing key, so that the journal chain continues across keys.

        The new key is written beside the old (``.next``); ``hand_over(new)`` must then
        durably journal a ``key_rotation`` record signed by the *old* key that names the
        new public key; only then does the new key replace the old. ``finish_rotation``
        completes or abandons a rotation that a crash interrupted.
        """
        with self._rotation_lock():
            old = self.signing_key()
            new = SigningKey.generate()
            self.next_path.unlink(missing_ok=True)
            _write_new(self.next_path, new.seed())
            # The old key stays until the gateway has acknowledged the hand-over: the
            # records before it are signed with it, and so must be the envelopes that
            # carry them.
            self.prev_path.unlink(missing_ok=True)
            _write_new(self.prev_path, old.seed())
            # Both files durable before the journal names the new key: a power cut must
            # not leave a hand-over to a key that is gone.
            fsync_dir(self.path.parent)
            hand_over(new)
            os.replace(self.next_path, self.path)
            fsync_dir(self.path.parent)
            return new

    @property
    def prev_path(self) -> Path:
        return self.path.with_name(self.path.name + ".prev")

    def previous(self) -> SigningKey | None:
        """The key before the last rotation, while the gateway has not acknowledged it."""
        if not self.prev_path.exists():
            return None
        return SigningKey.from_seed(_read_private(self.prev_path, "previous device key"))

    def forget_previous(self) -> None:
        self.prev_path.unlink(missing_ok=True)

    def key_for(self, public_hex: str) -> SigningKey:
        """The signing key (current or about to become current) with this public key."""
        for _attempt in range(3):  # a rotation may move .next over the key between reads
            for path in (self.next_path, self.path):
                try:
                    key = SigningKey.from_seed(_read_private(path, "device key"))
                except KeyStoreError:
                    continue
                if key.verify_key.hex == public_hex:
                    return key
        raise KeyStoreError(f"no device key matches the journal's signer {public_hex[:16]}…")

    def finish_rotation(self, handed_over_to: Callable[[], str | None]) -> None:
        """After a crash: keep ``.next`` if the journal already names it, else drop it.

        ``handed_over_to`` reads the journal's newest hand-over; it is asked under the
        rotation lock, so a rotation running in another process is waited for, and a
        crashed one is judged by what it committed, not by what was there before.
        """
        if not self.next_path.exists():
            return
        with self._rotation_lock():
            if not self.next_path.exists():
                return  # the rotation we waited for has finished
            pending = SigningKey.from_seed(_read_private(self.next_path, "next device key"))
            if handed_over_to() == pending.verify_key.hex:
                os.replace(self.next_path, self.path)
            else:
                self.next_path.unlink()
            fsync_dir(self.path.parent)

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
