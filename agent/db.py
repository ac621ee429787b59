"""The device database: one SQLite file (WAL) holding journal, outbox and small state.

``custody agent add`` and the running agent are separate processes writing the same file,
so every write that allocates a sequence number runs inside ``BEGIN IMMEDIATE`` (one
writer at a time, the other waits on ``busy_timeout``). ``synchronous=FULL`` because a
committed row is a promise to the officer that the evidence is captured.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import Table

from agent.errors import StoreError

SCHEMA_VERSION = 1


def wal_mode(conn: sqlite3.Connection, attempts: int = 200) -> None:
    """Switch to WAL. Setting the journal mode takes an exclusive lock and SQLite does not
    wait for it through the busy handler: when another process (``custody agent add``,
    a second connection of the agent) is creating or opening the same database at that
    moment, it fails at once with "database is locked". So wait here, briefly."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def open_db(path: Path) -> sqlite_utils.Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        wal_mode(conn)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open device database {path}: {exc}") from exc
    db = sqlite_utils.Database(conn)
    _create_schema(db)
    return db


def _create_schema(db: sqlite_utils.Database) -> None:
    # No surrounding transaction: sqlite-utils commits each create itself.
    Table(db, "journal").create(
        {
            "seq": int,
            "hash": bytes,
            "kind": str,
            "record": bytes,
            "acked": int,
            "added_ms": int,
        },
        pk="seq",
        if_not_exists=True,
    )
    Table(db, "media").create(
        {
            "seq": int,
            "path": str,
            "size": int,
            "sha256": str,
            "media_type": str,
            "kind": str,
            "marked": int,
            "state": str,  # pending | receipted | rejected
            "acked_bytes": int,
            "added_ms": int,
            "receipt": bytes,
            "receipted_ms": int,
            "reason": str,
            "chunk_size": int,  # the piece size chunk_hashes was computed for
            "chunk_hashes": bytes,  # sha256 of each piece, concatenated (protocol.upload)
            "sealed_id": bytes,  # the sealed file's random id: ties the file to this row
        },
        pk="seq",
        if_not_exists=True,
    )
    media = Table(db, "media")
    for column, kind in (("chunk_size", int), ("chunk_hashes", bytes), ("sealed_id", bytes)):
        if column not in media.columns_dict:  # a database from before these columns
            try:
                media.add_column(column, kind)
            except sqlite3.OperationalError as exc:
                # `custody agent add` and the agent may upgrade the same file at once.
                if "duplicate column" not in str(exc):
                    raise
    Table(db, "kv").create({"key": str, "value": int}, pk="key", if_not_exists=True)
    db.execute("CREATE INDEX IF NOT EXISTS media_pending ON media(state, marked, seq)")
    db.execute("CREATE INDEX IF NOT EXISTS journal_unacked ON journal(acked, seq)")
    db.execute("CREATE INDEX IF NOT EXISTS journal_kind ON journal(kind, seq)")
    db.execute(
        "INSERT OR IGNORE INTO kv(key, value) VALUES ('schema_version', ?)", [SCHEMA_VERSION]
    )


@contextmanager
def immediate(db: sqlite_utils.Database, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front, committed on success.

    ``durable=False`` commits without fsync: safe against a crash of the process (WAL),
    not against power loss. The next durable commit makes it durable too (the WAL is
    sequential), which is what ``Outbox.purge`` relies on.
    """
    conn = db.conn
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous=FULL")


def bump_counter(db: sqlite_utils.Database, key: str) -> int:
    """Increment and return a persistent counter (committed before it is used)."""
    with immediate(db) as conn:
        conn.execute("INSERT OR IGNORE INTO kv(key, value) VALUES (?, 0)", [key])
        conn.execute("UPDATE kv SET value = value + 1 WHERE key = ?", [key])
        row = conn.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
    return int(row[0])


def add_to_counter(db: sqlite_utils.Database, key: str, amount: int) -> None:
    with immediate(db) as conn:
        conn.execute("INSERT OR IGNORE INTO kv(key, value) VALUES (?, 0)", [key])
        conn.execute("UPDATE kv SET value = value + ? WHERE key = ?", [amount, key])


def get_counter(db: sqlite_utils.Database, key: str) -> int:
    row = db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
    return int(row[0]) if row else 0


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
