"""Upload messages: a signed journal batch, then media in offset-addressed chunks.

The shape follows EMQX's file transfer: ``init`` names the file (the journal ``seq`` of its
signed manifest record, its size and sha256), ``chunk`` carries bytes at an offset with
their own sha256, ``fin`` asks the gateway to finish (or to repeat its verdict). Re-sending
any of them is harmless: the gateway is idempotent by (device, seq, offset).

The gateway answers with ``UploadAck``: the byte ranges it holds. After a reconnect the
device sends ``init`` again and resumes from those ranges instead of from zero.

Journal records travel in a ``JournalBatch`` envelope signed by the device, with a
per-device ``counter`` that increases with every envelope sent: an envelope with an old
counter is a replay.

Chunk wire format (binary, so media is not inflated by base64)::

    u16 big-endian header length | canonical JSON header | data

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.encoding import canonical, decode, from_hex
from protocol.errors import EncodingError, MessageError, ProtocolError
from protocol.fields import check_fields as _fields
from protocol.fields import check_version as _version
from protocol.fields import int_field as _int
from protocol.journal import VERSION, SignedRecord, check_device_id
from protocol.signing import SigningKey, VerifyKey, sign_object, verify_object

MAX_CHUNK_SIZE = 8 * 1024 * 1024
MAX_BATCH_RECORDS = 256


@dataclass(frozen=True)
class JournalBatch:
    device_id: str
    counter: int
    records: tuple[SignedRecord, ...]

    def encode(self, key: SigningKey) -> bytes:
        obj = {
            "v": VERSION,
            "device_id": self.device_id,
            "counter": self.counter,
            "records": [r.to_wire() for r in self.records],
        }
        return canonical(sign_object(obj, key))

    @staticmethod
    def peek_device(data: bytes) -> str:
        """The claimed device id, before the key to check it with is known."""
        return check_device_id(decode(data, what="journal batch").get("device_id"))

    @staticmethod
    def announced_keys(data: bytes, current: VerifyKey) -> list[VerifyKey]:
        """Keys that ``key_rotation`` records in the batch hand over to, counting only
        hand-over records that verify under ``current`` (the key the receiver trusts)."""
        obj = decode(data, what="journal batch")
        records = obj.get("records")
        if not isinstance(records, list):
            return []  # ``decode`` names the fault; there is nothing to hand over to
        keys = []
        for wire in records:
            if not isinstance(wire, dict) or wire.get("kind") != "key_rotation":
                continue
            try:
                signed = SignedRecord.from_wire(wire)
                signed.verify(current)
                keys.append(VerifyKey.from_hex(str(signed.record.body["new_public_key"])))
            except ProtocolError:
                continue
        return keys

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> JournalBatch:
        obj = decode(data, what="journal batch")
        _version(obj, "journal batch")
        _fields(obj, "journal batch", {"v", "device_id", "counter", "records", "sig"})
        verify_object(obj, key, what="journal batch")
        records = obj["records"]
        if not isinstance(records, list) or not 1 <= len(records) <= MAX_BATCH_RECORDS:
            raise MessageError(f"records must be a list of 1..{MAX_BATCH_RECORDS} records")
        device_id = check_device_id(obj["device_id"])
        parsed = tuple(SignedRecord.from_wire(r) for r in records)
        for r in parsed:
            if r.record.device_id != device_id:
                raise MessageError(
                    f"record seq {r.record.seq} names device {r.record.device_id!r} "
                    f"inside a batch from {device_id!r}"
                )
        seqs = [r.record.seq for r in parsed]
        if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise MessageError(f"batch records must have consecutive seq, got {seqs}")
        return cls(device_id, _int(obj, "counter", 1), parsed)


@dataclass(frozen=True)
class UploadInit:
    device_id: str
    seq: int
    size: int
    sha256: bytes
    chunk_size: int

    def encode(self) -> bytes:
        return canonical(
            {
                "v": VERSION,
                "device_id": self.device_id,
                "seq": self.seq,
                "size": self.size,
                "sha256": self.sha256.hex(),
                "chunk_size": self.chunk_size,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> UploadInit:
        obj = decode(data, what="upload init")
        _version(obj, "upload init")
        _fields(obj, "upload init", {"v", "device_id", "seq", "size", "sha256", "chunk_size"})
        return cls(
            device_id=check_device_id(obj["device_id"]),
            seq=_int(obj, "seq", 1),
            size=_int(obj, "size"),
            sha256=from_hex(obj["sha256"], field="sha256", length=32),
            chunk_size=_int(obj, "chunk_size", 1, MAX_CHUNK_SIZE),
        )


_HEADER_LEN = struct.Struct(">H")


@dataclass(frozen=True)
class Chunk:
    """Bytes of one media file at an offset, with their own sha256.

    ``sha256`` is the hash the sender claims for ``data``; ``encode`` computes it when it
    is empty. ``decode`` checks it by default. A receiver that hashes every byte anyway
    (the gateway's whole-file hash) may decode with ``verify=False`` and call ``intact``
    only when the whole file fails: one hash pass per byte instead of two.
    """

    device_id: str
    seq: int
    offset: int
    data: bytes | memoryview
    sha256: bytes = b""

    def encode(self) -> bytes:
        header = canonical(
            {
                "v": VERSION,
                "device_id": self.device_id,
                "seq": self.seq,
                "offset": self.offset,
                "sha256": (self.sha256 or hashlib.sha256(self.data).digest()).hex(),
            }
        )
        return b"".join((_HEADER_LEN.pack(len(header)), header, self.data))

    def intact(self) -> bool:
        """True when ``data`` hashes to the claimed ``sha256``."""
        return hashlib.sha256(self.data).digest() == self.sha256

    def check(self) -> None:
        """Raise ``MessageError`` unless ``data`` hashes to the claimed ``sha256``."""
        if not self.intact():
            raise MessageError(
                f"chunk at offset {self.offset} of seq {self.seq}: "
                "data does not match its sha256 (corrupted in transit or on the device)"
            )

    @classmethod
    def decode(cls, payload: bytes | memoryview, *, verify: bool = True) -> Chunk:
        """Parse a chunk message; ``data`` is a view into ``payload``, never a copy.

        A chunk is the one message that carries megabytes a second: copying its bytes
        out of the received buffer cost the gateway more than writing them to disk.
        """
        view = memoryview(payload)
        if len(view) < _HEADER_LEN.size:
            raise EncodingError(f"chunk too short ({len(view)} bytes) for its header length")
        (hlen,) = _HEADER_LEN.unpack_from(view)
        if len(view) < _HEADER_LEN.size + hlen:
            raise EncodingError(f"chunk header length {hlen} exceeds payload {len(view)}")
        obj = decode(bytes(view[_HEADER_LEN.size : _HEADER_LEN.size + hlen]), what="chunk header")
        _version(obj, "chunk")
        _fields(obj, "chunk header", {"v", "device_id", "seq", "offset", "sha256"})
        data = view[_HEADER_LEN.size + hlen :]
        if len(data) > MAX_CHUNK_SIZE:
            raise MessageError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_SIZE}")
        chunk = cls(
            check_device_id(obj["device_id"]),
            _int(obj, "seq", 1),
            _int(obj, "offset"),
            data,
            from_hex(obj["sha256"], field="chunk sha256", length=32),
        )
        if verify:
            chunk.check()
        return chunk


class ChunkHashes:
    """The sha256 of every ``chunk_size`` piece of a stream, computed as it goes by.

    A device hashes its chunks once, at capture, in the same pass that hashes and seals
    the whole file; the relay then sends a chunk with its stored hash instead of hashing
    it again while the link is up (a backlog drains after a dead zone, when the CPU is
    needed to move bytes). ``digests`` is the concatenation of the 32-byte hashes.
    """

    def __init__(self, chunk_size: int, max_chunks: int | None = None) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.overflow = False  # more than ``max_chunks`` pieces: hashing stopped
        self._parts: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view and not self.overflow:
            if self.max_chunks is not None and len(self._parts) >= self.max_chunks:
                self.overflow = True
                break
            take = min(self.chunk_size - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._parts.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0

    def digests(self) -> bytes:
        """All hashes so far, the last (short) piece included; b"" after an overflow."""
        if self.overflow:
            return b""
        tail = [self._current.digest()] if self._filled else []
        return b"".join(self._parts + tail)


def stored_chunk_hash(
    digests: bytes, chunk_size: int, size: int, offset: int, length: int
) -> bytes | None:
    """The hash ``ChunkHashes`` stored for ``[offset, offset + length)``, or None when that
    range is not exactly one of its pieces (a resume after the chunk size changed)."""
    if chunk_size <= 0 or offset % chunk_size or length != min(chunk_size, size - offset):
        return None
    index = offset // chunk_size
    found = digests[index * 32 : index * 32 + 32]
    return found if len(found) == 32 else None


@dataclass(frozen=True)
class UploadFin:
    device_id: str
    seq: int

    def encode(self) -> bytes:
        return canonical({"v": VERSION, "device_id": self.device_id, "seq": self.seq})

    @classmethod
    def decode(cls, data: bytes) -> UploadFin:
        obj = decode(data, what="upload fin")
        _version(obj, "upload fin")
        _fields(obj, "upload fin", {"v", "device_id", "seq"})
        return cls(check_device_id(obj["device_id"]), _int(obj, "seq", 1))


Ranges = tuple[tuple[int, int], ...]


def add_range(ranges: Ranges, start: int, end: int) -> Ranges:
    """Merge half-open ``[start, end)`` into sorted, disjoint, non-adjacent ``ranges``."""
    if end <= start:
        return ranges
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if e < start or s > end:
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    out.append((start, end))
    out.sort()
    return tuple(out)


def union(intervals: Iterable[tuple[int, int]]) -> Ranges:
    """Merge any half-open intervals (unsorted, overlapping) in one pass after a sort."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def subtract(ranges: Ranges, remove: Ranges) -> Ranges:
    """``ranges`` without the bytes in ``remove`` (both sorted, half-open)."""
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        pos = s
        for rs, re_ in remove:
            if rs >= e:
                break
            if re_ <= pos or rs >= re_:
                continue
            if rs > pos:
                out.append((pos, rs))
            pos = max(pos, re_)
        if pos < e:
            out.append((pos, e))
    return tuple(out)


def covered(ranges: Ranges, size: int) -> bool:
    return size == 0 or ranges == ((0, size),)


def missing(ranges: Ranges, size: int) -> list[tuple[int, int]]:
    """The holes of ``ranges`` within ``[0, size)``."""
    holes: list[tuple[int, int]] = []
    pos = 0
    for s, e in ranges:
        if s > pos:
            holes.append((pos, s))
        pos = max(pos, e)
    if pos < size:
        holes.append((pos, size))
    return [(s, min(e, size)) for s, e in holes if s < size]


def _ranges(value: object) -> Ranges:
    if not isinstance(value, list):
        raise MessageError("ranges must be a list of [start, end] pairs")
    out: Ranges = ()
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item)
            or item[0] >= item[1]
        ):
            raise MessageError(f"bad range {item!r}: want [start, end] with start < end")
        out = add_range(out, item[0], item[1])
    return out


