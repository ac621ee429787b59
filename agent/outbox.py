"""The outbox: media waiting for the gateway's custody receipt, and nothing else deletes it.

A media file counts as captured only when (1) its bytes are in ``media/`` — written to a
temp file, fsync'd, renamed, directory fsync'd — and (2) its signed manifest record and
outbox row are committed in one transaction. It leaves the device only after a custody
receipt that verifies (gateway signature, tree head, inclusion proof) and names the same
sha256 and size: the row is marked ``receipted`` and committed first, the file unlinked
second, so a crash in between leaves a file that ``recover`` removes later, never a
receipt-less deletion.

``recover`` runs when the agent starts and repairs what a crash can leave behind.

With a data key, a row's sha256, chunk hashes and receipt are sealed too (``RecordCipher``,
bound to the device, the row and the field): in the clear, a copy of the device's
database told whoever had a file already whether this camera had captured it. Rows an
earlier release wrote are sealed by the running relay a batch at a time
(``seal_old_rows``); until then, and on devices without a data key, they read as they
were written (hex sha256, raw hashes, the receipt's JSON).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.db import fsync_dir, get_counter, immediate
from agent.errors import StoreError
from agent.journal import Journal, now_ms
from agent.sealed import (
    CorruptMedia,
    MediaReader,
    RecordCipher,
    SealedReader,
    open_media,
    seal_blocks,
    sealed_file_id,
)
from protocol.journal import MEDIA_KINDS
from protocol.receipt import Receipt
from protocol.upload import ChunkHashes

log = logging.getLogger("custody.agent.outbox")

COPY_BLOCK = 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024
#: Chunk hashes are kept for files of up to this many chunks (512 KiB of hashes); the
#: relay hashes the chunks of a bigger file as it sends them.
MAX_STORED_CHUNKS = 16384
#: Largest sealed block. AES-GCM holds the GIL for a whole block and sealing buffers one:
#: at 1 MiB that is ~1 ms with AES instructions (longer on a small ARM core without them)
#: and a few MiB of memory, where 8 MiB chunks would stall capture threads and cost tens.
MAX_SEAL_BLOCK = 1024 * 1024
#: ``recover`` leaves younger files alone: they may belong to a ``custody agent add`` that
#: is still between its rename and its commit in another process.
SETTLE_S = 60.0
SEALED_FLAG = "media_rows_sealed"  # kv: every row's hashes and receipt are sealed


@dataclass(frozen=True)
class MediaItem:
    seq: int
    path: Path
    size: int
    sha256: bytes
    marked: bool
    acked_bytes: int
    sealed_id: bytes | None = None  # the sealed file's random id recorded at capture


@dataclass(frozen=True)
class Written:
    """A media file made durable in ``media/``, with what the outbox row records of it."""

    path: Path
    size: int
    sha256: bytes  # of the plaintext
    chunk_hashes: bytes = b""  # see ``Outbox._write_durably``
    sealed_id: bytes | None = None  # the sealed file's random id (its header), or None


@dataclass(frozen=True)
class RecoveryReport:
    discarded_partial: int = 0
    adopted_orphans: int = 0
    removed_receipted: int = 0
    missing: int = 0


class Outbox:
    """``data_key`` (AES-256) seals every buffered file (``agent.sealed``); without it
    files are kept in the clear (devices enrolled before encryption at rest)."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        journal: Journal,
        data_dir: Path,
        data_key: bytes | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.db = db
        self.journal = journal
        self.data_key = data_key
        self._cipher = RecordCipher(data_key) if data_key is not None else None
        self.chunk_size = chunk_size
        self.media_dir = data_dir / "media"
        self.incoming = self.media_dir / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Until the rows of an earlier release are all sealed (``seal_old_rows``, run by
        # the relay a batch at a time), a field in the clear is read as written; after,
        # it is refused like any other altered field.
        self._all_sealed = self._cipher is None or bool(get_counter(db, SEALED_FLAG))

    # -- sealed fields ---------------------------------------------------------------------

    def _context(self, seq: int, field: str) -> bytes:
        return f"{self.journal.device_id}/media/{seq}/{field}".encode()

    def _seal(self, seq: int, field: str, data: bytes) -> bytes:
        assert self._cipher is not None
        return self._cipher.seal(data, self._context(seq, field))

    def _stored_sha(self, seq: int, sha: bytes) -> str | bytes:
        return sha.hex() if self._cipher is None else self._seal(seq, "sha256", sha)

    def _read_sha(self, seq: int, value: str | bytes) -> bytes:
        """A row's sha256: sealed, or hex in the clear (no data key, or a row of an earlier
        release not sealed yet); ``CorruptMedia`` when it does not read (the row altered)."""
        if isinstance(value, str):
            if self._cipher is not None and self._all_sealed:
                raise CorruptMedia(f"the sha256 of seq {seq} is in the clear, not sealed")
            try:
                sha = bytes.fromhex(value)
            except ValueError:
                sha = b""
            if len(sha) != 32:
                raise CorruptMedia(f"the sha256 of seq {seq} is not a sha256")
            return sha
        if self._cipher is None:
            raise CorruptMedia(f"the row of seq {seq} is sealed and there is no data key")
        return self._cipher.open(bytes(value), self._context(seq, "sha256"))

    def _read_hashes(self, seq: int, value: bytes) -> bytes:
        if self._cipher is None:
            return value
        if value[:1] != RecordCipher.PREFIX or len(value) % 32 == 0:
            # In the clear (32n bytes; sealed is 1 + 12 + 32n + 16): an earlier release's.
            if self._all_sealed or len(value) % 32:
                raise CorruptMedia(f"the chunk hashes of seq {seq} are not sealed")
            return value
        return self._cipher.open(value, self._context(seq, "chunk_hashes"))

    def seal_old_rows(self, batch: int = 500) -> bool:
        """Seal a batch of rows an earlier release wrote in the clear; True once none are
        left (then recorded in ``kv``, so no open looks again).

        A batch at a time, from the relay while it runs: a device with a year of history
        has a million rows, and one transaction over them at start kept the camera from
        recording for minutes and grew the WAL by the whole table. A row whose clear
        sha256 does not even parse is left for ``next_uploads`` to refuse. Receipted rows
        lose their chunk hashes (nothing needs them any more) instead of sealing them.
        """
        if self._all_sealed:
            return True
        assert self._cipher is not None
        with immediate(self.db) as conn:
            rows = conn.execute(
                "SELECT seq, sha256, chunk_hashes, receipt, state FROM media "
                "WHERE typeof(sha256) = 'text' AND length(sha256) = 64 ORDER BY seq LIMIT ?",
                [batch],
            ).fetchall()
            for seq, sha, hashes, receipt, state in rows:
                try:
                    digest = bytes.fromhex(sha)
                except ValueError:  # marked, so the next batch does not pick it again
                    conn.execute("UPDATE media SET sha256 = 'unreadable' WHERE seq = ?", [seq])
                    continue
                keep = hashes if hashes and state == "pending" else None
                conn.execute(
                    "UPDATE media SET sha256 = ?, chunk_hashes = ?, receipt = ? WHERE seq = ?",
                    [
                        self._seal(seq, "sha256", digest),
                        self._seal(seq, "chunk_hashes", bytes(keep)) if keep else None,
                        self._seal(seq, "receipt", bytes(receipt)) if receipt else None,
                        seq,
                    ],
                )
            if len(rows) < batch:
                conn.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, 1)", [SEALED_FLAG])
                self._all_sealed = True
        if rows:
            log.info("sealed the hashes and receipts of %d earlier outbox rows", len(rows))
        return self._all_sealed

    def stored_receipt(self, seq: int) -> bytes | None:
        """The gateway's receipt for ``seq`` as it arrived (signed JSON), if receipted."""
        row = self.db.execute("SELECT receipt FROM media WHERE seq = ?", [seq]).fetchone()
        if row is None or row[0] is None:
            return None
        raw = bytes(row[0])
        if self._cipher is None or (raw[:1] != RecordCipher.PREFIX and not self._all_sealed):
            return raw  # JSON never starts with the sealed prefix
        return self._cipher.open(raw, self._context(seq, "receipt"))

    # -- capture -------------------------------------------------------------------------

    @property
    def seal_block(self) -> int:
        """Plaintext bytes per sealed block: one upload chunk (at most ``MAX_SEAL_BLOCK``),
        so the relay reads and decrypts each chunk it sends in one piece, no join."""
        return min(self.chunk_size, MAX_SEAL_BLOCK)

    def open_media(self, item: MediaItem) -> MediaReader:
        """A reader of the plaintext (authenticated block by block when sealed).

        Authentication proves the data key, not which capture a sealed file belongs to: a
        file swapped for another one sealed on this device would read back without error.
        So the row records the file's random id at capture, and a file that carries
        another one is refused here (``CorruptMedia``), before a byte of it is uploaded.
        """
        reader = open_media(item.path, self.data_key)
        if isinstance(reader, SealedReader) and item.sealed_id not in (None, reader.info.file_id):
            reader.close()
            raise CorruptMedia(
                f"{item.path.name}: sealed for another capture than seq {item.seq} "
                "(its file id differs from the one recorded: swapped or replaced)"
            )
        return reader

    def _write_durably(self, blocks: Iterable[bytes]) -> Written:
        """Write blocks to media/ via temp + fsync + rename.

        The sha256, size and chunk hashes are of the plaintext: that is what the manifest
        promises and what the gateway will check. Hashing the chunks here, while the bytes
        pass by anyway, keeps that work out of the relay (``protocol.upload.ChunkHashes``).

        Only sealed files get stored chunk hashes: every byte the relay reads back from
        one is authenticated, so a change to it is caught here on the device. A file kept
        in the clear can be changed behind the agent's back; its chunks are hashed as they
        are sent, so the gateway sees the change as the device's own (``hash_mismatch``)
        and not as damage in transit that a resend would repair. (Authentication proves
        the key, not the row: ``Upload.distrust_stored_hashes`` covers a swapped file.)
        """
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        # Only sealed media gets them (see above); a file over the cap is hashed as sent.
        chunks = ChunkHashes(self.chunk_size, MAX_STORED_CHUNKS) if self.data_key else None
        size = 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for block in blocks:
                digest.update(block)
                if chunks is not None:
                    chunks.update(block)
                size += len(block)
                yield block

        stored = (
            plaintext()
            if self.data_key is None
            else seal_blocks(self.data_key, plaintext(), self.seal_block)
        )
        header = b""
        final = self.media_dir / f"{uuid.uuid4().hex}.bin"
        try:
            with open(tmp, "xb") as out:
                for block in stored:
                    header = header or block  # a sealed file's first piece is its header
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
                # Dated now, and the rename keeps the date: ``recover`` leaves files alone
                # for ``SETTLE_S`` after it, and the last write's date, which a slow fsync
                # of a large file can leave minutes behind, let recovery running meanwhile
                # adopt the file a second time.
                os.utime(out.fileno())
            os.rename(tmp, final)
        except BaseException:
            # A full disk mid-segment, say: the space is not kept until the next boot.
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.media_dir)
        if chunks is None:
            return Written(final, size, digest.digest())
        return Written(final, size, digest.digest(), chunks.digests(), sealed_file_id(header))

    def add_blocks(
        self,
        blocks: Iterable[bytes],
        *,
        kind: str = "file",
        media_type: str = "application/octet-stream",
        marked: bool = False,
        body: Mapping[str, Any] | None = None,
        also: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> int:
        """Capture media from ``blocks``; return its journal sequence number. ``also``
        runs in the transaction that makes it captured."""
        if kind not in MEDIA_KINDS:
            raise StoreError(f"{kind!r} is not a media record kind ({sorted(MEDIA_KINDS)})")
        return self._commit(
            self._write_durably(blocks),
            kind=kind,
            media_type=media_type,
            marked=marked,
            body=body or {},
            also=also,
        )

    def add_file(self, src: Path, *, marked: bool = False, kind: str = "file") -> int:
        """Capture a copy of ``src`` (the original is left alone)."""
        if not src.is_file():
            raise StoreError(f"{src} is not a readable file")
        media_type = mimetypes.guess_type(src.name)[0] or "application/octet-stream"

        def blocks() -> Iterable[bytes]:
            with open(src, "rb") as f:
                while block := f.read(COPY_BLOCK):
                    yield block

        # A name that is not valid UTF-8 (possible on Linux) is kept readable, not fatal.
        name = src.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return self.add_blocks(
            blocks(), kind=kind, media_type=media_type, marked=marked, body={"name": name}
        )

    def _commit(
        self,
        written: Written,
        *,
        kind: str,
        media_type: str,
        marked: bool,
        body: Mapping[str, Any],
        also: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> int:
        w = written
        manifest = dict(body)
        manifest.update(
            {"sha256": w.sha256.hex(), "size": w.size, "media_type": media_type, "marked": marked}
        )

        def insert_row(conn: sqlite3.Connection, seq: int) -> None:
            conn.execute(
                "INSERT INTO media(seq, path, size, sha256, media_type, kind, marked, state, "
                "acked_bytes, added_ms, chunk_size, chunk_hashes, sealed_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)",
                [
                    seq,
                    w.path.name,
                    w.size,
                    self._stored_sha(seq, w.sha256),
                    media_type,
                    kind,
                    int(marked),
                    now_ms(),
                    self.chunk_size if w.chunk_hashes else None,
                    self._seal(seq, "chunk_hashes", w.chunk_hashes) if w.chunk_hashes else None,
                    w.sealed_id,
                ],
            )
            if also is not None:
                also(conn, seq)

        record = self.journal.append(kind, manifest, also=insert_row)
        return record.record.seq

    # -- upload bookkeeping --------------------------------------------------------------

    def _item(self, row: tuple[Any, ...]) -> MediaItem:
        seq, path, size, sha, marked, acked, sealed_id = row
        return MediaItem(
            int(seq),
            self.media_dir / path,
            int(size),
            self._read_sha(int(seq), sha),
            bool(marked),
            int(acked),
            bytes(sealed_id) if sealed_id is not None else None,
        )

    def next_uploads(self, exclude: set[int], limit: int) -> list[MediaItem]:
        """Pending media whose manifest the gateway has accepted: marked first, then oldest."""
        rows = self.db.execute(
            "SELECT m.seq, m.path, m.size, m.sha256, m.marked, m.acked_bytes, m.sealed_id "
            "FROM media m "
            "JOIN journal j ON j.seq = m.seq WHERE m.state = 'pending' AND j.acked = 1 "
            "ORDER BY m.marked DESC, m.seq LIMIT ?",
            [limit + len(exclude)],
        ).fetchall()
        items = []
        for row in rows:
            if int(row[0]) in exclude:
                continue
            try:
                items.append(self._item(row))
            except CorruptMedia as exc:
                # Its row was altered: never uploaded as if it were sound, and not left
                # first in line for ever either.
                log.error("outbox row of seq %d is corrupt: %s", row[0], exc)
                self.reject(int(row[0]), f"corrupt_on_device: {exc}")
        return items[:limit]

    def get(self, seq: int) -> MediaItem | None:
        row = self.db.execute(
            "SELECT seq, path, size, sha256, marked, acked_bytes, sealed_id FROM media "
            "WHERE seq = ?",
            [seq],
        ).fetchone()
        return self._item(row) if row else None

    def chunk_hashes(self, seq: int) -> tuple[int, bytes]:
        """(chunk size, concatenated sha256s) stored at capture; (0, b"") if none were
        or the media is kept in the clear (see ``_write_durably``)."""
        row = self.db.execute(
            "SELECT chunk_size, chunk_hashes FROM media WHERE seq = ?", [seq]
        ).fetchone()
        if row is None or not row[0] or not row[1]:
            return 0, b""
        try:
            return int(row[0]), self._read_hashes(seq, bytes(row[1]))
        except CorruptMedia as exc:
            log.error("stored chunk hashes of seq %d are corrupt (%s); hashing as sent", seq, exc)
            return 0, b""

    def state(self, seq: int) -> str | None:
        row = self.db.execute("SELECT state FROM media WHERE seq = ?", [seq]).fetchone()
        return str(row[0]) if row else None

    def set_progress(self, seq: int, acked_bytes: int) -> None:
        with immediate(self.db) as conn:
            conn.execute("UPDATE media SET acked_bytes = ? WHERE seq = ?", [acked_bytes, seq])

    def settle(self, receipt: Receipt, raw: bytes) -> bool:
        """Store a verified receipt, then delete the local copy. False if it does not match."""
        settled = self.settle_many([(receipt, raw)])
        self.purge([item.path for item in settled])
        return bool(settled)

    def settle_many(self, receipts: list[tuple[Receipt, bytes]]) -> list[MediaItem]:
        """Store verified receipts in one (not yet durable) commit; return what settled.

        The local copies must then go through ``purge``, which makes the receipts durable
        before it deletes anything. A receipt naming another sha256 or size than the
        outbox row is ignored (and logged): it cannot be for this evidence.
        """
        matching: list[tuple[MediaItem, Receipt, bytes]] = []
        for receipt, raw in receipts:
            try:
                item = self.get(receipt.seq)
            except CorruptMedia as exc:
                log.error("outbox row of seq %d is corrupt (%s); receipt ignored", receipt.seq, exc)
                continue
            if item is None or item.sha256 != receipt.sha256 or item.size != receipt.size:
                log.warning("receipt for seq %d does not match the outbox; ignored", receipt.seq)
                continue
            matching.append((item, receipt, raw))
        if not matching:
            return []
        settled = []
        with immediate(self.db, durable=False) as conn:
            for item, receipt, raw in matching:
                cur = conn.execute(
                    "UPDATE media SET state = 'receipted', receipt = ?, receipted_ms = ?, "
                    "acked_bytes = size WHERE seq = ? AND state = 'pending'",
                    [
                        raw if self._cipher is None else self._seal(receipt.seq, "receipt", raw),
                        now_ms(),
                        receipt.seq,
                    ],
                )
                if cur.rowcount:
                    settled.append(item)
        return settled

    def purge(self, paths: list[Path]) -> None:
        """Make every receipt committed so far durable (one fsync), then delete ``paths``.

        Many receipts share one fsync this way. No directory fsync after the unlinks:
        should a power cut undo one, ``recover`` removes the file again (its row says
        receipted).
        """
        if not paths:
            return
        with immediate(self.db) as conn:
            conn.execute("INSERT OR IGNORE INTO kv(key, value) VALUES ('purges', 0)")
            conn.execute("UPDATE kv SET value = value + 1 WHERE key = 'purges'")
        for path in paths:
            path.unlink(missing_ok=True)

    def reject(self, seq: int, reason: str) -> None:
        """The gateway refused the bytes: keep the file, stop retrying, journal why.

        The reason is the gateway's words: kept short and printable, so a hostile one can
        neither bloat the journal past what a batch carries nor forge log lines."""
        reason = "".join(ch if ch.isprintable() else " " for ch in reason[:200])

        def mark(conn: sqlite3.Connection, _: int) -> None:
            conn.execute(
                "UPDATE media SET state = 'rejected', reason = ? "
                "WHERE seq = ? AND state = 'pending'",
                [reason, seq],
            )

        self.journal.append("media_corrupt", {"media_seq": seq, "reason": reason}, also=mark)

    # -- crash repair --------------------------------------------------------------------

    def recover(self, *, at_boot: bool) -> RecoveryReport:
        """Repair what a crash left: adopt media renamed into place but never committed,
        delete receipted media (receipts made durable first), reject rows whose media
        vanished, and (``at_boot``) discard half-written temporary files.

        Files are judged only once settled for ``SETTLE_S``: another process (``custody
        agent add``) may be between its rename and its commit (``_write_durably`` dates
        a file at its rename, not its last write, for this). Temporary files are
        discarded at boot only; while the agent runs, one may belong to an add still
        writing it.
        """
        discarded = 0
        cutoff = time.time() - SETTLE_S
        for tmp in self.incoming.glob("*.part") if at_boot else ():
            # Never counted as captured: the commit that would have made it evidence did
            # not happen. `agent add` still has the original.
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                discarded += 1
        rows = self.db.execute("SELECT seq, path, state FROM media").fetchall()
        known = {str(path): (int(seq), str(state)) for seq, path, state in rows}
        removed = missing = adopted = 0
        receipted: list[Path] = []
        for path, (seq, state) in known.items():
            exists = (self.media_dir / path).exists()
            if state == "receipted" and exists:
                receipted.append(self.media_dir / path)
            elif state == "pending" and not exists:
                missing += 1
                log.error("media for seq %d vanished from %s before its receipt", seq, path)
                self.reject(seq, "missing_on_device")
        # Through ``purge``: its receipt may not be durable yet (receipts are committed
        # without fsync until a purge), and a file must never go before its receipt.
        self.purge(receipted)
        removed = len(receipted)
        for orphan in sorted(self.media_dir.glob("*.bin")):
            if orphan.name in known or orphan.stat().st_mtime >= cutoff:
                continue
            # Renamed into place, but the process died before the commit: adopt it rather
            # than lose it, and say so in the manifest.
            digest = hashlib.sha256()
            try:
                reader = open_media(orphan, self.data_key)
                try:
                    for block in reader.blocks():
                        digest.update(block)
                    size = reader.size
                    sealed_id = reader.info.file_id if isinstance(reader, SealedReader) else None
                finally:
                    reader.close()
            except CorruptMedia as exc:
                log.error("cannot adopt %s: %s; left in place", orphan.name, exc)
                continue
            # Rare: the relay hashes this one's chunks as it sends them.
            self._commit(
                Written(orphan, size, digest.digest(), sealed_id=sealed_id),
                kind="file",
                media_type="application/octet-stream",
                marked=False,
                body={"recovered": True},
            )
            adopted += 1
        return RecoveryReport(discarded, adopted, removed, missing)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        backlog = self.db.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN m.state = 'pending' THEN m.size "
            "ELSE length(j.record) END), 0), min(j.added_ms) FROM journal j "
            "LEFT JOIN media m ON m.seq = j.seq WHERE j.acked = 0 OR m.state = 'pending'"
        ).fetchone()
        first_unsettled = self.db.execute(
            "SELECT min(j.seq) FROM journal j LEFT JOIN media m ON m.seq = j.seq "
            "WHERE j.acked = 0 OR m.state = 'pending'"
        ).fetchone()[0]
        head, _ = self.journal.head()
        rejected = self.db.execute("SELECT count(*) FROM media WHERE state = 'rejected'").fetchone()
        receipted = self.db.execute(
            "SELECT count(*) FROM media WHERE state = 'receipted'"
        ).fetchone()
        oldest = backlog[2]
        return {
            "backlog_items": int(backlog[0]),
            "backlog_bytes": int(backlog[1]),
            "last_receipt_seq": head if first_unsettled is None else int(first_unsettled) - 1,
            "journal_seq": head,
            "receipted_items": int(receipted[0]),
            "rejected_items": int(rejected[0]),
            # Bytes the gateway already held when an interrupted upload resumed: what a
            # restart from zero would have sent again.
            "resumed_bytes": get_counter(self.db, "resumed_bytes"),
            "oldest_unacked_age_s": 0 if oldest is None else max(0, (now_ms() - oldest) // 1000),
        }
