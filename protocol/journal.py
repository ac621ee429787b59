"""The device journal: versioned, hash-chained, signed records.

Every device keeps one append-only journal. Record ``n`` carries ``seq = n`` (64-bit,
starting at 1) and ``prev`` = the hash of record ``n-1`` (``GENESIS`` for the first), and
is signed by the device's Ed25519 key over its canonical encoding without ``sig``. The hash
of a record is sha256 over its canonical encoding *with* ``sig``, so the chain commits to
signatures too.

A gap in recording is therefore explained by a signed record, and a missing sequence
number, a second record with the same number (a fork) or a broken ``prev`` link is
evidence of deletion or tampering (Art. 34). ``check_link`` classifies those cases; what
to do about them (alarms, rejections) is the gateway's business.

Pure: no I/O, no clocks. Callers pass times in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from protocol.encoding import canonical, from_hex
from protocol.errors import ChainError, MessageError, SignatureError, VersionError
from protocol.fields import INT_MAX, check_fields
from protocol.signing import SigningKey, VerifyKey

VERSION = 1
GENESIS = bytes(32)
SEQ_MAX = INT_MAX  # "64-bit sequence numbers", signed as every store holds them
#: The largest file a manifest may announce: far past any recording or document, and a
#: part file that size still fits the filesystems a gateway runs on (a manifest of 2**62
#: bytes made every chunk fail with "File too large").
MEDIA_SIZE_MAX = 2**40

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Record kinds whose body describes a media file that must follow the record.
MEDIA_KINDS = frozenset({"segment", "photo", "file"})
#: Every kind a v1 journal may contain. Unknown kinds are rejected, not ignored: a kind we
#: do not understand cannot be shown to a supervisor correctly.
RECORD_KINDS = MEDIA_KINDS | frozenset(
    {
        "boot",
        "case_context",
        "mark",
        "recording_started",
        "recording_stopped",
        "clock_sync",
        "tamper",
        "media_corrupt",
        "command_rejected",
        "command_executed",
        "key_rotation",
    }
)


def check_device_id(device_id: object) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise MessageError(
            f"device id {device_id!r} is invalid: use 1-64 of A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return device_id


def _int(value: object, name: str, lo: int = 0, hi: int = SEQ_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MessageError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


#: RFC 6838 names (``type/subtype``), RFC 9110 parameters. What a device says its file is
#: becomes the Content-Type of every download: a control character, a line break or a
#: character outside Latin-1 there made the download fail for good (the record cannot
#: change), so anything else is refused with the record.
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}"
    rf'(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[ !#-\[\]-~]*"))*'
)
MEDIA_TYPE_MAX = 255


def valid_media_type(value: str) -> bool:
    """True for a well-formed media type such as ``video/mp4; codecs="avc1.64001f"``."""
    return len(value) <= MEDIA_TYPE_MAX and _MEDIA_TYPE.fullmatch(value) is not None


@dataclass(frozen=True)
class MediaInfo:
    """What a media record's body says about its file (the manifest)."""

    sha256: bytes
    size: int
    media_type: str
    marked: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> MediaInfo:
        media_type = body.get("media_type")
        if not isinstance(media_type, str) or not media_type:
            raise MessageError("media record body needs a non-empty media_type")
        if not valid_media_type(media_type):
            raise MessageError(
                f"media record body media_type {media_type[:80]!r} is not a media type "
                "(type/subtype, with optional ;name=value parameters, in printable ASCII)"
            )
        marked = body.get("marked", False)
        if not isinstance(marked, bool):
            raise MessageError("media record body field marked must be a boolean")
        return cls(
            sha256=from_hex(body.get("sha256"), field="body.sha256", length=32),
            size=_int(body.get("size"), "body.size", hi=MEDIA_SIZE_MAX),
            media_type=media_type,
            marked=marked,
        )