UPLOAD_STATES = frozenset({"receiving", "complete", "rejected", "unknown"})


@dataclass(frozen=True)
class UploadAck:
    """Gateway → device: which bytes of ``seq`` the gateway holds, and its verdict.

    ``receiving``: keep sending the holes. ``complete``: verified and stored, a receipt
    follows (or was sent). ``rejected``: the bytes do not match the signed manifest; the
    device keeps its copy and journals the fact. ``unknown``: the gateway has not accepted
    the manifest record yet; send the journal first.
    """

    device_id: str
    seq: int
    state: str
    ranges: Ranges
    reason: str
    ts_ms: int

    def encode(self, key: SigningKey) -> bytes:
        obj = {
            "v": VERSION,
            "device_id": self.device_id,
            "seq": self.seq,
            "state": self.state,
            "ranges": [list(r) for r in self.ranges],
            "reason": self.reason,
            "ts_ms": self.ts_ms,
        }
        return canonical(sign_object(obj, key))

    @classmethod
    def decode(cls, data: bytes, key: VerifyKey) -> UploadAck:
        obj = decode(data, what="upload ack")
        _version(obj, "upload ack")
        _fields(
            obj,
            "upload ack",
            {"v", "device_id", "seq", "state", "ranges", "reason", "ts_ms", "sig"},
        )
        verify_object(obj, key, what="upload ack")
        state = obj["state"]
        if not isinstance(state, str) or state not in UPLOAD_STATES:
            raise MessageError(f"upload ack state {state!r} unknown")
        reason = obj["reason"]
        if not isinstance(reason, str):
            raise MessageError("upload ack reason must be a string")
        return cls(
            check_device_id(obj["device_id"]),
            _int(obj, "seq", 1),
            state,
            _ranges(obj["ranges"]),
            reason,
            _int(obj, "ts_ms"),
        )
