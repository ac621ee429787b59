"""Uploads in progress: bytes streamed to a part file at their offsets, never held in memory.

Memory per upload is one open file descriptor, a sha256 state and a short range list,
so a 2 GiB file costs the same as a 2 KiB one. Chunks normally arrive in order; the
running hash follows them and the file is re-read only if they did not.

Each chunk's claimed sha256 is recorded, not checked: the running whole-file hash covers
every byte once, and only when it does not match the signed manifest are the chunks
checked against their claims (``suspect_ranges``). Bytes that fail their claim, or that
no claim covers (lost in a crash before it reached the disk), are dropped and asked for
again. A stale claim is harmless: it vouches only for bytes that hash to it, that is,
bytes the device did send; a torn one names no chunk of the file and is skipped.
One hash pass per byte instead of two while nothing goes wrong.

The claims live in the part file itself, after the evidence (from offset ``size`` on),
and are cut off, durably, before the file goes into the blob store. A claims file of its
own cost an inode created and deleted per upload, and ext4 without a journal scans past
every inode deleted in the last minute before it hands out a new one: 4–6 % of the
gateway's CPU at a few hundred MiB/s (``perf``). Such a part file is named
``<seq>.upload``, not ``<seq>.part`` as the earlier layout (evidence only, claims in
``<seq>.claims``) was: a gateway rolled back to a release that knows only ``.part`` then
never moves a file with claims in it into the store; it finds no part file and has the
upload sent again. The other way round, ``take_over_legacy`` converts an earlier
release's part file, claims included, when its upload is next opened.

After ``MAX_RECHECKS`` such rounds (counted in the database, so a restart or an eviction
from the cache does not reset it) the upload turns **eager**: like before this scheme,
every chunk is hashed on arrival and a damaged one is dropped with a ``bad_message``
alarm. Everything then held has been checked, so a later whole-file mismatch is the
device's own doing and is rejected as ``hash_mismatch``. A flaky link never gets a file
rejected, and a device cannot make the gateway re-read a file forever.

Bounds: the claims hold at most ``max_claims`` records (about 4 per KiB of the
file; past that, later bytes simply go unvouched), and ``suspect_ranges`` gives up on
files damaged in more than ``MAX_PIECES`` places (everything is asked for again).

Durability: the ranges recorded in the database are the ranges that were fsync'd before
the row was written (a checkpoint every ``CHECKPOINT_BYTES`` and at the end). After a
gateway crash, ``init`` answers with those ranges, and the device resends the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.blobs import fsync_dir
from protocol.upload import MAX_CHUNK_SIZE, Ranges, add_range, covered, subtract, union

CHECKPOINT_BYTES = 8 * 1024 * 1024
CHECKPOINT_INTERVAL_S = 1.0
MAX_OPEN = 128
HASH_BLOCK = 1024 * 1024
CLAIM = struct.Struct(">QI32s")  # offset, length, sha256 the device sent with the chunk
#: Whole-file mismatches that send unvouched bytes back for a resend; then the upload
#: hashes every chunk on arrival (``eager``).
MAX_RECHECKS = 3
#: Vouched pieces ``suspect_ranges`` will track before it treats the whole file as suspect.
MAX_PIECES = 4096


def _drop_cached(fd: int) -> None:
    """Hand a durable part file's pages back to the kernel; a hint, never an error.

    Evidence is written once and read rarely: once durable its pages are clutter, and
    giving them back lets the next chunks reuse warm memory instead of faulting in fresh
    pages (several times the cost of the write itself on a virtual machine). The running
    hash normally spares reading the file back; when it must be read (chunks out of order,
    a resend, ``suspect_ranges``), that read comes from the disk.
    """
    advise = getattr(os, "posix_fadvise", None)  # absent on macOS
    if advise is None:
        return
    with contextlib.suppress(OSError):  # the data is durable; a refused hint changes nothing
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def ranges_to_json(ranges: Ranges) -> str:
    return json.dumps([list(r) for r in ranges])


def ranges_from_json(text: str | None) -> Ranges:
    out: Ranges = ()
    for s, e in json.loads(text or "[]"):
        out = add_range(out, int(s), int(e))
    return out


@dataclass
class ActiveUpload:
    device_id: str
    seq: int
    size: int
    sha256: bytes
    path: Path
    ranges: Ranges = ()
    durable: Ranges = ()
    bytes_received: int = 0
    inits: int = 0
    resumed_from: int = -1
    unsynced: int = 0
    unacked: int = 0  # bytes received since the last ack sent to the device
    synced_at: float = field(default_factory=time.monotonic)
    fd: int = -1
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed_to: int = 0
    rehash: bool = False
    claims: int = -1  # claim records after the evidence bytes; -1 until counted
    rechecks: int = 0  # how often a whole-file mismatch sent bytes back for a resend

    @property
    def complete(self) -> bool:
        return covered(self.ranges, self.size)

    @property
    def eager(self) -> bool:
        """Hash each chunk on arrival: lazy checking already cost its rounds here."""
        return self.rechecks >= MAX_RECHECKS

    @property
    def max_claims(self) -> int:
        # Room for every 1 KiB chunk (the smallest a device sends) four times over.
        return 1024 + 4 * (self.size // 1024 + 1)

    def take_over_legacy(self) -> None:
        """Convert the part file an earlier release left for this upload, if any.

        First the evidence file is renamed (``.part`` → ``.upload``, durably), and only
        then are the whole records of its ``.claims`` file (at most ``max_claims``) copied
        after the evidence and the claims file deleted. So no file named ``.part`` ever
        holds claims, whatever crash or rollback comes in between; a crash after the rename
        leaves ``.claims`` to be copied on the next call (the same records to the same
        place). A ``.part`` beside an ``.upload`` means a rollback came in between: the
        earlier release started the upload again in the ``.part``, which is what the
        database now describes, so the stale ``.upload`` goes.
        """
        legacy = self.path.with_suffix(".part")
        legacy_claims = self.path.with_suffix(".claims")
        if legacy.exists():
            self.close()
            self.path.unlink(missing_ok=True)
            os.rename(legacy, self.path)
            fsync_dir(self.path.parent)
        if not legacy_claims.exists() or not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            # Written after ``size`` (a hole before them while evidence is still missing).
            with open(legacy_claims, "rb") as f:
                pos, left = self.size, self.max_claims * CLAIM.size
                while left and (block := f.read(min(left, 4096 * CLAIM.size))):
                    block = block[: len(block) // CLAIM.size * CLAIM.size]
                    if not block:
                        break
                    os.pwrite(fd, block, pos)
                    pos, left = pos + len(block), left - len(block)
            os.fsync(fd)
        finally:
            os.close(fd)
        legacy_claims.unlink()

    def _claim(self, fd: int, offset: int, length: int, claim: bytes) -> None:
        if self.claims < 0:
            # Whole records only: one torn by a crash is overwritten by the next.
            self.claims = max(0, os.fstat(fd).st_size - self.size) // CLAIM.size
        if self.claims < self.max_claims:
            os.pwrite(fd, CLAIM.pack(offset, length, claim), self.size + self.claims * CLAIM.size)
            self.claims += 1

    def open(self) -> int:
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self.fd

    def write(self, offset: int, data: bytes, claim: bytes = b"") -> None:
        fd = self.open()
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], offset + pos)
        if offset < self.hashed_to:
            # Bytes already hashed are being overwritten: the running hash no longer
            # describes the file, so ``digest`` must read the whole file back.
            self.rehash = True
        elif offset == self.hashed_to and not self.rehash:
            self.hasher.update(data)
            self.hashed_to += len(data)
        if claim and data and not self.eager:
            self._claim(fd, offset, len(data), claim)
        self.ranges = add_range(self.ranges, offset, offset + len(data))
        self.bytes_received += len(data)
        self.unsynced += len(data)
        self.unacked += len(data)

    def sync(self) -> None:
        if self.fd >= 0 and self.unsynced:
            os.fsync(self.fd)
            _drop_cached(self.fd)
        self.durable = self.ranges
        self.unsynced = 0
        self.synced_at = time.monotonic()

    def checkpoint_due(self) -> bool:
        return self.unsynced >= CHECKPOINT_BYTES or (
            self.unsynced > 0 and time.monotonic() - self.synced_at >= CHECKPOINT_INTERVAL_S
        )

    def digest(self) -> bytes:
        """sha256 of the whole part file, re-reading only what the running hash missed."""
        if self.hashed_to == self.size and not self.rehash:
            return bytes(self.hasher.digest())
        fd = self.open()
        digest = hashlib.sha256()
        pos = 0
        while pos < self.size:
            block = os.pread(fd, min(HASH_BLOCK, self.size - pos), pos)
            if not block:
                break
            digest.update(block)
            pos += len(block)
        return digest.digest()

    def suspect_ranges(self) -> Ranges:
        """The held bytes that no chunk claim vouches for (read back and hashed).

        Called only after the whole file failed its hash. Bytes covered by a claim that
        still matches are what the device sent; everything else (a claim that fails, or
        bytes whose claim a crash lost before it reached the disk) may have been damaged
        on the way, and is worth asking for again.
        """
        fd = self.open()
        vouched: list[list[int]] = []
        # A block of records at a time, so memory stays flat however many chunks the file
        # had; contiguous claims (the usual, in-order case) merge into one piece as they go.
        pos, end = self.size, os.fstat(fd).st_size
        while end - pos >= CLAIM.size:
            block = os.pread(fd, min(end - pos, 1024 * CLAIM.size) // CLAIM.size * CLAIM.size, pos)
            if len(block) < CLAIM.size:
                break
            pos += len(block)
            for offset, length, claim in CLAIM.iter_unpack(
                block[: len(block) // CLAIM.size * CLAIM.size]
            ):
                if length > MAX_CHUNK_SIZE or offset + length > self.size:
                    continue  # never a chunk of this file: torn by a crash, say
                if hashlib.sha256(os.pread(fd, length, offset)).digest() != claim:
                    continue
                if vouched and vouched[-1][0] <= offset <= vouched[-1][1]:
                    vouched[-1][1] = max(vouched[-1][1], offset + length)
                    continue
                vouched.append([offset, offset + length])
                if len(vouched) > MAX_PIECES:
                    return self.ranges  # damaged all over: ask for all of it again
        return subtract(self.ranges, union((s, e) for s, e in vouched))

    def cut_claims(self) -> None:
        """Leave only the evidence bytes in the part file (before it is synced and stored).

        The next ``sync`` always fsyncs, cut or not: the file may have been cut by an
        attempt that failed before its fsync.
        """
        fd = self.open()
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        self.unsynced = max(self.unsynced, 1)
        self.claims = 0

    def drop(self, suspects: Ranges) -> None:
        """Forget ``suspects`` were ever received, so the device sends them again."""
        self.ranges = subtract(self.ranges, suspects)
        self.durable = subtract(self.durable, suspects)
        self.rehash = True  # the resent bytes overwrite hashed ones
        self.rechecks += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.claims = -1  # counted again from the file when it is next opened

    def discard(self) -> None:
        """Remove what is left on disk once the upload is settled (stored or rejected)."""
        self.close()
        self.path.unlink(missing_ok=True)
        # The earlier layout's files, should any be left.
        self.path.with_suffix(".part").unlink(missing_ok=True)
        self.path.with_suffix(".claims").unlink(missing_ok=True)


class ActiveUploads:
    """A bounded cache of uploads with open part files (oldest closed first)."""

    def __init__(self, partial_dir: Path) -> None:
        self.partial_dir = partial_dir
        self._items: OrderedDict[tuple[str, int], ActiveUpload] = OrderedDict()

    def part_path(self, device_id: str, seq: int) -> Path:
        return self.partial_dir / device_id / f"{seq}.upload"

    def get(self, device_id: str, seq: int) -> ActiveUpload | None:
        item = self._items.get((device_id, seq))
        if item is not None:
            self._items.move_to_end((device_id, seq))
        return item

    def put(self, up: ActiveUpload) -> list[ActiveUpload]:
        """Track ``up``; return uploads evicted to stay under ``MAX_OPEN`` (to checkpoint)."""
        self._items[(up.device_id, up.seq)] = up
        evicted = []
        while len(self._items) > MAX_OPEN:
            _, old = self._items.popitem(last=False)
            evicted.append(old)
        return evicted

    def forget(self, device_id: str, seq: int) -> None:
        """Stop tracking without closing: whoever finalizes the upload owns its file now."""
        self._items.pop((device_id, seq), None)

    def all(self) -> list[ActiveUpload]:
        return list(self._items.values())
