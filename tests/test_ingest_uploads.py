"""Ingest's upload rules, driven directly (real SQLite and files, no broker): what is
receipted is exactly what is stored, and late duplicates change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
from pathlib import Path

import pytest

from agent.config import load_config
from agent.service import Device
from gateway import blobs, uploads
from gateway.datadir import DataDir
from gateway.db import open_db
from gateway.ingest import Ingest
from gateway.registry import enroll
from gateway.uploads import CLAIM, ActiveUpload
from protocol.encoding import decode
from protocol.journal import SignedRecord
from protocol.signing import SigningKey
from protocol.topics import DeviceTopic, GatewayTopic, device_topic, gateway_topic
from protocol.upload import Chunk, JournalBatch, UploadAck, UploadInit, add_range, subtract

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
    # The claims are on disk (after the evidence bytes in the part file), so a damaged
    # chunk received before a restart is still singled out after it: only that chunk is
    # asked for again. The stored blob is the evidence alone, the claims cut off.
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


def test_an_upload_left_by_an_earlier_release_is_taken_over_with_its_claims(tmp_path):
    # Before 2026-11-27 a part file was ``<seq>.part`` (evidence only) with its claims in
    # ``<seq>.claims``. After an upgrade the upload goes on from there, and the claims
    # still single out the one damaged chunk.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), damaged(seq, 0, data[:CHUNK]))
    chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    ingest.close()
    part = ingest.evidence.active.part_path("cam-i", seq)
    assert part.suffix == ".upload"
    # Write it back the way the earlier release kept it.
    whole = part.read_bytes()
    part.with_suffix(".part").write_bytes(whole[: len(data)].rstrip(b"\0"))
    part.with_suffix(".claims").write_bytes(whole[len(data) :] + b"torn")
    part.unlink()
    ingest = restart(tmp_path, ingest, seq, data)
    assert part.exists() and not part.with_suffix(".claims").exists()
    assert not part.with_suffix(".part").exists()
    [ack] = acks(ingest, chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :]))
    assert ack.state == "receiving" and ack.ranges == ((CHUNK, len(data)),)
    replies = chunk(ingest, seq, 0, data[:CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert stored(ingest, data) == data


def test_a_takeover_cut_short_by_a_crash_or_a_rollback_ends_right(tmp_path):
    data = bytes(range(256)) * 12
    claims = b"".join(
        CLAIM.pack(off, CHUNK, hashlib.sha256(data[off : off + CHUNK]).digest())
        for off in range(0, 2 * CHUNK, CHUNK)
    )
    path = tmp_path / "7.upload"

    def fresh() -> ActiveUpload:
        return ActiveUpload("cam-i", 7, len(data), hashlib.sha256(data).digest(), path)

    # A crash after the rename, before the claims were copied: the next call copies them.
    path.write_bytes(data[: 2 * CHUNK])
    path.with_suffix(".claims").write_bytes(claims + b"to")
    up = fresh()
    up.take_over_legacy()
    assert not path.with_suffix(".claims").exists()
    assert path.read_bytes()[len(data) :] == claims  # whole records, after the evidence
    up.ranges = ((0, len(data)),)
    up.write(2 * CHUNK, b"x" * CHUNK)  # the last chunk arrives damaged
    assert up.suspect_ranges() == ((2 * CHUNK, len(data)),)  # the copied claims vouch
    up.close()
    # A rollback came in between: the earlier release began again in a ``.part`` (the
    # database describes that one), and the stale ``.upload`` gives way to it.
    path.with_suffix(".part").write_bytes(data[:CHUNK])
    up = fresh()
    up.take_over_legacy()
    assert path.read_bytes() == data[:CHUNK] and not path.with_suffix(".part").exists()
    # Settled, an upload leaves nothing of either layout behind.
    path.with_suffix(".part").write_bytes(b"left")
    path.with_suffix(".claims").write_bytes(b"left")
    up.discard()
    assert list(tmp_path.glob("7.*")) == []


def test_a_rolled_back_gateway_never_finds_a_part_file_with_claims_in_it(tmp_path):
    # An earlier release moves ``<seq>.part`` into the blob store whole; the claims after
    # the evidence would go with it. This layout's file has another name, so a rolled
    # back gateway finds no part file and has the upload sent again instead.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    part = ingest.evidence.active.part_path("cam-i", seq)
    assert part.stat().st_size > len(data)  # claims after the evidence
    assert list(part.parent.glob("*.part")) == []
    up = ingest.evidence.active.get("cam-i", seq)
    assert up is not None
    up.sync()
    up.cut_claims()
    assert up.unsynced > 0  # the cut is always made durable by the next sync
    ingest.close()


def test_bytes_no_claim_vouches_for_are_asked_for_again(tmp_path):
    # A crash can lose claims that never reached the disk; bytes nothing vouches for
    # may be damaged, so they are fetched again rather than the file being rejected.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK), damaged(seq, 0, data[:CHUNK]))
    chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    os.truncate(ingest.evidence.active.part_path("cam-i", seq), len(data))  # claims gone
    ingest = restart(tmp_path, ingest, seq, data)
    [ack] = acks(ingest, chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :]))
    assert ack.state == "receiving" and ack.ranges == ((2 * CHUNK, len(data)),)
    chunk(ingest, seq, 0, data[:CHUNK])
    replies = chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert stored(ingest, data) == data


def eager_after_three_rounds(tmp_path: Path, data: bytes) -> tuple[Ingest, int]:
    """An upload whose middle chunk arrived damaged three times, then a gateway restart."""
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :])
    states = []
    for _ in range(3):
        replies = ingest.handle(
            device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK),
            damaged(seq, CHUNK, data[CHUNK : 2 * CHUNK]),
        )
        states += [a.state for a in acks(ingest, replies)]
    assert states == ["receiving"] * 3
    # The count is in the database: a restart (or an eviction) does not reset it.
    return restart(tmp_path, ingest, seq, data), seq


def test_after_three_rounds_chunks_are_checked_on_arrival(tmp_path):
    # A link that keeps damaging chunks never gets the file rejected, and the gateway
    # stops re-reading the file for it: damaged chunks are dropped as they arrive.
    data = bytes(range(256)) * 12
    ingest, seq = eager_after_three_rounds(tmp_path, data)
    replies = ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_CHUNK),
        damaged(seq, CHUNK, data[CHUNK : 2 * CHUNK]),
    )
    assert replies == []
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 0
    replies = chunk(ingest, seq, CHUNK, data[CHUNK : 2 * CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert stored(ingest, data) == data
    assert alarms(ingest) == ["bad_message"]


def test_a_file_the_device_really_sent_wrong_is_rejected(tmp_path):
    # Every chunk matches its own hash, the file does not match its signed manifest:
    # nothing was damaged on the way, so nothing is asked for again.
    data = bytes(range(256)) * 12
    ingest, seq = eager_after_three_rounds(tmp_path, data)
    replies = chunk(ingest, seq, CHUNK, b"X" * CHUNK)
    assert [a.state for a in acks(ingest, replies)] == ["rejected"]
    assert alarms(ingest) == ["bad_message", "hash_mismatch"]
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 0
    part = ingest.evidence.active.part_path("cam-i", seq)
    assert not part.exists() and not part.with_suffix(".claims").exists()


def test_claims_are_bounded_and_a_torn_record_is_overwritten(tmp_path):
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    for _ in range(3000):  # far more resends of one chunk than the file has chunks
        chunk(ingest, seq, 0, data[:CHUNK])
    up = ingest.evidence.active.get("cam-i", seq)
    assert up is not None
    assert up.path.stat().st_size == len(data) + up.max_claims * CLAIM.size
    # A crash tears the last record: the next claim is written over it, so the records
    # stay aligned, and a record naming no chunk of the file is never read as one.
    small = tmp_path / "small.part"
    first = ActiveUpload("cam-i", 9, len(data), hashlib.sha256(data).digest(), small)
    for off in range(0, len(data), CHUNK):
        piece = data[off : off + CHUNK]
        first.write(off, piece, hashlib.sha256(piece).digest())
    first.close()
    with open(small, "ab") as f:
        f.write(b"torn")
    again = ActiveUpload("cam-i", 9, len(data), hashlib.sha256(data).digest(), small)
    again.write(0, b"x" * CHUNK, hashlib.sha256(b"other").digest())  # damaged on the way
    assert again.claims == 4
    assert small.stat().st_size == len(data) + 4 * CLAIM.size
    with open(small, "ab") as f:  # a whole record of garbage, as a crash might leave
        f.write(CLAIM.pack(2**62, 2**31, b"\0" * 32))
    assert again.suspect_ranges() == ((0, CHUNK),)  # no claim vouches for those bytes
    again.cut_claims()
    again.close()
    assert small.read_bytes() == b"x" * CHUNK + data[CHUNK:]


def test_subtract_matches_a_byte_by_byte_reference():
    rng = random.Random(7)

    def pieces() -> tuple[tuple[int, int], ...]:
        out: tuple[tuple[int, int], ...] = ()
        for _ in range(rng.randint(0, 5)):
            s = rng.randint(0, 60)
            out = add_range(out, s, s + rng.randint(0, 12))
        return out

    for _ in range(2000):
        have, remove = pieces(), pieces()
        left = {b for s, e in have for b in range(s, e)} - {
            b for s, e in remove for b in range(s, e)
        }
        expected: tuple[tuple[int, int], ...] = ()
        for b in sorted(left):
            expected = add_range(expected, b, b + 1)
        assert subtract(have, remove) == expected


def test_a_database_from_before_the_recheck_count_is_upgraded(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE uploads (device_id TEXT, seq INTEGER, size INTEGER, sha256 TEXT, "
        "ranges TEXT, bytes_received INTEGER, inits INTEGER, resumed_from INTEGER, "
        "state TEXT, reason TEXT, updated_ms INTEGER, PRIMARY KEY (device_id, seq))"
    )
    conn.execute(
        "INSERT INTO uploads VALUES ('cam-i', 1, 10, 'ab', '[[0, 5]]', 5, 1, -1, "
        "'receiving', '', 0)"
    )
    conn.commit()
    conn.close()
    db = open_db(path)
    assert db.execute("SELECT ranges, rechecks FROM uploads").fetchall() == [("[[0, 5]]", 0)]


def test_a_file_damaged_all_over_is_asked_for_whole(tmp_path, monkeypatch):
    # Past MAX_PIECES vouched pieces the gateway stops tracking them (memory and the
    # size of the ack stay bounded) and asks for everything again.
    monkeypatch.setattr(uploads, "MAX_PIECES", 4)
    data = bytes(range(256)) * 4
    up = ActiveUpload("cam-i", 1, len(data), hashlib.sha256(data).digest(), tmp_path / "1.part")
    for off in range(0, len(data), 64):
        piece = data[off : off + 64]
        claim = hashlib.sha256(piece if off % 128 == 0 else b"other").digest()
        up.write(off, piece, claim)
    assert up.suspect_ranges() == ((0, len(data)),)
    monkeypatch.setattr(uploads, "MAX_PIECES", 4096)
    assert up.suspect_ranges() == tuple((off + 64, off + 128) for off in range(0, len(data), 128))
    up.close()


def test_empty_chunks_claim_nothing(tmp_path):
    up = ActiveUpload("cam-i", 1, 1024, hashlib.sha256(b"").digest(), tmp_path / "1.part")
    for _ in range(100):
        up.write(0, b"", hashlib.sha256(b"").digest())
    assert up.claims <= 0 and up.path.stat().st_size == 0
    up.close()


def test_a_verification_that_decided_nothing_closes_the_files(tmp_path):
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    up = ingest.evidence.active.get("cam-i", seq)
    assert up is not None and up.fd >= 0
    assert ingest.evidence._commit(up, None) == []
    assert up.fd == -1


def test_init_or_fin_naming_another_device_is_a_topic_mismatch(tmp_path):
    """Found by a tester: a chunk naming another device raised ``topic_mismatch``, an init
    or fin was dropped without a word."""
    from protocol.upload import UploadFin

    data = b"x" * 3000
    ingest, _, seq = setup(tmp_path, data)
    sha = hashlib.sha256(data).digest()
    init = UploadInit("cam-other", seq, len(data), sha, CHUNK).encode()
    assert ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_INIT), init) == []
    fin = UploadFin("cam-other", seq).encode()
    assert ingest.handle(device_topic("cam-i", DeviceTopic.UPLOAD_FIN), fin) == []
    details = [r[0] for r in ingest.db.execute("SELECT detail FROM alarms").fetchall()]
    assert any("upload init naming cam-other" in d for d in details), details
    assert any("upload fin naming cam-other" in d for d in details), details
    # Made-up ids, a new one in every message: one alarm per kind of message, counted.
    for n in range(20):
        made_up = f"cam-made-up-{n}"
        for topic, payload in (
            (DeviceTopic.UPLOAD_INIT, UploadInit(made_up, seq, len(data), sha, CHUNK).encode()),
            (DeviceTopic.UPLOAD_FIN, UploadFin(made_up, seq).encode()),
            (DeviceTopic.UPLOAD_CHUNK, Chunk(made_up, seq, 0, data[:CHUNK]).encode()),
            (DeviceTopic.JOURNAL, JournalBatch(made_up, n + 9, ()).encode(SigningKey.generate())),
        ):
            assert ingest.handle(device_topic("cam-i", topic), payload) == []
    rows = ingest.db.execute(
        "SELECT count(*), sum(count) FROM alarms WHERE kind = 'topic_mismatch'"
    ).fetchone()
    assert rows == (4, 2 + 4 * 20), rows


def test_a_signed_manifest_too_large_to_store_is_refused(tmp_path):
    """Found by a tester: a signed manifest of 2**62 bytes was accepted, then every chunk
    failed with "File too large" and a traceback, no alarm, no ack, for ever. Manifests
    are now held to 1 TiB when the journal batch is decoded, like any malformed record."""
    from protocol.encoding import canonical
    from protocol.signing import sign_object

    data = b"y" * 100
    ingest, device, _ = setup(tmp_path, data)
    prev = device.journal.unacked(10)[-1]
    wire = decode(prev[1])
    record = {k: v for k, v in wire.items() if k != "sig"}
    record.update(seq=record["seq"] + 1, prev=hashlib.sha256(canonical(wire)).hexdigest())
    record["body"] = {**record["body"], "size": 2**62}
    batch = {
        "v": 1,
        "device_id": "cam-i",
        "counter": 2,
        "records": [sign_object(record, device.key)],
    }
    ingest.handle(
        device_topic("cam-i", DeviceTopic.JOURNAL), canonical(sign_object(batch, device.key))
    )
    details = [r[0] for r in ingest.db.execute("SELECT detail FROM alarms").fetchall()]
    assert any("body.size must be an integer in [0, 1099511627776]" in d for d in details)
    assert ingest.db.execute(
        "SELECT count(*) FROM journal WHERE device_id = 'cam-i' AND seq = ?", [record["seq"]]
    ).fetchone() == (0,)


def test_a_stored_manifest_that_no_longer_reads_refuses_its_upload(tmp_path):
    """A manifest stored before the 1 TiB cap (or damaged in the database) is refused at
    ``init`` with ``bad_manifest`` and a ``bad_record`` alarm: the device stops asking."""
    data = b"z" * 100
    ingest, _, seq = setup(tmp_path, data)
    record = json.loads(
        ingest.db.execute(
            "SELECT record FROM journal WHERE device_id = 'cam-i' AND seq = ?", [seq]
        ).fetchone()[0]
    )
    record["body"]["size"] = 2**62
    ingest.db.execute(
        "UPDATE journal SET record = ? WHERE device_id = 'cam-i' AND seq = ?",
        [json.dumps(record), seq],
    )
    ingest.db.execute("DELETE FROM uploads WHERE device_id = 'cam-i' AND seq = ?", [seq])
    ingest.evidence.active.forget("cam-i", seq)
    replies = ingest.handle(
        device_topic("cam-i", DeviceTopic.UPLOAD_INIT),
        UploadInit("cam-i", seq, len(data), hashlib.sha256(data).digest(), CHUNK).encode(),
    )
    (ack,) = acks(ingest, replies)
    assert (ack.state, ack.reason) == ("rejected", "bad_manifest")
    assert "bad_record" in alarms(ingest)


@pytest.mark.parametrize("first", ["init", "a resent chunk"])
def test_a_crash_after_the_file_went_into_the_store_asks_the_device_for_nothing(
    tmp_path, monkeypatch, first
):
    # The background step moved the verified file into the blob store; the gateway died
    # before the ingest thread committed the evidence. The last checkpoint says only part
    # of the file was held. Asked for the rest, the device sent it into a new part file
    # with a hole where the head had been: a false "corrupted in transit" alarm and the
    # whole file again (or, out of rechecks, a false hash_mismatch and a rejection).
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    chunk(ingest, seq, 0, data[:CHUNK])
    up = ingest.evidence.active.get("cam-i", seq)
    assert up is not None
    ingest.evidence._checkpoint(up)  # durable: the first chunk only
    for offset in (CHUNK, 2 * CHUNK):
        piece = data[offset : offset + CHUNK]
        up.write(offset, piece, hashlib.sha256(piece).digest())
    assert ingest.evidence._verify_and_store(up) is not None  # the finalize thread's part
    ingest.db.conn.close()  # killed before its commit
    gw = DataDir.open(tmp_path / "gw")
    ingest = Ingest(gw, open_db(gw.db_path), gw.signing_key())
    synced: list[Path] = []
    real_fsync_dir = blobs.fsync_dir
    monkeypatch.setattr(blobs, "fsync_dir", lambda d: (synced.append(d), real_fsync_dir(d)))
    if first == "init":
        replies = ingest.handle(
            device_topic("cam-i", DeviceTopic.UPLOAD_INIT),
            UploadInit("cam-i", seq, len(data), hashlib.sha256(data).digest(), CHUNK).encode(),
        )
    else:  # the device's last chunk timed out and it sent it again, before any init
        replies = chunk(ingest, seq, 2 * CHUNK, data[2 * CHUNK :])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    # The rename may not have been durable when the crash came: it is made so before the
    # receipt rests on it.
    blob = ingest.evidence.blobs.path(hashlib.sha256(data).hexdigest())
    assert blob.parent in synced and ingest.evidence.blobs.root in synced
    assert any(r.topic == gateway_topic("cam-i", GatewayTopic.RECEIPT) for r in replies)
    assert stored(ingest, data) == data
    assert alarms(ingest) == []
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone()[0] == 1
    ingest.close()
    device.close()


def test_new_evidence_is_stored_one_directory_deep(tmp_path):
    # blobs/ab/<sha256>: 256 directories, not one new directory (and its fsync) per file.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    for off in range(0, len(data), CHUNK):
        chunk(ingest, seq, off, data[off : off + CHUNK])
    sha = hashlib.sha256(data).hexdigest()
    root = ingest.evidence.blobs.root
    assert (root / sha[:2] / sha).read_bytes() == data
    assert [p.name for p in (root / sha[:2]).iterdir()] == [sha]  # no second level made
    device.close()


def test_a_blob_an_earlier_release_stored_two_levels_deep_is_found_not_stored_again(
    tmp_path, monkeypatch
):
    # Releases before 2026-11-27 stored blobs/ab/cd/<sha256>. Such a blob is still read,
    # and content already held that way is not stored a second time.
    data = bytes(range(256)) * 12
    ingest, device, seq = setup(tmp_path, data)
    sha = hashlib.sha256(data).hexdigest()
    root = ingest.evidence.blobs.root
    nested = root / sha[:2] / sha[2:4] / sha
    nested.parent.mkdir(parents=True)
    nested.write_bytes(data)
    nested.chmod(0o440)
    synced: list[Path] = []
    real_fsync_dir = blobs.fsync_dir
    monkeypatch.setattr(blobs, "fsync_dir", lambda d: (synced.append(d), real_fsync_dir(d)))
    for off in range(0, len(data), CHUNK):
        replies = chunk(ingest, seq, off, data[off : off + CHUNK])
    assert [a.state for a in acks(ingest, replies)] == ["complete"]
    assert any(r.topic == gateway_topic("cam-i", GatewayTopic.RECEIPT) for r in replies)
    assert ingest.evidence.blobs.path(sha) == nested and stored(ingest, data) == data
    assert not (root / sha[:2] / sha).exists()  # not stored twice
    assert list(ingest.evidence.active.partial_dir.rglob("*.upload")) == []
    # The earlier release may have renamed it in just before a crash: made durable, all
    # the way up, before a receipt rests on it.
    assert {nested.parent, nested.parent.parent, root} <= set(synced)
    assert alarms(ingest) == []
    device.close()
