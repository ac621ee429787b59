"""Chunk hashes computed once, at capture: stored beside the outbox row, sent by the relay
with each chunk instead of hashing it again while a backlog drains; hashed on the fly
when a chunk is not one of the stored pieces (the chunk size changed, an old database)."""

from __future__ import annotations

import hashlib
import itertools
import os
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.outbox
from agent.db import open_db
from agent.journal import Journal
from agent.outbox import Outbox
from agent.sealed import SealedReader
from agent.service import Device
from agent.transport import Connected, Message
from agent.uploading import Upload
from gateway import uploads
from gateway.datadir import DataDir
from gateway.db import open_db as open_gateway_db
from gateway.ingest import Ingest
from protocol.signing import SigningKey
from protocol.upload import ChunkHashes, stored_chunk_hash
from tests.inprocess import Wire, device, relay_for


def pieces(data: bytes, size: int) -> bytes:
    return b"".join(hashlib.sha256(data[i : i + size]).digest() for i in range(0, len(data), size))


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    chunk=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
)
def test_chunk_hashes_match_hashing_each_piece_whatever_the_blocks(data, chunk, cuts):
    hasher = ChunkHashes(chunk)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for lo, hi in itertools.pairwise(bounds):
        hasher.update(data[lo:hi])
    digests = hasher.digests()
    assert digests == pieces(data, chunk)
    capped = ChunkHashes(chunk, max_chunks=2)
    for lo, hi in itertools.pairwise(bounds):
        capped.update(data[lo:hi])
    n = -(-len(data) // chunk)
    assert capped.overflow == (n > 2)
    assert capped.digests() == (b"" if n > 2 else digests)
    for offset in range(0, len(data), chunk):
        length = min(chunk, len(data) - offset)
        want = hashlib.sha256(data[offset : offset + length]).digest()
        assert stored_chunk_hash(digests, chunk, len(data), offset, length) == want
        # Not one of the pieces: the caller must hash it itself.
        if length > 1:
            assert stored_chunk_hash(digests, chunk, len(data), offset, length - 1) is None
        if chunk > 1 and offset + 1 < len(data):
            assert stored_chunk_hash(digests, chunk, len(data), offset + 1, 1) is None
    assert stored_chunk_hash(digests, chunk, len(data), len(data) + chunk, chunk) is None
    assert stored_chunk_hash(b"", 0, len(data), 0, 1) is None


def test_capture_stores_chunk_hashes_and_the_relay_sends_them(tmp_path: Path) -> None:
    dev = device(tmp_path, 1024)
    data = hashlib.shake_256(b"chunk hashes").digest(5000)  # 4 full pieces and a short one
    src = tmp_path / "clip.bin"
    src.write_bytes(data)
    seq = dev.outbox.add_file(src)
    assert dev.outbox.chunk_hashes(seq) == (1024, pieces(data, 1024))
    # Prove the relay sends what was stored rather than hashing again: replace one stored
    # hash with a value no hashing of these bytes can give.
    marker = b"\x5a" * 32
    stored = bytearray(pieces(data, 1024))
    stored[32:64] = marker
    dev.db.execute("UPDATE media SET chunk_hashes = ? WHERE seq = ?", [bytes(stored), seq])
    dev.db.execute("UPDATE journal SET acked = 1")  # the gateway accepted the manifest
    transport = Wire()
    relay = relay_for(dev, transport)
    relay.connected = True
    relay._admit_uploads(0.0, 0)
    up = relay.uploads[seq]
    up.phase = "sending"
    relay._send_holes(up, [(0, len(data))], budget=10, now=0.0)
    sent = {c.offset: c for c in transport.chunks("cam-hash")}
    assert sorted(sent) == [0, 1024, 2048, 3072, 4096]
    assert sent[1024].sha256 == marker
    for offset in (0, 2048, 3072, 4096):
        assert sent[offset].intact()
    up.close()
    dev.close()


def test_a_chunk_that_is_not_a_stored_piece_is_hashed_when_sent(tmp_path: Path) -> None:
    dev = device(tmp_path, 1024)
    data = hashlib.shake_256(b"resize").digest(3000)
    src = tmp_path / "clip.bin"
    src.write_bytes(data)
    seq = dev.outbox.add_file(src)
    dev.db.execute("UPDATE media SET chunk_hashes = ? WHERE seq = ?", [b"\x5a" * 96, seq])
    item = dev.outbox.get(seq)
    assert item is not None
    transport = Wire()
    relay = relay_for(dev, transport)
    up = Upload(item, phase="sending")
    up.chunk_size, up.chunk_hashes = dev.outbox.chunk_hashes(seq)
    relay.uploads[seq] = up
    # A resume that starts mid-piece (the gateway holds 0..1500 from a run with another
    # chunk size): none of these ranges is a stored piece, so each is hashed afresh.
    relay._send_holes(up, [(1500, 3000)], budget=10, now=0.0)
    chunks = transport.chunks("cam-hash")
    assert [(c.offset, len(c.data)) for c in chunks] == [(1500, 1024), (2524, 476)]
    assert all(c.intact() for c in chunks)
    up.close()
    dev.close()


def test_files_captured_before_chunk_hashes_were_stored_still_upload(tmp_path: Path) -> None:
    # A device database from before the columns existed gains them on open; its rows have
    # none, and the relay hashes their chunks as it sends them.
    path = tmp_path / "agent.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE media (seq INTEGER PRIMARY KEY, path TEXT, size INTEGER, sha256 TEXT, "
        "media_type TEXT, kind TEXT, marked INTEGER, state TEXT, acked_bytes INTEGER, "
        "added_ms INTEGER, receipt BLOB, receipted_ms INTEGER, reason TEXT)"
    )
    conn.execute(
        "INSERT INTO media(seq, path, size, sha256, state) VALUES (1, 'old.bin', 10, 'ab', "
        "'pending')"
    )
    conn.commit()
    conn.close()
    db = open_db(path)
    assert {"chunk_size", "chunk_hashes", "sealed_id"} <= set(db["media"].columns_dict)
    row = db.execute("SELECT path, chunk_size, chunk_hashes FROM media").fetchone()
    assert row == ("old.bin", None, None)
    outbox = Outbox(db, Journal(db, "cam-old", SigningKey.generate()), tmp_path)
    assert outbox.chunk_hashes(1) == (0, b"")  # so every chunk is hashed when sent
    db.conn.close()


