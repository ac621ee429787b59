"""Relay policies that the evidence path promises: a bandwidth cap that holds, jittered
exponential reconnects (no fleet stampede), a Last Will when a device dies, and uploads
that give way to capture."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time

from agent.recorder import Recorder, RecorderSettings
from agent.relay import MAX_YIELD_S
from agent.transport import backoff_delay
from agent.uploading import TokenBucket
from simulators.camera import SyntheticCamera
from tests.conftest import wait_for
from tests.inprocess import Wire, device, relay_for


def test_bandwidth_cap_is_never_exceeded():
    rate = 2_000_000
    bucket = TokenBucket(rate, 64 * 1024)
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 0.3:
        if bucket.take(16 * 1024):
            sent += 16 * 1024
    elapsed = time.monotonic() - start
    # Whatever the machine's speed: at most the initial burst plus rate × time.
    assert sent <= bucket.burst + rate * elapsed
    assert sent > 0
    assert TokenBucket(0, 1).take(10**12)  # 0 means no cap


def test_reconnect_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.5 <= d <= cap for d in delays)
        if cap > 0.5:
            assert len({round(d, 6) for d in delays}) > 150, "no jitter"
    # A fleet reconnecting at the same attempt spreads out over the whole window.
    fleet = sorted(backoff_delay(6, 0.5, 30.0, random.Random(i)) for i in range(500))
    assert fleet[50] < 8 and fleet[450] > 24


def test_last_will_marks_a_killed_device_offline(tmp_path, gateway, make_agent):
    agent = make_agent("cam-will", gateway, keepalive_s="5")
    agent.start()

    def online() -> bool | None:
        devs = [d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-will"]
        return devs[0]["online"] if devs else None

    wait_for(lambda: online() is True, 30, "birth")
    agent.kill()  # no clean disconnect: only the broker's Last Will can tell
    wait_for(lambda: online() is False, 30, "the Last Will (1.5 x keepalive)")


def test_uploads_give_way_while_frames_wait_for_the_encoder(tmp_path) -> None:
    dev = device(tmp_path, 1024)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(5000))
    seq = dev.outbox.add_file(src)
    dev.db.execute("UPDATE journal SET acked = 1")  # the gateway accepted the manifest
    recorder = Recorder(
        RecorderSettings(device_id="cam-hash", frame_queue=8),
        dev.journal,
        dev.outbox,
        lambda: SyntheticCamera(64, 36, 5.0),
    )
    wire = Wire()
    relay = relay_for(dev, wire, recorder=recorder)
    relay.connected = True
    relay._admit_uploads(0.0, 0)  # init goes out
    relay.uploads[seq].phase = "sending"  # as if the gateway had answered it
    for _ in range(4):  # half the hand-over queue
        recorder._frames.put_nowait(None)
    assert not recorder.behind(), "no encode thread drains the queue: nothing to wait for"
    done = threading.Event()
    recorder._encode_thread = threading.Thread(target=done.wait)  # a live encoder
    recorder._encode_thread.start()
    try:
        assert recorder.behind()
        relay._pump_uploads(0.0)
        assert wire.chunks("cam-hash") == [], "no new chunk while capture is behind"
        assert relay.counters["yields_to_capture"] == 1
        assert relay.telemetry().yields_to_capture == 1  # the operator sees it
        recorder._frames.get_nowait()  # the encoder caught up a little
        assert not recorder.behind()
        relay._pump_uploads(0.1)
        assert [c.offset for c in wire.chunks("cam-hash")] == [0, 1024, 2048, 3072, 4096]
    finally:
        done.set()
        recorder._encode_thread.join()
    relay.uploads[seq].close()
    dev.close()


def test_uploads_never_wait_for_capture_for_long(tmp_path) -> None:
    # An encoder slower than its camera on its own stays behind however long the relay
    # waits; withholding evidence would not help it, so the wait has a bound.
    dev = device(tmp_path, 1024)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(40 * 1024))
    seq = dev.outbox.add_file(src)
    dev.db.execute("UPDATE journal SET acked = 1")

    class AlwaysBehind:
        def behind(self) -> bool:
            return True

    wire = Wire()
    relay = relay_for(dev, wire, recorder=AlwaysBehind())
    relay.connected = True
    relay._admit_uploads(0.0, 0)
    relay.uploads[seq].phase = "sending"
    for now in (0.0, 0.2, 0.4):
        relay._pump_uploads(now)
    assert wire.chunks("cam-hash") == []
    relay._pump_uploads(MAX_YIELD_S)  # the stretch is over: one pump sends a window
    sent = len(wire.chunks("cam-hash"))
    assert sent == dev.config.window
    relay._pump_uploads(MAX_YIELD_S + 0.1)  # and the next stretch begins
    assert len(wire.chunks("cam-hash")) == sent
    relay.uploads[seq].close()
    dev.close()


def _gateway_key(tmp_path):
    from protocol.signing import SigningKey

    return SigningKey.from_seed((tmp_path / "gw" / "gateway.key").read_bytes())


def test_a_gateway_that_does_not_know_a_manifest_is_asked_again_slowly(tmp_path) -> None:
    """Found by a tester: on ``unknown`` the relay sent ``init`` again at the next poll,
    dozens a second for ever, and said nothing."""
    from agent.transport import Message
    from protocol.topics import DeviceTopic, GatewayTopic, device_topic, gateway_topic
    from protocol.upload import UploadAck

    dev = device(tmp_path, 1024, ack_timeout=5.0)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(3000))
    seq = dev.outbox.add_file(src)
    dev.db.execute("UPDATE journal SET acked = 1")
    wire = Wire()
    relay = relay_for(dev, wire)
    relay.connected = True
    inits = device_topic("cam-hash", DeviceTopic.UPLOAD_INIT)
    relay._admit_uploads(0.0, 0)
    assert [t for t, _ in wire.sent].count(inits) == 1
    unknown = UploadAck("cam-hash", seq, "unknown", (), "", 1).encode(_gateway_key(tmp_path))
    relay._handle(Message(gateway_topic("cam-hash", GatewayTopic.UPLOAD_ACK), unknown))
    for _ in range(20):  # twenty polls in quick succession
        relay.next_outbox_poll = 0.0
        relay._admit_uploads(time.monotonic(), 0)
    assert [t for t, _ in wire.sent].count(inits) == 1, "asked again at once"
    relay.unknown_until[seq] = 0.0  # its time has come
    relay.next_outbox_poll = 0.0
    relay._admit_uploads(time.monotonic(), 0)
    assert [t for t, _ in wire.sent].count(inits) == 2
    dev.close()


def test_replayed_journal_acks_cannot_flood_the_journal_with_clock_syncs(tmp_path) -> None:
    """Found by a tester: two old, genuine journal acks replayed in turn by the broker (no
    key needed) wrote hundreds of ``clock_sync`` records a second."""
    from agent.transport import Message
    from protocol.receipt import JournalAck
    from protocol.topics import GatewayTopic, gateway_topic

    dev = device(tmp_path, 1024)
    key = _gateway_key(tmp_path)
    relay = relay_for(dev, Wire())
    relay.connected = True
    dev.journal.append("mark", {"source": "button"})
    head = dev.journal.db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC").fetchone()
    topic = gateway_topic("cam-hash", GatewayTopic.JOURNAL_ACK)
    base = int(time.time() * 1000)
    for i in range(200):
        # A batch in flight (each replay clears it, and the relay sends it again).
        relay.journal_inflight = (head[0], time.monotonic())
        relay.journal_sent_ms = int(time.time() * 1000)
        ts = base + (3_600_000 if i % 2 else 0)  # alternating an hour apart
        ack = JournalAck("cam-hash", head[0], bytes(head[1]), 0, "", "", ts).encode(key)
        relay._handle(Message(topic, ack))
    syncs = dev.journal.db.execute("SELECT count(*) FROM journal WHERE kind = 'clock_sync'")
    assert syncs.fetchone()[0] <= 1
    dev.close()


def test_a_validly_signed_command_with_arguments_the_device_cannot_use_is_refused(
    tmp_path,
) -> None:
    """Found by a tester, with the gateway's key: a mark whose note was nested ~490 deep
    was journalled, then killed the relay thread at every start (the encoder recursed);
    a 9 MiB note made a journal batch larger than the broker carries, for ever. The device
    checks a command's arguments as the gateway does, before it journals anything."""
    from agent.transport import Message
    from protocol.command import Command
    from protocol.topics import GatewayTopic, gateway_topic

    dev = device(tmp_path, 1024)
    key = _gateway_key(tmp_path)
    relay = relay_for(dev, Wire())
    relay.connected = True
    topic = gateway_topic("cam-hash", GatewayTopic.COMMAND)
    now = int(time.time() * 1000)
    deep: object = "x"
    for _ in range(400):
        deep = {"a": deep}
    bad = [
        {"note": "n" * 2_000_000},
        {"note": deep},
        {"bytes_per_s": True},
    ]
    names = ["mark", "mark", "set_bandwidth"]
    for cmd_id, (name, args) in enumerate(zip(names, bad, strict=True), start=1):
        payload = Command("cam-hash", cmd_id, name, now, now + 60_000, args).encode(key)
        relay._handle(Message(topic, payload))
    kinds = [r[0] for r in dev.journal.db.execute("SELECT kind FROM journal ORDER BY seq")]
    assert "command_executed" not in kinds and "mark" not in kinds
    assert "command_rejected" in kinds
    relay._pump_journal(time.monotonic())  # and the journal still goes out
    good = Command("cam-hash", 9, "mark", now, now + 60_000, {"note": "ok"}).encode(key)
    relay._handle(Message(topic, good))
    kinds = [r[0] for r in dev.journal.db.execute("SELECT kind FROM journal ORDER BY seq")]
    assert "mark" in kinds
    dev.close()


