"""The gateway database (SQLite through sqlite-utils, WAL).

Append-only by construction: ``journal``, ``evidence``, ``log_leaves`` and ``audit`` rows
are inserted and never updated or deleted by any code path; ``devices``, ``uploads`` and
``alarms`` hold mutable state about those facts. ``synchronous=FULL`` because a receipt is
sent only after the commit that records it, and must survive power loss.

The ingest thread is the only writer inside the gateway; ``custody enroll`` may write the
``devices`` table from another process while the gateway runs (WAL + busy timeout).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import Table


def wal_mode(conn: sqlite3.Connection, attempts: int = 200) -> None:
    """Switch to WAL, waiting out another process that holds the lock: setting the journal
    mode does not go through SQLite's busy handler (``agent.db.wal_mode`` is the same;
    gateway and agent do not import each other)."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def connect(path: Path) -> sqlite_utils.Database:
    # Owner-only from the start (SQLite gives its -wal and -shm files the same mode): the
    # database holds password hashes and the whole registry, and a umask of 022 made it
    # readable by every local user unless systemd's UMask=0077 applied.
    # An existing one (from before this rule) is narrowed too, with its -wal and -shm.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    wal_mode(conn)  # custody enroll may be opening the database at the same moment
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
            "rechecks": int,  # whole-file mismatches that sent bytes back (gateway.uploads)
            "state": str,  # receiving | complete | rejected
            "reason": str,
            "updated_ms": int,
        },
        pk=("device_id", "seq"),
        defaults={"rechecks": 0},
        if_not_exists=True,
    )
    if "rechecks" not in Table(db, "uploads").columns_dict:
        # A gateway data directory from before the lazy chunk check.
        Table(db, "uploads").add_column("rechecks", int, not_null_default=0)
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
            "state": str,  # pending | sent | executed | failed | expired
            "created_by": str,
        },
        pk=("device_id", "cmd_id"),
        if_not_exists=True,
    )
    # Hash-chained (``gateway.audit``): every row commits to the one before; the chain head
    # is checkpointed into the transparency log by the ingest thread.
    Table(db, "audit").create(
        {
            "id": int,
            "at_ms": int,
            "actor": str,
            "action": str,
            "target": str,
            "detail": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="id",
        if_not_exists=True,
    )
    Table(db, "audit_checkpoints").create(
        {"through_id": int, "head": str, "log_index": int, "at_ms": int},
        pk="through_id",
        if_not_exists=True,
    )
    Table(db, "telemetry_log").create(
        {
            "device_id": str,
            "at_ms": int,
            "battery_pct": int,
            "backlog_items": int,
            "backlog_bytes": int,
            "headroom_min": int,
            "lat_e6": int,
            "lon_e6": int,
            "recording": int,
        },
        if_not_exists=True,
    )
    db.execute("CREATE INDEX IF NOT EXISTS telemetry_log_at ON telemetry_log(device_id, at_ms)")
    db.execute("CREATE INDEX IF NOT EXISTS telemetry_log_age ON telemetry_log(at_ms)")
    _create_case_schema(db)
    from gateway.watch import ensure_schema as ensure_watch_schema

    ensure_watch_schema(db)


def _create_case_schema(db: sqlite_utils.Database) -> None:
    """Registry, cases and their evidence (``gateway.access``, ``gateway.cases``).

    Facts are insert-only here too: step times change through ``step_history`` rows (the
    ``steps`` row holds the current value, the history every value it ever had), a
    binding is never edited — a newer ``bindings`` row supersedes it — and corrections go
    through ``amendments``.
    """
    Table(db, "agencies").create(
        {
            "id": str,
            "name": str,
            "level": str,  # city | district
            "district": str,  # district code for district-level agencies
            "parent_id": str,  # the city-level agency of a vertically managed system
            "created_ms": int,
        },
        pk="id",
        not_null={"name", "level"},
        if_not_exists=True,
    )
    Table(db, "officers").create(
        {"id": str, "name": str, "agency_id": str, "created_ms": int},
        pk="id",  # the enforcement certificate number
        not_null={"agency_id"},
        if_not_exists=True,
    )
    Table(db, "assignments").create(
        {"id": int, "device_id": str, "officer_id": str, "from_ms": int, "by": str},
        pk="id",
        if_not_exists=True,
    )
    Table(db, "users").create(
        {
            "name": str,
            "role": str,
            "agency_id": str,
            "district": str,
            "password_hash": str,
            "created_ms": int,
            "disabled": int,
        },
        pk="name",
        not_null={"role"},
        defaults={"disabled": 0},
        if_not_exists=True,
    )
    Table(db, "tokens").create(
        {"token_hash": str, "user": str, "label": str, "created_ms": int, "expires_ms": int},
        pk="token_hash",
        if_not_exists=True,
    )
    Table(db, "cases").create(
        {
            "id": str,
            "agency_id": str,
            "case_type": str,
            "title": str,
            "catalogue_version": str,
            "created_ms": int,
            "created_by": str,
        },
        pk="id",
        not_null={"agency_id", "case_type"},
        if_not_exists=True,
    )
    Table(db, "steps").create(
        {
            "id": int,
            "case_id": str,
            "step_type": str,
            "name": str,
            "officers": str,  # JSON list of officer ids
            "recording_required": int,
            "start_ms": int,
            "end_ms": int,
            "created_ms": int,
        },
        pk="id",
        not_null={"case_id", "step_type"},
        if_not_exists=True,
    )
    Table(db, "step_history").create(
        {
            "id": int,
            "step_id": int,
            "at_ms": int,
            "actor": str,
            "field": str,
            "old": str,
            "new": str,
            "reason": str,
        },
        pk="id",
        if_not_exists=True,
    )
    Table(db, "bindings").create(
        {
            "id": int,
            "device_id": str,
            "seq": int,  # the media journal record (manifest) the binding is about
            "step_id": int,  # null: explicitly unbound
            "method": str,  # explicit | officer_time | review | amendment
            "at_ms": int,
            "actor": str,
            "note": str,
        },
        pk="id",
        if_not_exists=True,
    )
    db.execute("CREATE INDEX IF NOT EXISTS bindings_item ON bindings(device_id, seq)")
    Table(db, "review_queue").create(
        {
            "device_id": str,
            "seq": int,
            "reason": str,  # ambiguous | unmatched | malformed
            "candidates": str,  # JSON list of step ids
            "state": str,  # open | resolved
            "opened_ms": int,
        },
        pk=("device_id", "seq"),
        if_not_exists=True,
    )
    Table(db, "amendments").create(
        {
            "id": int,
            "kind": str,  # rebind | step_times
            "case_id": str,
            "payload": str,  # JSON
            "reason": str,
            "state": str,  # pending | approved | rejected
            "requested_by": str,
            "requested_ms": int,
            "decided_by": str,
            "decided_ms": int,
            "decision_note": str,
        },
        pk="id",
        if_not_exists=True,
    )


def storage_full(exc: BaseException) -> bool:
    """A write refused for want of space: ENOSPC (or a quota) from a file, SQLITE_FULL
    ("database or disk is full") from the database."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "is full" in str(exc)
