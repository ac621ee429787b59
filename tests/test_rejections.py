"""Rejections and anomalies: each becomes an alarm with a clear reason, and nothing that
was already stored changes. The attacks are real messages on a real broker."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.ca import CertificateAuthority
from protocol.encoding import canonical
from protocol.journal import GENESIS, JournalRecord
from protocol.signing import SigningKey
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import JournalBatch
from simulators.netfault import FaultyLink
from tests.conftest import (
    AgentProc,
    Broker,
    Gateway,
    Identity,
    assert_all_in_custody,
    make_files,
    publish,
    run_custody,
    wait_for,
)


class Capture:
    """A wiretap with the gateway's identity: a plain (non-shared) subscriber that records
    what a device publishes."""

    def __init__(self, gateway: Gateway, topic: str) -> None:
        self.messages: list[bytes] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        who = Identity.gateway(gateway.data)
        self.client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
        self.client.on_message = lambda c, u, m: self.messages.append(bytes(m.payload))
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", gateway.broker.port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def record(device_id: str, seq: int, prev: bytes, key: SigningKey, **body: Any):
    return JournalRecord(device_id, seq, prev, "mark", int(time.time() * 1000), 1, body).sign(key)


def snapshot(gateway: Gateway, device_id: str) -> tuple[Any, Any]:
    return gateway.evidence(device_id), gateway.get("/api/v1/journal", device_id=device_id)


def alarm(gateway: Gateway, kind: str, device_id: str) -> dict[str, Any]:
    found = wait_for(
        lambda: gateway.alarms(kind=kind, device_id=device_id), 30, f"{kind} alarm for {device_id}"
    )
    return found[0]


def test_flipped_byte_in_encrypted_media_is_caught_on_the_device(tmp_path, gateway, make_agent):
    agent = make_agent("cam-seal", gateway)
    agent.add(*make_files(tmp_path / "bad", [300_000], seed=12).values())
    [media] = agent.media_files()
    data = bytearray(media.read_bytes())
    data[150_000] ^= 0x01
    media.write_bytes(bytes(data))
    agent.start()
    found = alarm(gateway, "media_corrupt", "cam-seal")
    assert "not uploaded" in found["detail"] and "authentication" in found["detail"]
    wait_for(lambda: agent.status()["rejected_items"] == 1, 30, "device marks it rejected")
    assert gateway.evidence("cam-seal") == []
    assert gateway.get("/api/v1/uploads", device_id="cam-seal") == [] or all(
        u["bytes_received"] < 300_000 for u in gateway.get("/api/v1/uploads", device_id="cam-seal")
    )
    assert agent.media_files() == [media], "the device keeps what it cannot vouch for"


def test_flipped_byte_in_media_is_rejected_and_journalled(tmp_path, gateway, make_agent):
    agent = make_agent("cam-flip", gateway)
    # A device enrolled without a data key stores media in the clear: then the gateway's
    # check against the signed manifest is what catches the change.
    config = agent.config.read_text()
    agent.config.write_text(config.replace('data_key_file = "data.key"\n', ""))
    good = make_files(tmp_path / "good", [50_000], seed=10)
    agent.add(*good.values())
    agent.start()
    wait_for(lambda: agent.status()["backlog_items"] == 0, 30, "first evidence receipted")
    agent.stop()
    before = snapshot(gateway, "cam-flip")
    bad = make_files(tmp_path / "bad", [80_000], seed=11)
    agent.add(*bad.values())
    [media] = agent.media_files()
    data = bytearray(media.read_bytes())
    data[40_000] ^= 0x01
    media.write_bytes(bytes(data))
    agent.start()
    found = alarm(gateway, "hash_mismatch", "cam-flip")
    assert "signed manifest" in found["detail"]
    wait_for(lambda: agent.status()["rejected_items"] == 1, 30, "device marks it rejected")
    assert agent.media_files() == [media], "the device keeps what the gateway refused"
    wait_for(
        lambda: any(
            r["kind"] == "media_corrupt"
            for r in gateway.get("/api/v1/journal", device_id="cam-flip")
        ),
        30,
        "media_corrupt record journalled and delivered",
    )
    after_evidence, after_journal = snapshot(gateway, "cam-flip")
    assert after_evidence == before[0], "no evidence stored for the altered file"
    assert after_journal[: len(before[1])] == before[1], "earlier journal unchanged"


def test_forged_batch_signature_is_rejected(gateway, make_agent):
    forged_dir = make_agent("cam-forge", gateway).dir
    before = snapshot(gateway, "cam-forge")
    forger = SigningKey.generate()
    batch = JournalBatch("cam-forge", 1, (record("cam-forge", 1, GENESIS, forger),))
    # Whoever holds cam-forge's certificate (not its signing key) can reach the topic.
    publish(
        gateway.broker,
        Identity.device(forged_dir),
        device_topic("cam-forge", DeviceTopic.JOURNAL),
        batch.encode(forger),
    )
    found = alarm(gateway, "bad_signature", "cam-forge")
    assert "journal batch" in found["detail"]
    assert snapshot(gateway, "cam-forge") == before


def test_forged_record_inside_a_genuine_envelope_is_rejected(tmp_path, gateway, make_agent):
    agent = make_agent("cam-forge2", gateway)
    device_key = SigningKey.from_seed((agent.dir / "device.key").read_bytes())
    forger = SigningKey.generate()
    good = record("cam-forge2", 1, GENESIS, device_key, note="genuine")
    forged = record("cam-forge2", 2, good.hash(), forger, note="forged")
    batch = JournalBatch("cam-forge2", 1, (good, forged))
    publish(
        gateway.broker,
        Identity.device(agent.dir),
        device_topic("cam-forge2", DeviceTopic.JOURNAL),
        batch.encode(device_key),
    )
    found = alarm(gateway, "bad_signature", "cam-forge2")
    assert "seq 2" in found["detail"]
    journal = gateway.get("/api/v1/journal", device_id="cam-forge2")
    assert [r["seq"] for r in journal] == [1], "the genuine record stays, the forged one not"


def test_replayed_journal_message_is_rejected(tmp_path, gateway, make_agent):
    agent = make_agent("cam-replay", gateway)
    capture = Capture(gateway, device_topic("cam-replay", DeviceTopic.JOURNAL))
    try:
        agent.add(*make_files(tmp_path / "a", [1000], seed=20).values())
        agent.start()
        wait_for(lambda: len(gateway.evidence("cam-replay")) == 1, 30, "first evidence")
        agent.add(*make_files(tmp_path / "b", [1000], seed=21).values())
        wait_for(lambda: len(gateway.evidence("cam-replay")) == 2, 30, "second evidence")
        wait_for(lambda: len(capture.messages) >= 2, 10, "captured envelopes")
    finally:
        capture.close()
    before = snapshot(gateway, "cam-replay")
    # Replayed by someone holding the device's certificate (a copy of its TLS files).
    publish(
        gateway.broker,
        Identity.device(agent.dir),
        device_topic("cam-replay", DeviceTopic.JOURNAL),
        capture.messages[0],
    )
    found = alarm(gateway, "replay", "cam-replay")
    assert "replayed" in found["detail"]
    assert snapshot(gateway, "cam-replay") == before


def test_unknown_device_is_rejected(tmp_path, gateway):
    # A certificate from our CA for an id the registry does not know (say, a device deleted
    # from the registry by hand): the broker lets it in, ingest must not.
    issued = CertificateAuthority.open(gateway.data / "ca").issue("ghost-7")
    (tmp_path / "ghost.crt").write_bytes(issued.cert_pem)
    (tmp_path / "ghost.key").write_bytes(issued.key_pem)
    ghost = Identity(gateway.data / "ca" / "ca.crt", tmp_path / "ghost.crt", tmp_path / "ghost.key")
    key = SigningKey.generate()
    batch = JournalBatch("ghost-7", 1, (record("ghost-7", 1, GENESIS, key),))
    publish(gateway.broker, ghost, device_topic("ghost-7", DeviceTopic.JOURNAL), batch.encode(key))
    found = alarm(gateway, "unknown_device", "ghost-7")
    assert "not enrolled" in found["detail"]
    assert gateway.get("/api/v1/journal", device_id="ghost-7") == []
    assert not [d for d in gateway.get("/api/v1/devices") if d["device_id"] == "ghost-7"]


def test_missing_sequence_number_raises_a_gap_alarm(tmp_path, gateway, make_agent):
    agent = make_agent("cam-gap", gateway)
    files = make_files(tmp_path, [1000, 2000, 3000], seed=30)
    agent.add(*files.values())
    # Someone deletes the second piece of evidence and its record on the device.
    db = sqlite3.connect(agent.dir / "agent.db")
    path = db.execute("SELECT path FROM media WHERE seq = 2").fetchone()[0]
    db.execute("DELETE FROM journal WHERE seq = 2")
    db.execute("DELETE FROM media WHERE seq = 2")
    db.commit()
    db.close()
    (agent.dir / "media" / path).unlink()
    agent.start()
    found = alarm(gateway, "sequence_gap", "cam-gap")
    assert "2..2" in found["detail"] and "Art. 34" in found["detail"]
    wait_for(lambda: len(gateway.evidence("cam-gap")) == 2, 30, "evidence either side of the gap")
    assert {e["seq"] for e in gateway.evidence("cam-gap")} == {1, 3}
    journal = gateway.get("/api/v1/journal", device_id="cam-gap")
    assert [r["gap_before"] for r in journal if r["seq"] == 3] == [True]


TELEMETRY = {
    "v": 1,
    "device_id": "cam-junk",
    "ts_ms": 5,
    "backlog_items": 0,
    "backlog_bytes": 0,
    "oldest_unacked_age_s": 0,
    "last_receipt_seq": 0,
    "journal_seq": 0,
    "storage_free_bytes": 0,
}


def test_malformed_payloads_raise_alarms_and_the_gateway_keeps_working(
    tmp_path, gateway, make_agent
):
    agent = make_agent("cam-junk", gateway)
    for topic_kind, payload in [
        (DeviceTopic.JOURNAL, b"\xff\xfe not json"),
        (DeviceTopic.UPLOAD_INIT, b'{"v": 1, "device_id": "cam-junk"}'),
        (DeviceTopic.UPLOAD_CHUNK, b"\x00"),
        # Well formed, but past what SQLite stores: once, storing it stopped ingest (the
        # upload at the end never finished). Its alarm is the telemetry one below.
        (DeviceTopic.TELEMETRY, canonical(TELEMETRY | {"backlog_bytes": 2**63})),
        (DeviceTopic.TELEMETRY, b'{"v": 2}'),
        (DeviceTopic.UPLOAD_FIN, canonical({"v": 1, "device_id": "cam-junk", "seq": 2**63})),
        # Not a list of records, under a signature that does not verify.
        (
            DeviceTopic.JOURNAL,
            canonical(
                {"v": 1, "device_id": "cam-junk", "counter": 9, "records": 5, "sig": "00" * 64}
            ),
        ),
    ]:
        publish(
            gateway.broker,
            Identity.device(agent.dir),
            device_topic("cam-junk", topic_kind),
            payload,
        )
    wait_for(
        lambda: len(gateway.alarms(kind="bad_message", device_id="cam-junk")) >= 4,
        30,
        "bad_message alarms",
    )
    wait_for(
        lambda: gateway.alarms(kind="bad_signature", device_id="cam-junk"), 30, "bad_signature"
    )
    details = " | ".join(a["detail"] for a in gateway.alarms(device_id="cam-junk"))
    assert "not UTF-8" in details and "missing" in details and "version 2" in details
    assert "up/fin: seq must be an integer" in details
    agent.add(*make_files(tmp_path, [5000], seed=40).values())
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-junk")) == 1, 30, "evidence after the junk")


def test_stored_blobs_are_read_only(tmp_path, gateway, make_agent):
    agent = make_agent("cam-ro", gateway)
    agent.add(*make_files(tmp_path, [1000], seed=50).values())
    agent.start()
    wait_for(lambda: gateway.evidence("cam-ro"), 30, "evidence")
    sha = gateway.evidence("cam-ro")[0]["sha256"]
    blob = Path(gateway.data) / "blobs" / sha[:2] / sha
    assert blob.stat().st_mode & 0o222 == 0


def test_a_bit_flipped_on_the_wire_is_fetched_again_not_rejected(tmp_path, gateway_dir):
    # Plain TCP between device and broker, so the damage reaches the gateway (TLS would
    # refuse the altered record itself). The gateway does not hash chunks on arrival:
    # the file fails its signed sha256, the chunk that fails its own is found, and only
    # it is fetched again. The evidence lands byte-identical; nothing is rejected.
    plain = Broker(tmp_path / "plain-broker")
    plain.start()
    gw = Gateway(gateway_dir, plain, tmp_path / "gateway.log")
    link = FaultyLink(("127.0.0.1", plain.port))
    agent = None
    try:
        gw.start()
        dev_dir = tmp_path / "devices" / "cam-wire"
        enrolled = run_custody(
            "enroll", "cam-wire", "--gateway-data", str(gateway_dir), "--out", str(dev_dir),
            "--broker", f"mqtt://127.0.0.1:{link.port}",
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        agent = AgentProc("cam-wire", dev_dir / "agent.toml", tmp_path / "cam-wire.log", {})
        files = make_files(tmp_path / "wire", [3 * 1024 * 1024], seed=21)
        [path] = files.values()
        link.corrupt(path.read_bytes()[2_000_000:2_000_032])
        agent.add(path)
        agent.start()
        wait_for(lambda: agent.status()["backlog_items"] == 0, 60, "the file receipted")
        assert link.corrupted == 1, "the bit was flipped on its way to the broker"
        assert_all_in_custody(gw, agent, files)
        found = alarm(gw, "bad_message", "cam-wire")
        assert "did not match the sha256 of the chunk" in found["detail"]
        assert gw.alarms(kind="hash_mismatch", device_id="cam-wire") == []
        [upload] = gw.get("/api/v1/uploads", device_id="cam-wire")
        # The damaged chunk came again, not the whole file.
        assert 3 * 1024 * 1024 < upload["bytes_received"] < 4 * 1024 * 1024
    finally:
        if agent is not None:
            agent.stop()
        gw.stop()
        link.close()
        plain.stop()


def test_the_faulty_link_flips_a_marker_split_across_reads():
    server = socket.create_server(("127.0.0.1", 0))
    link = FaultyLink(("127.0.0.1", server.getsockname()[1]))
    try:
        device = socket.create_connection(("127.0.0.1", link.port))
        broker_side, _ = server.accept()
        data = hashlib.shake_256(b"wire").digest(200_000)
        marker = data[99_990:100_022]
        link.corrupt(marker)
        device.sendall(data[:100_000])  # the marker straddles the two sends
        time.sleep(0.2)
        device.sendall(data[100_000:])
        got = b""
        while len(got) < len(data):
            got += broker_side.recv(65536)
        assert [i for i in range(len(data)) if got[i] != data[i]] == [100_021]
        assert link.corrupted == 1
        device.close()
        broker_side.close()
    finally:
        link.close()
        server.close()
