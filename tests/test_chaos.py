"""Nothing captured is lost: really kill the agent, really stop the broker, really kill the
gateway, mid-upload — then every file is at the gateway exactly once, byte-identical,
verified, receipted on the device and deleted there, and uploads resumed from the ranges
the gateway held rather than from zero."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import (
    AgentProc,
    Broker,
    Gateway,
    assert_all_in_custody,
    make_files,
    wait_for,
)

pytestmark = pytest.mark.chaos

MiB = 1024 * 1024
CHUNK = 64 * 1024
WINDOW = 16
# Slow the link so there is an upload in progress to interrupt.
# A long ack timeout: a gateway stalled a second or two (a slow fsync on a shared disk)
# must not make the agent resend its window, which the byte allowance below would count.
SLOW = {
    "chunk_size": str(CHUNK),
    "window": str(WINDOW),
    "bandwidth_limit_bps": str(2 * MiB),
    "ack_timeout_s": "10",
}


def random_moment(rng: random.Random, lo: float, hi: float) -> None:
    """Let the system run for a random while before the next fault (this *is* the test's
    randomness, not a wait for a condition)."""
    time.sleep(rng.uniform(lo, hi))


def assert_resumed_not_restarted(gateway: Gateway, agent: AgentProc) -> list[dict]:
    """Interrupted uploads continued from the bytes the gateway held: the device says how
    many bytes it skipped, and the gateway received little more than each file's size."""
    assert agent.status()["resumed_bytes"] > 0, "the device never resumed from held ranges"
    uploads = gateway.get("/api/v1/uploads", device_id=agent.device_id)
    for up in uploads:
        # Each (re)start may cost at most one window of chunks already in flight; an upload
        # that started again from zero would cost its whole size.
        allowance = up["inits"] * WINDOW * CHUNK + WINDOW * CHUNK
        assert up["bytes_received"] <= up["size"] + allowance, up
    return [u for u in uploads if u["resumed_from"]]


def partial_bytes(gateway: Gateway, device_id: str) -> int:
    folder = gateway.data / "partial" / device_id
    return sum(p.stat().st_size for p in folder.glob("*.upload")) if folder.exists() else 0


