"""Relay policies that the evidence path promises: a bandwidth cap that holds, jittered
exponential reconnects (no fleet stampede), and a Last Will when a device dies."""

from __future__ import annotations

import random
import time

from agent.transport import backoff_delay
from agent.uploading import TokenBucket
from tests.conftest import wait_for


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
