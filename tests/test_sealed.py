"""Encryption at rest: round trips, random access, and every kind of tampering caught."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sealed import (
    HEADER,
    MAX_BLOCK_SIZE,
    TAG,
    CorruptMedia,
    RecordCipher,
    SealedReader,
    seal_blocks,
)
from tests.conftest import run_custody

KEY = bytes(range(32))


def seal(tmp_path: Path, data: bytes, block: int, pieces: int = 3) -> Path:
    path = tmp_path / f"sealed-{os.urandom(4).hex()}.bin"
    step = max(1, len(data) // pieces)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    path.write_bytes(b"".join(seal_blocks(KEY, chunks, block)))
    return path


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=5000),
    block=st.integers(1, 700),
    a=st.integers(0, 6000),
    n=st.integers(0, 6000),
)
def test_round_trip_and_random_access(tmp_path_factory, data, block, a, n):
    path = seal(tmp_path_factory.mktemp("s"), data, block)
    reader = SealedReader(path, KEY)
    try:
        assert reader.size == len(data)
        assert b"".join(reader.blocks()) == data
        assert reader.pread(n, a) == data[a : a + n]
    finally:
        reader.close()


def test_ciphertext_reveals_nothing_and_nonces_differ(tmp_path):
    data = b"plate AB-1234 " * 1000
    p1, p2 = seal(tmp_path, data, 4096), seal(tmp_path, data, 4096)
    assert b"AB-1234" not in p1.read_bytes()
    assert p1.read_bytes()[HEADER.size :] != p2.read_bytes()[HEADER.size :]


def seal_v1(key: bytes, data: bytes, block: int) -> bytes:
    """The first format, as releases before 2026-11-27 wrote it: the data key itself,
    nonce = 64-bit random file id || block index."""
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    file_id = os.urandom(8)
    header = struct.pack(">8s8sI", b"CSTDYv1\0", file_id, block)
    pieces = [data[i : i + block] for i in range(0, len(data), block)] or [b""]
    out = [header]
    for i, piece in enumerate(pieces):
        aad = header + struct.pack(">I?", i, i == len(pieces) - 1)
        out.append(AESGCM(key).encrypt(file_id + struct.pack(">I", i), piece, aad))
    return b"".join(out)


def test_each_file_has_a_key_of_its_own_and_files_of_the_first_format_still_read(tmp_path):
    # A nonce must never be reused under a key. The first format drew a 64-bit file id
    # per file under the one data key: past NIST's 2**-32 for random nonces after about
    # 90,000 files, a month of a camera's segments. Now each file's key is derived from a
    # 128-bit salt, and the nonces are counters under it.
    data = os.urandom(5000)
    a, b = seal(tmp_path, data, 1000), seal(tmp_path, data, 1000)
    header_a, header_b = a.read_bytes()[: HEADER.size], b.read_bytes()[: HEADER.size]
    assert header_a[:8] == b"CSTDYv2\0" and header_a[8:24] != header_b[8:24]
    # Block 0 of one file does not open under the other's key, even with the headers
    # swapped (the associated data): the keys differ, not only the nonces.
    forged = header_b + a.read_bytes()[HEADER.size :]
    path = tmp_path / "forged.bin"
    path.write_bytes(forged)
    with pytest.raises(CorruptMedia), SealedReader(path, KEY) as reader:
        reader.pread(10, 0)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(seal_v1(KEY, data, 1000))
    with SealedReader(legacy, KEY) as reader:
        assert b"".join(reader.blocks()) == data
        assert reader.pread(1500, 700) == data[700:2200]
    raw = bytearray(legacy.read_bytes())
    raw[30] ^= 1
    legacy.write_bytes(bytes(raw))
    with pytest.raises(CorruptMedia), SealedReader(legacy, KEY) as reader:
        b"".join(reader.blocks())


@pytest.mark.parametrize("where", ["header", "first", "middle", "last-tag"])
def test_any_flipped_byte_is_detected(tmp_path, where):
    path = seal(tmp_path, os.urandom(10_000), 1000)
    raw = bytearray(path.read_bytes())
    index = {
        "header": 10,
        "first": HEADER.size + 3,
        "middle": len(raw) // 2,
        "last-tag": len(raw) - 1,
    }[where]
    raw[index] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptMedia), SealedReader(path, KEY) as reader:
        b"".join(reader.blocks())


def test_a_flipped_high_bit_in_the_block_size_is_refused_before_any_read(tmp_path):
    # The header is authenticated with the first block, read by the size the header
    # gives: a high bit flipped there asked for 2 GiB, a MemoryError on a device (which
    # ended the relay), not the corruption it is.
    path = seal(tmp_path, os.urandom(10_000), 1000)
    raw = bytearray(path.read_bytes())
    raw[HEADER.size - 4] ^= 0x80  # the block size's top byte
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptMedia, match="bad header"):
        SealedReader(path, KEY)
    with pytest.raises(ValueError):
        list(seal_blocks(KEY, [b"x"], block_size=MAX_BLOCK_SIZE + 1))


def read(path: Path, key: bytes, length: int = -1, offset: int = 0) -> bytes:
    with SealedReader(path, key) as reader:
        return b"".join(reader.blocks()) if length < 0 else reader.pread(length, offset)


def test_truncation_reordering_and_wrong_key_are_detected(tmp_path):
    data = os.urandom(5000)
    path = seal(tmp_path, data, 1000)
    raw = path.read_bytes()
    block = 1000 + TAG
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw[: HEADER.size + 3 * block])  # whole blocks gone from the end
    with pytest.raises(CorruptMedia):
        read(cut, KEY)
    body = raw[HEADER.size :]
    swapped = tmp_path / "swapped.bin"
    swapped.write_bytes(
        raw[: HEADER.size] + body[block : 2 * block] + body[:block] + body[2 * block :]
    )
    with pytest.raises(CorruptMedia):
        read(swapped, KEY, 10, 0)
    with pytest.raises(CorruptMedia):
        read(path, bytes(32), 10, 0)
    other = seal(tmp_path, os.urandom(5000), 1000)  # a block moved in from another file
    mixed = tmp_path / "mixed.bin"
    mixed.write_bytes(
        raw[: HEADER.size + block]
        + other.read_bytes()[HEADER.size + block :][:block]
        + raw[HEADER.size + 2 * block :]
    )
    with pytest.raises(CorruptMedia):
        read(mixed, KEY, 10, 1000)


def test_record_cipher_binds_its_context():
    cipher = RecordCipher(KEY)
    sealed = cipher.seal(b'{"case":"A-17"}', b"dev/journal/1")
    assert b"A-17" not in sealed
    assert cipher.open(sealed, b"dev/journal/1") == b'{"case":"A-17"}'
    with pytest.raises(CorruptMedia):
        cipher.open(sealed, b"dev/journal/2")  # a record moved to another seq


def device_copy_reveals(tmp_path: Path, *, encrypted: bool) -> list[str]:
    """Enroll, capture marked evidence (never uploaded: no broker), copy the data directory
    without the key files, and list which secrets can be found in the copy's bytes."""
    dev = tmp_path / ("enc" if encrypted else "plain")
    result = run_custody(
        "enroll",
        "cam-x",
        "--gateway-data",
        str(tmp_path / f"gw-{encrypted}"),
        "--out",
        str(dev),
        "--broker",
        "mqtt://127.0.0.1:1",
    )
    assert result.returncode == 0, result.stderr
    if not encrypted:
        config = dev / "agent.toml"
        config.write_text(config.read_text().replace('data_key_file = "data.key"\n', ""))
    secret = tmp_path / "case-4711-suspect-statement.txt"
    secret.write_bytes(b"witness saw plate TJ-A-9F321 at 14:02\n" * 2000)
    assert (
        run_custody("agent", "add", "--config", str(dev / "agent.toml"), str(secret)).returncode
        == 0
    )
    copy = tmp_path / f"stolen-{encrypted}"
    shutil.copytree(dev, copy, ignore=shutil.ignore_patterns("*.key"))
    blob = b"".join(p.read_bytes() for p in copy.rglob("*") if p.is_file())
    # Its sha256 (hex or raw) would tell whoever holds the file already that it is here.
    digest = hashlib.sha256(secret.read_bytes())
    needles = {
        "TJ-A-9F321": b"TJ-A-9F321",
        "case-4711-suspect": b"case-4711-suspect",
        "sha256": digest.hexdigest().encode(),
        "sha256 raw": digest.digest(),
    }
    return [name for name, needle in needles.items() if needle in blob]


