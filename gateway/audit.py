"""The audit log: every write and every look at evidence, hash-chained (Art. 34).

Each row's ``hash`` is sha256 over the canonical encoding of the row (time, actor,
action, target, detail) and the previous row's hash, so deleting or editing a row breaks
every hash after it. The chain head is also put into the transparency log as an
``audit`` leaf (``checkpoint``, run by the ingest thread, the log's only writer), so a
holder of a signed tree head can prove the audit log was not rewritten either.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

from gateway.translog import TransparencyLog
from protocol.encoding import canonical

GENESIS = "0" * 64


def _row_hash(prev: str, at_ms: int, actor: str, action: str, target: str, detail: str) -> str:
    body = canonical(
        {
            "prev": prev,
            "at_ms": at_ms,
            "actor": actor,
            "action": action,
            "target": target,
            "detail": detail,
        }
    )
    return hashlib.sha256(body).hexdigest()


def record(
    conn: sqlite3.Connection,
    actor: str,
    action: str,
    target: str,
    now_ms: int,
    detail: dict[str, Any] | None = None,
) -> str:
    """Append one audit row inside the caller's transaction; returns its hash."""
    text = json.dumps(detail or {}, sort_keys=True, ensure_ascii=False)
    row = conn.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    prev = row[0] if row and row[0] else GENESIS
    h = _row_hash(prev, now_ms, actor, action, target, text)
    conn.execute(
        "INSERT INTO audit(at_ms, actor, action, target, detail, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [now_ms, actor, action, target, text, prev, h],
    )
    return h


def verify_chain(conn: sqlite3.Connection) -> list[str]:
    """Problems in the chain (empty when intact)."""
    problems = []
    prev = GENESIS
    for rid, at_ms, actor, action, target, detail, prev_hash, h in conn.execute(
        "SELECT id, at_ms, actor, action, target, detail, prev_hash, hash FROM audit ORDER BY id"
    ):
        if prev_hash != prev:
            problems.append(f"audit row {rid}: does not follow the row before it")
        if _row_hash(prev_hash or GENESIS, at_ms, actor, action, target, detail or "{}") != h:
            problems.append(f"audit row {rid}: its contents do not match its hash")
        prev = h
    return problems


def checkpoint_leaf(through_id: int, head: str) -> bytes:
    return canonical({"v": 1, "type": "audit", "through_id": through_id, "head": head})


def checkpoint(conn: sqlite3.Connection, log: TransparencyLog, now_ms: int) -> int | None:
    """Put the audit chain head into the transparency log if it moved; returns the leaf's
    index. Call inside a transaction on the log's writer thread."""
    head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    done = conn.execute("SELECT coalesce(max(through_id), 0) FROM audit_checkpoints").fetchone()
    if head is None or int(head[0]) <= int(done[0]):
        return None
    index = log.append(conn, checkpoint_leaf(int(head[0]), str(head[1])), now_ms)
    conn.execute(
        "INSERT INTO audit_checkpoints(through_id, head, log_index, at_ms) VALUES (?, ?, ?, ?)",
        [head[0], head[1], index, now_ms],
    )
    return index
