"""Evidence intake: media streamed in chunks becomes verified, stored, receipted evidence.

For every media record the gateway accepted, the device sends ``init`` / chunks / ``fin``.
Bytes go to a part file at their offsets (``gateway.uploads``); when all are there, the
file is fsync'd, hashed and compared with the sha256 in the **signed** manifest, moved
into the content-addressed blob store, committed with an ``evidence`` leaf in the
transparency log, and only then receipted. Re-sent messages are answered from what is
already stored (idempotent).

On a mismatch, the chunks are checked against their own hashes: bytes damaged on the way
(or whose claim a crash lost before it reached the disk) are dropped, a ``bad_message``
alarm says so, and the device sends them again. After three such rounds the upload
checks every chunk on arrival instead (see ``gateway.uploads``). A file whose every chunk
is what the device sent is rejected with ``hash_mismatch`` and stores nothing.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from gateway.alarms import raise_alarm
from gateway.blobs import BlobStore
from gateway.db import transaction
from gateway.outgoing import Outgoing, now_ms
from gateway.translog import TransparencyLog
from gateway.uploads import ActiveUpload, ActiveUploads, ranges_from_json, ranges_to_json
from protocol.encoding import decode
from protocol.errors import MessageError
from protocol.journal import MEDIA_KINDS, MediaInfo
from protocol.receipt import Receipt, evidence_leaf
from protocol.signing import SigningKey
from protocol.topics import GatewayTopic, gateway_topic
from protocol.upload import Chunk, Ranges, UploadAck, UploadFin, UploadInit

log = logging.getLogger("custody.gateway.evidence")

ACK_EVERY = 1024 * 1024
events = logging.getLogger("custody.events")


@dataclass(frozen=True)
class Verdict:
    """What verifying a finished part file found (computed off the ingest thread)."""

    digest: bytes
    suspects: Ranges = ()  # on a mismatch: held bytes that no chunk claim vouches for


#: Runs ``work`` off the ingest thread, then ``then(result)`` back on it (publishing what
#: it returns). ``None`` means: do both inline.
Background = Callable[
    [Callable[[], Verdict | None], Callable[[Verdict | None], list[Outgoing]]], None
]


class EvidenceIntake:
    def __init__(
        self,
        db: sqlite_utils.Database,
        key: SigningKey,
        log_: TransparencyLog,
        blobs: BlobStore,
        active: ActiveUploads,
        *,
        is_active: Callable[[str], bool],
        is_active_cached: Callable[[str], bool],
        alarm: Callable[..., None],
        background: Background | None = None,
    ) -> None:
        self.db = db
        self.key = key
        self.log = log_
        self.blobs = blobs
        self.active = active
        self._is_active = is_active
        self._is_active_cached = is_active_cached
        self._alarm = alarm
        self.background = background
        self._pending_acks: dict[tuple[str, int], ActiveUpload] = {}
        self._finalizing: set[tuple[str, int]] = set()

    def _upload_ack(
        self, device_id: str, seq: int, state: str, ranges: Any = (), reason: str = ""
    ) -> Outgoing:
        ack = UploadAck(device_id, seq, state, tuple(ranges), reason, now_ms())
        return Outgoing(gateway_topic(device_id, GatewayTopic.UPLOAD_ACK), ack.encode(self.key))

    def _manifest(self, device_id: str, seq: int) -> tuple[MediaInfo, dict[str, Any]] | None:
        row = self.db.execute(
            "SELECT kind, record FROM journal WHERE device_id = ? AND seq = ?", [device_id, seq]
        ).fetchone()
        if row is None or row[0] not in MEDIA_KINDS:
            return None
        record = decode(row[1].encode(), what="stored record")
        return MediaInfo.from_body(record["body"]), record

    def _upload(self, device_id: str, seq: int) -> ActiveUpload | None:
        """The upload for (device, seq), from memory, the database, or its manifest."""
        up = self.active.get(device_id, seq)
        if up is not None:
            return up
        found = self._manifest(device_id, seq)
        if found is None:
            return None
        info, _ = found
        row = self.db.execute(
            "SELECT ranges, bytes_received, inits, resumed_from, rechecks FROM uploads "
            "WHERE device_id = ? AND seq = ?",
            [device_id, seq],
        ).fetchone()
        up = ActiveUpload(
            device_id, seq, info.size, info.sha256, self.active.part_path(device_id, seq)
        )
        if row is None:
            with transaction(self.db, durable=False) as conn:
                conn.execute(
                    "INSERT INTO uploads(device_id, seq, size, sha256, ranges, bytes_received, "
                    "inits, resumed_from, state, reason, updated_ms) "
                    "VALUES (?, ?, ?, ?, '[]', 0, 0, -1, 'receiving', '', ?)",
                    [device_id, seq, info.size, info.sha256.hex(), now_ms()],
                )
        else:
            up.take_over_legacy()  # a part file an earlier release left
            up.ranges = up.durable = ranges_from_json(row[0])
            # A missing part file was either moved into the blob store just before a crash
            # or lost: then start over. Moved, it is all there, whatever the last
            # checkpoint (up to ``CHECKPOINT_BYTES`` earlier) says: the device is asked
            # for nothing, and ``_verify_and_store`` finds the blob. Asked for the tail
            # instead, it sent it into a new part file with a hole where the head had
            # been, and the whole-file hash failed: a false "corrupted in transit", and
            # a false ``hash_mismatch`` for an upload out of rechecks.
            if up.ranges and not up.path.exists():
                stored = self.blobs.exists(info.sha256.hex())
                up.ranges = up.durable = ((0, info.size),) if stored else ()
            up.bytes_received, up.inits, up.resumed_from = int(row[1]), int(row[2]), int(row[3])
            up.rechecks = int(row[4] or 0)
            if up.ranges and up.resumed_from < 0:
                # Picked up again after a gateway restart: resume from the durable ranges.
                up.resumed_from = sum(e - s for s, e in up.ranges)
                events.info(
                    "%s seq %d resumes after restart: %d of %d bytes held",
                    device_id,
                    seq,
                    up.resumed_from,
                    up.size,
                )
        self._activate(up)
        return up

    def _activate(self, up: ActiveUpload) -> None:
        """Keep ``up`` open; the uploads it pushes out of the cache are checkpointed."""
        for old in self.active.put(up):
            self._checkpoint(old)
            old.close()

    def _checkpoint(self, up: ActiveUpload) -> None:
        up.sync()
        with transaction(self.db, durable=False) as conn:
            conn.execute(
                "UPDATE uploads SET ranges = ?, bytes_received = ?, inits = ?, resumed_from = ?, "
                "rechecks = ?, updated_ms = ? WHERE device_id = ? AND seq = ?",
                [
                    ranges_to_json(up.durable),
                    up.bytes_received,
                    up.inits,
                    up.resumed_from,
                    up.rechecks,
                    now_ms(),
                    up.device_id,
                    up.seq,
                ],
            )

    def _settled(self, device_id: str, seq: int) -> list[Outgoing] | None:
        """Replies for an upload that is already finished (complete or rejected), else None."""
        ev = self.db.execute(
            "SELECT size FROM evidence WHERE device_id = ? AND seq = ?", [device_id, seq]
        ).fetchone()
        if ev is not None:
            return [
                self._upload_ack(device_id, seq, "complete", [(0, int(ev[0]))] if ev[0] else []),
                self.receipt(device_id, seq),
            ]
        row = self.db.execute(
            "SELECT reason FROM uploads WHERE device_id = ? AND seq = ? AND state = 'rejected'",
            [device_id, seq],
        ).fetchone()
        if row is not None:
            return [self._upload_ack(device_id, seq, "rejected", reason=row[0])]
        return None

    def _names_another(self, what: str, device_id: str, named: str) -> bool:
        if named == device_id:
            return False
        # One alarm per kind of message, however many ids a device makes up (keyed by the
        # text, each made-up id was a new row and a durable commit).
        self._alarm(
            "topic_mismatch",
            device_id,
            f"upload {what} naming {named} on {device_id}'s topic",
            key=what,
        )
        return True

    def on_init(self, device_id: str, init: UploadInit) -> list[Outgoing]:
        if self._names_another("init", device_id, init.device_id):
            return []
        if not self._is_active(device_id):
            return []
        if (device_id, init.seq) in self._finalizing:
            return []
        settled = self._settled(device_id, init.seq)
        if settled is not None:
            return settled
        try:
            found = self._manifest(device_id, init.seq)
        except MessageError as exc:
            # Signed, in the journal, and unusable: refuse the upload (the device stops
            # asking) rather than fail every chunk of it.
            self._alarm(
                "bad_record",
                device_id,
                f"media record seq {init.seq} is signed but its manifest is unusable: {exc}",
                key=f"record {init.seq}",
            )
            return [self._upload_ack(device_id, init.seq, "rejected", reason="bad_manifest")]
        if found is None:
            return [self._upload_ack(device_id, init.seq, "unknown")]
        info, _ = found
        if info.sha256 != init.sha256 or info.size != init.size:
            self._alarm(
                "manifest_mismatch",
                device_id,
                f"upload init for seq {init.seq} names sha256/size that differ from its "
                "signed manifest",
                key=str(init.seq),
            )
            return [self._upload_ack(device_id, init.seq, "rejected", reason="manifest_mismatch")]
        up = self._upload(device_id, init.seq)
        assert up is not None
        up.inits += 1
        if up.inits > 1 and up.resumed_from < 0 and up.ranges:
            up.resumed_from = sum(e - s for s, e in up.ranges)
            events.info(
                "%s seq %d resumes: %d of %d bytes already held",
                device_id,
                init.seq,
                up.resumed_from,
                up.size,
            )
        self._checkpoint(up)
        if up.complete:
            return self._finalize(up)
        return [self._upload_ack(device_id, init.seq, "receiving", up.ranges)]

    def on_chunk(self, device_id: str, chunk: Chunk) -> list[Outgoing]:
        if chunk.device_id != device_id:
            self._alarm(
                "topic_mismatch",
                device_id,
                f"chunk claiming {chunk.device_id} on {device_id}'s topic",
                key="chunk",
            )
            return []
        if not self._is_active_cached(device_id):
            return []
        if (device_id, chunk.seq) in self._finalizing:
            return []  # a re-sent chunk while the file is being verified: the receipt follows
        up = self.active.get(device_id, chunk.seq)
        if up is None:
            # Not in progress here: a late duplicate of a finished upload must be answered
            # from what is stored, never written into a fresh part file.
            settled = self._settled(device_id, chunk.seq)
            if settled is not None:
                return settled
            up = self._upload(device_id, chunk.seq)
        if up is None:
            return [self._upload_ack(device_id, chunk.seq, "unknown")]
        if chunk.offset + len(chunk.data) > up.size:
            self._alarm(
                "bad_message",
                device_id,
                f"chunk at {chunk.offset}+{len(chunk.data)} exceeds seq {chunk.seq}'s "
                f"size {up.size}",
                key=f"bounds {chunk.seq}",
            )
            return []
        if up.complete:
            # All held already (resumed as complete after a crash, say): nothing to write;
            # writing would start a new part file with a hole where the rest had been.
            return self._finalize(up)
        if up.eager:
            try:
                chunk.check()
            except MessageError as exc:
                self._alarm("bad_message", device_id, f"{exc}; dropped", key=f"chunk {chunk.seq}")
                return []
        up.write(chunk.offset, chunk.data, chunk.sha256)
        if up.complete:
            return self._finalize(up)
        if up.checkpoint_due():
            self._checkpoint(up)
        # Acks are cumulative, so a burst of chunks needs one ack, sent by ``flush``.
        self._pending_acks[(device_id, chunk.seq)] = up
        return []

    def flush(self, *, idle: bool = True) -> list[Outgoing]:
        """The coalesced ``receiving`` acks for chunks handled since the last flush.

        Acks are cumulative, so while more messages are queued (``idle`` False) an upload
        is acked only every ``ACK_EVERY`` bytes; once the queue is drained every pending
        ack goes out, so a device with a small window never waits for a timeout.
        """
        out = []
        for key, up in list(self._pending_acks.items()):
            if idle or up.unacked >= ACK_EVERY:
                del self._pending_acks[key]
                up.unacked = 0
                out.append(self._upload_ack(up.device_id, up.seq, "receiving", up.ranges))
        return out

    def on_fin(self, device_id: str, fin: UploadFin) -> list[Outgoing]:
        if self._names_another("fin", device_id, fin.device_id):
            return []
        if not self._is_active(device_id):
            return []
        if (device_id, fin.seq) in self._finalizing:
            return []
        settled = self._settled(device_id, fin.seq)
        if settled is not None:
            return settled
        up = self._upload(device_id, fin.seq)
        if up is None:
            return [self._upload_ack(device_id, fin.seq, "unknown")]
        if up.complete:
            return self._finalize(up)
        return [self._upload_ack(device_id, fin.seq, "receiving", up.ranges)]

    def _finalize(self, up: ActiveUpload) -> list[Outgoing]:
        """All bytes are here: verify and store them, then commit and receipt.

        The file I/O (fsync, hashing, the move into the blob store) runs on the background
        executor when there is one, so chunks of other uploads keep flowing meanwhile;
        the database commit, log append and receipt always run on the ingest thread.
        """
        key = (up.device_id, up.seq)
        self._pending_acks.pop(key, None)
        self.active.forget(up.device_id, up.seq)
        if self.background is None:
            return self._commit(up, self._verify_and_store(up))
        self._finalizing.add(key)
        self.background(lambda: self._verify_and_store(up), lambda found: self._commit(up, found))
        return []

    def _verify_and_store(self, up: ActiveUpload) -> Verdict | None:
        """fsync, hash, and (when it matches the manifest) move into the blob store.

        ``None`` when the disk failed us (full, I/O error): nothing is decided, the device
        asks again after its timeout and the upload resumes from the durable ranges.
        """
        try:
            return self._verify_and_store_unguarded(up)
        except OSError as exc:
            log.error("storing %s/%d failed, will retry: %s", up.device_id, up.seq, exc)
            up.close()
            return None

    def _verify_and_store_unguarded(self, up: ActiveUpload) -> Verdict:
        sha = up.sha256.hex()
        if not up.path.exists() and self.blobs.exists(sha):
            # Moved into the store just before a crash; the store holds only verified bytes.
            # (Not when a part file exists: its bytes are what this device sent, and they
            # are checked like any others; the same content stored for another upload must
            # not vouch for bytes a device never had.)
            self.blobs.settle(sha)
            up.discard()
            return Verdict(up.sha256)
        up.open()  # an empty file never saw a chunk, so its part file may not exist yet
        digest = up.digest()
        if digest == up.sha256:
            up.cut_claims()  # the store holds the evidence bytes and nothing else
            up.sync()  # the bytes and the cut, durable before the file is in the store
            up.close()
            self.blobs.adopt(up.path, sha)
            up.discard()
            return Verdict(digest)
        up.sync()
        # Eager uploads hold only checked bytes: a mismatch is then the device's own.
        suspects = () if up.eager else up.suspect_ranges()
        up.close()
        return Verdict(digest, suspects)

    def _resend(self, up: ActiveUpload, suspects: Ranges) -> list[Outgoing]:
        """Drop bytes no chunk hash vouches for and ask the device for them again."""
        up.drop(suspects)
        self._alarm(
            "bad_message",
            up.device_id,
            f"seq {up.seq}: {sum(e - s for s, e in suspects)} bytes at "
            f"{', '.join(f'{s}-{e}' for s, e in suspects[:4])}"
            f"{' …' if len(suspects) > 4 else ''} did not match the sha256 of the chunk "
            "they came in (corrupted in transit, or their claim was lost in a crash); "
            "asked for again",
            key=f"chunk {up.seq}",
        )
        self._activate(up)
        self._checkpoint(up)
        return [self._upload_ack(up.device_id, up.seq, "receiving", up.ranges)]

    def _commit(self, up: ActiveUpload, verdict: Verdict | None) -> list[Outgoing]:
        self._finalizing.discard((up.device_id, up.seq))
        if verdict is None:
            up.close()  # nothing decided; the next init or fin starts verification again
            return []
        digest = verdict.digest
        if digest != up.sha256 and verdict.suspects:
            return self._resend(up, verdict.suspects)
        received = now_ms()
        if digest != up.sha256:
            with transaction(self.db) as conn:
                raise_alarm(
                    conn,
                    "hash_mismatch",
                    up.device_id,
                    f"media of seq {up.seq} has sha256 {digest.hex()[:16]}… but its signed "
                    f"manifest says {up.sha256.hex()[:16]}…: altered on the device or in transit",
                    received,
                    key=str(up.seq),
                )
                conn.execute(
                    "UPDATE uploads SET state = 'rejected', reason = 'hash_mismatch', "
                    "updated_ms = ? WHERE device_id = ? AND seq = ?",
                    [received, up.device_id, up.seq],
                )
            up.discard()
            return [self._upload_ack(up.device_id, up.seq, "rejected", reason="hash_mismatch")]
        found = self._manifest(up.device_id, up.seq)
        assert found is not None
        _, record = found
        body = record["body"]
        try:
            with transaction(self.db) as conn:
                index = self.log.append(
                    conn,
                    evidence_leaf(up.device_id, up.seq, up.sha256, up.size, received),
                    received,
                )
                conn.execute(
                    "INSERT INTO evidence(device_id, seq, kind, media_type, name, marked, sha256, "
                    "size, verified, captured_ms, received_ms, log_index) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                    [
                        up.device_id,
                        up.seq,
                        record["kind"],
                        body["media_type"],
                        str(body.get("name", "")),
                        int(bool(body.get("marked"))),
                        up.sha256.hex(),
                        up.size,
                        record["wall_ms"],
                        received,
                        index,
                    ],
                )
                conn.execute(
                    "UPDATE uploads SET state = 'complete', ranges = ?, bytes_received = ?, "
                    "inits = ?, resumed_from = ?, updated_ms = ? WHERE device_id = ? AND seq = ?",
                    [
                        ranges_to_json(up.ranges),
                        up.bytes_received,
                        up.inits,
                        up.resumed_from,
                        received,
                        up.device_id,
                        up.seq,
                    ],
                )
        except BaseException:
            self.log.reload()
            raise
        events.info(
            "%s evidence seq=%d %d bytes verified, log#%d", up.device_id, up.seq, up.size, index
        )
        return [
            self._upload_ack(up.device_id, up.seq, "complete", [(0, up.size)] if up.size else []),
            self.receipt(up.device_id, up.seq),
        ]

    def receipt(self, device_id: str, seq: int) -> Outgoing:
        row = self.db.execute(
            "SELECT sha256, size, received_ms, log_index FROM evidence "
            "WHERE device_id = ? AND seq = ?",
            [device_id, seq],
        ).fetchone()
        sha, size, received, index = bytes.fromhex(row[0]), int(row[1]), int(row[2]), int(row[3])
        head = self.log.tree_head(now_ms())
        receipt = Receipt(
            device_id,
            seq,
            sha,
            size,
            received,
            index,
            head,
            tuple(self.log.inclusion(index, head.tree_size)),
        )
        return Outgoing(gateway_topic(device_id, GatewayTopic.RECEIPT), receipt.encode(self.key))

    def close(self) -> None:
        for up in self.active.all():
            try:
                self._checkpoint(up)
            except (OSError, sqlite3.Error) as exc:
                log.warning("checkpoint of %s/%d failed at shutdown: %s", up.device_id, up.seq, exc)
            up.close()