def test_the_gateway_state_is_believed_only_when_signed_and_for_the_run_it_ends(
    tmp_path,
) -> None:
    """Devices hold uploads while the retained gateway state reads offline, so a forged
    "offline" (anyone who may publish on ``gw/state``) would stop a fleet: it must carry the
    gateway's signature, and an "offline" ends only the gateway run the device last heard
    from (another process's end, or an old Last Will replayed, changes nothing)."""
    from agent.transport import Connected, Disconnected, Message
    from protocol.encoding import canonical
    from protocol.signing import SigningKey
    from protocol.state import GatewayState
    from protocol.topics import GATEWAY_STATE, DeviceTopic, device_topic

    dev = device(tmp_path, 1024)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(3000))
    dev.outbox.add_file(src)
    dev.db.execute("UPDATE journal SET acked = 1")
    wire = Wire()
    relay = relay_for(dev, wire)
    relay.connected = True
    key = _gateway_key(tmp_path)
    inits = device_topic("cam-hash", DeviceTopic.UPLOAD_INIT)

    def state(payload: bytes) -> None:
        relay._handle(Message(GATEWAY_STATE, payload))

    def uploads_go() -> bool:
        before = [t for t, _ in wire.sent].count(inits)
        relay.uploads.clear()
        relay.next_outbox_poll = 0.0
        relay._pump()
        return [t for t, _ in wire.sent].count(inits) > before

    forged = [
        canonical({"v": 1, "online": False, "session": "run-1"}),  # unsigned, as before
        GatewayState(False, "run-1").encode(SigningKey.generate()),  # another key
        GatewayState(False, "run-1").encode(key)[:-3] + b'0"}',  # signature altered
    ]
    for payload in forged:
        state(payload)
        assert relay.gateway_online is None
        assert uploads_go()
    rejected = dev.journal.db.execute(
        "SELECT count(*) FROM journal WHERE kind = 'command_rejected'"
    )
    assert rejected.fetchone()[0] >= 1  # journalled (at most one a minute per reason)
    state(GatewayState(True, "run-1").encode(key))
    assert relay.gateway_online is True and uploads_go()
    state(GatewayState(False, "run-0").encode(key))  # an older run's end, replayed
    assert relay.gateway_online is True and uploads_go()
    state(GatewayState(False, "run-1").encode(key))  # the end of the run we know
    assert relay.gateway_online is False and not uploads_go()
    state(b"")  # a retained state cleared says nothing either way
    assert relay.gateway_online is False and not uploads_go()
    state(GatewayState(True, "run-2").encode(key))  # a new run: resynchronise, go on
    assert relay.gateway_online is True and relay.gateway_session == "run-2"
    assert uploads_go()
    # Holding is only ever what a signed state says: after a rollback to a gateway that
    # does not sign, its unsigned "online" ends the hold a signed "offline" began.
    state(GatewayState(False, "run-2").encode(key))
    assert not uploads_go()
    state(canonical({"v": 1, "online": True, "session": "run-3"}))
    assert relay.gateway_online is None and uploads_go()
    # Runs come and go while a device is off the broker: the retained state it finds when
    # it connects again is the truth, whichever run it names.
    relay._handle(Disconnected("network"))
    relay._handle(Connected())
    state(GatewayState(False, "run-4").encode(key))
    assert relay.gateway_online is False and not uploads_go()
    dev.close()


