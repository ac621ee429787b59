"""Chunk hashes computed once, at capture: stored beside the outbox row, sent by the relay
with each chunk instead of hashing it again while a backlog drains; hashed on the fly
when a chunk is not one of the stored pieces (the chunk size changed, an old database)."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.db import open_db
from agent.journal import Journal
from agent.outbox import Outbox
from agent.relay import Relay
from agent.service import Device
from agent.uploading import Upload
from gateway.datadir import DataDir
from gateway.registry import enroll
from protocol.signing import SigningKey
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import Chunk, ChunkHashes, stored_chunk_hash


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


class Recorder:
    """A transport that keeps what the relay publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def start(self, on_event: object) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True

    def stop(self) -> None: ...

    def chunks(self, device_id: str) -> list[Chunk]:
        topic = device_topic(device_id, DeviceTopic.UPLOAD_CHUNK)
        return [Chunk.decode(p, verify=False) for t, p in self.sent if t == topic]


def device(tmp_path: Path, chunk_size: int, *, sealed: bool = True) -> Device:
    gw = tmp_path / "gw"
    DataDir.open(gw)
    config_path = enroll("cam-hash", gw, tmp_path / "dev", "mqtt://127.0.0.1:1")
    if not sealed:  # enrolled before encryption at rest: media kept in the clear
        text = config_path.read_text()
        config_path.write_text(text.replace('data_key_file = "data.key"\n', ""))
    env = {"CUSTODY_AGENT_CHUNK_SIZE": str(chunk_size)}
    return Device(load_config(config_path, environ=env))


def relay_for(dev: Device, transport: Recorder) -> Relay:
    return Relay(dev.config, dev.journal, dev.outbox, transport, dev.key)


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
    transport = Recorder()
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
    transport = Recorder()
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
    assert {"chunk_size", "chunk_hashes"} <= set(db["media"].columns_dict)
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
