"""Tests for the device store: agent.db, agent.journal, agent.outbox.

Everything runs against real SQLite files (WAL, ``BEGIN IMMEDIATE``) and real files under
``tmp_path``; the concurrency test uses real OS processes writing the same database, the way
``custody agent add`` and the running agent do. Crash states are produced by putting the
files and rows a crash would leave behind in place, then calling ``recover``.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from agent.db import get_counter, open_db
from agent.errors import StoreError
from agent.journal import Journal
from agent.keys import FileKeyStore
from agent.outbox import COPY_BLOCK, SETTLE_S, Outbox
from protocol import merkle
from protocol.encoding import decode
from protocol.journal import GENESIS, SignedRecord, verify_chain
from protocol.receipt import Receipt, SignedTreeHead, evidence_leaf
from protocol.signing import SigningKey

DEVICE = "dev-1"
GATEWAY_KEY = SigningKey.from_seed(hashlib.sha256(b"test gateway").digest())


@dataclass
class Store:
    data_dir: Path
    db: sqlite_utils.Database
    key: SigningKey
    journal: Journal
    outbox: Outbox

    @property
    def media_dir(self) -> Path:
        return self.data_dir / "media"


def open_store(data_dir: Path, key: SigningKey) -> Store:
    db = open_db(data_dir / "agent.db")
    journal = Journal(db, DEVICE, key)
    return Store(data_dir, db, key, journal, Outbox(db, journal, data_dir))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "device", SigningKey.generate())
    yield s
    s.db.conn.close()


def make_src(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def payload(label: str, size: int) -> bytes:
    return hashlib.shake_256(label.encode()).digest(size) if size else b""


def stored_chain(db: sqlite_utils.Database) -> list[SignedRecord]:
    """Every journal row decoded from its stored bytes, checked against its stored hash."""
    chain = []
    for seq, stored_hash, kind, raw in db.execute(
        "SELECT seq, hash, kind, record FROM journal ORDER BY seq"
    ).fetchall():
        signed = SignedRecord.from_wire(decode(bytes(raw)))
        assert signed.record.seq == seq
        assert signed.record.kind == kind
        assert signed.hash() == bytes(stored_hash)
        assert signed.encode() == bytes(raw)  # stored canonically
        chain.append(signed)
    return chain


def verify_store(s: Store) -> list[SignedRecord]:
    chain = stored_chain(s.db)
    head = verify_chain(chain, s.key.verify_key)
    assert s.journal.head() == ((len(chain), head) if chain else (0, GENESIS))
    return chain


def media_rows(db: sqlite_utils.Database) -> dict[int, dict[str, Any]]:
    cur = db.execute("SELECT * FROM media ORDER BY seq")
    names = [d[0] for d in cur.description]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def bin_files(s: Store) -> set[str]:
    return {p.name for p in s.media_dir.glob("*.bin")}


def receipt_for(s: Store, seq: int, *, sha256: bytes | None = None) -> tuple[Receipt, bytes]:
    """A genuine gateway receipt for ``seq`` (a one-entry-plus-padding transparency log)."""
    item = s.outbox.get(seq)
    assert item is not None
    sha = item.sha256 if sha256 is None else sha256
    leaves = [b"padding-0", evidence_leaf(DEVICE, seq, sha, item.size, 1_000), b"padding-2"]
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    head = SignedTreeHead(3, merkle.root_from_leaf_hashes(hashes), 1_000).signed(GATEWAY_KEY)
    receipt = Receipt(
        DEVICE, seq, sha, item.size, 1_000, 1, head, tuple(merkle.inclusion_proof(1, hashes))
    )
    raw = receipt.encode(GATEWAY_KEY)
    assert Receipt.decode(raw, GATEWAY_KEY.verify_key) == receipt
    return receipt, raw


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def test_add_file_allocates_consecutive_seqs_and_keeps_a_copy(store: Store, tmp_path: Path) -> None:
    sizes = {"clip.mp4": 10_000, "empty.bin": 0, "photo.jpg": 17, "big.dat": COPY_BLOCK * 2 + 5}
    src = {
        name: make_src(tmp_path / "src", name, payload(name, size)) for name, size in sizes.items()
    }
    before = {name: (p.read_bytes(), p.stat()) for name, p in src.items()}

    seqs = [store.outbox.add_file(src[name], marked=name == "photo.jpg") for name in sizes]
    assert seqs == [1, 2, 3, 4]

    rows = media_rows(store.db)
    chain = verify_store(store)
    for seq, name in zip(seqs, sizes, strict=True):
        data, st = before[name]
        # The original is untouched.
        assert src[name].read_bytes() == data
        assert src[name].stat().st_mtime_ns == st.st_mtime_ns
        # The outbox holds an independent copy, described by its row and its signed record.
        row = rows[seq]
        copy = store.media_dir / row["path"]
        assert copy.read_bytes() == data
        assert copy.stat().st_ino != st.st_ino
        assert row["state"] == "pending"
        assert row["size"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["marked"] == (name == "photo.jpg")
        body = chain[seq - 1].record.body
        assert chain[seq - 1].record.kind == "file"
        assert body["name"] == name
        assert body["sha256"] == row["sha256"]
        assert body["size"] == len(data)
        assert body["marked"] == (name == "photo.jpg")
    assert rows[1]["media_type"] == "video/mp4"
    assert rows[3]["media_type"] == "image/jpeg"
    assert rows[4]["media_type"] == "application/octet-stream"

    # Changing the original later does not reach the captured copy.
    src["clip.mp4"].write_bytes(b"overwritten")
    assert (store.media_dir / rows[1]["path"]).read_bytes() == before["clip.mp4"][0]
    assert bin_files(store) == {r["path"] for r in rows.values()}
    assert list(store.outbox.incoming.iterdir()) == []


def test_add_blocks_body_and_kind(store: Store) -> None:
    seq = store.outbox.add_blocks(
        [b"ab", b"", b"cd"], kind="segment", media_type="video/mp4", body={"camera": "front"}
    )
    record = verify_store(store)[seq - 1].record
    assert record.kind == "segment"
    assert record.body["camera"] == "front"
    assert record.media is not None
    assert record.media.sha256 == hashlib.sha256(b"abcd").digest()
    assert record.media.size == 4


def test_capture_refusals_leave_nothing_behind(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a media record kind"):
        store.outbox.add_blocks([b"x"], kind="mark")
    with pytest.raises(StoreError, match="not a readable file"):
        store.outbox.add_file(tmp_path / "does-not-exist.mp4")
    with pytest.raises(StoreError, match="not a readable file"):
        store.outbox.add_file(tmp_path)
    assert store.journal.head() == (0, GENESIS)
    assert bin_files(store) == set()
    assert media_rows(store.db) == {}


def test_add_file_with_undecodable_name(store: Store, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", os.fsdecode(b"clip-\xff.mp4"), b"evidence")
    try:
        seq: int | None = store.outbox.add_file(src)
    except StoreError:
        seq = None
    # Either the evidence is captured, or it is refused cleanly: never a file with no row.
    assert bin_files(store) == {r["path"] for r in media_rows(store.db).values()}
    if seq is not None:
        assert verify_store(store)[seq - 1].record.body["sha256"] == (
            hashlib.sha256(b"evidence").hexdigest()
        )


# --------------------------------------------------------------------------------------------
# Journal bookkeeping, status and upload order
# --------------------------------------------------------------------------------------------


def test_journal_append_ack_and_unacked(store: Store) -> None:
    assert store.journal.head() == (0, GENESIS)
    records = [store.journal.append("mark", {"n": i}) for i in range(5)]
    assert [r.record.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].record.prev == GENESIS
    for a, b in itertools.pairwise(records):
        assert b.record.prev == a.hash()
    assert store.journal.hash_at(3) == records[2].hash()
    assert store.journal.hash_at(6) is None
    assert [s for s, _ in store.journal.unacked(3)] == [1, 2, 3]
    assert store.journal.unacked(10)[0][1] == records[0].encode()
    assert store.journal.mark_acked(2) == 2
    assert store.journal.mark_acked(2) == 0  # idempotent
    assert store.journal.unacked_count() == 3
    assert [s for s, _ in store.journal.unacked(10)] == [3, 4, 5]
    assert store.journal.mark_acked(100) == 3
    assert store.journal.unacked(10) == []
    verify_store(store)


def test_status_backlog_and_last_receipt(store: Store, tmp_path: Path) -> None:
    empty = store.outbox.status()
    assert (empty["backlog_items"], empty["backlog_bytes"], empty["last_receipt_seq"]) == (0, 0, 0)

    a = store.outbox.add_file(make_src(tmp_path / "src", "a.bin", payload("a", 100)))
    mark = store.journal.append("mark", {"note": "officer pressed mark"})
    b = store.outbox.add_file(make_src(tmp_path / "src", "b.bin", payload("b", 300)))
    assert (a, mark.record.seq, b) == (1, 2, 3)
    mark_len = len(mark.encode())

    def numbers() -> tuple[int, int, int]:
        st = store.outbox.status()
        assert st["journal_seq"] == 3
        return st["backlog_items"], st["backlog_bytes"], st["last_receipt_seq"]

    # Nothing acked: media count with their file size, other records with their own size.
    assert numbers() == (3, 100 + mark_len + 300, 0)

    # The gateway has the first two records: the mark is settled, media 1 still pending.
    store.journal.mark_acked(2)
    assert numbers() == (2, 400, 0)

    # Media 1 receipted: everything up to the still-pending seq 3 is settled.
    receipt, raw = receipt_for(store, a)
    assert store.outbox.settle(receipt, raw)
    assert numbers() == (1, 300, 2)

    # Acking seq 3's record does not settle it; only its receipt does.
    store.journal.mark_acked(3)
    assert numbers() == (1, 300, 2)
    receipt, raw = receipt_for(store, b)
    assert store.outbox.settle(receipt, raw)
    assert numbers() == (0, 0, 3)
    st = store.outbox.status()
    assert st["receipted_items"] == 2
    assert st["rejected_items"] == 0


def test_next_uploads_marked_first_and_only_acked(store: Store, tmp_path: Path) -> None:
    def add(name: str, marked: bool = False) -> int:
        return store.outbox.add_file(
            make_src(tmp_path / "src", name, payload(name, 50)), marked=marked
        )

    a = add("a")
    b = add("b", marked=True)
    store.journal.append("mark", {})
    c = add("c", marked=True)
    d = add("d")
    assert (a, b, c, d) == (1, 2, 4, 5)

    def order(exclude: set[int] | None = None, limit: int = 10) -> list[int]:
        return [i.seq for i in store.outbox.next_uploads(exclude or set(), limit)]

    assert order() == []  # the gateway has not accepted any manifest yet
    store.journal.mark_acked(4)
    assert order() == [b, c, a]  # d's record is not acked yet
    assert order(limit=2) == [b, c]
    assert order(exclude={b}) == [c, a]
    assert order(exclude={b}, limit=1) == [c]
    assert order(exclude={a, b, c}) == []
    store.journal.mark_acked(5)
    assert order() == [b, c, a, d]

    item = store.outbox.next_uploads(set(), 1)[0]
    assert item.path == store.media_dir / media_rows(store.db)[b]["path"]
    assert item.sha256 == hashlib.sha256(payload("b", 50)).digest()
    assert (item.size, item.marked, item.acked_bytes) == (50, True, 0)
    store.outbox.set_progress(b, 25)
    assert store.outbox.next_uploads(set(), 1)[0].acked_bytes == 25

    # Settled and rejected media leave the queue.
    receipt, raw = receipt_for(store, c)
    assert store.outbox.settle(receipt, raw)
    store.outbox.reject(a, "sha_mismatch")
    assert order() == [b, d]


def test_settle_requires_matching_receipt(store: Store, tmp_path: Path) -> None:
    seq = store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"evidence"))
    path = store.media_dir / media_rows(store.db)[seq]["path"]
    wrong, wrong_raw = receipt_for(store, seq, sha256=hashlib.sha256(b"other").digest())
    assert not store.outbox.settle(wrong, wrong_raw)
    assert path.exists()
    assert store.outbox.state(seq) == "pending"

    receipt, raw = receipt_for(store, seq)
    assert store.outbox.settle(receipt, raw)
    assert not path.exists()
    row = media_rows(store.db)[seq]
    assert row["state"] == "receipted"
    assert bytes(row["receipt"]) == raw
    assert row["acked_bytes"] == row["size"]
    assert not store.outbox.settle(receipt, raw)  # a repeated receipt changes nothing
    assert store.outbox.state(999) is None


def test_reject_journals_and_keeps_the_file(store: Store, tmp_path: Path) -> None:
    seq = store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"bytes"))
    path = store.media_dir / media_rows(store.db)[seq]["path"]
    store.outbox.reject(seq, "sha256_mismatch")
    row = media_rows(store.db)[seq]
    assert (row["state"], row["reason"]) == ("rejected", "sha256_mismatch")
    assert path.read_bytes() == b"bytes"
    chain = verify_store(store)
    assert len(chain) == 2
    assert chain[1].record.kind == "media_corrupt"
    assert dict(chain[1].record.body) == {"media_seq": seq, "reason": "sha256_mismatch"}
    assert store.outbox.status()["rejected_items"] == 1


# --------------------------------------------------------------------------------------------
# Concurrency: several processes, one database
# --------------------------------------------------------------------------------------------

WORKERS = 4
FILES_PER_WORKER = 10


def _concurrent_writer(
    data_dir: str, seed_file: str, worker: int, barrier: Any, results: Any
) -> None:
    """Child process: open the shared store and add files as fast as possible."""
    try:
        key = FileKeyStore(Path(seed_file)).signing_key()
        s = open_store(Path(data_dir), key)
        src = Path(data_dir).parent / f"src-{worker}"
        files = [
            make_src(src, f"w{worker}-{i}.bin", payload(f"w{worker}-{i}", 100 + i))
            for i in range(FILES_PER_WORKER)
        ]
        barrier.wait(timeout=60)
        seqs = [s.outbox.add_file(f) for f in files]
        s.db.conn.close()
        results.put((worker, seqs, None))
    except BaseException:
        results.put((worker, [], traceback.format_exc()))


def test_concurrent_processes_never_fork_the_chain(tmp_path: Path) -> None:
    data_dir = tmp_path / "device"
    seed_file = tmp_path / "keys" / "device.key"
    key = FileKeyStore.create(seed_file)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_concurrent_writer,
            args=(str(data_dir), str(seed_file), w, barrier, results),
        )
        for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
        results.close()
        results.join_thread()
    errors = [tb for _, _, tb in outcomes if tb]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * WORKERS

    all_seqs = sorted(seq for _, seqs, _ in outcomes for seq in seqs)
    assert all_seqs == list(range(1, WORKERS * FILES_PER_WORKER + 1))
    for _, seqs, _ in outcomes:
        assert seqs == sorted(seqs)  # each process sees its own appends in order

    s = open_store(data_dir, key)
    try:
        chain = verify_store(s)
        assert len(chain) == WORKERS * FILES_PER_WORKER
        rows = media_rows(s.db)
        assert sorted(rows) == all_seqs
        assert len({r["path"] for r in rows.values()}) == len(rows)
        assert bin_files(s) == {r["path"] for r in rows.values()}
        names = {rec.record.body["name"]: rec for rec in chain}
        for w in range(WORKERS):
            for i in range(FILES_PER_WORKER):
                rec = names[f"w{w}-{i}.bin"]
                data = payload(f"w{w}-{i}", 100 + i)
                assert rec.record.body["sha256"] == hashlib.sha256(data).hexdigest()
                path = s.media_dir / rows[rec.record.seq]["path"]
                assert path.read_bytes() == data
    finally:
        s.db.conn.close()


# --------------------------------------------------------------------------------------------
# Crash recovery
# --------------------------------------------------------------------------------------------


def age(*paths: Path) -> None:
    """Make files look older than ``SETTLE_S`` (recover leaves younger ones alone)."""
    old = time.time() - SETTLE_S - 10
    for path in paths:
        os.utime(path, (old, old))


def test_recover_leaves_young_files_to_a_concurrent_add(store, tmp_path):
    # Another process may be between its rename into media/ and its commit right now.
    part = store.outbox.incoming / "inflight.part"
    part.write_bytes(b"being written")
    young = store.media_dir / "renamed-not-committed.bin"
    young.write_bytes(b"about to be committed")
    report = store.outbox.recover(at_boot=True)
    assert (report.discarded_partial, report.adopted_orphans) == (0, 0)
    assert part.exists() and young.exists()


def test_recover_on_a_clean_store_does_nothing(store: Store, tmp_path: Path) -> None:
    store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"x"))
    report = store.outbox.recover(at_boot=True)
    assert (report.discarded_partial, report.adopted_orphans) == (0, 0)
    assert (report.removed_receipted, report.missing) == (0, 0)
    assert store.journal.head()[0] == 1


def test_recover_discards_partial_writes(store: Store) -> None:
    part = store.outbox.incoming / "0123abcd.part"
    part.write_bytes(b"half a video")
    age(part)
    report = store.outbox.recover(at_boot=True)
    assert report.discarded_partial == 1
    assert not part.exists()
    assert store.journal.head() == (0, GENESIS)  # never evidence: nothing journalled
    assert media_rows(store.db) == {}


def test_recover_adopts_orphan_media(store: Store, tmp_path: Path) -> None:
    store.outbox.add_file(make_src(tmp_path / "src", "known.bin", b"known"))
    orphan = store.media_dir / "feedfacefeedfacefeedfacefeedface.bin"
    orphan.write_bytes(payload("orphan", 5_000))
    age(orphan)
    report = store.outbox.recover(at_boot=True)
    assert report.adopted_orphans == 1
    assert orphan.read_bytes() == payload("orphan", 5_000)  # kept, now owned by a row
    chain = verify_store(store)
    assert len(chain) == 2
    record = chain[1].record
    assert record.kind == "file"
    assert record.body["recovered"] is True
    assert record.body["sha256"] == hashlib.sha256(payload("orphan", 5_000)).hexdigest()
    assert record.body["size"] == 5_000
    row = media_rows(store.db)[2]
    assert (row["path"], row["state"], row["sha256"]) == (
        orphan.name,
        "pending",
        record.body["sha256"],
    )
    # A second recovery finds nothing new to adopt.
    assert store.outbox.recover(at_boot=True).adopted_orphans == 0
    assert store.journal.head()[0] == 2


def test_recover_removes_receipted_leftovers(store: Store, tmp_path: Path) -> None:
    seq = store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"evidence"))
    path = store.media_dir / media_rows(store.db)[seq]["path"]
    receipt, raw = receipt_for(store, seq)
    assert store.outbox.settle(receipt, raw)
    # The crash: the row committed as receipted, the unlink never happened.
    path.write_bytes(b"evidence")
    report = store.outbox.recover(at_boot=True)
    assert report.removed_receipted == 1
    assert not path.exists()
    assert store.outbox.state(seq) == "receipted"
    assert store.journal.head()[0] == 1  # nothing to journal


def test_recover_makes_receipts_durable_before_it_deletes_receipted_files(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Receipts are committed without fsync (``settle_many``); only ``purge``'s commit
    # makes them durable. A file found at start whose row says receipted may rest on such
    # a receipt, so it is deleted only after a durable commit: never file gone, receipt
    # lost, and the evidence nowhere on the device.
    seq = store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"evidence"))
    path = store.media_dir / media_rows(store.db)[seq]["path"]
    receipt, raw = receipt_for(store, seq)
    assert store.outbox.settle_many([(receipt, raw)])  # the crash came before the purge

    def purges() -> int:
        return get_counter(store.db, "purges")

    before = purges()
    seen: list[int] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == path:
            seen.append(purges())
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert store.outbox.recover(at_boot=True).removed_receipted == 1
    assert seen == [before + 1] and not path.exists()


def test_recover_rejects_vanished_pending_media(store: Store, tmp_path: Path) -> None:
    keep = store.outbox.add_file(make_src(tmp_path / "src", "keep.bin", b"keep"))
    lost = store.outbox.add_file(make_src(tmp_path / "src", "lost.bin", b"lost"))
    rows = media_rows(store.db)
    (store.media_dir / rows[lost]["path"]).unlink()
    report = store.outbox.recover(at_boot=True)
    assert report.missing == 1
    assert store.outbox.state(lost) == "rejected"
    assert media_rows(store.db)[lost]["reason"] == "missing_on_device"
    assert store.outbox.state(keep) == "pending"
    chain = verify_store(store)
    assert len(chain) == 3
    assert chain[2].record.kind == "media_corrupt"
    assert dict(chain[2].record.body) == {"media_seq": lost, "reason": "missing_on_device"}
    # Reported once: the row is no longer pending.
    assert store.outbox.recover(at_boot=True).missing == 0
    assert store.journal.head()[0] == 3


def test_recover_all_at_once_across_a_reopen(tmp_path: Path) -> None:
    key = SigningKey.generate()
    s = open_store(tmp_path / "device", key)
    src = tmp_path / "src"
    done = s.outbox.add_file(make_src(src, "done.bin", b"done"))
    lost = s.outbox.add_file(make_src(src, "lost.bin", b"lost"))
    rows = media_rows(s.db)
    receipt, raw = receipt_for(s, done)
    assert s.outbox.settle(receipt, raw)
    (s.media_dir / rows[done]["path"]).write_bytes(b"done")
    (s.media_dir / rows[lost]["path"]).unlink()
    (s.outbox.incoming / "x.part").write_bytes(b"partial")
    (s.media_dir / "orphan.bin").write_bytes(b"orphan")
    age(s.outbox.incoming / "x.part", s.media_dir / "orphan.bin")
    s.db.conn.close()

    s = open_store(tmp_path / "device", key)  # the agent restarts
    try:
        report = s.outbox.recover(at_boot=True)
        assert (report.discarded_partial, report.adopted_orphans) == (1, 1)
        assert (report.removed_receipted, report.missing) == (1, 1)
        assert bin_files(s) == {"orphan.bin"}
        kinds = [r.record.kind for r in verify_store(s)]
        assert kinds == ["file", "file", "media_corrupt", "file"]
    finally:
        s.db.conn.close()


def test_a_write_the_disk_refuses_leaves_no_temporary_file(store: Store) -> None:
    """A full disk mid-segment left its temporary file, and its space, until the next
    boot's recovery (recovery while the agent runs leaves temporary files alone)."""
    import errno

    def blocks() -> Iterator[bytes]:
        yield b"x" * 100_000
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        store.outbox.add_blocks(blocks())
    assert not list(store.outbox.incoming.glob("*.part"))
    assert not list(store.outbox.media_dir.glob("*.bin"))


@pytest.mark.parametrize("clock_ms", [300_000_000_000_000, -5_000])
def test_a_device_clock_gone_wild_still_records_evidence_the_gateway_accepts(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock_ms: int
) -> None:
    # Past 9999 (or before 1970) no record could be made, or the gateway refused it and
    # every later one waited behind it: the time is held within what the protocol carries.
    import agent.journal
    from protocol.fields import TIME_MS_MAX

    monkeypatch.setattr(agent.journal.time, "time_ns", lambda: clock_ms * 1_000_000)
    seq = store.outbox.add_file(make_src(tmp_path / "src", "x.bin", b"evidence"))
    record = verify_store(store)[seq - 1].record  # decoded as the gateway decodes it
    assert record.wall_ms == min(max(clock_ms, 0), TIME_MS_MAX)