def test_a_copied_device_reveals_no_media_or_case_data(tmp_path):
    assert device_copy_reveals(tmp_path, encrypted=False) == [
        "TJ-A-9F321",
        "case-4711-suspect",
        "sha256",
    ]
    assert device_copy_reveals(tmp_path, encrypted=True) == []


def test_rows_from_before_are_sealed_and_an_altered_row_is_refused_not_fatal(tmp_path):
    """A device upgraded with a backlog: its rows' hashes and receipts, written in the
    clear, are sealed when the outbox opens, and still read the same. A sealed field that
    no longer opens (the row altered) rejects that item; the others go on."""
    from agent.outbox import Outbox
    from tests.inprocess import device

    dev = device(tmp_path, 1024)
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(5000))
    first = dev.outbox.add_file(src)
    src.write_bytes(os.urandom(3000))
    second = dev.outbox.add_file(src)
    sha = {seq: dev.outbox.get(seq).sha256 for seq in (first, second)}  # type: ignore[union-attr]
    size, hashes = dev.outbox.chunk_hashes(first)
    # As an earlier release wrote them: in the clear.
    for seq in (first, second):
        dev.db.execute(
            "UPDATE media SET sha256 = ?, chunk_hashes = ? WHERE seq = ?",
            [sha[seq].hex(), dev.outbox.chunk_hashes(seq)[1], seq],
        )
    dev.db.conn.commit()
    reopened = Outbox(dev.db, dev.journal, dev.config.data_dir, dev.outbox.data_key, 1024)
    assert reopened.get(first).sha256 == sha[first]  # type: ignore[union-attr]  (as written)
    batches = 1
    while not reopened.seal_old_rows(batch=1):  # a batch at a time, in the background
        batches += 1
    assert batches == 3  # two rows, then none left
    types = dev.db.execute("SELECT typeof(sha256), typeof(chunk_hashes) FROM media").fetchall()
    assert set(types) == {("blob", "blob")}
    assert reopened.get(first).sha256 == sha[first]  # type: ignore[union-attr]
    assert reopened.chunk_hashes(first) == (size, hashes)
    # Once all are sealed, a field in the clear is an altered one.
    dev.db.execute("UPDATE media SET sha256 = ? WHERE seq = ?", [sha[second].hex(), second])
    dev.db.conn.commit()
    again = Outbox(dev.db, dev.journal, dev.config.data_dir, dev.outbox.data_key, 1024)
    with pytest.raises(CorruptMedia):
        again.get(second)
    dev.db.execute(
        "UPDATE media SET sha256 = ? WHERE seq = ?",
        [reopened._stored_sha(second, sha[second]), second],
    )
    dev.db.conn.commit()
    raw = dev.db.execute("SELECT sha256 FROM media WHERE seq = ?", [first]).fetchone()[0]
    altered = bytes(raw[:-1]) + bytes([raw[-1] ^ 1])
    dev.db.execute("UPDATE media SET sha256 = ? WHERE seq = ?", [altered, first])
    dev.db.execute("UPDATE journal SET acked = 1")
    dev.db.conn.commit()
    items = reopened.next_uploads(set(), 10)
    assert [i.seq for i in items] == [second]
    assert reopened.state(first) == "rejected"
    dev.close()


def test_a_malformed_row_of_an_earlier_release_is_refused_alone(tmp_path):
    from agent.outbox import Outbox
    from tests.inprocess import device

    dev = device(tmp_path, 1024)
    src = tmp_path / "a.bin"
    seqs = []
    for n in (5000, 3000):
        src.write_bytes(os.urandom(n))
        seqs.append(dev.outbox.add_file(src))
    dev.db.execute("UPDATE media SET sha256 = ? WHERE seq = ?", ["zz" * 32, seqs[0]])
    dev.db.execute("UPDATE journal SET acked = 1")
    dev.db.conn.commit()
    outbox = Outbox(dev.db, dev.journal, dev.config.data_dir, dev.outbox.data_key, 1024)
    assert outbox.seal_old_rows()  # opening and sealing do not fail over it
    assert [i.seq for i in outbox.next_uploads(set(), 10)] == [seqs[1]]
    assert outbox.state(seqs[0]) == "rejected"
    dev.close()