def test_media_that_does_not_read_is_tried_again_then_given_up_not_a_crash(tmp_path) -> None:
    """Found by a review: an I/O error reading media (a failing card) escaped the relay and
    ended the agent; restarted, it took the same file first again, for ever. Now it is held
    and tried again, and after a few failures given up, journalled, and kept."""
    import shutil

    from agent.relay import READ_ATTEMPTS
    from agent.transport import Message
    from agent.uploading import Upload
    from protocol.topics import DeviceTopic, GatewayTopic, device_topic, gateway_topic
    from protocol.upload import UploadAck

    dev = device(tmp_path, 1024)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(3000))
    seq = dev.outbox.add_file(src)
    dev.db.execute("UPDATE journal SET acked = 1")
    item = dev.outbox.get(seq)
    assert item is not None
    kept = tmp_path / "kept"
    shutil.move(item.path, kept)
    item.path.mkdir()  # the file's name now opens with an OSError (EISDIR), not ENOENT
    wire = Wire()
    relay = relay_for(dev, wire)
    relay.connected = True
    chunks = device_topic("cam-hash", DeviceTopic.UPLOAD_CHUNK)
    receiving = UploadAck("cam-hash", seq, "receiving", (), "", 1).encode(_gateway_key(tmp_path))
    for attempt in range(READ_ATTEMPTS):
        relay.unknown_until.clear()  # its time has come
        relay.next_outbox_poll = 0.0
        relay._admit_uploads(time.monotonic(), 0)
        assert seq in relay.uploads, f"attempt {attempt + 1} not made"
        relay._handle(Message(gateway_topic("cam-hash", GatewayTopic.UPLOAD_ACK), receiving))
        relay._pump_uploads(time.monotonic())  # raised before
        assert seq not in relay.uploads
        if attempt < READ_ATTEMPTS - 1:
            assert dev.outbox.state(seq) == "pending"
            assert relay.unknown_until[seq] > time.monotonic(), "held, not tried at once"
    assert [t for t, _ in wire.sent].count(chunks) == 0
    assert dev.outbox.state(seq) == "rejected"
    # Trouble of the process's or the system's own (too many open files, say) never gives
    # evidence up, however often it comes.
    import errno

    src.write_bytes(bytes(2000))
    other = dev.outbox.add_file(src)
    item = dev.outbox.get(other)
    assert item is not None
    for _ in range(READ_ATTEMPTS + 2):
        relay.uploads[other] = Upload(item)
        relay._unreadable(relay.uploads[other], OSError(errno.EMFILE, "Too many open files"))
    assert dev.outbox.state(other) == "pending"
    (reason,) = dev.db.execute("SELECT reason FROM media WHERE seq = ?", [seq]).fetchone()
    assert reason.startswith("unreadable_on_device")
    kinds = [r[0] for r in dev.db.execute("SELECT kind FROM journal").fetchall()]
    assert "media_corrupt" in kinds
    assert kept.exists()
    dev.close()


