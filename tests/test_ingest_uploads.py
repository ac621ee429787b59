"""Ingest's upload rules, driven directly (real SQLite and files, no broker): what is
receipted is exactly what is stored, and late duplicates change nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from agent.config import load_config
from agent.service import Device
from gateway.datadir import DataDir
from gateway.db import open_db
from gateway.ingest import Ingest
from gateway.registry import enroll
from protocol.encoding import decode
from protocol.journal import SignedRecord
from protocol.topics import DeviceTopic, GatewayTopic, device_topic, gateway_topic
from protocol.upload import Chunk, JournalBatch, UploadAck, UploadInit

CHUNK = 1024


def setup(tmp_path: Path, data: bytes) -> tuple[Ingest, Device, int]:
    config = load_config(enroll("cam-i", tmp_path / "gw", tmp_path / "dev", "mqtt://127.0.0.1:1"))
    device = Device(config)
    src = tmp_path / "evidence.bin"
    src.write_bytes(data)
    seq = device.outbox.add_file(src)
    gw = DataDir.open(tmp_path / "gw")
    ingest = Ingest(gw, open_db(gw.db_path), gw.signing_key())
    rows = device.journal.unacked(10)
    records = tuple(SignedRecord.from_wire(decode(r)) for _, r in rows)
    ingest.handle(
        device_topic("cam-i", DeviceTopic.JOURNAL),
        JournalBatch("cam-i", 1, records).encode(device.key),
    )
    ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_INIT),
        UploadInit("cam-i", seq, len(data), hashlib.sha256(data).digest(), CHUNK).encode(),
    )
    return ingest, device, seq


def chunk(ingest: Ingest, seq: int, offset: int, data: bytes) -> list:
    return ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), Chunk("cam-i", seq, offset, data).encode()
    )


def alarms(ingest: Ingest) -> list[str]:
    return [r[0] for r in ingest.db.execute("SELECT kind FROM alarms").fetchall()]


def test_overwriting_hashed_bytes_cannot_slip_past_verification(tmp_path):
    data = bytes(range(256)) * 12  # 3 chunks
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    chunk(ingest, seq, 0, b"X" * CHUNK)  # the same offset again, other bytes
    chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    replies = chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :])
    acks = [
        UploadAck.decode(r.payload, ingest.key.verify_key)
        for r in replies
        if r.topic == gateway_topic("cam-i", GatewayTopic.UPLOAD_ACK)
    ]
    assert [a.state for a in acks] == ["rejected"]
    assert alarms(ingest) == ["hash_mismatch"]
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 0
    device.close()


def test_a_late_duplicate_chunk_after_the_receipt_changes_nothing(tmp_path):
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    for off in range(0, len(data), CHUNK):
        replies = chunk(ingest, seq, off, data[off : off + CHUNK])
    assert any(r.topic.endswith("/receipt") for r in replies)
    again = chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    states = [json.loads(r.payload)["state"] for r in again if r.topic.endswith("/ack")]
    assert states == ["complete"] and any(r.topic.endswith("/receipt") for r in again)
    assert alarms(ingest) == []
    row = ingest.db.execute("SELECT state FROM uploads").fetchone()
    assert row[0] == "complete"
    evidence = ingest.db.execute("SELECT sha256 FROM evidence").fetchall()
    assert evidence == [(hashlib.sha256(data).hexdigest(),)]
    device.close()


def damaged(seq: int, offset: int, data: bytes) -> bytes:
    """A chunk whose bytes were damaged after the device hashed them (in transit)."""
    payload = bytearray(Chunk("cam-i", seq, offset, data).encode())
    payload[-1] ^= 0x01
    return bytes(payload)


def acks(ingest: Ingest, replies: list) -> list[UploadAck]:
    return [
        UploadAck.decode(r.payload, ingest.key.verify_key)
        for r in replies
        if r.topic == gateway_topic("cam-i", GatewayTopic.UPLOAD_ACK)
    ]


def stored(ingest: Ingest, data: bytes) -> bytes:
    return ingest.evidence.blobs.path(hashlib.sha256(data).hexdigest()).read_bytes()


def test_a_chunk_damaged_in_transit_is_asked_for_again_not_rejected(tmp_path):
    # Chunks are not hashed on arrival (the whole-file hash covers every byte); when the
    # file fails, the chunk that fails its own sha256 is found, dropped and re-requested.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), damaged(seq, CHUNK, data[CHUNK:-CHUNK])
    )
    replies = chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :])
    [ack] = acks(ingest, replies)
    assert ack.state == "receiving" and ack.ranges == ((0, CHUNK), (2 * CHUNK, len(data)))
    assert alarms(ingest) == ["bad_message"]
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 0
    replies = chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])  # the device resends
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert any(r.topic.endswith("/receipt") for r in replies)
    assert stored(ingest, data) == data
    assert "hash_mismatch" not in alarms(ingest)


def restart(tmp_path: Path, ingest: Ingest, seq: int, data: bytes) -> Ingest:
    ingest.close()
    gw = DataDir.open(tmp_path / "gw")
    ingest = Ingest(gw, open_db(gw.db_path), gw.signing_key())
    ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_INIT),
        UploadInit("cam-i", seq, len(data), hashlib.sha256(data).digest(), CHUNK).encode(),
    )
    return ingest


def test_claims_survive_a_gateway_restart(tmp_path):
    # The claims are on disk beside the part file, so a damaged chunk received before a
    # restart is still singled out after it: only that chunk is asked for again.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), damaged(seq, 0, data[:CHUNK]))
    chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    ingest = restart(tmp_path, ingest, seq, data)
    [ack] = acks(ingest, chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :]))
    assert ack.state == "receiving" and ack.ranges == ((CHUNK, len(data)),)
    replies = chunk(ingest, seq, 0, data[:CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert stored(ingest, data) == data
    part = ingest.evidence.active.part_path("cam-i", seq)
    assert not part.exists() and not part.with_suffix(".claims").exists()


def test_bytes_no_claim_vouches_for_are_asked_for_again(tmp_path):
    # A crash can lose claims that never reached the disk; bytes nothing vouches for
    # may be damaged, so they are fetched again rather than the file being rejected.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), damaged(seq, 0, data[:CHUNK]))
    chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    ingest.evidence.active.part_path("cam-i", seq).with_suffix(".claims").unlink()
    ingest = restart(tmp_path, ingest, seq, data)
    [ack] = acks(ingest, chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :]))
    assert ack.state == "receiving" and ack.ranges == ((2 * CHUNK, len(data)),)
    chunk(ingest, seq, 0, data[:CHUNK])
    replies = chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert stored(ingest, data) == data


def test_a_device_whose_chunks_keep_failing_is_rejected_in_the_end(tmp_path):
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :])
    states = []
    for _ in range(10):
        replies = ingest.handle(
            device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK),
            damaged(seq, CHUNK, data[CHUNK : 2 * CHUNK]),
        )
        states += [a.state for a in acks(ingest, replies)]
        if "rejected" in states:
            break
    assert states == ["receiving"] * 3 + ["rejected"]
    assert alarms(ingest) == ["bad_message", "hash_mismatch"]
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 0