@dataclass(frozen=True)
class JournalRecord:
    """An unsigned journal record. ``body`` is kind-specific and must be JSON-safe."""

    device_id: str
    seq: int
    prev: bytes
    kind: str
    wall_ms: int
    mono_ns: int
    body: Mapping[str, Any] = field(default_factory=dict)
    v: int = VERSION

    def __post_init__(self) -> None:
        if self.v != VERSION:
            raise VersionError(f"journal record version {self.v} is not supported (want 1)")
        check_device_id(self.device_id)
        _int(self.seq, "seq", 1)
        if len(self.prev) != 32:
            raise MessageError("prev must be a 32-byte hash")
        if self.kind not in RECORD_KINDS:
            raise MessageError(
                f"unknown record kind {self.kind!r}; known: {', '.join(sorted(RECORD_KINDS))}"
            )
        _int(self.wall_ms, "wall_ms")
        _int(self.mono_ns, "mono_ns")
        if not isinstance(self.body, Mapping):
            raise MessageError("body must be an object")
        if self.kind in MEDIA_KINDS:
            MediaInfo.from_body(self.body)
        if self.kind == "key_rotation":
            from_hex(self.body.get("new_public_key"), field="body.new_public_key", length=32)
        canonical(dict(self.body))  # refuse bodies that cannot be signed, now not later

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "device_id": self.device_id,
            "seq": self.seq,
            "prev": self.prev.hex(),
            "kind": self.kind,
            "wall_ms": self.wall_ms,
            "mono_ns": self.mono_ns,
            "body": dict(self.body),
        }

    def signing_bytes(self) -> bytes:
        return canonical(self.to_wire())

    def sign(self, key: SigningKey) -> SignedRecord:
        return SignedRecord(self, key.sign(self.signing_bytes()))

    @property
    def media(self) -> MediaInfo | None:
        return MediaInfo.from_body(self.body) if self.kind in MEDIA_KINDS else None


@dataclass(frozen=True)
class SignedRecord:
    record: JournalRecord
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        wire = self.record.to_wire()
        wire["sig"] = self.sig.hex()
        return wire

    def encode(self) -> bytes:
        return canonical(self.to_wire())

    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    def verify(self, key: VerifyKey) -> None:
        try:
            key.verify(self.sig, self.record.signing_bytes())
        except SignatureError as exc:
            raise SignatureError(
                f"record seq {self.record.seq} of {self.record.device_id}: {exc}"
            ) from exc

    @classmethod
    def from_wire(cls, wire: object) -> SignedRecord:
        if not isinstance(wire, dict):
            raise MessageError("journal record must be an object")
        expected = {"v", "device_id", "seq", "prev", "kind", "wall_ms", "mono_ns", "body", "sig"}
        if "v" in wire and wire["v"] != VERSION:
            raise VersionError(f"journal record version {wire['v']!r} is not supported (want 1)")
        check_fields(wire, "journal record", expected)
        body = wire["body"]
        if not isinstance(body, dict):
            raise MessageError("body must be an object")
        kind = wire["kind"]
        if not isinstance(kind, str):
            raise MessageError("kind must be a string")
        record = JournalRecord(
            v=VERSION,
            device_id=check_device_id(wire["device_id"]),
            seq=_int(wire["seq"], "seq", 1),
            prev=from_hex(wire["prev"], field="prev", length=32),
            kind=kind,
            wall_ms=_int(wire["wall_ms"], "wall_ms"),
            mono_ns=_int(wire["mono_ns"], "mono_ns"),
            body=body,
        )
        return cls(record, from_hex(wire["sig"], field="sig", length=64))


class Link(Enum):
    """How a record relates to the verifier's current head."""

    NEXT = "next"  # extends the chain
    GAP = "gap"  # seq skips ahead: records are missing
    BROKEN = "broken"  # right seq, but prev is not the head's hash: a fork
    BEHIND = "behind"  # seq at or below the head: a duplicate or a fork; compare stored hash


def check_link(head_seq: int, head_hash: bytes, record: JournalRecord) -> Link:
    """Classify ``record`` against a head (``head_seq`` 0 and ``GENESIS`` for an empty chain)."""
    if record.seq <= head_seq:
        return Link.BEHIND
    if record.seq > head_seq + 1:
        return Link.GAP
    if record.prev != head_hash:
        return Link.BROKEN
    return Link.NEXT


def verify_chain(records: list[SignedRecord], key: VerifyKey) -> bytes:
    """Verify a complete chain from genesis; return the head hash or raise ``ChainError``."""
    head_seq, head_hash = 0, GENESIS
    for signed in records:
        signed.verify(key)
        link = check_link(head_seq, head_hash, signed.record)
        if link is not Link.NEXT:
            raise ChainError(
                f"record seq {signed.record.seq} does not extend head seq {head_seq}: {link.value}"
            )
        head_seq, head_hash = signed.record.seq, signed.hash()
    return head_hash