def test_a_file_renamed_in_just_before_a_crash_is_adopted_while_the_agent_runs(
    tmp_path, monkeypatch
):
    """At boot, recovery leaves files younger than ``SETTLE_S`` alone (another process may
    be about to commit them). A photo renamed into place just before a crash, with the
    agent back two seconds later, then sat uncounted and unsent until some later restart.
    While the agent runs, "settled" is judged by the rename, not the last write (a slow
    fsync of a big file), and half-written temporary files are left to their writer."""
    from agent import outbox as outbox_mod
    from agent.sealed import seal_blocks

    dev = device(tmp_path, 1024)
    key = dev.outbox.data_key
    assert key is not None
    sealed = b"".join(seal_blocks(key, [b"a photo" * 100]))
    orphan = dev.outbox.media_dir / "orphan.bin"
    orphan.write_bytes(sealed)
    assert dev.outbox.recover(at_boot=True).adopted_orphans == 0  # boot: too young to judge
    relay = relay_for(dev, Wire())
    relay._recover_late(time.monotonic())  # nothing yet: SETTLE_S after start
    assert dev.outbox.status()["backlog_items"] == 0
    monkeypatch.setattr(outbox_mod, "SETTLE_S", 0.5)
    time.sleep(0.6)  # the orphan has settled
    # An add still at work: its last write long ago (a slow fsync), renamed just now, not
    # committed yet; and another one's temporary file.
    written_long_ago = time.time() - 3600
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # the last write is an hour old when it returns
        os.utime(fd, (written_long_ago, written_long_ago))
        real_fsync(fd)

    monkeypatch.setattr(outbox_mod.os, "fsync", slow_fsync)
    adding = dev.outbox._write_durably([b"a large file"])
    monkeypatch.setattr(outbox_mod.os, "fsync", real_fsync)
    part = dev.outbox.incoming / "still-writing.part"
    part.write_bytes(b"half")
    os.utime(part, (written_long_ago, written_long_ago))
    relay._recover_late(relay.next_recover)  # its time has come
    adopted = {r[0] for r in dev.db.execute("SELECT path FROM media").fetchall()}
    assert adopted == {"orphan.bin"}, "an add between its rename and its commit adopted"
    assert adding.path.exists() and part.exists()
    assert dev.outbox.status()["backlog_items"] == 1
    dev.close()


