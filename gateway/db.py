"""The gateway database (SQLite through sqlite-utils, WAL).

Append-only by construction: ``journal``, ``evidence``, ``log_leaves`` and ``audit`` rows
are inserted and never updated or deleted by any code path; ``devices``, ``uploads`` and
``alarms`` hold mutable state about those facts. ``synchronous=FULL`` because a receipt is
sent only after the commit that records it, and must survive power loss.

The ingest thread is the only writer inside the gateway; ``custody enroll`` may write the
``devices`` table from another process while the gateway runs (WAL + busy timeout).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import Table


def connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return sqlite_utils.Database(conn)


def open_db(path: Path) -> sqlite_utils.Database:
    db = connect(path)
    create_schema(db)
    return db


@contextmanager
def transaction(db: sqlite_utils.Database, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """A write transaction. ``durable=False`` skips the fsync at commit (WAL stays
    consistent; the commit may be lost on power failure, never half-applied).

    Use it only where losing the commit is safe: upload range checkpoints (the device
    resends from an older checkpoint), telemetry and online state. Every commit that a
    message to a device depends on (journal acks, receipts) stays durable. On ext4 every
    fsync also flushes other files' dirty data, so needless ones slow the whole gateway.
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


def create_schema(db: sqlite_utils.Database) -> None:
    # No surrounding transaction: sqlite-utils commits each create itself.
    Table(db, "devices").create(
        {
            "device_id": str,
            "public_key": str,
            "status": str,  # active | revoked
            "enrolled_at": str,
            "online": int,
            "bd_seq": int,
            "last_seen_ms": int,
            "telemetry": str,
            "head_seq": int,
            "head_hash": str,
            "batch_counter": int,
            "last_batch_hash": str,
        },
        pk="device_id",
        not_null={"public_key", "status"},
        defaults={"online": 0, "bd_seq": 0, "head_seq": 0, "batch_counter": 0},
        if_not_exists=True,
    )
    Table(db, "journal").create(
        {
            "device_id": str,
            "seq": int,
            "hash": str,
            "kind": str,
            "wall_ms": int,
            "record": str,
            "received_ms": int,
            "log_index": int,
            "gap_before": int,
        },
        pk=("device_id", "seq"),
        if_not_exists=True,
    )
    Table(db, "uploads").create(
        {
            "device_id": str,
            "seq": int,
            "size": int,
            "sha256": str,
            "ranges": str,  # durable (fsync'd) byte ranges, JSON
            "bytes_received": int,
            "inits": int,
            "resumed_from": int,  # bytes already held at the first resume, -1 none
            "state": str,  # receiving | complete | rejected
            "reason": str,
            "updated_ms": int,
        },
        pk=("device_id", "seq"),
        if_not_exists=True,
    )
    Table(db, "evidence").create(
        {
            "id": int,
            "device_id": str,
            "seq": int,
            "kind": str,
            "media_type": str,
            "name": str,
            "marked": int,
            "sha256": str,
            "size": int,
            "verified": int,
            "captured_ms": int,
            "received_ms": int,
            "log_index": int,
        },
        pk="id",
        if_not_exists=True,
    )
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS evidence_device_seq ON evidence(device_id, seq)")
    Table(db, "log_leaves").create(
        {"idx": int, "leaf_hash": bytes, "leaf": str, "created_ms": int},
        pk="idx",
        if_not_exists=True,
    )
    Table(db, "alarms").create(
        {
            "id": int,
            "kind": str,
            "device_id": str,
            "detail": str,
            "dedupe": str,
            "count": int,
            "first_ms": int,
            "last_ms": int,
            "state": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS alarms_dedupe ON alarms(dedupe)")
    Table(db, "certificates").create(
        {
            "serial": str,  # hex
            "device_id": str,
            "not_after": str,
            "issued_at": str,
            "revoked": int,
        },
        pk="serial",
        defaults={"revoked": 0},
        if_not_exists=True,
    )
    Table(db, "device_keys").create(
        {"device_id": str, "from_seq": int, "public_key": str, "at_ms": int},
        pk=("device_id", "from_seq"),
        if_not_exists=True,
    )
    Table(db, "commands").create(
        {
            "device_id": str,
            "cmd_id": int,
            "name": str,
            "args": str,
            "issued_ms": int,
            "expires_ms": int,
            "state": str,  # pending | sent
            "created_by": str,
        },
        pk=("device_id", "cmd_id"),
        if_not_exists=True,
    )
    Table(db, "audit").create(
        {"id": int, "at_ms": int, "actor": str, "action": str, "target": str},
        pk="id",
        if_not_exists=True,
    )