def test_media_kept_in_the_clear_gets_no_stored_chunk_hashes(tmp_path: Path) -> None:
    # Nothing authenticates a clear file when it is read back, so a hash from capture time
    # could vouch for bytes changed since; such chunks are hashed as they are sent
    # (tests/test_rejections.py shows the change then ends in hash_mismatch).
    dev = device(tmp_path, 1024, sealed=False)
    src = tmp_path / "clip.bin"
    src.write_bytes(b"x" * 3000)
    seq = dev.outbox.add_file(src)
    assert dev.outbox.data_key is None
    assert dev.outbox.chunk_hashes(seq) == (0, b"")
    assert dev.db.execute("SELECT chunk_hashes FROM media").fetchone() == (None,)
    dev.close()


@pytest.mark.parametrize(
    ("size", "stored"),
    [(4 * 1024, True), (4 * 1024 - 1, True), (4 * 1024 + 1, False), (5 * 1024, False)],
)
def test_files_over_the_cap_store_no_hashes(tmp_path, monkeypatch, size, stored) -> None:
    monkeypatch.setattr(agent.outbox, "MAX_STORED_CHUNKS", 4)
    dev = device(tmp_path, 1024)
    data = hashlib.shake_256(b"cap").digest(size)
    # One block, as the recorder hands over a whole segment, and many small ones.
    for seq in (dev.outbox.add_blocks([data]), dev.outbox.add_blocks([data[:700], data[700:]])):
        want = (1024, pieces(data, 1024)) if stored else (0, b"")
        assert dev.outbox.chunk_hashes(seq) == want
    dev.close()


def swapped(dev: Device, tmp_path: Path) -> int:
    """Capture two files, then put the first one's sealed file in place of the second's
    (both sealed with the device's key, so each reads back without error); returns the
    second's seq, the only one left to upload."""
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(hashlib.shake_256(b"A").digest(4000))
    b.write_bytes(hashlib.shake_256(b"B").digest(4000))
    seq_a, seq_b = dev.outbox.add_file(a), dev.outbox.add_file(b)
    item_a, item_b = dev.outbox.get(seq_a), dev.outbox.get(seq_b)
    assert item_a is not None and item_b is not None
    item_b.path.write_bytes(item_a.path.read_bytes())
    dev.db.execute("UPDATE media SET state = 'receipted' WHERE seq = ?", [seq_a])
    return seq_b


def test_a_swapped_sealed_file_is_refused_on_the_device(tmp_path) -> None:
    # AES-GCM proves the data key, not which capture a file belongs to; the row's
    # recorded file id does.
    dev = device(tmp_path, 1024)
    seq = swapped(dev, tmp_path)
    dev.db.execute("UPDATE journal SET acked = 1")  # the gateway accepted the manifests
    transport = Wire()
    relay = relay_for(dev, transport)
    relay.connected = True
    relay._admit_uploads(0.0, 0)
    relay.uploads[seq].phase = "sending"
    relay._send_holes(relay.uploads[seq], [(0, 4000)], budget=10, now=0.0)
    assert transport.chunks("cam-hash") == [], "not a byte of it leaves the device"
    assert dev.outbox.state(seq) == "rejected"
    [reason] = dev.db.execute("SELECT reason FROM media WHERE seq = ?", [seq]).fetchone()
    assert reason.startswith("corrupt_on_device") and "another capture" in reason
    assert dev.journal.db.execute(
        "SELECT count(*) FROM journal WHERE kind = 'media_corrupt'"
    ).fetchone() == (1,)
    dev.close()


