"""The evidence path end to end, against a real mosquitto and real processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from protocol.encoding import canonical
from protocol.errors import ProtocolError
from protocol.merkle import leaf_hash, verify_inclusion
from protocol.receipt import SignedTreeHead
from protocol.signing import SigningKey, VerifyKey
from tests.conftest import assert_all_in_custody, make_files, wait_for


def test_files_added_before_and_while_running_reach_custody(tmp_path: Path, gateway, make_agent):
    agent = make_agent("cam-1", gateway)
    before = make_files(tmp_path / "before", [0, 1, 1000, 300_000, 2_500_000], seed=1)
    agent.add(*before.values())
    status = agent.status()
    assert status["backlog_items"] == 5
    assert status["backlog_bytes"] == sum(p.stat().st_size for p in before.values())
    assert status["last_receipt_seq"] == 0
    agent.start()
    during = make_files(tmp_path / "during", [123_456, 700_000], seed=2)
    agent.add(*during.values(), marked=True)
    files = {**before, **during}
    wait_for(lambda: agent.status()["backlog_items"] == 0, 60, "backlog to drain")
    assert_all_in_custody(gateway, agent, files)
    status = agent.status()
    assert status["last_receipt_seq"] == status["journal_seq"]
    evidence = gateway.evidence("cam-1")
    required = {"id", "device_id", "seq", "sha256", "size", "verified", "received_at", "log_index"}
    assert all(required <= item.keys() for item in evidence)
    assert {e["name"] for e in evidence} == {p.name for p in files.values()}


def test_receipt_log_index_is_provable_against_signed_tree_head(tmp_path, gateway, make_agent):
    agent = make_agent("cam-2", gateway)
    files = make_files(tmp_path, [4096], seed=3)
    agent.add(*files.values())
    agent.start()
    wait_for(lambda: gateway.evidence("cam-2"), 30, "evidence")
    item = gateway.evidence("cam-2")[0]
    key = VerifyKey.from_hex((gateway.data / "gateway.pub").read_text().strip())
    head = SignedTreeHead.from_wire(
        {k: v for k, v in gateway.get("/api/v1/log/tree-head").items() if k != "public_key"}, key
    )
    proof = gateway.get(f"/api/v1/log/proof/{item['log_index']}", tree_size=head.tree_size)
    assert proof["leaf"]["sha256"] == item["sha256"]
    assert verify_inclusion(
        leaf_hash(canonical(proof["leaf"])),
        item["log_index"],
        head.tree_size,
        [bytes.fromhex(h) for h in proof["inclusion_proof"]],
        head.root_hash,
    )
    # The device's stored receipt verifies by itself too (signature, tree head, proof);
    # in its database it is sealed, like the row's hashes.
    import sqlite3

    from agent.config import load_config
    from agent.service import Device
    from protocol.receipt import Receipt

    stored = (
        sqlite3.connect(agent.dir / "agent.db")
        .execute("SELECT receipt, sha256 FROM media WHERE state = 'receipted'")
        .fetchone()
    )
    assert item["sha256"].encode() not in bytes(stored[0]) and not isinstance(stored[1], str)
    device = Device(load_config(agent.config))
    try:
        raw = device.outbox.stored_receipt(item["seq"])
    finally:
        device.close()
    assert raw is not None
    receipt = Receipt.decode(raw, key)
    assert receipt.sha256.hex() == item["sha256"] and receipt.log_index == item["log_index"]


def test_api_requires_the_bearer_token(gateway):
    assert httpx.get(gateway.base + "/healthz").status_code == 200
    for path in ("/api/v1/devices", "/api/v1/evidence", "/api/v1/alarms", "/api/v1/log/tree-head"):
        r = httpx.get(gateway.base + path)
        assert r.status_code == 401, path
        assert "Bearer" in r.json()["detail"]
        r = httpx.get(gateway.base + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert httpx.get(gateway.base + "/openapi.json").json()["info"]["title"] == "custody gateway"


def test_device_birth_telemetry_and_death_reach_the_gateway(tmp_path, gateway, make_agent):
    agent = make_agent("cam-3", gateway)
    agent.start()

    def device() -> dict | None:
        devs = [d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-3"]
        if devs and devs[0]["online"] and devs[0]["telemetry"]:
            # The first telemetry may predate the boot record's ack; wait for a drained one.
            return devs[0] if devs[0]["telemetry"]["backlog_items"] == 0 else None
        return None

    dev = wait_for(device, 30, "online device with telemetry showing an empty backlog")
    # The boot record, then (after the first journal ack) the gateway clock_sync.
    assert dev["telemetry"]["journal_seq"] in (1, 2)
    kinds = [r["kind"] for r in gateway.get("/api/v1/journal", device_id="cam-3")]
    assert kinds[0] == "boot" and set(kinds) <= {"boot", "clock_sync"}
    agent.stop()

    def offline() -> bool:
        return not next(d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-3")[
            "online"
        ]

    wait_for(offline, 30, "device offline after a clean stop")


def test_same_content_twice_is_two_pieces_of_evidence(tmp_path, gateway, make_agent):
    agent = make_agent("cam-4", gateway)
    path = tmp_path / "same.txt"
    path.write_bytes(b"identical bytes")
    agent.add(path)
    agent.add(path)
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-4")) == 2, 30, "two evidence items")
    items = gateway.evidence("cam-4")
    assert (
        items[0]["sha256"] == items[1]["sha256"] == hashlib.sha256(b"identical bytes").hexdigest()
    )
    assert items[0]["seq"] != items[1]["seq"]


def test_marked_evidence_is_uploaded_first(tmp_path, gateway, make_agent):
    # One file at a time, so the order of receipts is the order of upload.
    agent = make_agent("cam-5", gateway, max_active_uploads="1")
    plain = make_files(tmp_path / "plain", [200_000] * 4, seed=90)
    agent.add(*plain.values())
    marked = make_files(tmp_path / "marked", [1000], seed=91)
    agent.add(*marked.values(), marked=True)
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-5")) == 5, 60, "all five")
    by_arrival = sorted(gateway.evidence("cam-5"), key=lambda e: e["id"])
    assert by_arrival[0]["marked"] is True, [e["name"] for e in by_arrival]
    assert by_arrival[0]["seq"] == 5  # captured last, delivered first


def test_demo_runs_and_stops_by_itself(tmp_path):
    from tests.conftest import run_custody

    result = run_custody(
        "demo",
        "--devices",
        "2",
        "--duration",
        "6",
        "--data",
        str(tmp_path / "demo"),
        "--http",
        "127.0.0.1:0",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cam-01" in out and "cam-02" in out
    assert " receipt seq=" in out and " evidence seq=" in out
    assert "alarms: 0" in out


def test_ctrl_c_stops_the_demo_in_order(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group. The demo must
    still stop devices, then gateway, then broker: the broker is not in that group."""
    from tests.conftest import ROOT, custody_cmd

    proc = subprocess.Popen(
        custody_cmd(
            "demo", "--devices", "1", "--data", str(tmp_path / "demo"), "--http", "127.0.0.1:0"
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    assert proc.stdout is not None
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if " receipt seq=" in line:
                break
        else:
            raise AssertionError("no receipt within 60 s:\n" + "".join(lines))
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "alarms: 0" in out, out
    assert "lost the broker" not in out, out


def test_a_gateway_that_cannot_reach_its_broker_says_why(tmp_path: Path, gateway_dir: Path):
    from gateway.datadir import DataDir
    from tests.conftest import Broker, Gateway

    def health(g: Gateway) -> dict[str, str]:
        result: dict[str, str] = httpx.get(g.base + "/healthz", timeout=5).json()
        return result

    # Nothing listens on the broker's port yet: the API answers, and says what is wrong.
    b = Broker(tmp_path / "broker", tls_dir=gateway_dir / "ca")
    g = Gateway(gateway_dir, b, tmp_path / "gateway.log")
    g.start()
    try:
        wait_for(lambda: "cannot connect" in health(g)["broker"], 20, "a degraded /healthz")
        assert health(g)["status"] == "degraded"
        wait_for(lambda: "cannot connect to the broker" in g.log.read_text(), 20, "a warning")
        b.start()
        wait_for(lambda: health(g) == {"status": "ok", "broker": "connected"}, 30, "connected")
    finally:
        g.stop()
        b.stop()
    # A broker whose certificates come from another gateway's CA: a TLS failure, named.
    other = DataDir.open(tmp_path / "other-gateway")
    b2 = Broker(tmp_path / "broker2", tls_dir=other.ca_dir)
    b2.start()
    g2 = Gateway(gateway_dir, b2, tmp_path / "gateway2.log")
    g2.start()
    try:
        wait_for(lambda: "TLS" in health(g2)["broker"], 20, "a TLS problem in /healthz")
        assert "certificate verify failed" in health(g2)["broker"]
    finally:
        g2.stop()
        b2.stop()
    # mqtt:// against the TLS broker (found by a newcomer: the hint was about certificates).
    import types

    b3 = Broker(tmp_path / "broker3", tls_dir=gateway_dir / "ca")
    b3.start()
    plain = types.SimpleNamespace(url=f"mqtt://127.0.0.1:{b3.port}")
    g3 = Gateway(gateway_dir, plain, tmp_path / "gateway3.log")  # type: ignore[arg-type]
    g3.start()
    try:
        wait_for(lambda: "mqtts://" in health(g3)["broker"], 20, "the scheme named")
    finally:
        g3.stop()
        b3.stop()


def test_another_gateway_marking_the_gateway_offline_does_not_stop_uploads(
    tmp_path: Path, gateway, make_agent
):
    """Found by a tester: a second gateway process that stopped left the retained state
    ``online: false`` behind, and every device held its uploads while the real gateway ran."""
    from protocol.state import GatewayState
    from protocol.topics import GATEWAY_STATE
    from tests.conftest import Identity, mqtt_client

    agent = make_agent("cam-1", gateway)
    agent.start()
    files = make_files(tmp_path / "a", [4000], seed=7)
    agent.add(*files.values())
    wait_for(lambda: len(gateway.evidence("cam-1")) == 1, 30, "the first file")
    # What another gateway process (same data directory, same key) publishes as it stops,
    # with a gateway's identity, retained: its own run's end.
    key = SigningKey.from_seed((gateway.data / "gateway.key").read_bytes())
    other = mqtt_client(gateway.broker, Identity.gateway(gateway.data))
    try:
        other.publish(
            GATEWAY_STATE, GatewayState(False, "other").encode(key), 1, retain=True
        ).wait_for_publish(10)
    finally:
        other.disconnect()
        other.loop_stop()
    agent.add(*make_files(tmp_path / "b", [5000], seed=8).values())
    wait_for(lambda: len(gateway.evidence("cam-1")) == 2, 30, "uploads after the false offline")
    assert "another gateway process" in gateway.log.read_text()

    def retained() -> GatewayState | None:
        got: list[bytes] = []
        reader = mqtt_client(gateway.broker, Identity.gateway(gateway.data))
        reader.on_message = lambda c, u, m: got.append(bytes(m.payload))
        reader.subscribe(GATEWAY_STATE, qos=1)
        try:
            wait_for(lambda: got, 10, "the retained gateway state")
        finally:
            reader.disconnect()
            reader.loop_stop()
        try:
            return GatewayState.decode(got[0], key.verify_key)
        except ProtocolError:
            return None

    # An older release's worker (it does not sign) says "online": devices cannot believe
    # that, so the running gateway puts its own signed state back.
    old = mqtt_client(gateway.broker, Identity.gateway(gateway.data))
    try:
        old.publish(
            GATEWAY_STATE, canonical({"v": 1, "online": True, "session": "old"}), 1, retain=True
        ).wait_for_publish(10)
    finally:
        old.disconnect()
        old.loop_stop()
    wait_for(lambda: (s := retained()) is not None and s.online, 30, "a signed online again")


def test_the_gateway_answers_states_devices_cannot_believe_without_a_loop(tmp_path: Path):
    """Two gateways with different keys on one broker (a second one started by mistake)
    must not answer each other's "online" for ever; an "offline" is answered at once."""
    from gateway.datadir import DataDir
    from gateway.service import GatewayService
    from protocol.state import GatewayState

    service = GatewayService(DataDir.open(tmp_path / "gw"), "mqtt://127.0.0.1:1")
    published: list[bytes] = []
    service.client.publish = lambda topic, payload, *a, **k: published.append(payload)  # type: ignore[method-assign,assignment,return-value]
    service.connected.set()
    own = service.ingest.key
    foreign = SigningKey.generate()
    try:
        service._on_gateway_state(GatewayState(True, "other-run").encode(own))
        assert published == []  # ours, another run: it stands
        for _ in range(5):
            service._on_gateway_state(GatewayState(True, "stranger").encode(foreign))
        assert len(published) == 1  # once a minute, not once per message
        for _ in range(3):
            service._on_gateway_state(GatewayState(False, "stranger").encode(foreign))
        assert len(published) == 4  # "offline" would hold older devices: at once
        assert all(GatewayState.decode(p, own.verify_key).online for p in published)
    finally:
        service.db.close()


def test_a_verification_finishing_at_once_does_not_block_a_full_inbox(tmp_path: Path):
    """The ingest thread hands a finished file to the finalize thread. If the work is done
    before ``add_done_callback`` is reached (the ingest thread descheduled in between),
    the callback runs on the ingest thread itself; with the inbox full, as under load, a
    blocking put there waited for ever on a queue only that thread drains."""
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    from gateway.datadir import DataDir
    from gateway.service import QUEUE_DEPTH, GatewayService

    class DoneBeforeReturn(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            future = super().submit(fn, *args, **kwargs)
            wait([future])  # the work finishes before the caller adds its callback
            return future

    service = GatewayService(DataDir.open(tmp_path / "gw"), "mqtt://127.0.0.1:1")
    service._io.shutdown()
    service._io = DoneBeforeReturn(max_workers=1)
    committed: list[object] = []
    try:
        for _ in range(QUEUE_DEPTH):
            service.inbox.put_nowait(lambda: [])
        caller = threading.Thread(
            target=service._background,
            args=(lambda: None, lambda verdict: committed.append(verdict) or []),
            daemon=True,
        )
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "the ingest thread blocked on its own inbox"
        assert committed == []  # not yet: committing is the ingest loop's job
        service._thread.start()  # the ingest loop drains the inbox and commits
        wait_for(lambda: committed == [None], 10, "the finished verification committed")
    finally:
        if service._thread.ident is None:
            service._thread.start()  # drains the inbox, so the put below cannot block
        service.inbox.put(None)
        service._thread.join(10)
        service._io.shutdown()
        service.db.close()


def test_a_second_gateway_on_the_same_data_directory_is_refused(gateway):
    """Found by a newcomer: it started, took the same MQTT client id, and the two knocked
    each other off the broker every two seconds, neither log saying why."""
    from gateway.broker import free_port
    from tests.conftest import run_custody

    second = run_custody(
        "gateway", "--data", str(gateway.data), "--broker", gateway.broker.url,
        "--http", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"another gateway (pid {gateway.proc.pid}) is running on" in second.stderr
    assert "lost the broker" not in gateway.log.read_text()
