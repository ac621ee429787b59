"""Ingest: every message a device sends, verified, stored, answered.

``Ingest.handle(topic, payload)`` is the whole gateway policy, free of MQTT: it returns
the messages to publish back. The rules (DESIGN guarantees 1–3):

* A journal batch is accepted only from an enrolled, active device, with a valid envelope
  signature and a counter above the last one seen (an older counter is a **replay**).
  Each record must carry a valid signature and extend the device's chain; a skipped
  sequence number is accepted but raises **sequence_gap** (records were deleted on the
  device or in transit); a different record at a known sequence number or a broken
  ``prev`` link is a **fork** and is refused.
* Media is streamed to a part file, verified against the sha256 in its signed manifest,
  moved into the content-addressed blob store, committed, appended to the transparency
  log, and only then receipted. A mismatch is a **hash_mismatch** alarm; nothing is
  stored under that record.
* Nothing already stored is updated: accepted journal rows, evidence rows, and log leaves
  are insert-only. Re-sent messages are answered again, idempotently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from gateway.alarms import raise_alarm
from gateway.blobs import BlobStore
from gateway.datadir import DataDir
from gateway.db import transaction
from gateway.translog import TransparencyLog
from gateway.uploads import (
    ActiveUpload,
    ActiveUploads,
    ranges_from_json,
    ranges_to_json,
)
from protocol.encoding import decode
from protocol.errors import MessageError, ProtocolError, SignatureError
from protocol.journal import GENESIS, MEDIA_KINDS, Link, MediaInfo, check_link
from protocol.receipt import JournalAck, Receipt, evidence_leaf, record_leaf
from protocol.signing import SigningKey, VerifyKey
from protocol.state import DeviceState, Telemetry
from protocol.topics import DeviceTopic, GatewayTopic, gateway_topic, parse_device_topic
from protocol.upload import Chunk, JournalBatch, UploadAck, UploadFin, UploadInit

log = logging.getLogger("custody.gateway.ingest")
events = logging.getLogger("custody.events")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Device:
    device_id: str
    public_key: VerifyKey
    status: str
    head_seq: int
    head_hash: bytes
    batch_counter: int
    last_batch_hash: str
    bd_seq: int


class Ingest:
    def __init__(self, data: DataDir, db: sqlite_utils.Database, key: SigningKey) -> None:
        self.db = db
        self.key = key
        self.log = TransparencyLog(db, key)
        self.blobs = BlobStore(data.blobs)
        self.active = ActiveUploads(data.partial)

    # -- entry point ---------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        try:
            parsed = parse_device_topic(topic)
        except ProtocolError as exc:
            log.warning("ignored message on %s: %s", topic, exc)
            return []
        device_id, kind = parsed.device_id, parsed.kind
        try:
            if kind is DeviceTopic.JOURNAL:
                return self.on_journal(device_id, payload)
            if kind is DeviceTopic.UPLOAD_CHUNK:
                return self.on_chunk(device_id, Chunk.decode(payload))
            if kind is DeviceTopic.UPLOAD_INIT:
                return self.on_init(device_id, UploadInit.decode(payload))
            if kind is DeviceTopic.UPLOAD_FIN:
                return self.on_fin(device_id, UploadFin.decode(payload))
            if kind is DeviceTopic.STATE:
                return self.on_state(device_id, payload)
            return self.on_telemetry(device_id, payload)
        except ProtocolError as exc:
            if payload == b"" and kind is DeviceTopic.STATE:
                return []  # a retained state being cleared
            kind_name = "bad_signature" if isinstance(exc, SignatureError) else "bad_message"
            self._alarm(kind_name, device_id, f"{kind.value}: {exc}", key=f"{kind.value}")
            return []

    # -- helpers -------------------------------------------------------------------------

    def device(self, device_id: str) -> Device | None:
        row = self.db.execute(
            "SELECT device_id, public_key, status, head_seq, head_hash, batch_counter, "
            "last_batch_hash, bd_seq FROM devices WHERE device_id = ?",
            [device_id],
        ).fetchone()
        if row is None:
            return None
        return Device(
            row[0],
            VerifyKey.from_hex(row[1]),
            row[2],
            int(row[3] or 0),
            bytes.fromhex(row[4]) if row[4] else GENESIS,
            int(row[5] or 0),
            row[6] or "",
            int(row[7] or 0),
        )

    def _alarm(self, kind: str, device_id: str, detail: str, key: str = "") -> None:
        with transaction(self.db) as conn:
            raise_alarm(conn, kind, device_id, detail, now_ms(), key)

    def _active_device(self, device_id: str) -> Device | None:
        dev = self.device(device_id)
        if dev is None:
            self._alarm("unknown_device", device_id, f"{device_id} is not enrolled", key="x")
            return None
        if dev.status != "active":
            self._alarm("revoked_device", device_id, f"{device_id} is {dev.status}", key="x")
            return None
        return dev

    def _upload_ack(
        self, device_id: str, seq: int, state: str, ranges: Any = (), reason: str = ""
    ) -> Outgoing:
        ack = UploadAck(device_id, seq, state, tuple(ranges), reason, now_ms())
        return Outgoing(gateway_topic(device_id, GatewayTopic.UPLOAD_ACK), ack.encode(self.key))

    # -- journal -------------------------------------------------------------------------

    def on_journal(self, device_id: str, payload: bytes) -> list[Outgoing]:
        claimed = JournalBatch.peek_device(payload)
        if claimed != device_id:
            self._alarm(
                "topic_mismatch",
                device_id,
                f"journal batch claiming to be from {claimed} arrived on {device_id}'s topic",
            )
            return []
        dev = self._active_device(device_id)
        if dev is None:
            return [self._journal_ack(device_id, 0, GENESIS, 1, "unknown_device", "not enrolled")]
        try:
            batch = JournalBatch.decode(payload, dev.public_key)
        except SignatureError as exc:
            self._alarm("bad_signature", device_id, f"journal batch: {exc}", key="batch")
            return [
                self._journal_ack(
                    device_id,
                    dev.head_seq,
                    dev.head_hash,
                    dev.head_seq + 1,
                    "bad_signature",
                    str(exc),
                )
            ]
        batch_hash = hashlib.sha256(payload).hexdigest()
        if batch.counter <= dev.batch_counter:
            if batch.counter == dev.batch_counter and batch_hash == dev.last_batch_hash:
                # The broker redelivered the last message (e.g. we crashed before PUBACK).
                return [self._journal_ack(device_id, dev.head_seq, dev.head_hash)]
            self._alarm(
                "replay",
                device_id,
                f"journal batch counter {batch.counter} is not above the last seen "
                f"{dev.batch_counter}: a replayed message (records "
                f"{batch.records[0].record.seq}..{batch.records[-1].record.seq})",
                key=str(batch.counter),
            )
            return []
        return [self._accept_batch(dev, batch, batch_hash)]

    def _accept_batch(self, dev: Device, batch: JournalBatch, batch_hash: str) -> Outgoing:
        head_seq, head_hash = dev.head_seq, dev.head_hash
        rejected_seq, reason, detail = 0, "", ""
        received = now_ms()
        accepted: list[int] = []
        try:
            with transaction(self.db) as conn:
                for signed in batch.records:
                    rec = signed.record
                    try:
                        signed.verify(dev.public_key)
                    except SignatureError as exc:
                        rejected_seq, reason, detail = rec.seq, "bad_signature", str(exc)
                        raise_alarm(
                            conn,
                            "bad_signature",
                            dev.device_id,
                            detail,
                            received,
                            key=f"record {rec.seq}",
                        )
                        break
                    link = check_link(head_seq, head_hash, rec)
                    if link is Link.BEHIND:
                        stored = conn.execute(
                            "SELECT hash FROM journal WHERE device_id = ? AND seq = ?",
                            [dev.device_id, rec.seq],
                        ).fetchone()
                        if stored is not None and stored[0] == signed.hash().hex():
                            continue  # already have exactly this record
                        rejected_seq, reason = rec.seq, "fork"
                        detail = (
                            f"a different record for seq {rec.seq} (already accepted "
                            f"{'another' if stored else 'a gap there'}): journal rewritten?"
                        )
                        raise_alarm(
                            conn, "fork", dev.device_id, detail, received, key=f"seq {rec.seq}"
                        )
                        break
                    if link is Link.BROKEN:
                        rejected_seq, reason = rec.seq, "fork"
                        detail = (
                            f"seq {rec.seq} does not link to seq {head_seq}: its prev hash "
                            "differs, the journal was rewritten or forked"
                        )
                        raise_alarm(
                            conn, "fork", dev.device_id, detail, received, key=f"seq {rec.seq}"
                        )
                        break
                    gap = link is Link.GAP
                    if gap:
                        raise_alarm(
                            conn,
                            "sequence_gap",
                            dev.device_id,
                            f"records {head_seq + 1}..{rec.seq - 1} never arrived before seq "
                            f"{rec.seq}: possible deletion on the device (Art. 34)",
                            received,
                            key=f"gap {head_seq + 1}",
                        )
                    index = self.log.append(conn, record_leaf(signed), received)
                    conn.execute(
                        "INSERT INTO journal(device_id, seq, hash, kind, wall_ms, record, "
                        "received_ms, log_index, gap_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            dev.device_id,
                            rec.seq,
                            signed.hash().hex(),
                            rec.kind,
                            rec.wall_ms,
                            signed.encode().decode(),
                            received,
                            index,
                            int(gap),
                        ],
                    )
                    head_seq, head_hash = rec.seq, signed.hash()
                    accepted.append(rec.seq)
                conn.execute(
                    "UPDATE devices SET head_seq = ?, head_hash = ?, batch_counter = ?, "
                    "last_batch_hash = ? WHERE device_id = ?",
                    [head_seq, head_hash.hex(), batch.counter, batch_hash, dev.device_id],
                )
        except BaseException:
            self.log.reload()
            raise
        if accepted:
            events.info("%s journal seq %d..%d accepted", dev.device_id, accepted[0], accepted[-1])
        return self._journal_ack(dev.device_id, head_seq, head_hash, rejected_seq, reason, detail)

    def _journal_ack(
        self,
        device_id: str,
        head_seq: int,
        head_hash: bytes,
        rejected_seq: int = 0,
        reason: str = "",
        detail: str = "",
    ) -> Outgoing:
        ack = JournalAck(device_id, head_seq, head_hash, rejected_seq, reason, detail, now_ms())
        return Outgoing(gateway_topic(device_id, GatewayTopic.JOURNAL_ACK), ack.encode(self.key))

    # -- uploads -------------------------------------------------------------------------

    def _manifest(self, device_id: str, seq: int) -> tuple[MediaInfo, dict[str, Any]] | None:
        row = self.db.execute(
            "SELECT kind, record FROM journal WHERE device_id = ? AND seq = ?", [device_id, seq]
        ).fetchone()
        if row is None or row[0] not in MEDIA_KINDS:
            return None
        record = decode(row[1].encode(), what="stored record")
        return MediaInfo.from_body(record["body"]), record

    def _upload(self, device_id: str, seq: int) -> ActiveUpload | None:
        """The upload for (device, seq), from memory, the database, or its manifest."""
        up = self.active.get(device_id, seq)
        if up is not None:
            return up
        found = self._manifest(device_id, seq)
        if found is None:
            return None
        info, _ = found
        row = self.db.execute(
            "SELECT ranges, bytes_received, inits, resumed_from FROM uploads "
            "WHERE device_id = ? AND seq = ?",
            [device_id, seq],
        ).fetchone()
        up = ActiveUpload(
            device_id, seq, info.size, info.sha256, self.active.part_path(device_id, seq)
        )
        if row is None:
            with transaction(self.db) as conn:
                conn.execute(
                    "INSERT INTO uploads(device_id, seq, size, sha256, ranges, bytes_received, "
                    "inits, resumed_from, state, reason, updated_ms) "
                    "VALUES (?, ?, ?, ?, '[]', 0, 0, -1, 'receiving', '', ?)",
                    [device_id, seq, info.size, info.sha256.hex(), now_ms()],
                )
        else:
            up.ranges = up.durable = ranges_from_json(row[0])
            up.bytes_received, up.inits, up.resumed_from = int(row[1]), int(row[2]), int(row[3])
            if up.ranges and up.resumed_from < 0:
                # Picked up again after a gateway restart: resume from the durable ranges.
                up.resumed_from = sum(e - s for s, e in up.ranges)
                events.info(
                    "%s seq %d resumes after restart: %d of %d bytes held",
                    device_id,
                    seq,
                    up.resumed_from,
                    up.size,
                )
        for old in self.active.put(up):
            self._checkpoint(old)
            old.close()
        return up

    def _checkpoint(self, up: ActiveUpload) -> None:
        up.sync()
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE uploads SET ranges = ?, bytes_received = ?, inits = ?, resumed_from = ?, "
                "updated_ms = ? WHERE device_id = ? AND seq = ?",
                [
                    ranges_to_json(up.durable),
                    up.bytes_received,
                    up.inits,
                    up.resumed_from,
                    now_ms(),
                    up.device_id,
                    up.seq,
                ],
            )

    def _settled(self, device_id: str, seq: int) -> list[Outgoing] | None:
        """Replies for an upload that is already finished (complete or rejected), else None."""
        ev = self.db.execute(
            "SELECT size FROM evidence WHERE device_id = ? AND seq = ?", [device_id, seq]
        ).fetchone()
        if ev is not None:
            return [
                self._upload_ack(device_id, seq, "complete", [(0, int(ev[0]))] if ev[0] else []),
                self.receipt(device_id, seq),
            ]
        row = self.db.execute(
            "SELECT reason FROM uploads WHERE device_id = ? AND seq = ? AND state = 'rejected'",
            [device_id, seq],
        ).fetchone()
        if row is not None:
            return [self._upload_ack(device_id, seq, "rejected", reason=row[0])]
        return None

    def on_init(self, device_id: str, init: UploadInit) -> list[Outgoing]:
        if init.device_id != device_id or self._active_device(device_id) is None:
            return []
        settled = self._settled(device_id, init.seq)
        if settled is not None:
            return settled
        found = self._manifest(device_id, init.seq)
        if found is None:
            return [self._upload_ack(device_id, init.seq, "unknown")]
        info, _ = found
        if info.sha256 != init.sha256 or info.size != init.size:
            self._alarm(
                "manifest_mismatch",
                device_id,
                f"upload init for seq {init.seq} names sha256/size that differ from its "
                "signed manifest",
                key=str(init.seq),
            )
            return [self._upload_ack(device_id, init.seq, "rejected", reason="manifest_mismatch")]
        up = self._upload(device_id, init.seq)
        assert up is not None
        up.inits += 1
        if up.inits > 1 and up.resumed_from < 0 and up.ranges:
            up.resumed_from = sum(e - s for s, e in up.ranges)
            events.info(
                "%s seq %d resumes: %d of %d bytes already held",
                device_id,
                init.seq,
                up.resumed_from,
                up.size,
            )
        self._checkpoint(up)
        if up.complete:
            return self._finalize(up)
        return [self._upload_ack(device_id, init.seq, "receiving", up.ranges)]

    def on_chunk(self, device_id: str, chunk: Chunk) -> list[Outgoing]:
        if chunk.device_id != device_id:
            self._alarm(
                "topic_mismatch",
                device_id,
                f"chunk claiming {chunk.device_id} on {device_id}'s topic",
            )
            return []
        if self._active_device(device_id) is None:
            return []
        up = self._upload(device_id, chunk.seq)
        if up is None:
            settled = self._settled(device_id, chunk.seq)
            return settled or [self._upload_ack(device_id, chunk.seq, "unknown")]
        if chunk.offset + len(chunk.data) > up.size:
            self._alarm(
                "bad_message",
                device_id,
                f"chunk at {chunk.offset}+{len(chunk.data)} exceeds seq {chunk.seq}'s "
                f"size {up.size}",
                key=f"bounds {chunk.seq}",
            )
            return []
        up.write(chunk.offset, chunk.data)
        if up.complete:
            return self._finalize(up)
        if up.checkpoint_due():
            self._checkpoint(up)
        return [self._upload_ack(device_id, chunk.seq, "receiving", up.ranges)]

    def on_fin(self, device_id: str, fin: UploadFin) -> list[Outgoing]:
        if fin.device_id != device_id or self._active_device(device_id) is None:
            return []
        settled = self._settled(device_id, fin.seq)
        if settled is not None:
            return settled
        up = self._upload(device_id, fin.seq)
        if up is None:
            return [self._upload_ack(device_id, fin.seq, "unknown")]
        if up.complete:
            return self._finalize(up)
        return [self._upload_ack(device_id, fin.seq, "receiving", up.ranges)]

    def _finalize(self, up: ActiveUpload) -> list[Outgoing]:
        up.open()  # an empty file never saw a chunk, so its part file may not exist yet
        up.sync()
        digest = up.digest()
        up.close()
        self.active.drop(up.device_id, up.seq)
        received = now_ms()
        if digest != up.sha256:
            with transaction(self.db) as conn:
                raise_alarm(
                    conn,
                    "hash_mismatch",
                    up.device_id,
                    f"media of seq {up.seq} has sha256 {digest.hex()[:16]}… but its signed "
                    f"manifest says {up.sha256.hex()[:16]}…: altered on the device or in transit",
                    received,
                    key=str(up.seq),
                )
                conn.execute(
                    "UPDATE uploads SET state = 'rejected', reason = 'hash_mismatch', "
                    "updated_ms = ? WHERE device_id = ? AND seq = ?",
                    [received, up.device_id, up.seq],
                )
            up.path.unlink(missing_ok=True)
            return [self._upload_ack(up.device_id, up.seq, "rejected", reason="hash_mismatch")]
        found = self._manifest(up.device_id, up.seq)
        assert found is not None
        _, record = found
        self.blobs.adopt(up.path, up.sha256.hex())
        body = record["body"]
        try:
            with transaction(self.db) as conn:
                index = self.log.append(
                    conn,
                    evidence_leaf(up.device_id, up.seq, up.sha256, up.size, received),
                    received,
                )
                conn.execute(
                    "INSERT INTO evidence(device_id, seq, kind, media_type, name, marked, sha256, "
                    "size, verified, captured_ms, received_ms, log_index) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                    [
                        up.device_id,
                        up.seq,
                        record["kind"],
                        body["media_type"],
                        str(body.get("name", "")),
                        int(bool(body.get("marked"))),
                        up.sha256.hex(),
                        up.size,
                        record["wall_ms"],
                        received,
                        index,
                    ],
                )
                conn.execute(
                    "UPDATE uploads SET state = 'complete', ranges = ?, bytes_received = ?, "
                    "inits = ?, resumed_from = ?, updated_ms = ? WHERE device_id = ? AND seq = ?",
                    [
                        ranges_to_json(up.ranges),
                        up.bytes_received,
                        up.inits,
                        up.resumed_from,
                        received,
                        up.device_id,
                        up.seq,
                    ],
                )
        except BaseException:
            self.log.reload()
            raise
        events.info(
            "%s evidence seq=%d %d bytes verified, log#%d", up.device_id, up.seq, up.size, index
        )
        return [
            self._upload_ack(up.device_id, up.seq, "complete", [(0, up.size)] if up.size else []),
            self.receipt(up.device_id, up.seq),
        ]

    def receipt(self, device_id: str, seq: int) -> Outgoing:
        row = self.db.execute(
            "SELECT sha256, size, received_ms, log_index FROM evidence "
            "WHERE device_id = ? AND seq = ?",
            [device_id, seq],
        ).fetchone()
        sha, size, received, index = bytes.fromhex(row[0]), int(row[1]), int(row[2]), int(row[3])
        head = self.log.tree_head(now_ms())
        receipt = Receipt(
            device_id,
            seq,
            sha,
            size,
            received,
            index,
            head,
            tuple(self.log.inclusion(index, head.tree_size)),
        )
        return Outgoing(gateway_topic(device_id, GatewayTopic.RECEIPT), receipt.encode(self.key))

    # -- state ---------------------------------------------------------------------------

    def on_state(self, device_id: str, payload: bytes) -> list[Outgoing]:
        if not payload:
            return []
        state = DeviceState.decode(payload)
        if state.device_id != device_id:
            raise MessageError(f"state names {state.device_id} on {device_id}'s topic")
        dev = self.device(device_id)
        if dev is None:
            return []
        with transaction(self.db) as conn:
            if state.online:
                conn.execute(
                    "UPDATE devices SET online = 1, bd_seq = ?, last_seen_ms = ? "
                    "WHERE device_id = ?",
                    [state.bd_seq, now_ms(), device_id],
                )
            else:
                # A Last Will from a superseded session must not mark a live device dead.
                conn.execute(
                    "UPDATE devices SET online = 0 WHERE device_id = ? AND bd_seq <= ?",
                    [device_id, state.bd_seq],
                )
        events.info(
            "%s %s (bd_seq %d)", device_id, "online" if state.online else "offline", state.bd_seq
        )
        return []

    def on_telemetry(self, device_id: str, payload: bytes) -> list[Outgoing]:
        tele = Telemetry.decode(payload)
        if tele.device_id != device_id:
            raise MessageError(f"telemetry names {tele.device_id} on {device_id}'s topic")
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET telemetry = ?, last_seen_ms = ? WHERE device_id = ?",
                [json.dumps(decode(payload, what="telemetry")), now_ms(), device_id],
            )
        return []

    def close(self) -> None:
        for up in self.active.all():
            try:
                self._checkpoint(up)
            except (OSError, sqlite3.Error) as exc:
                log.warning("checkpoint of %s/%d failed at shutdown: %s", up.device_id, up.seq, exc)
            up.close()