def test_stored_hashes_that_disagree_end_in_hash_mismatch_not_a_resend_loop(tmp_path) -> None:
    """A row from before file ids were recorded cannot tell a swapped file, whose stored
    hashes then disagree with its bytes: the gateway drops those chunks as damaged and asks
    again, and after its three rounds it drops them on arrival. The relay must stop
    trusting stored hashes at the first resend, or it repeats them forever."""
    dev = device(tmp_path, 1024, ack_timeout=0.01)
    seq_b = swapped(dev, tmp_path)
    dev.db.execute("UPDATE media SET sealed_id = NULL")
    gw = DataDir.open(tmp_path / "gw")
    ingest = Ingest(gw, open_gateway_db(gw.db_path), gw.signing_key())
    transport = Wire()
    relay = relay_for(dev, transport)
    relay._handle(Connected())
    for _ in range(300):  # in-process: device and gateway take turns, no broker between
        relay._pump()
        replies = []
        while transport.sent:
            topic, payload = transport.sent.pop(0)
            replies += ingest.handle(topic, payload)
        replies += ingest.flush()
        for reply in replies:
            relay._handle(Message(reply.topic, reply.payload))
        if dev.outbox.state(seq_b) != "pending":
            break
        time.sleep(0.003)  # lets the relay's ack timeout expire
    assert dev.outbox.state(seq_b) == "rejected"
    kinds = {k for (k,) in ingest.db.execute("SELECT kind FROM alarms").fetchall()}
    assert "hash_mismatch" in kinds
    assert ingest.db.execute("SELECT count(*) FROM evidence").fetchone() == (0,)
    relay.uploads.clear()
    ingest.close()
    dev.close()


@pytest.mark.parametrize("how", ["refused", "absent"])
def test_dropping_cached_pages_is_only_a_hint(tmp_path, monkeypatch, how) -> None:
    if how == "absent":
        monkeypatch.delattr(uploads.os, "posix_fadvise")
    else:

        def refuse(*args: object) -> None:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(uploads.os, "posix_fadvise", refuse)
    up = uploads.ActiveUpload("cam", 1, 10, b"\0" * 32, tmp_path / "1.part")
    up.write(0, b"0123456789")
    up.sync()
    assert up.durable == ((0, 10),)
    assert up.unsynced == 0
    up.close()


@pytest.mark.parametrize(("chunk", "block"), [(1024, 1024), (16 * 1024 * 1024, 1024 * 1024)])
def test_media_is_sealed_in_blocks_of_one_chunk_up_to_a_mebibyte(tmp_path, chunk, block):
    dev = device(tmp_path, 1024)
    dev.outbox.chunk_size = chunk  # 16 MiB is past the config's limit: set on the outbox
    src = tmp_path / "clip.bin"
    src.write_bytes(hashlib.shake_256(b"blocks").digest(3000))
    seq = dev.outbox.add_file(src)
    item = dev.outbox.get(seq)
    assert item is not None
    reader = dev.outbox.open_media(item)
    assert isinstance(reader, SealedReader)
    assert reader.info.block_size == block
    reader.close()
    dev.close()


def test_reads_smaller_than_a_block_decrypt_it_once(tmp_path, monkeypatch) -> None:
    # A file sealed under a larger chunk size, read back in smaller chunks.
    dev = device(tmp_path, 4096)
    data = hashlib.shake_256(b"small reads").digest(8192)
    src = tmp_path / "clip.bin"
    src.write_bytes(data)
    item = dev.outbox.get(dev.outbox.add_file(src))
    assert item is not None
    reader = dev.outbox.open_media(item)
    assert isinstance(reader, SealedReader)
    calls = []
    decrypt = reader._decrypt_block
    monkeypatch.setattr(reader, "_decrypt_block", lambda i: calls.append(i) or decrypt(i))
    got = b"".join(reader.pread(1024, off) for off in range(0, 8192, 1024))
    assert got == data
    assert calls == [0, 1]
    reader.close()
    dev.close()


def test_an_adopted_sealed_orphan_records_its_own_file_id(tmp_path) -> None:
    # Renamed into media/ but never committed (a crash in between): adopted on recovery,
    # it must still upload, so its row records the id its header carries.
    dev = device(tmp_path, 1024)
    written = dev.outbox._write_durably([hashlib.shake_256(b"orphan").digest(3000)])
    old = time.time() - agent.outbox.SETTLE_S - 5
    os.utime(written.path, (old, old))
    assert dev.outbox.recover(at_boot=True).adopted_orphans == 1
    [(seq, sealed_id)] = dev.db.execute("SELECT seq, sealed_id FROM media").fetchall()
    assert bytes(sealed_id) == written.sealed_id
    item = dev.outbox.get(seq)
    assert item is not None
    reader = dev.outbox.open_media(item)  # not refused as another capture's file
    assert reader.pread(3000, 0) == hashlib.shake_256(b"orphan").digest(3000)
    reader.close()
    dev.close()
