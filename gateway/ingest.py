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
import time
from dataclasses import dataclass

import sqlite_utils

from gateway import audit, cases
from gateway.alarms import CLOCK_ALARM_MS, raise_alarm
from gateway.blobs import BlobStore
from gateway.datadir import DataDir
from gateway.db import storage_full, transaction
from gateway.evidence import Background, EvidenceIntake
from gateway.outgoing import Outgoing, now_ms
from gateway.translog import TransparencyLog
from gateway.uploads import ActiveUploads
from gateway.watch import watch
from protocol.command import Command
from protocol.errors import MessageError, ProtocolError, SignatureError
from protocol.journal import GENESIS, Link, check_link
from protocol.receipt import JournalAck, record_leaf
from protocol.signing import SigningKey, VerifyKey
from protocol.state import DeviceState, Telemetry
from protocol.topics import (
    DeviceTopic,
    GatewayTopic,
    device_topic,
    gateway_topic,
    parse_device_topic,
)
from protocol.upload import Chunk, JournalBatch, UploadFin, UploadInit

__all__ = ["Device", "Ingest", "Outgoing"]

TELEMETRY_BATCH = 256  # telemetry messages written at most in one transaction
log = logging.getLogger("custody.gateway.ingest")

STATUS_TTL_S = 1.0
STATUS_CACHE_MAX = 4096
events = logging.getLogger("custody.events")

TELEMETRY_KEEP_MS = 24 * 3600 * 1000

