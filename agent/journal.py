"""The device's journal: append-only, hash-chained, signed, in the device database.

Appending allocates the next sequence number and links to the previous record's hash
under the database write lock, so two processes (the agent and ``custody agent add``)
can never fork the chain. A record is never updated except for its ``acked`` flag, and
never deleted.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

import sqlite_utils

from agent.db import immediate
from agent.sealed import RecordCipher
from protocol.encoding import decode
from protocol.fields import TIME_MS_MAX
from protocol.journal import GENESIS, JournalRecord, SignedRecord
from protocol.signing import SigningKey


def now_ms() -> int:
    """The device's wall clock in Unix ms, held within what the protocol carries (1970 to
    ``TIME_MS_MAX``): a clock gone wild must not make every record refused, the gateway's
    and the agent's own checks both, and so stop the device recording evidence."""
    return min(max(time.time_ns() // 1_000_000, 0), TIME_MS_MAX)


def record_context(device_id: str, seq: int) -> bytes:
    """What a sealed journal record is bound to: opened under another, it fails."""
    return f"{device_id}/journal/{seq}".encode()


class Journal:
    """``cipher`` (when the device has a data key) seals each stored record at rest: the
    records carry case context, names and places, which a copied device must not reveal.
    """

    def __init__(
        self,
        db: sqlite_utils.Database,
        device_id: str,
        key: SigningKey,
        cipher: RecordCipher | None = None,
        key_loader: Callable[[str], SigningKey] | None = None,
    ) -> None:
        self.db = db
        self.device_id = device_id
        self._key = key
        self._cipher = cipher
        self._key_loader = key_loader
        self._checked_rotation = 0

    def _context(self, seq: int) -> bytes:
        return record_context(self.device_id, seq)

    def _seal(self, seq: int, data: bytes) -> bytes:
        return data if self._cipher is None else self._cipher.seal(data, self._context(seq))

    def _open(self, seq: int, data: bytes) -> bytes:
        return data if self._cipher is None else self._cipher.open(data, self._context(seq))

    def append(
        self,
        kind: str,
        body: Mapping[str, Any],
        *,
        also: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> SignedRecord:
        """Sign and store the next record; ``also(conn, seq)`` runs in the same transaction."""
        with immediate(self.db) as conn:
            self._follow_rotation(conn)
            row = conn.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, bytes(row[1])) if row else (1, GENESIS)
            record = JournalRecord(
                device_id=self.device_id,
                seq=seq,
                prev=prev,
                kind=kind,
                wall_ms=now_ms(),
                mono_ns=time.monotonic_ns(),
                body=dict(body),
            ).sign(self._key)
            conn.execute(
                "INSERT INTO journal(seq, hash, kind, record, acked, added_ms) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                [seq, record.hash(), kind, self._seal(seq, record.encode()), record.record.wall_ms],
            )
            if also is not None:
                also(conn, seq)
        return record

    def _follow_rotation(self, conn: sqlite3.Connection) -> None:
        """Another process (the agent) may have rotated the key since we loaded ours: sign
        with the key the newest hand-over names, or every later record would be refused."""
        row = conn.execute(
            "SELECT seq, record FROM journal WHERE kind = 'key_rotation' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None or int(row[0]) == self._checked_rotation:
            return
        record = decode(self._open(int(row[0]), bytes(row[1])), what="stored record")
        wanted = str(record["body"]["new_public_key"])
        if wanted != self._key.verify_key.hex and self._key_loader is not None:
            self._key = self._key_loader(wanted)
        self._checked_rotation = int(row[0])

    def rotate_to(self, new_key: SigningKey) -> None:
        """Journal the hand-over (signed by the current key), then sign with ``new_key``."""
        self.append("key_rotation", {"new_public_key": new_key.verify_key.hex})
        self._key = new_key

    def head(self) -> tuple[int, bytes]:
        row = self.db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else (0, GENESIS)

    def unacked(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest records the gateway has not acknowledged, in sequence order."""
        rows = self.db.execute(
            "SELECT seq, record FROM journal WHERE acked = 0 ORDER BY seq LIMIT ?", [limit]
        ).fetchall()
        return [(int(s), self._open(int(s), bytes(r))) for s, r in rows]

    def records(self, kind: str) -> list[JournalRecord]:
        """Every stored record of ``kind``, opened (for status and summaries)."""
        rows = self.db.execute(
            "SELECT seq, record FROM journal WHERE kind = ? ORDER BY seq", [kind]
        ).fetchall()
        return [
            SignedRecord.from_wire(
                decode(self._open(int(s), bytes(r)), what="stored record")
            ).record
            for s, r in rows
        ]

    def hash_at(self, seq: int) -> bytes | None:
        row = self.db.execute("SELECT hash FROM journal WHERE seq = ?", [seq]).fetchone()
        return bytes(row[0]) if row else None

    def mark_acked(self, through: int) -> int:
        with immediate(self.db) as conn:
            cur = conn.execute(
                "UPDATE journal SET acked = 1 WHERE acked = 0 AND seq <= ?", [through]
            )
        return cur.rowcount

    def unacked_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM journal WHERE acked = 0").fetchone()[0])


def last_handover(
    db: sqlite_utils.Database, device_id: str, cipher: RecordCipher | None
) -> str | None:
    """The public key the newest ``key_rotation`` record hands over to, if any."""
    row = db.execute(
        "SELECT seq, record FROM journal WHERE kind = 'key_rotation' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    raw = bytes(row[1])
    if cipher is not None:
        raw = cipher.open(raw, record_context(device_id, int(row[0])))
    record = decode(raw, what="stored record")
    return str(record["body"]["new_public_key"])