def test_agent_sigkilled_at_random_moments(tmp_path: Path, gateway, make_agent):
    seed = int(os.environ.get("CUSTODY_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    agent: AgentProc = make_agent("cam-kill", gateway, **SLOW)
    files = make_files(tmp_path / "a", [3 * MiB, 5 * MiB, 0, 700_000, 2 * MiB, 1], seed=60)
    agent.add(*files.values())
    kills = 0
    for round_ in range(12):
        agent.start()
        random_moment(rng, 0.4, 1.5)
        agent.kill()
        kills += 1
        if round_ == 5:  # evidence keeps arriving while the agent is dead
            more = make_files(tmp_path / "b", [4 * MiB, 10_000], seed=61)
            agent.add(*more.values())
            files.update(more)
        if agent.status()["backlog_items"] == 0:
            break
    agent.start()
    wait_for(lambda: agent.status()["backlog_items"] == 0, 120, "backlog to drain after kills")
    assert kills >= 5
    assert_all_in_custody(gateway, agent, files)
    resumed = assert_resumed_not_restarted(gateway, agent)
    assert any(u["resumed_from"] > 0 for u in resumed), "gateway saw no re-init with held bytes"
    assert not gateway.alarms(device_id="cam-kill"), "crashes are not tampering"


def test_broker_stopped_and_restarted_mid_upload(
    tmp_path: Path, gateway_dir: Path, own_broker: Broker, make_agent
):
    gateway = Gateway(gateway_dir, own_broker, tmp_path / "gw.log")
    gateway.start()
    try:
        agent: AgentProc = make_agent("cam-broker", gateway, **SLOW)
        files = make_files(tmp_path, [6 * MiB, 6 * MiB, 1000], seed=70)
        agent.add(*files.values())
        agent.start()
        wait_for(lambda: partial_bytes(gateway, "cam-broker") > 2 * MiB, 60, "upload under way")
        own_broker.stop()
        time.sleep(1.5)  # the outage itself
        own_broker.start()
        wait_for(lambda: agent.status()["backlog_items"] == 0, 120, "backlog to drain")
        assert_all_in_custody(gateway, agent, files)
        assert_resumed_not_restarted(gateway, agent)
    finally:
        gateway.stop()


def test_gateway_sigkilled_and_restarted_mid_upload(tmp_path: Path, gateway, make_agent):
    agent: AgentProc = make_agent("cam-gw", gateway, **SLOW)
    files = make_files(tmp_path, [10 * MiB, 3 * MiB], seed=80)
    agent.add(*files.values())
    agent.start()

    def checkpointed() -> bool:
        db = sqlite3.connect(gateway.data / "custody.db")
        try:
            rows = db.execute("SELECT ranges FROM uploads WHERE device_id = 'cam-gw'").fetchall()
        finally:
            db.close()
        return any(json.loads(r[0]) for r in rows)

    wait_for(checkpointed, 60, "a durable checkpoint of a partial upload")
    gateway.kill()
    gateway.start()
    wait_for(lambda: agent.status()["backlog_items"] == 0, 120, "backlog to drain")
    assert_all_in_custody(gateway, agent, files)
    resumed = assert_resumed_not_restarted(gateway, agent)
    assert resumed and resumed[0]["resumed_from"] > 0, "gateway did not reload held ranges"


def test_everything_at_once_with_two_devices(
    tmp_path: Path, gateway_dir: Path, own_broker: Broker, make_agent
):
    """Agent kill, broker restart and gateway kill in one run, two devices uploading."""
    rng = random.Random(1234)
    gateway = Gateway(gateway_dir, own_broker, tmp_path / "gw.log")
    gateway.start()
    try:
        agents = [make_agent(f"cam-mix{i}", gateway, **SLOW) for i in range(2)]
        files = {}
        for i, agent in enumerate(agents):
            files[agent.device_id] = make_files(tmp_path / str(i), [4 * MiB, 1 * MiB, 99], i)
            agent.add(*files[agent.device_id].values())
            agent.start()
        random_moment(rng, 0.5, 1.0)
        agents[0].kill()
        own_broker.stop()
        random_moment(rng, 0.5, 1.0)
        own_broker.start()
        agents[0].start()
        random_moment(rng, 0.5, 1.0)
        gateway.kill()
        gateway.start()
        for agent in agents:
            wait_for(lambda a=agent: a.status()["backlog_items"] == 0, 120, f"{agent.device_id}")
            assert_all_in_custody(gateway, agent, files[agent.device_id])
    finally:
        gateway.stop()


def test_uploads_wait_while_the_gateway_is_offline(tmp_path: Path, gateway, make_agent):
    """The gateway's Last Will marks it offline; the device then holds its uploads back
    (nobody would consume them) and resumes when the gateway is back."""
    from protocol.topics import DeviceTopic, device_topic
    from tests.test_rejections import Capture

    agent: AgentProc = make_agent("cam-wait", gateway, **SLOW)
    files = make_files(tmp_path, [12 * MiB], seed=81)
    agent.add(*files.values())
    tap = Capture(gateway, device_topic("cam-wait", DeviceTopic.UPLOAD_CHUNK))
    try:
        agent.start()
        wait_for(lambda: len(tap.messages) > 3, 60, "chunks flowing")
        gateway.kill()  # no goodbye: the broker publishes the gateway's Last Will
        wait_for(lambda: "uploads wait for it" in agent.log.read_text(), 30, "the Will heard")
        time.sleep(1)  # what was in flight settles
        before = len(tap.messages)
        time.sleep(4)
        assert len(tap.messages) == before, "chunks were sent while the gateway was offline"
        gateway.start()
        wait_for(lambda: agent.status()["backlog_items"] == 0, 120, "backlog to drain")
    finally:
        tap.close()
    assert_all_in_custody(gateway, agent, files)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MiB filesystem of its own (tmpfs, so it really runs full)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_gateway_disk_loses_nothing_and_recovers_by_itself(
    tmp_path: Path, small_disk: Path, make_agent
):
    """The gateway's data directory runs out of space mid-upload: it stays up, says so
    once (not a traceback per resent chunk) and in /healthz, acknowledges nothing it could
    not store, the device keeps its files, what was stored is intact; given space, the
    uploads finish without anyone restarting anything."""
    import hashlib
    import subprocess

    import httpx

    from gateway.datadir import DataDir

    data = DataDir.open(small_disk / "gw").root
    broker = Broker(tmp_path / "broker", tls_dir=data / "ca")
    broker.start()
    gateway = Gateway(data, broker, tmp_path / "gateway.log")
    gateway.start()
    try:
        agent = make_agent("cam-full", gateway, chunk_size=str(256 * 1024))
        first = make_files(tmp_path / "first", [3 * MiB], seed=1)
        agent.add(*first.values())
        agent.start()
        wait_for(lambda: len(gateway.evidence("cam-full")) == 1, 60, "the first file")
        later = make_files(tmp_path / "later", [6 * MiB] * 4, seed=2)  # more than is left
        agent.add(*later.values())

        def health() -> dict[str, str]:
            result: dict[str, str] = httpx.get(gateway.base + "/healthz", timeout=5).json()
            return result

        wait_for(lambda: "storage" in health(), 90, "/healthz to report the full disk")
        assert health()["status"] == "degraded"
        log = gateway.log.read_text()
        assert "the gateway's disk is full" in log
        assert "ingest failed" not in log and "Traceback" not in log, log[-3000:]
        # Acknowledged and kept only what it could store; the device keeps the rest.
        assert agent.status()["backlog_items"] >= 1
        # What is stored is intact (read off the disk: a download needs an audit record).
        held = gateway.evidence("cam-full")
        for item in held:
            blob = data / "blobs" / item["sha256"][:2] / item["sha256"]
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == item["sha256"]
        # A download is served only with its audit record stored: refused (503, said so)
        # when the disk refuses the record, served when SQLite still had room for it
        # (its WAL reuses pages after a checkpoint) -- and then the record is there.
        r = httpx.get(
            f"{gateway.base}/api/v1/evidence/{held[0]['id']}/media",
            headers={"Authorization": f"Bearer {gateway.token}"},
        )
        if r.status_code == 503:
            assert "disk is full" in r.text
        else:
            import sqlite3

            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == held[0]["sha256"]
            with sqlite3.connect(f"{(data / 'custody.db').as_uri()}?mode=ro", uri=True) as db:
                audited = db.execute(
                    "SELECT count(*) FROM audit WHERE action = 'download' AND target LIKE ?",
                    ["evidence/cam-full/%"],
                ).fetchone()[0]
            assert audited >= 1, "a download served without its audit record"
        # Space again: the uploads finish by themselves.
        subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
        wait_for(lambda: len(gateway.evidence("cam-full")) == 5, 120, "every file after space")
        assert_all_in_custody(gateway, agent, {**first, **later})
    finally:
        gateway.stop()
        broker.stop()