#: Recording stops whose signed reason an operator must act on (Guarantee 5: a full
#: buffer stops recording with a reason, and someone has to empty it).
STOP_ALARMS = {
    "storage_full": "storage_full",
    "battery_low": "battery_low",
    "error": "recording_error",
}


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
    def __init__(
        self,
        data: DataDir,
        db: sqlite_utils.Database,
        key: SigningKey,
        *,
        background: Background | None = None,
    ) -> None:
        self.db = db
        self.key = key
        self.log = TransparencyLog(db, key)
        self._status_cache: dict[str, tuple[bool, float]] = {}
        # Telemetry accepted but not yet written: (device, message text, received, decoded).
        self._telemetry: list[tuple[str, str, int, Telemetry]] = []
        self.evidence = EvidenceIntake(
            db,
            key,
            self.log,
            BlobStore(data.blobs),
            ActiveUploads(data.partial),
            is_active=lambda d: self._active_device(d) is not None,
            is_active_cached=self._is_active_cached,
            alarm=self._alarm,
            background=background,
        )

    # -- entry point ---------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes | memoryview) -> list[Outgoing]:
        """Act on one device message; ``payload`` may be a view into the received packet."""
        try:
            parsed = parse_device_topic(topic)
        except ProtocolError as exc:
            log.warning("ignored message on %s: %s", topic, exc)
            return []
        device_id, kind = parsed.device_id, parsed.kind
        if self._telemetry and kind is not DeviceTopic.TELEMETRY:
            self.write_telemetry()  # what came before this message is stored before it
        if kind is not DeviceTopic.UPLOAD_CHUNK:
            payload = bytes(payload)  # small control messages; their decoders take bytes
        try:
            if kind is DeviceTopic.JOURNAL:
                return self.on_journal(device_id, payload)
            if kind is DeviceTopic.UPLOAD_CHUNK:
                # Not hashed here: the whole-file hash covers every byte (see uploads).
                return self.evidence.on_chunk(device_id, Chunk.decode(payload, verify=False))
            if kind is DeviceTopic.UPLOAD_INIT:
                return self.evidence.on_init(device_id, UploadInit.decode(payload))
            if kind is DeviceTopic.UPLOAD_FIN:
                return self.evidence.on_fin(device_id, UploadFin.decode(payload))
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

    def _active_device(self, device_id: str, *, alarm_unknown: bool = True) -> Device | None:
        """The device if enrolled and active, else an alarm (one per device) and None.

        ``alarm_unknown=False`` for state and telemetry: on a broker without TLS anyone
        can publish those under made-up ids, and each would be an alarm row."""
        dev = self.device(device_id)
        if dev is None:
            if alarm_unknown:
                self._alarm("unknown_device", device_id, f"{device_id} is not enrolled", key="x")
            return None
        if dev.status != "active":
            self._alarm("revoked_device", device_id, f"{device_id} is {dev.status}", key="x")
            return None
        return dev

    def _is_active_cached(self, device_id: str, *, alarm_unknown: bool = True) -> bool:
        """Chunks arrive by the hundred per second; re-read the registry at most every
        ``STATUS_TTL_S`` for them (revocation still takes effect within that time). The
        cache is bounded: made-up ids must not grow it without end."""
        now = time.monotonic()
        cached = self._status_cache.get(device_id)
        if cached is not None and now - cached[1] < STATUS_TTL_S:
            return cached[0]
        active = self._active_device(device_id, alarm_unknown=alarm_unknown) is not None
        if len(self._status_cache) >= STATUS_CACHE_MAX:
            self._status_cache.clear()
        self._status_cache[device_id] = (active, now)
        return active

    # -- journal -------------------------------------------------------------------------

    def on_journal(self, device_id: str, payload: bytes) -> list[Outgoing]:
        claimed = JournalBatch.peek_device(payload)
        if claimed != device_id:
            self._alarm(
                "topic_mismatch",
                device_id,
                f"journal batch claiming to be from {claimed} arrived on {device_id}'s topic",
                key="journal",
            )
            return []
        dev = self._active_device(device_id)
        if dev is None:
            return [self._journal_ack(device_id, 0, GENESIS, 1, "unknown_device", "not enrolled")]
        try:
            batch = self._decode_batch(payload, dev.public_key)
        except SignatureError as exc:
            if self._resent_across_rotation(dev, payload):
                return [self._journal_ack(device_id, dev.head_seq, dev.head_hash)]
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

    def _resent_across_rotation(self, dev: Device, payload: bytes) -> bool:
        """A batch sent again after its ack was lost, when it carried a key hand-over.

        The device signs envelopes with the key before the hand-over until the gateway
        acknowledges it; the gateway already verifies with the new key, so the resend
        failed as a forgery (``bad_signature``). Accepted as a resend only when signed by
        the key just before the current one and when every record in it is already
        stored, byte for byte: it then changes nothing, and is answered with the head.
        """
        row = self.db.execute(
            "SELECT public_key FROM device_keys WHERE device_id = ? AND public_key != ? "
            "ORDER BY from_seq DESC LIMIT 1",
            [dev.device_id, dev.public_key.hex],
        ).fetchone()
        if row is None:
            return False
        try:
            batch = JournalBatch.decode(payload, VerifyKey.from_hex(row[0]))
        except ProtocolError:
            return False
        # The device's resend: a new counter, and it ends with the hand-over to the key
        # in use now (records after it travel under the new key). Anything else under
        # the old key (a replay of an older batch, say) is still a bad_signature.
        exact = hashlib.sha256(payload).hexdigest() == dev.last_batch_hash
        if batch.counter == dev.batch_counter and exact:
            return True  # the accepted hand-over batch itself, delivered twice (QoS 1)
        if batch.counter <= dev.batch_counter or not batch.records:
            return False
        last = batch.records[-1].record
        if last.kind != "key_rotation" or last.body.get("new_public_key") != dev.public_key.hex:
            return False
        for signed in batch.records:
            stored = self.db.execute(
                "SELECT hash FROM journal WHERE device_id = ? AND seq = ?",
                [dev.device_id, signed.record.seq],
            ).fetchone()
            if stored is None or stored[0] != signed.hash().hex():
                return False
        return True

    @staticmethod
    def _decode_batch(payload: bytes, key: VerifyKey) -> JournalBatch:
        """Verify the envelope with the device's key, or with a key the batch hands over
        to — only when the hand-over record itself verifies under the current key (an
        unverified announcement must not make a forged envelope acceptable)."""
        try:
            return JournalBatch.decode(payload, key)
        except SignatureError as first:
            for candidate in JournalBatch.announced_keys(payload, key):
                try:
                    return JournalBatch.decode(payload, candidate)
                except SignatureError:
                    continue
            raise first

    def _accept_batch(self, dev: Device, batch: JournalBatch, batch_hash: str) -> Outgoing:
        head_seq, head_hash = dev.head_seq, dev.head_hash
        key = dev.public_key  # changes at a key_rotation record
        rejected_seq, reason, detail = 0, "", ""
        received = now_ms()
        accepted: list[int] = []
        try:
            with transaction(self.db) as conn:
                for signed in batch.records:
                    rec = signed.record
                    try:
                        signed.verify(key)
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
                    if rec.kind == "key_rotation":
                        # Signed by the old key, names the new one: the chain continues.
                        key = VerifyKey.from_hex(str(rec.body.get("new_public_key")))
                        conn.execute(
                            "UPDATE devices SET public_key = ? WHERE device_id = ?",
                            [key.hex, dev.device_id],
                        )
                        conn.execute(
                            "INSERT INTO device_keys(device_id, from_seq, public_key, at_ms) "
                            "VALUES (?, ?, ?, ?)",
                            [dev.device_id, rec.seq + 1, key.hex, received],
                        )
                        events.info("%s journal key rotated at seq %d", dev.device_id, rec.seq)
                    if rec.kind == "tamper" and rec.body.get("opened") is True:
                        raise_alarm(
                            conn,
                            "tamper",
                            dev.device_id,
                            f"the device's tamper switch opened (seq {rec.seq}); inspect it "
                            "before trusting what it records next",
                            received,
                            key=f"tamper {rec.seq}",
                        )
                    if rec.kind == "recording_stopped":
                        stop_reason = str(rec.body.get("reason"))
                        stop_alarm = STOP_ALARMS.get(stop_reason)
                        if stop_alarm is not None:
                            raise_alarm(
                                conn,
                                stop_alarm,
                                dev.device_id,
                                f"recording {rec.body.get('recording_id')} stopped: {stop_reason}"
                                + (f" ({rec.body['detail']})" if rec.body.get("detail") else ""),
                                received,
                                key=f"stop {rec.seq}",
                            )
                    if rec.kind == "clock_sync":
                        offset = rec.body.get("offset_ms")
                        if isinstance(offset, int) and abs(offset) > CLOCK_ALARM_MS:
                            raise_alarm(
                                conn,
                                "clock_offset",
                                dev.device_id,
                                f"the device clock is {offset / 1000:+.1f} s off its "
                                f"{rec.body.get('source')} reference",
                                received,
                                key=str(rec.body.get("source")),
                            )
                    if rec.kind in ("command_executed", "command_rejected"):
                        # The device's own word on a numbered command: carried out, or
                        # accepted and then failed (no camera, a key it could not rotate).
                        # Refusals of forged or replayed commands carry no cmd_id.
                        cmd_id = rec.body.get("cmd_id")
                        if isinstance(cmd_id, int) and not isinstance(cmd_id, bool):
                            conn.execute(
                                "UPDATE commands SET state = ? WHERE device_id = ? AND "
                                "cmd_id = ? AND state IN ('pending', 'sent', 'executed')",
                                [
                                    "executed" if rec.kind == "command_executed" else "failed",
                                    dev.device_id,
                                    cmd_id,
                                ],
                            )
                    if rec.kind == "case_context":
                        cases.apply_terminal_context(
                            conn, dev.device_id, rec.seq, dict(rec.body), received
                        )
                    if rec.kind == "media_corrupt":
                        raise_alarm(
                            conn,
                            "media_corrupt",
                            dev.device_id,
                            f"the device reports its copy of seq {rec.body.get('media_seq')} "
                            f"unusable ({rec.body.get('reason')}); it was not uploaded",
                            received,
                            key=f"media {rec.body.get('media_seq')}",
                        )
                if accepted:
                    # Only a batch that carried at least one genuine record moves the replay
                    # counter: a forged envelope must not be able to lock the device out.
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

    # -- state ---------------------------------------------------------------------------

    def on_state(self, device_id: str, payload: bytes) -> list[Outgoing]:
        if not payload:
            return []
        state = DeviceState.decode(payload)
        if state.device_id != device_id:
            raise MessageError(f"state names {state.device_id} on {device_id}'s topic")
        # A revoked device is not shown online again (``revoke`` marked it offline), nor
        # is one never enrolled. A revoked device's state is most likely its retained
        # birth from before the revocation, handed to the gateway at every (re)connect:
        # cleared, so the alarm does not come back each time as if the device were
        # still trying to talk.
        if self._active_device(device_id, alarm_unknown=False) is None:
            if self.device(device_id) is None:
                return []
            return [Outgoing(device_topic(device_id, DeviceTopic.STATE), b"", retain=True)]
        with transaction(self.db, durable=False) as conn:
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
        if not self._is_active_cached(device_id, alarm_unknown=False):
            return []  # nothing of a revoked or unknown device is stored, telemetry neither
        self._telemetry.append((device_id, payload.decode("utf-8"), now_ms(), tele))
        if len(self._telemetry) >= TELEMETRY_BATCH:
            self.write_telemetry()
        return []

    def write_telemetry(self) -> None:
        """Store the telemetry accepted since the last write, in one transaction.

        A fleet sends thousands of telemetry messages a second, and a transaction of its
        own for each (two pragmas, BEGIN, COMMIT) cost more than the rows. They are
        written when the service has drained its queue (``flush``), before any other
        kind of message is handled (so order is kept), before housekeeping reads them,
        and every ``TELEMETRY_BATCH``. Telemetry is not evidence: a gateway crash loses
        at most the last batch, as a non-durable commit could.
        """
        pending, self._telemetry = self._telemetry, []
        if not pending:
            return
        try:
            with transaction(self.db, durable=False) as conn:
                # The message as the device sent it: decoded and checked already, so its
                # text is valid JSON (parsing it again to store it cost ≈ 30 µs).
                conn.executemany(
                    "UPDATE devices SET telemetry = ?, last_seen_ms = ? WHERE device_id = ?",
                    [(text, at, device_id) for device_id, text, at, _ in pending],
                )
                # History for the dashboard's charts and GPS track (pruned to a day by
                # ``housekeeping``, not here).
                conn.executemany(
                    "INSERT INTO telemetry_log(device_id, at_ms, battery_pct, backlog_items, "
                    "backlog_bytes, headroom_min, lat_e6, lon_e6, recording) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            device_id,
                            at,
                            t.battery_pct,
                            t.backlog_items,
                            t.backlog_bytes,
                            t.storage_headroom_min,
                            t.gps_lat_e6,
                            t.gps_lon_e6,
                            int(t.recording),
                        )
                        for device_id, _, at, t in pending
                    ],
                )
        except Exception as exc:  # never stop ingest over telemetry (sqlite, or a value it refuses)
            if storage_full(exc):  # the service says so, once a minute
                log.debug("telemetry dropped, disk full: %s", exc)
            else:
                log.exception(
                    "storing %d telemetry messages failed; they are dropped", len(pending)
                )

    def housekeeping(self) -> None:
        """Periodic work on the ingest thread: bind newly accepted manifests to case steps,
        and put the audit chain's head into the transparency log (this thread is the
        log's only writer)."""
        self.write_telemetry()  # the watch below reads it
        now = now_ms()
        try:
            with transaction(self.db) as conn:
                cases.bind_pending(conn, now)
                audit.checkpoint(conn, self.log, now)
                # Telemetry is not evidence (the journal is): a day of history is enough.
                conn.execute("DELETE FROM telemetry_log WHERE at_ms < ?", [now - TELEMETRY_KEEP_MS])
        except Exception:
            self.log.reload()  # the append may have been rolled back
            raise
        # Apart, so a failing check cannot hold up binding; not durable, because every
        # write it makes is recomputed from the facts on the next pass.
        with transaction(self.db, durable=False) as conn:
            watch(conn, now)

    def pending_commands(self) -> list[Outgoing]:
        """Commands queued through the API, signed and ready to publish (marked sent)."""
        # Only to devices that are online (a device has no persistent session, so a
        # command published while it is away would be lost); the rest wait for its birth.
        rows = self.db.execute(
            "SELECT c.device_id, c.cmd_id, c.name, c.args, c.issued_ms, c.expires_ms "
            "FROM commands c JOIN devices d ON d.device_id = c.device_id "
            "WHERE c.state = 'pending' AND d.online = 1 AND d.status = 'active' "
            "ORDER BY c.device_id, c.cmd_id"
        ).fetchall()
        now = now_ms()
        out = []
        with transaction(self.db, durable=False) as conn:
            conn.execute(
                "UPDATE commands SET state = 'expired' WHERE state = 'pending' AND expires_ms < ?",
                [now],
            )
            for device_id, cmd_id, name, args, issued, expires in rows:
                state = "sent"
                if expires < now:
                    continue
                try:
                    cmd = Command(device_id, cmd_id, name, issued, expires, json.loads(args))
                    payload = cmd.encode(self.key)
                except (ProtocolError, ValueError) as exc:
                    log.error("command %s/%d cannot be sent: %s", device_id, cmd_id, exc)
                    state = "failed"
                else:
                    out.append(Outgoing(gateway_topic(device_id, GatewayTopic.COMMAND), payload))
                conn.execute(
                    "UPDATE commands SET state = ? WHERE device_id = ? AND cmd_id = ?",
                    [state, device_id, cmd_id],
                )
        return out

    def flush(self, *, idle: bool = True) -> list[Outgoing]:
        """Called when a batch of messages is done: pending telemetry, coalesced acks."""
        self.write_telemetry()
        return self.evidence.flush(idle=idle)

    def close(self) -> None:
        self.write_telemetry()
        self.evidence.close()
