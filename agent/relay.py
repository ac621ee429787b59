"""The relay: moves the journal and the outbox to the gateway, and nothing else decides
when evidence may be deleted.

One thread owns all relay state and the database connection; transport events arrive on
a queue. Per connection the relay

1. sends unacknowledged journal records in signed batches, one batch in flight, each
   envelope with a fresh persisted counter (the gateway treats an old counter as a replay);
2. uploads media whose manifest the gateway accepted, marked evidence first: ``init``
   (the gateway answers with the byte ranges it already holds, so an upload resumes
   where it stopped rather than from zero), then offset-addressed chunks with at most
   ``window`` unacknowledged, then ``fin``;
3. deletes a local file only through ``Outbox.settle`` with a receipt that verifies.

Anything unanswered after ``ack_timeout_s`` is sent again; the gateway is idempotent, so
duplicates cost bandwidth, never correctness. Bad gateway messages are logged and
dropped; they never crash the relay.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commands import CommandFailed, CommandGate
from agent.config import AgentConfig
from agent.db import add_to_counter, bump_counter
from agent.errors import AgentError
from agent.hardware import DeviceHardware, HardwareState
from agent.journal import Journal, now_ms
from agent.outbox import SETTLE_S, MediaItem, Outbox
from agent.sealed import CorruptMedia
from agent.transport import Connected, Disconnected, Event, Message, Transport
from agent.uploading import TokenBucket, Upload
from protocol.encoding import decode
from protocol.errors import ProtocolError
from protocol.journal import SignedRecord
from protocol.receipt import JournalAck, Receipt
from protocol.signing import SigningKey, VerifyKey
from protocol.state import DeviceState, GatewayState, Telemetry
from protocol.throttle import Throttle
from protocol.topics import (
    GATEWAY_STATE,
    DeviceTopic,
    GatewayTopic,
    device_topic,
    parse_gateway_topic,
)
from protocol.upload import (
    Chunk,
    JournalBatch,
    UploadAck,
    UploadFin,
    UploadInit,
    missing,
    stored_chunk_hash,
    subtract,
)

if TYPE_CHECKING:
    from agent.recorder import Recorder

log = logging.getLogger("custody.agent.relay")
events = logging.getLogger("custody.events")

JOURNAL_REJECT_BACKOFF_S = 30.0
POLL_S = 0.02  # how soon evidence added by another process starts moving
PURGE_DELAY_S = 0.2
PURGE_BATCH = 32
PREFETCH = 16
MAX_TRACKED = 8
CLOCK_MAX_RTT_MS = 2000
CLOCK_DRIFT_MS = 1000
CLOCK_EVERY_S = 600.0
CLOCK_MIN_GAP_S = 10.0
#: Longest stretch the relay holds new chunks back while capture is behind.
MAX_YIELD_S = 0.5
READ_ATTEMPTS = 3  # reads of a media file that may fail before it is given up
RECOVER_EVERY_S = 300.0  # see ``Relay._recover_late``
SILENT_AFTER_ACK_TIMEOUTS = 6  # see ``Relay._warn_if_unanswered``
SEAL_EVERY_S = 0.5  # see ``Relay._seal_old_rows``
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.EAGAIN,
        errno.EINTR,
        errno.ENOMEM,
        errno.ESTALE,
        errno.EBUSY,
        errno.ETIMEDOUT,
    }
)


class Relay:
    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        outbox: Outbox,
        transport: Transport,
        key: SigningKey,
        rotate_key: Callable[[], SigningKey] | None = None,
        hardware: DeviceHardware | None = None,
        recorder: Recorder | None = None,
        previous_key: Callable[[], SigningKey | None] | None = None,
        forget_previous_key: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.outbox = outbox
        self.transport = transport
        self.key = key
        self.rotate_key = rotate_key
        self.hardware = hardware
        self.recorder = recorder
        self.case_context: dict[str, object] | None = None
        self.clock_logged: tuple[int, float] | None = None
        self.journal_sent_ms = 0
        self.previous_key = previous_key or (lambda: None)
        self.forget_previous_key = forget_previous_key or (lambda: None)
        self.gateway_key = VerifyKey.from_hex(config.gateway_public_key)
        self.device_id = config.device_id
        self.inbox: queue.Queue[Event] = queue.Queue()
        self.connected = False
        self.uploads: dict[int, Upload] = {}
        self.journal_inflight: tuple[int, float] | None = None
        self.gateway_online: bool | None = None
        self.gateway_session: str | None = None
        self.journal_retry_at = 0.0
        self.next_journal_poll = 0.0
        self.next_outbox_poll = 0.0
        self.upcoming: list[MediaItem] = []
        self.next_telemetry = 0.0
        self.bucket = TokenBucket(config.bandwidth_limit_bps, config.chunk_size * 2)
        self.bd_seq = bump_counter(journal.db, "bd_seq")
        self.receipts: list[tuple[Receipt, bytes]] = []
        self.commands = CommandGate(journal, config.device_id, self.gateway_key)
        self.to_purge: list[Path] = []
        self.purge_at = 0.0
        self.counters = {
            "chunks_sent": 0,
            "bytes_sent": 0,
            "receipts": 0,
            "resumes": 0,
            "yields_to_capture": 0,  # pumps that held new chunks back for capture
        }
        self.yield_since: float | None = None
        # seq -> when to try it again: the gateway did not know it, or it did not read
        self.unknown_until: dict[int, float] = {}
        self.read_failures: dict[int, int] = {}  # seq -> reads failed in a row
        self.next_recover = time.monotonic() + SETTLE_S + 1.0
        self.rows_sealed = False
        self.next_seal = 0.0
        self._step_failures: dict[str, Throttle] = {}  # one per step: see ``_guarded``
        self.heard_at = time.monotonic()  # the last acknowledgement or receipt
        self.waiting_since: float | None = None  # since when something awaits an answer
        self._silence_warnings = Throttle()

    # -- lifecycle -----------------------------------------------------------------------

    def will(self) -> tuple[str, bytes]:
        """The Last Will for the next connection (called from the transport thread)."""
        state = DeviceState(self.device_id, False, self.bd_seq, now_ms())
        return device_topic(self.device_id, DeviceTopic.STATE), state.encode()

    def run(self, stop: threading.Event) -> None:
        self.transport.start(self.inbox.put)
        try:
            while not stop.is_set():
                try:
                    event: Event | None = self.inbox.get(timeout=POLL_S)
                except queue.Empty:
                    event = None
                while event is not None:
                    self._handle(event)
                    try:
                        event = self.inbox.get_nowait()
                    except queue.Empty:
                        event = None
                now = time.monotonic()
                self._guarded("settling receipts", self._settle_receipts)
                self._guarded("recovering files", functools.partial(self._recover_late, now))
                self._guarded("sealing earlier rows", functools.partial(self._seal_old_rows, now))
                if self.connected:
                    self._guarded("sending", self._pump)
        finally:
            if self.connected:
                state = DeviceState(self.device_id, False, self.bd_seq, now_ms())
                self.transport.publish(
                    device_topic(self.device_id, DeviceTopic.STATE), state.encode(), retain=True
                )
            for up in self.uploads.values():
                up.close()
            self.outbox.purge(self.to_purge)
            self.to_purge = []
            self.transport.stop()

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        """Run one step of the loop; a bug or a full disk must not end the agent, nor one
        failing step (sealing old rows, say) stop the others (sending)."""
        try:
            step()
        except Exception:
            throttle = self._step_failures.setdefault(what, Throttle())
            if throttle.due(what, time.monotonic()):
                log.exception("%s failed; carrying on (capture is unaffected)", what)

    # -- events --------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Connected):
            self.connected = True
            self.heard_at = time.monotonic()
            self._reset_session()
            birth = DeviceState(self.device_id, True, self.bd_seq, now_ms())
            self.transport.publish(
                device_topic(self.device_id, DeviceTopic.STATE), birth.encode(), retain=True
            )
            self.next_telemetry = 0.0
            log.info("%s connected (bd_seq %d)", self.device_id, self.bd_seq)
        elif isinstance(event, Disconnected):
            self.connected = False
            self._reset_session()
            # The retained gateway state on the next connection is the truth, whichever run
            # it names: runs may have come and gone meanwhile.
            self.gateway_session = None
            # The next connection gets a new session number, like Sparkplug's bd_seq.
            self.bd_seq = bump_counter(self.journal.db, "bd_seq")
            log.info("%s disconnected: %s", self.device_id, event.reason)
        else:
            try:
                self._on_message(event)
            except ProtocolError as exc:
                self.commands.refuse(event.topic.rsplit("/", 1)[-1], exc)
            except Exception:  # a bug or a full disk must not stop the relay
                log.exception("handling %s failed", event.topic)

    def _reset_session(self) -> None:
        for up in self.uploads.values():
            up.close()
        self.uploads.clear()
        self.journal_inflight = None
        self.next_outbox_poll = self.next_journal_poll = 0.0

    def _on_message(self, msg: Message) -> None:
        if msg.topic == GATEWAY_STATE:
            self._on_gateway_state(msg.payload)
            return
        parsed = parse_gateway_topic(msg.topic)
        if parsed.device_id != self.device_id:
            return
        if parsed.kind is not GatewayTopic.COMMAND:
            self.heard_at = time.monotonic()  # (an unverifiable one raises below: fine)
        if parsed.kind is GatewayTopic.JOURNAL_ACK:
            self._on_journal_ack(JournalAck.decode(msg.payload, self.gateway_key))
        elif parsed.kind is GatewayTopic.UPLOAD_ACK:
            self._on_upload_ack(UploadAck.decode(msg.payload, self.gateway_key))
        elif parsed.kind is GatewayTopic.RECEIPT:
            self._on_receipt(Receipt.decode(msg.payload, self.gateway_key), msg.payload)
        elif parsed.kind is GatewayTopic.COMMAND:
            self._on_command(msg.payload)

    def _on_command(self, payload: bytes) -> None:
        cmd = self.commands.accept(payload)
        if cmd is None:
            return
        if cmd.name == "mark":
            self.journal.append("mark", {"source": "remote", "note": str(cmd.args.get("note", ""))})
        elif cmd.name == "telemetry":
            self.next_telemetry = 0.0
        elif cmd.name == "set_bandwidth":
            rate = cmd.args.get("bytes_per_s")
            if isinstance(rate, int) and rate >= 0:
                self.bucket = TokenBucket(rate, self.config.chunk_size * 2)
        elif cmd.name == "case_context":
            # The step the officer is working on, pushed by the gateway when a case step
            # opens (empty when it closes): new segments and photos carry it.
            step = cmd.args.get("step_id")
            self.case_context = (
                {"case_id": str(cmd.args.get("case_id")), "step_id": step}
                if isinstance(step, int)
                else None
            )
        elif cmd.name in ("record_start", "record_stop", "photo"):
            if self.recorder is None:
                self.commands.fail(cmd, CommandFailed(f"{cmd.name}: this device has no camera"))
            elif cmd.name == "record_start":
                self.recorder.start_recording("remote", str(cmd.args.get("note", "")))
            elif cmd.name == "record_stop":
                self.recorder.stop_recording("remote", str(cmd.args.get("note", "")))
            else:
                self.recorder.take_photo("remote")
        elif cmd.name == "resync":
            self._reset_session()
        elif cmd.name == "rotate_key" and self.rotate_key is not None:
            try:
                self.key = self.rotate_key()
            except (AgentError, OSError) as exc:
                self.commands.fail(cmd, CommandFailed(f"rotate_key failed: {exc}"))
                return
            log.info("journal signing key rotated; now %s", self.key.verify_key.hex[:16])

    def _on_gateway_state(self, payload: bytes) -> None:
        if not payload:
            return  # a retained state cleared: it says nothing either way
        try:
            state = GatewayState.decode(payload, self.gateway_key)
        except ProtocolError:
            # Unsigned (a gateway from before 2026-11-27, after a rollback, say) or forged:
            # refused and journalled by ``_handle``. Holding uploads only saves bandwidth,
            # so a state the device cannot believe never keeps it holding them.
            self.gateway_online = None
            raise
        online, session = state.online, state.session
        if not online and self.gateway_session not in (None, session):
            # The end of some other run of the gateway (a second process that stopped, a
            # Last Will replayed): the one this device last heard from has not said so.
            log.info(
                "ignored the end of gateway run %s: %s is the one running",
                session[:8],
                str(self.gateway_session)[:8],
            )
            return
        restarted = self.gateway_online is False or (
            self.gateway_session is not None and session != self.gateway_session
        )
        if not online and self.gateway_online is not False:
            log.info("the gateway says it is offline (its retained state): uploads wait for it")
        if online and restarted:
            # The gateway restarted: whatever it acknowledged but had not made durable is
            # gone, so start every upload again from ``init`` (cheap: it answers with the
            # ranges it really holds) instead of waiting for timeouts.
            log.info("gateway is back; resynchronising uploads")
            self._reset_session()
        self.gateway_online = online
        if online:
            self.gateway_session = session
            self.heard_at = time.monotonic()  # its silence while offline was not news

    def _on_journal_ack(self, ack: JournalAck) -> None:
        if ack.device_id != self.device_id:
            return
        if self.journal_inflight is not None:
            self._clock_sync(ack.ts_ms)
        self.journal_inflight = None
        if ack.acked_through:
            ours = self.journal.hash_at(ack.acked_through)
            if ours != ack.head_hash:
                log.error(
                    "gateway's head at seq %d differs from ours; not marking acked",
                    ack.acked_through,
                )
                self.journal_retry_at = time.monotonic() + JOURNAL_REJECT_BACKOFF_S
                return
            self.journal.mark_acked(ack.acked_through)
            self.next_outbox_poll = self.next_journal_poll = 0.0
            if not self.journal.db.execute(
                "SELECT 1 FROM journal WHERE kind = 'key_rotation' AND acked = 0 LIMIT 1"
            ).fetchone():
                self.forget_previous_key()
        if ack.rejected_seq:
            log.error(
                "gateway rejected journal record %d: %s (%s)",
                ack.rejected_seq,
                ack.reason,
                ack.detail,
            )
            self.journal_retry_at = time.monotonic() + JOURNAL_REJECT_BACKOFF_S

    def _clock_sync(self, gateway_ms: int) -> None:
        """NTP's idea on the signed journal ack: the gateway's clock at the midpoint of
        the round trip. Journalled (``clock_sync``) when first known and when it moves."""
        received = now_ms()
        rtt = received - self.journal_sent_ms
        if not 0 <= rtt <= CLOCK_MAX_RTT_MS:
            return  # too slow a round trip to say anything useful
        offset = gateway_ms - (self.journal_sent_ms + received) // 2
        last = self.clock_logged
        now = time.monotonic()
        if last is not None and now - last[1] < CLOCK_MIN_GAP_S:
            # At most one record per gap whatever the acks say: replayed old acks (no key
            # needed, only the broker) alternated offsets and wrote hundreds a second.
            return
        if last is None or abs(offset - last[0]) > CLOCK_DRIFT_MS or now - last[1] > CLOCK_EVERY_S:
            self.clock_logged = (offset, now)
            self.journal.append(
                "clock_sync",
                {
                    "source": "gateway",
                    "offset_ms": offset,
                    "reference_ms": gateway_ms,
                    "rtt_ms": rtt,
                },
            )

    def _on_upload_ack(self, ack: UploadAck) -> None:
        up = self.uploads.get(ack.seq)
        if up is None or ack.device_id != self.device_id:
            return
        if ack.state == "receiving":
            if up.phase == "init":
                up.phase = "sending"
                if ack.ranges:
                    held = sum(e - s for s, e in ack.ranges)
                    up.resumed_from = held
                    self.counters["resumes"] += 1
                    add_to_counter(self.journal.db, "resumed_bytes", held)
                    log.info(
                        "seq %d: resuming, gateway holds %d of %d bytes",
                        ack.seq,
                        held,
                        up.item.size,
                    )
            if up.chunk_hashes and subtract(up.acked, ack.ranges):
                up.distrust_stored_hashes("the gateway dropped bytes it had acknowledged")
            up.acked = ack.ranges
            for off, (length, _) in list(up.inflight.items()):
                if any(s <= off and off + length <= e for s, e in ack.ranges):
                    del up.inflight[off]
            if up.phase == "fin" and missing(ack.ranges, up.item.size):
                up.phase = "sending"
        elif ack.state == "complete":
            up.phase = "fin"  # a receipt is on its way; wait for it
            up.inflight.clear()
        elif ack.state == "rejected":
            log.error("gateway rejected media seq %d: %r", ack.seq, ack.reason[:200])
            self.outbox.reject(ack.seq, ack.reason)
            up.close()
            del self.uploads[ack.seq]
        else:  # unknown: the manifest has not reached the gateway; the journal goes first
            up.close()
            del self.uploads[ack.seq]
            # Not again at the next poll (that was dozens of inits a second, for ever, when
            # the gateway had lost an acked manifest, say restored from an old backup).
            if ack.seq not in self.unknown_until:
                log.warning(
                    "the gateway does not know media seq %d (its manifest); asking again "
                    "every %.0f s",
                    ack.seq,
                    self.config.ack_timeout_s,
                )
            self.unknown_until[ack.seq] = time.monotonic() + self.config.ack_timeout_s

    def _on_receipt(self, receipt: Receipt, raw: bytes) -> None:
        if receipt.device_id == self.device_id:
            self.receipts.append((receipt, raw))  # settled together in _settle_receipts

    def _settle_receipts(self) -> None:
        """One commit for all receipts that arrived together, then the deletions."""
        if not self.receipts:
            return
        batch, self.receipts = self.receipts, []
        items = self.outbox.settle_many(batch)
        if items and not self.to_purge:
            self.purge_at = time.monotonic() + PURGE_DELAY_S
        self.to_purge.extend(item.path for item in items)
        settled = {item.seq for item in items}
        for receipt, _ in batch:
            if receipt.seq in settled:
                self.counters["receipts"] += 1
                events.info(
                    "%s receipt seq=%d sha256=%s… log#%d",
                    self.device_id,
                    receipt.seq,
                    receipt.sha256.hex()[:12],
                    receipt.log_index,
                )
            up = self.uploads.pop(receipt.seq, None)
            if up is not None:
                up.close()
        self.next_outbox_poll = 0.0

    # -- sending -------------------------------------------------------------------------

    def _publish(self, kind: DeviceTopic, payload: bytes) -> bool:
        return self.transport.publish(device_topic(self.device_id, kind), payload)

    def _purge(self, now: float) -> None:
        """Delete receipted media in groups: one durable commit covers many receipts."""
        if self.to_purge and (now >= self.purge_at or len(self.to_purge) >= PURGE_BATCH):
            paths, self.to_purge = self.to_purge, []
            self.outbox.purge(paths)

    def _pump(self) -> None:
        now = time.monotonic()
        self._purge(now)
        # While the gateway says it is offline (its retained state), nobody consumes what
        # we would send: hold the journal and bulk uploads back, keep the telemetry.
        if self.gateway_online is not False:
            self._pump_journal(now)
            self._pump_uploads(now)
            self._warn_if_unanswered(now)
        if now >= self.next_telemetry:
            self.next_telemetry = now + self.config.telemetry_interval_s
            self._publish(DeviceTopic.TELEMETRY, self.telemetry().encode())

    def _warn_if_unanswered(self, now: float) -> None:
        """Say so when the gateway answers nothing for a long while that we wait on it.

        A revoked device whose connection stays open (the broker drops what it publishes
        from the moment its ACL says so) or a gateway that is down but left no "offline"
        looked the same from here: silence, and nothing in the log until a restart.
        """
        # Not an upload at ``fin``: the gateway answers a file only once it has verified
        # it, which for a large one (or a queue of them) may take a while.
        waiting = self.journal_inflight is not None or any(
            up.inflight or up.phase == "init" for up in self.uploads.values()
        )
        if not waiting:
            self.waiting_since = None
            return
        if self.waiting_since is None:
            self.waiting_since = now  # an hour without traffic is not an hour of silence
        quiet = now - max(self.heard_at, self.waiting_since)
        if quiet < max(SILENT_AFTER_ACK_TIMEOUTS * self.config.ack_timeout_s, 30):
            return
        if self._silence_warnings.due("silent", now):
            log.warning(
                "%s: nothing from the gateway for %.0f s while connected and waiting for "
                "acknowledgements; the gateway may be down, or this device revoked (the "
                "broker then drops what it sends); evidence stays buffered meanwhile",
                self.device_id,
                quiet,
            )

    def _pump_journal(self, now: float) -> None:
        if self.journal_inflight is not None:
            if now - self.journal_inflight[1] < self.config.ack_timeout_s:
                return
            self.journal_inflight = None
        if now < self.journal_retry_at or now < self.next_journal_poll:
            return
        # New records come from other threads and processes; look for them on a short
        # timer (and right after an ack), not on every event, to keep the hot path cheap.
        self.next_journal_poll = now + POLL_S
        rows = self.journal.unacked(self.config.journal_batch)
        if not rows:
            return
        # A batch is consecutive by contract; if records are missing from the local
        # journal, send up to the hole and let the gateway see (and alarm on) the gap.
        for i in range(1, len(rows)):
            if rows[i][0] != rows[i - 1][0] + 1:
                rows = rows[:i]
                break
        envelope_key = self.key
        pending = self.journal.db.execute(
            "SELECT min(seq) FROM journal WHERE kind = 'key_rotation' AND acked = 0"
        ).fetchone()[0]
        if pending is not None and rows[0][0] <= pending:
            # Up to and including an unacknowledged hand-over, records carry the previous
            # key's signature: send them in envelopes the gateway can check with the key
            # it knows; the new key takes over with the batch after the hand-over.
            rows = [r for r in rows if r[0] <= pending]
            envelope_key = self.previous_key() or self.key
        records = tuple(SignedRecord.from_wire(_load(r)) for _, r in rows)
        counter = bump_counter(self.journal.db, "batch_counter")
        batch = JournalBatch(self.device_id, counter, records)
        self.journal_sent_ms = now_ms()
        if self._publish(DeviceTopic.JOURNAL, batch.encode(envelope_key)):
            self.journal_inflight = (records[-1].record.seq, now)

    def _admit_uploads(self, now: float, busy: int) -> None:
        """Start uploads while fewer than ``max_active_uploads`` have bytes left to send.

        The next candidates are fetched a few at a time (marked first, then oldest) and
        refreshed on a short timer, so starting the next file costs one small query (its
        stored chunk hashes);
        its ``init`` goes out while the previous file's last chunks are still in flight.
        """
        if now >= self.next_outbox_poll:
            self.next_outbox_poll = now + POLL_S
            self.upcoming = self.outbox.next_uploads(set(self.uploads), PREFETCH)
        while busy < self.config.max_active_uploads and len(self.uploads) < MAX_TRACKED:
            item = self.upcoming.pop(0) if self.upcoming else None
            if item is None:
                return
            if item.seq in self.uploads or self.outbox.state(item.seq) != "pending":
                continue  # the prefetched list may be a little stale
            if self.unknown_until.get(item.seq, 0.0) > now:
                continue  # the gateway said it does not know it: not yet again
            up = Upload(item)
            up.chunk_size, up.chunk_hashes = self.outbox.chunk_hashes(item.seq)
            self.uploads[item.seq] = up
            self._send_control(up, now)
            busy += 1

    def _pump_uploads(self, now: float) -> None:
        timeout = self.config.ack_timeout_s
        budget = self.config.window - sum(len(u.inflight) for u in self.uploads.values())
        capture_first = self._capture_first(now)
        busy = 0  # uploads that still have bytes not yet sent
        for up in sorted(self.uploads.values(), key=lambda u: (not u.item.marked, u.item.seq)):
            if up.phase in ("init", "fin"):
                busy += up.phase == "init"
                if now - up.last_tx >= timeout:
                    self._send_control(up, now)
                continue
            for off, (_, sent) in list(up.inflight.items()):
                if now - sent >= timeout:  # lost somewhere: forget it, it will be resent
                    del up.inflight[off]
                    budget += 1
                    # Lost, or dropped by a gateway that found it failing its hash.
                    up.distrust_stored_hashes("a chunk went unacknowledged")
            holes = missing(up.acked, up.item.size)
            if not holes:
                if not up.inflight:
                    up.phase = "fin"
                    self._send_control(up, now)
                continue
            unsent = self._send_holes(up, holes, 0 if capture_first else budget, now)
            budget = self.config.window - sum(len(u.inflight) for u in self.uploads.values())
            busy += unsent
        self._admit_uploads(now, busy)

    def _capture_first(self, now: float) -> bool:
        """True when this pump sends no new chunks because frames wait for the encoder.

        What is in flight stays in flight, and sending resumes at the next pump (POLL_S
        at most). Never for longer than ``MAX_YIELD_S`` at a stretch: an encoder slower
        than its camera on its own is not helped by withheld evidence, so after that one
        pump sends a full window, and the next stretch begins.
        """
        if self.recorder is None or not self.recorder.behind():
            self.yield_since = None
            return False
        if self.yield_since is None:
            self.yield_since = now
        elif now - self.yield_since >= MAX_YIELD_S:
            self.yield_since = now
            return False
        self.counters["yields_to_capture"] += 1
        return True

    def _send_holes(
        self, up: Upload, holes: list[tuple[int, int]], budget: int, now: float
    ) -> bool:
        """Send chunks into ``holes`` within ``budget``; True if bytes remain unsent."""
        for start, end in holes:
            off = start
            while off < end:
                length = min(self.config.chunk_size, end - off)
                if off not in up.inflight:
                    if budget <= 0 or not self.bucket.take(length):
                        return True
                    if not self._send_chunk(up, off, length, now):
                        return True
                    budget -= 1
                off += length
        return False

    def _send_control(self, up: Upload, now: float) -> None:
        up.last_tx = now
        if up.phase == "init":
            msg = UploadInit(
                self.device_id, up.item.seq, up.item.size, up.item.sha256, self.config.chunk_size
            )
            self._publish(DeviceTopic.UPLOAD_INIT, msg.encode())
        else:
            self._publish(DeviceTopic.UPLOAD_FIN, UploadFin(self.device_id, up.item.seq).encode())

    def _send_chunk(self, up: Upload, offset: int, length: int, now: float) -> bool:
        try:
            if up.file is None:
                up.file = self.outbox.open_media(up.item)
            data = up.file.pread(length, offset)
        except FileNotFoundError:
            log.error("media for seq %d is missing before its receipt", up.item.seq)
            self.outbox.reject(up.item.seq, "missing_on_device")
            del self.uploads[up.item.seq]
            return False
        except CorruptMedia as exc:
            # Never upload bytes that fail authentication as if they were the evidence.
            log.error("media for seq %d is corrupt on the device: %s", up.item.seq, exc)
            self.outbox.reject(up.item.seq, f"corrupt_on_device: {exc}")
            up.close()
            del self.uploads[up.item.seq]
            return False
        except OSError as exc:
            self._unreadable(up, exc)
            return False
        self.read_failures.pop(up.item.seq, None)
        if len(data) != length:
            log.error("media for seq %d is shorter than its manifest", up.item.seq)
            self.outbox.reject(up.item.seq, "truncated_on_device")
            up.close()
            del self.uploads[up.item.seq]
            return False
        # The hash stored at capture when this is one of its pieces; hashed here otherwise.
        claim = stored_chunk_hash(up.chunk_hashes, up.chunk_size, up.item.size, offset, length)
        chunk = Chunk(self.device_id, up.item.seq, offset, data, claim or b"")
        if not self._publish(DeviceTopic.UPLOAD_CHUNK, chunk.encode()):
            return False
        up.inflight[offset] = (length, now)
        self.counters["chunks_sent"] += 1
        self.counters["bytes_sent"] += length
        return True

    def _seal_old_rows(self, now: float) -> None:
        """Seal an earlier release's outbox rows, a batch every ``SEAL_EVERY_S`` until
        none are left (``Outbox.seal_old_rows``): in the background, not at start."""
        if self.rows_sealed or now < self.next_seal:
            return
        self.next_seal = now + SEAL_EVERY_S
        self.rows_sealed = self.outbox.seal_old_rows()

    def _recover_late(self, now: float) -> None:
        """``Outbox.recover`` again, ``SETTLE_S`` after start and then every few minutes.

        At boot it leaves alone files younger than ``SETTLE_S`` (another process may be
        about to commit them); a photo renamed into place just before a crash, the agent
        restarted two seconds later, then sat uncounted and unsent until some later
        restart. The same goes for a ``custody agent add`` killed mid-commit while the
        agent runs.
        """
        if now < self.next_recover:
            return
        self.next_recover = now + RECOVER_EVERY_S
        report = self.outbox.recover(at_boot=False)
        if report.adopted_orphans or report.missing:
            log.warning("recovered while running: %s", report)
            self.next_outbox_poll = 0.0

    def _unreadable(self, up: Upload, exc: OSError) -> None:
        """The media would not read (an I/O error on a failing card, say): try it again
        later, and after ``READ_ATTEMPTS`` give it up and journal why (the file stays).

        Escaping, the error ended the relay and the agent with it; restarted, the agent
        took the same file first again: a crash loop in which nothing else was uploaded
        and the camera did not record.
        """
        seq = up.item.seq
        up.close()
        del self.uploads[seq]
        why = exc.strerror or str(exc)
        # The process's or the system's trouble, not the file's: never a reason to give
        # evidence up, however often.
        transient = exc.errno in TRANSIENT_ERRNOS
        failures = self.read_failures.get(seq, 0) + (not transient)
        self.read_failures[seq] = failures
        if failures >= READ_ATTEMPTS:
            log.error("media for seq %d cannot be read (%s); giving it up", seq, why)
            self.read_failures.pop(seq)
            self.outbox.reject(seq, f"unreadable_on_device: {why}")
            return
        log.error(
            "media for seq %d did not read (%s); trying again in %.0f s",
            seq,
            why,
            self.config.ack_timeout_s,
        )
        self.unknown_until[seq] = time.monotonic() + self.config.ack_timeout_s

    def telemetry(self) -> Telemetry:
        status = self.outbox.status()
        usage = os.statvfs(self.outbox.media_dir)
        hw = self.hardware.state if self.hardware is not None else HardwareState()
        rec = self.recorder
        return Telemetry(
            device_id=self.device_id,
            ts_ms=now_ms(),
            backlog_items=status["backlog_items"],
            backlog_bytes=status["backlog_bytes"],
            oldest_unacked_age_s=status["oldest_unacked_age_s"],
            last_receipt_seq=status["last_receipt_seq"],
            journal_seq=status["journal_seq"],
            storage_free_bytes=usage.f_bavail * usage.f_frsize,
            recording=rec.recording if rec is not None else False,
            storage_headroom_min=rec.headroom_s() // 60 if rec is not None else None,
            dropped_frames=rec.dropped_frames if rec is not None else None,
            yields_to_capture=self.counters["yields_to_capture"] if rec is not None else None,
            clock_offset_ms=self._clock_offset(),
            **asdict(hw),  # HardwareState's fields are Telemetry's MCU fields, by name
        )

    def _clock_offset(self) -> int | None:
        """GNSS time minus ours when the MCU has a fix, else the gateway's."""
        if self.hardware is not None and self.hardware.clock_offset_ms is not None:
            return self.hardware.clock_offset_ms
        return self.clock_logged[0] if self.clock_logged is not None else None


def _load(raw: bytes) -> object:
    return decode(raw, what="stored journal record")
