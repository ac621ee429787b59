"""Relay policies that the evidence path promises: a bandwidth cap that holds, jittered
exponential reconnects (no fleet stampede), a Last Will when a device dies, and uploads
that give way to capture."""

from __future__ import annotations

import random
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
