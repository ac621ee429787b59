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

The first start writes ``gateway.key`` last, after the database and the CA: a directory
with ``gateway.key`` is one that was whole, and its database and CA are never made
again when they go missing (a new database is a second, conflicting transparency log
under the same key; a new CA locks every enrolled device out of the broker). It is
refused instead, and so is a missing ``gateway.key`` beside a database that knows
devices. A first start cut short (no ``gateway.key`` yet) is finished by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.blobs import fsync_dir
from gateway.catalogue import load_catalogue
from gateway.errors import DataDirError
from gateway.files import write_public, write_secret
from protocol.signing import SigningKey

#: The way out of a refusal for a lost piece, besides restoring it.
START_ANEW = "(or move the directory away to start a new gateway)"


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


def _shown(text: str) -> str:
    """``text`` for a message: quoted, and cut short (a file may hold anything)."""
    return repr(text if len(text) <= 40 else text[:40] + "…")


@contextlib.contextmanager
def _initialising(root: Path) -> Iterator[None]:
    """One process at a time makes what is missing in ``root`` (an ``flock`` on the
    directory itself, so no file is added): two ``custody enroll`` on a new host at once
    could each make a CA, one's key ending up beside the other's certificate."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    def inspect(cls, root: Path) -> DataDir:
        """``root``, which must be a gateway's directory, checked as ``open`` checks it but
        without creating or changing anything (``--check-config``)."""
        data = cls._checked(root)
        if not data.key_path.exists():
            if data.db_path.exists():
                raise DataDirError(
                    f"{root} has no gateway.key: its first start did not finish; run "
                    f"`custody gateway --data {root} --init` to finish it"
                )
            raise DataDirError(
                f"{root} is not a gateway data directory (no gateway.key): run "
                "`custody gateway --data DIR` or `custody enroll ... --gateway-data DIR` "
                "there first, or fix the path"
            )
        return data

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> DataDir:
        """Open ``root``, creating keys, token, database and CA on first use (never with
        ``create=False``: then ``root`` must already be a gateway's directory, and only
        what follows from its keys, the token and the broker's ACL, is made again). An
        existing database that is not a custody database, or is damaged, is refused and
        left exactly as it is; so is a directory that lost a piece it cannot be rebuilt
        from (``check_nothing_lost``)."""
        data = cls._checked(root) if create else cls.inspect(root)
        data._mkdir(data.root, parents=True)
        with _initialising(data.root):
            if not data.token_path.exists():
                write_secret(data.token_path, (secrets.token_urlsafe(32) + "\n").encode())
            data._mkdir(data.blobs)
            data._mkdir(data.partial)
            new = not data.key_path.exists()  # a first start, or one cut short
            if new or not (data.ca_dir / "acl").exists():
                # Imported here: the CA and policy modules need the database schema.
                from gateway.ca import CertificateAuthority
                from gateway.policy import write_broker_policy

                db = data.open_db()
                try:
                    write_broker_policy(db, CertificateAuthority.open(data.ca_dir))
                finally:
                    db.conn.close()
            if new:
                key = SigningKey.generate()
                write_public(data.pub_path, (key.verify_key.hex + "\n").encode())
                # Last (see the module docstring), and whole or not at all: a key file
                # cut short by a crash would make the directory look finished, and be
                # refused for ever as "not a 32-byte seed".
                write_secret(data.key_path, key.seed(), replace=True)
                fsync_dir(data.root)
            elif _missing_or_blank(data.pub_path):
                # Missing or empty: an earlier release wrote it after the key, in place.
                write_public(data.pub_path, (data.signing_key().verify_key.hex + "\n").encode())
        return data

    @classmethod
    def _checked(cls, root: Path) -> DataDir:
        """The read-only checks both ``open`` and ``inspect`` make first."""
        data = cls(root.resolve())
        problem = directory_problem(data.root)
        if problem is not None:
            raise DataDirError(f"{root} {problem}: point it at a gateway data directory")
        data.check_database()
        data.check_nothing_lost()
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

    def read_db(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """The rows of ``sql`` on ``custody.db``, read without creating or changing any
        file. SQLite makes a WAL database's ``-wal`` and ``-shm`` files even to read it
        (and a read-only connection leaves them behind), so while there are none — no
        connection has it open, and nothing waits to be replayed — it is read as
        immutable, and read again the ordinary way should that find it damaged (a writer
        may have opened it meanwhile).
        """
        uri = f"{self.db_path.as_uri()}?mode=ro"
        quiet = not any(
            self.db_path.with_name(self.db_path.name + suffix).exists()
            for suffix in ("-wal", "-shm")
        )
        if quiet:
            try:
                return _query(f"{uri}&immutable=1", sql, params)
            except sqlite3.OperationalError:
                raise  # the query's own ("no such table"): the same either way
            except sqlite3.DatabaseError:
                pass
        return _query(uri, sql, params)

    def check_database(self) -> None:
        """Refuse a ``custody.db`` that SQLite cannot read or that holds another program's
        tables. Reads only; a missing file is left to ``check_nothing_lost``."""
        path = self.db_path
        if not path.exists():
            return
        if not path.is_file():
            raise DataDirError(f"{path} is not a file: move it away or restore the database")
        try:
            tables = {row[0] for row in self.read_db("SELECT name FROM sqlite_master")}
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
        if tables and "devices" not in tables:
            raise DataDirError(
                f"{path} is an SQLite database but not a custody database (it has no devices "
                "table); it was left untouched: point --data at the gateway's directory, or "
                "restore custody.db from a backup"
            )

    def enrolled_devices(self) -> int:
        """How many devices ``custody.db`` knows (revoked ones too); 0 without one."""
        if not self.db_path.exists():
            return 0
        try:
            return int(self.read_db("SELECT count(*) FROM devices")[0][0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0  # a first start cut short before the schema was made
            raise DataDirError(f"{self.db_path} cannot be read now ({exc}); try again") from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def _stored(self) -> Path | None:
        """``blobs/`` or ``partial/`` when it holds anything: evidence was received here."""
        for folder in (self.blobs, self.partial):
            with contextlib.suppress(OSError):
                if any(folder.iterdir()):
                    return folder
        return None

    def check_nothing_lost(self) -> None:
        """Refuse a directory that shows it was a working gateway's but lost a piece that
        cannot be made again: the database, the CA, or the signing key. Reads only.

        ``gateway.key`` is written last on the first start, so it proves the database and
        the CA were made; the CA is made after the database (in every release), so it
        proves the database was; received evidence and enrolled devices prove both.
        """
        key = self.key_path.exists()
        ca_cert, ca_key = self.ca_dir / "ca.crt", self.ca_dir / "ca.key"
        stored = self._stored()
        if not self.db_path.exists():
            # Not the key alone: releases before 2026-11-27 wrote it first, and a first
            # start of theirs cut short left a key and nothing else (no device, no
            # evidence: nothing to restore). That start is finished now.
            # The lock is taken only once a start has finished opening the directory
            # (``claim``): a gateway has run here, and devices may hold its tree heads.
            proofs = (
                (ca_cert, "exists"),
                (stored, "holds evidence"),
                (self.root / "gateway.lock", "shows a gateway has run here"),
            )
            for proof, says in proofs:
                if proof is not None and proof.exists():
                    raise DataDirError(
                        f"{proof} {says} but {self.db_path} is missing: this gateway has run "
                        f"before; restore custody.db (with its -wal file) from a backup "
                        f"{START_ANEW}"
                    )
            return
        devices = self.enrolled_devices()
        if not key and devices:
            raise DataDirError(
                f"{self.key_path} is missing but {self.db_path} knows {devices} enrolled "
                "device(s), which check the gateway's signatures with its key; restore "
                f"gateway.key and gateway.pub from a backup {START_ANEW}"
            )
        if devices or stored is not None:
            # With neither, a new CA locks nobody out (an earlier release's first start
            # made the CA last, and one cut short before it left a key and a database).
            why = (
                f"{self.db_path} knows {devices} enrolled device(s), whose certificates "
                "that CA issued"
                if devices
                else f"{stored} holds evidence: this gateway has run before"
            )
            for path in (ca_cert, ca_key):
                if not path.exists():
                    raise DataDirError(
                        f"{path} is missing but {why}; restore {self.ca_dir} from a backup "
                        f"{START_ANEW}: a new CA would lock every enrolled device out of "
                        "the broker"
                    )

    def check_ready(self) -> None:
        """What a start needs beyond ``open``, checked without changing anything: the
        signing key and the ``gateway.pub`` that goes with it, an admin token that is not
        empty (a missing one the start makes), and a step catalogue that loads."""
        self.checked_public_key()
        if self.token_path.exists():
            self.admin_token()
        load_catalogue(self.root)

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

    def checked_public_key(self) -> str:
        """``gateway.pub``, refused unless it is the public key of ``gateway.key``: it is
        what devices are given at enrollment to check every ack and receipt with."""
        expected = self.signing_key().verify_key.hex
        remedy = (
            "restore gateway.key and gateway.pub from a backup (devices enrolled here "
            "check the gateway's signatures with the key in gateway.pub)"
        )
        if _missing_or_blank(self.pub_path):
            # An earlier release wrote it after the key, in place: a crash could leave it
            # missing or empty. It can only say one thing, and the next start writes it.
            return expected
        try:
            text = self.pub_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataDirError(f"{self.pub_path} cannot be read ({exc}): {remedy}") from exc
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
            raise DataDirError(
                f"{self.pub_path} does not hold a public key (64 hex digits) but "
                f"{_shown(text)}: {remedy}"
            )
        if text.lower() != expected:
            raise DataDirError(
                f"{self.pub_path} is not the public key of {self.key_path} "
                f"(that is {expected}): {remedy}"
            )
        return expected

    def admin_token(self) -> str:
        raw = _read_secret(self.token_path)
        try:
            token = raw.decode().strip()
        except UnicodeDecodeError:
            token = ""
        if not token:
            raise DataDirError(
                f"{self.token_path} is empty or not text: every API request would be "
                "refused; delete it and start the gateway to make a new one, or restore it"
            )
        return token


def _query(uri: str, sql: str, params: Sequence[object]) -> list[Any]:
    conn = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _missing_or_blank(path: Path) -> bool:
    """True when ``path`` does not exist, or is a file holding nothing but white space;
    anything else (a directory, bytes that are not text) is for the caller to refuse."""
    if not os.path.lexists(path):
        return True
    try:
        return path.is_file() and not path.read_bytes().strip()
    except OSError:
        return False