def test_a_gateway_that_answers_nothing_is_said_so_in_the_log(tmp_path, caplog) -> None:
    """Found by a newcomer: a revoked device whose connection stayed open (the broker drops
    what it publishes) logged nothing at all; neither does a gateway gone quiet."""
    import logging

    dev = device(tmp_path, 1024, ack_timeout=2.0)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(3000))
    dev.outbox.add_file(src)
    relay = relay_for(dev, Wire())
    relay.connected = True
    with caplog.at_level(logging.WARNING, logger="custody.agent.relay"):
        relay._pump()  # the journal batch goes out, and waits for its ack
        assert relay.journal_inflight is not None
        assert "nothing from the gateway" not in caplog.text
        assert relay.waiting_since is not None
        relay.heard_at -= 31  # half a minute of silence, waiting all along
        relay.waiting_since -= 31
        relay._pump()
    assert "nothing from the gateway for 31 s" in caplog.text
    assert "revoked" in caplog.text
    # An hour without traffic is not an hour of silence: the wait starts with the send.
    caplog.clear()
    relay2 = relay_for(dev, Wire())
    relay2.connected = True
    relay2.heard_at -= 3600  # connected and idle for an hour
    dev.outbox.add_file(src)
    with caplog.at_level(logging.WARNING, logger="custody.agent.relay"):
        relay2._pump()
        relay2._pump()
    assert "nothing from the gateway" not in caplog.text
    dev.close()


def test_a_step_of_the_loop_that_keeps_failing_does_not_stop_the_others(tmp_path, caplog) -> None:
    """Sealing an earlier release's rows (or any background step) failing every time, on
    a damaged database say, must not keep the relay from sending, nor end the agent."""
    import logging
    import threading

    from agent.transport import Connected
    from protocol.topics import DeviceTopic, device_topic

    dev = device(tmp_path, 1024)
    src = tmp_path / "clip.bin"
    src.write_bytes(bytes(3000))
    dev.outbox.add_file(src)
    wire = Wire()
    relay = relay_for(dev, wire)

    def broken() -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    relay.outbox.seal_old_rows = broken  # type: ignore[method-assign]
    stop = threading.Event()
    relay.inbox.put(Connected())
    with caplog.at_level(logging.ERROR, logger="custody.agent.relay"):
        runner = threading.Thread(target=relay.run, args=(stop,))
        runner.start()
        journal = device_topic("cam-hash", DeviceTopic.JOURNAL)
        try:
            wait_for(lambda: any(t == journal for t, _ in wire.sent), 10, "the journal sent")
        finally:
            stop.set()
            runner.join(10)
    assert caplog.text.count("sealing earlier rows failed") == 1  # once a minute, not a flood
    dev.close()
