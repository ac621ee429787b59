"""The gateway's data directory: keys, admin token, database, blobs, partial uploads.

Layout (created on first start, or by the first ``custody enroll``)::

    DIR/gateway.key     Ed25519 seed that signs acks, receipts, tree heads (0600)
    DIR/gateway.pub     its public key, hex (what devices are given at enrollment)
    DIR/admin.token     the admin API token (0600)
    DIR/custody.db      SQLite database
    DIR/blobs/ab/…      content-addressed evidence (releases before 2026-11-27:
                        blobs/ab/cd/…, still read)
    DIR/partial/…       uploads in progress
    DIR/ca/             the CA (ca.key 0600, ca.crt), broker and gateway certificates,
                        the CRL and the broker ACL file

Secrets are written with O_EXCL and mode 0600 and never printed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from gateway.errors import DataDirError
from gateway.files import write_secret
from protocol.signing import SigningKey


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DataDirError(f"{path} is readable by others; run chmod 600 on it")
    return path.read_bytes()


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory, or None: it, or the nearest thing
    above it that exists, is a file. Checked before anything is created there."""
    for p in (path, *path.parents):
        if p.exists():
            if p.is_dir():
                return None
            return (
                "is a file, not a directory"
                if p == path
                else f"cannot be created: {p} is a file, not a directory"
            )
    return None


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def key_path(self) -> Path:
        return self.root / "gateway.key"

    @property
    def pub_path(self) -> Path:
        return self.root / "gateway.pub"

    @property
    def token_path(self) -> Path:
        return self.root / "admin.token"

    @property
    def db_path(self) -> Path:
        return self.root / "custody.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> DataDir:
        """Open ``root``, creating keys and token on first use (never with ``create=False``:
        then ``root`` must already be a gateway's directory). An existing database that is
        not a custody database, or is damaged, is refused and left exactly as it is."""
        data = cls(root.resolve())
        problem = directory_problem(data.root)
        if problem is not None:
            raise DataDirError(f"{root} {problem}: point it at a gateway data directory")
        data.check_database()
        if not data.key_path.exists():
            if not create:
                raise DataDirError(
                    f"{root} is not a gateway data directory (no gateway.key): run "
                    "`custody gateway --data DIR` or `custody enroll ... --gateway-data DIR` "
                    "there first, or fix the path"
                )
            data._mkdir(data.root, parents=True)
            key = SigningKey.generate()
            write_secret(data.key_path, key.seed())
            data.pub_path.write_text(key.verify_key.hex + "\n")
        if not data.token_path.exists():
            write_secret(data.token_path, (secrets.token_urlsafe(32) + "\n").encode())
        data._mkdir(data.blobs)
        data._mkdir(data.partial)
        if not (data.ca_dir / "acl").exists():
            # Imported here: the CA and policy modules need the database schema.
            from gateway.ca import CertificateAuthority
            from gateway.policy import write_broker_policy

            db = data.open_db()
            try:
                write_broker_policy(db, CertificateAuthority.open(data.ca_dir))
            finally:
                db.conn.close()
        return data

    @staticmethod
    def _mkdir(path: Path, *, parents: bool = False) -> None:
        try:
            path.mkdir(parents=parents, exist_ok=True)
        except FileExistsError as exc:
            raise DataDirError(f"{path} is in the way: it should be a directory") from exc
        except OSError as exc:
            raise DataDirError(f"cannot create {path}: {exc.strerror}") from exc

    def _damaged(self, exc: sqlite3.Error) -> DataDirError:
        return DataDirError(
            f"{self.db_path} is not a custody database or is damaged ({exc}); it was left "
            "untouched: restore it from a backup, or move it away to start an empty one"
        )

    def claim(self) -> int:
        """Hold ``DIR/gateway.lock`` for this process's life (the fd is returned; closing
        it, or exiting, lets go): one running gateway per data directory. A second one
        started by mistake took the same MQTT client id, and the two knocked each other
        off the broker every few seconds with nothing in either log to say why."""
        fd = os.open(self.root / "gateway.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirError(
                f"another gateway (pid {other}) is running on {self.root}: one gateway per "
                "data directory (stop it first, or give this one a directory of its own)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def check_database(self) -> None:
        """Refuse a ``custody.db`` that SQLite cannot read or that holds another program's
        tables. Reads only; a missing file is fine (the first start creates it)."""
        path = self.db_path
        if not path.exists():
            return
        if not path.is_file():
            raise DataDirError(f"{path} is not a file: move it away or restore the database")
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise self._damaged(exc) from exc
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                return  # busy with a live writer, so readable: not damaged
            if "readonly" in str(exc) or "unable to open" in str(exc):
                # WAL needs its -shm file even to read: a user who may not write here
                # cannot tell a good database from a damaged one. Say that instead.
                raise DataDirError(
                    f"{path} cannot be read by this user ({exc}): check the permissions of "
                    f"{path.parent} (a WAL database needs write access to its directory)"
                ) from exc
            raise self._damaged(exc) from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc
        finally:
            conn.close()
        if tables and "devices" not in tables:
            raise DataDirError(
                f"{path} is an SQLite database but not a custody database (it has no devices "
                "table); it was left untouched: point --data at the gateway's directory, or "
                "restore custody.db from a backup"
            )

    def open_db(self) -> sqlite_utils.Database:
        """``gateway.db.open_db`` on ``custody.db``, a damaged file reported as such."""
        from gateway.db import open_db

        try:
            return open_db(self.db_path)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def signing_key(self) -> SigningKey:
        seed = _read_secret(self.key_path)
        if len(seed) != 32:
            raise DataDirError(f"{self.key_path} is not a 32-byte Ed25519 seed")
        return SigningKey.from_seed(seed)

    def public_key_hex(self) -> str:
        return self.pub_path.read_text().strip()

    def admin_token(self) -> str:
        return _read_secret(self.token_path).decode().strip()
