"""Tests for the protocol messages: journal records and chains, uploads, acks, receipts,
device state and topics.

Pure in-memory tests: messages are encoded to the bytes that would cross the broker and
decoded again, signed with real Ed25519 keys, and tampered with one field at a time. The
decoders face untrusted input, so they are also fuzzed: whatever the bytes, the only
exceptions allowed out are ``ProtocolError`` subclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol import merkle
from protocol.encoding import canonical, decode
from protocol.errors import (
    ChainError,
    EncodingError,
    MessageError,
    ProtocolError,
    SignatureError,
    VersionError,
)
from protocol.fields import INT_MAX, TIME_MS_MAX
from protocol.journal import (
    GENESIS,
    MEDIA_KINDS,
    MEDIA_SIZE_MAX,
    RECORD_KINDS,
    SEQ_MAX,
    JournalRecord,
    Link,
    MediaInfo,
    SignedRecord,
    check_device_id,
    check_link,
    verify_chain,
)
from protocol.receipt import (
    JournalAck,
    Receipt,
    SignedTreeHead,
    evidence_leaf,
    record_leaf,
)
from protocol.signing import SigningKey, sign_object
from protocol.state import DeviceState, GatewayState, Telemetry
from protocol.topics import (
    GATEWAY_STATE,
    DeviceTopic,
    GatewayTopic,
    agent_subscriptions,
    device_topic,
    gateway_subscriptions,
    gateway_topic,
    parse_device_topic,
    parse_gateway_topic,
)
from protocol.upload import (
    MAX_BATCH_RECORDS,
    MAX_CHUNK_SIZE,
    Chunk,
    JournalBatch,
    Ranges,
    UploadAck,
    UploadFin,
    UploadInit,
    add_range,
    covered,
    missing,
)

FIELD_MAX = INT_MAX  # what a message field may carry (signed 64-bit)
DEVICE_KEY = SigningKey.from_seed(hashlib.sha256(b"device key").digest())
OTHER_KEY = SigningKey.from_seed(hashlib.sha256(b"someone else").digest())
GATEWAY_KEY = SigningKey.from_seed(hashlib.sha256(b"gateway key").digest())

# --------------------------------------------------------------------------------------------
# Strategies and helpers
# --------------------------------------------------------------------------------------------

device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
u64s = st.integers(0, FIELD_MAX)
times = st.integers(0, TIME_MS_MAX)  # device clocks: 1970 to 9999
seqs = st.integers(1, SEQ_MAX)
hashes32 = st.binary(min_size=32, max_size=32)
texts = st.text(max_size=10) | st.text(st.sampled_from('aé€\uffff😀𝄞"\\\n'), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), FIELD_MAX) | texts,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(texts, json_values, max_size=4)
_token = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,15}", fullmatch=True)
media_types = st.builds(lambda t, s: f"{t}/{s}", _token, _token)


@st.composite
def journal_records(draw: st.DrawFn, device_id: str | None = None) -> JournalRecord:
    kind = draw(st.sampled_from(sorted(RECORD_KINDS)))
    body = draw(bodies)
    if kind == "key_rotation":
        body["new_public_key"] = draw(hashes32).hex()
    if kind in MEDIA_KINDS:
        body.pop("marked", None)  # a random value there would be invalid; maybe set below
        body["sha256"] = draw(hashes32).hex()
        body["size"] = draw(st.integers(0, MEDIA_SIZE_MAX))
        body["media_type"] = draw(media_types)
        if draw(st.booleans()):
            body["marked"] = draw(st.booleans())
    return JournalRecord(
        device_id=device_id if device_id is not None else draw(device_ids),
        seq=draw(seqs),
        prev=draw(hashes32),
        kind=kind,
        wall_ms=draw(times),
        mono_ns=draw(u64s),
        body=body,
    )


def flip_bit(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def over_the_wire(signed: SignedRecord) -> SignedRecord:
    """Encode to the bytes that travel, parse them back."""
    return SignedRecord.from_wire(decode(signed.encode()))


def build_chain(
    n: int, key: SigningKey = DEVICE_KEY, device_id: str = "dev-1"
) -> list[SignedRecord]:
    chain: list[SignedRecord] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        signed = JournalRecord(device_id, seq, prev, "mark", 1_000 + seq, seq, {"i": seq}).sign(key)
        chain.append(signed)
        prev = signed.hash()
    return chain


def resign(data: bytes, key: SigningKey, **changes: Any) -> bytes:
    """Decode a signed object, apply ``changes``, sign it again with ``key``."""
    obj = decode(data)
    del obj["sig"]
    obj.update(changes)
    return canonical(sign_object(obj, key))


def only_protocol_errors(fn: Callable[[], object]) -> None:
    """Run ``fn``; a ``ProtocolError`` is fine, anything else propagates and fails the test."""
    with contextlib.suppress(ProtocolError):
        fn()


# --------------------------------------------------------------------------------------------
# Journal records: sign, wire, verify
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(record=journal_records())
def test_record_round_trip_and_verify(record: JournalRecord) -> None:
    signed = record.sign(DEVICE_KEY)
    signed.verify(DEVICE_KEY.verify_key)
    back = over_the_wire(signed)
    assert back == signed
    assert back.record.body == dict(record.body)
    back.verify(DEVICE_KEY.verify_key)
    assert back.hash() == signed.hash()
    assert back.encode() == signed.encode()
    if record.kind in MEDIA_KINDS:
        media = back.record.media
        assert media is not None
        assert media.sha256.hex() == record.body["sha256"]
        assert media.size == record.body["size"]
        assert media.marked == record.body.get("marked", False)
    else:
        assert back.record.media is None


MUTABLE_FIELDS = ["seq", "prev", "kind", "wall_ms", "mono_ns", "body", "device_id"]


def mutate(wire: dict[str, Any], name: str, data: st.DataObject) -> dict[str, Any]:
    """A copy of ``wire`` with field ``name`` changed to another valid value."""
    out = dict(wire)
    if name in ("seq", "wall_ms", "mono_ns"):
        top = TIME_MS_MAX if name == "wall_ms" else FIELD_MAX
        out[name] = wire[name] + 1 if wire[name] < top else wire[name] - 1
    elif name == "prev":
        out[name] = flip_bit(bytes.fromhex(wire[name]), data.draw(st.integers(0, 255))).hex()
    elif name == "kind":
        kind = wire["kind"]
        choices = sorted(
            k
            for k in RECORD_KINDS - {kind, "key_rotation"}
            if k not in MEDIA_KINDS or kind in MEDIA_KINDS
        )
        out[name] = data.draw(st.sampled_from(choices))
    elif name == "device_id":
        out[name] = data.draw(device_ids.filter(lambda d: d != wire["device_id"]))
    else:
        body = dict(wire["body"])
        if not body:
            body[data.draw(texts)] = data.draw(json_values)
        else:
            key = data.draw(st.sampled_from(sorted(body)))
            value = body[key]
            if wire["kind"] in MEDIA_KINDS and key == "sha256":
                body[key] = flip_bit(bytes.fromhex(value), 3).hex()
            elif wire["kind"] in MEDIA_KINDS and key == "size":
                body[key] = value + 1 if value < MEDIA_SIZE_MAX else value - 1
            elif wire["kind"] in MEDIA_KINDS and key == "media_type":
                body[key] = value + "x"
            elif wire["kind"] in MEDIA_KINDS and key == "marked":
                body[key] = not value
            elif wire["kind"] == "key_rotation" and key == "new_public_key":
                body[key] = flip_bit(bytes.fromhex(value), 3).hex()
            else:
                body[key] = [value]  # always different, always valid JSON
        out["body"] = body
    assert out != wire
    return out


@settings(max_examples=100, deadline=None)
@given(record=journal_records(), name=st.sampled_from(MUTABLE_FIELDS), data=st.data())
def test_any_changed_field_breaks_the_signature(
    record: JournalRecord, name: str, data: st.DataObject
) -> None:
    wire = record.sign(DEVICE_KEY).to_wire()
    tampered = SignedRecord.from_wire(decode(canonical(mutate(wire, name, data))))
    with pytest.raises(SignatureError, match=f"record seq {tampered.record.seq}"):
        tampered.verify(DEVICE_KEY.verify_key)


@settings(max_examples=60, deadline=None)
@given(record=journal_records(), pos=st.integers(0, 63), bit=st.integers(0, 7))
def test_flipped_signature_bit_or_other_key_fails(
    record: JournalRecord, pos: int, bit: int
) -> None:
    signed = record.sign(DEVICE_KEY)
    bad = SignedRecord(signed.record, flip_bit(signed.sig, pos, bit))
    with pytest.raises(SignatureError):
        over_the_wire(bad).verify(DEVICE_KEY.verify_key)
    with pytest.raises(SignatureError):
        signed.verify(OTHER_KEY.verify_key)
    with pytest.raises(SignatureError):
        record.sign(OTHER_KEY).verify(DEVICE_KEY.verify_key)


def valid_wire(**changes: Any) -> dict[str, Any]:
    wire = (
        JournalRecord("dev-1", 7, bytes(range(32)), "mark", 5, 6, {"note": "x"})
        .sign(DEVICE_KEY)
        .to_wire()
    )
    wire.update(changes)
    return wire


def test_valid_wire_fixture_parses() -> None:
    SignedRecord.from_wire(valid_wire()).verify(DEVICE_KEY.verify_key)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"kind": "deleted_everything"}, MessageError, "unknown record kind"),
        ({"kind": 3}, MessageError, "kind must be a string"),
        ({"v": 2}, VersionError, "version 2"),
        ({"v": 0}, VersionError, "version 0"),
        ({"v": "1"}, VersionError, "version"),
        ({"seq": 0}, MessageError, "seq"),
        ({"seq": -1}, MessageError, "seq"),
        ({"seq": SEQ_MAX + 1}, MessageError, "seq"),
        ({"seq": 2**63}, MessageError, "seq"),  # past what SQLite / PostgreSQL store
        ({"wall_ms": 2**63}, MessageError, "wall_ms"),
        ({"seq": True}, MessageError, "seq"),
        ({"seq": "7"}, MessageError, "seq"),
        ({"wall_ms": -1}, MessageError, "wall_ms"),
        ({"mono_ns": 2**64}, MessageError, "mono_ns"),
        ({"prev": "00" * 31}, EncodingError, "prev"),
        ({"prev": "AA" * 32}, EncodingError, "prev"),
        ({"sig": "00" * 63}, EncodingError, "sig"),
        ({"body": []}, MessageError, "body must be an object"),
        ({"body": "x"}, MessageError, "body must be an object"),
        ({"device_id": ""}, MessageError, "device id"),
        ({"device_id": "a/b"}, MessageError, "device id"),
        ({"device_id": "x" * 65}, MessageError, "device id"),
        ({"extra": 1}, MessageError, "unexpected \\['extra'\\]"),
    ],
)
def test_from_wire_rejects(changes: dict[str, Any], error: type[ProtocolError], match: str) -> None:
    with pytest.raises(error, match=match):
        SignedRecord.from_wire(valid_wire(**changes))


def test_a_record_dated_past_9999_is_still_a_record() -> None:
    # Devices before the agent held its clock in range wrote such records, and gateways
    # acknowledged them: refused now, they would stop the device starting (its key check
    # reads them), wedge its journal and fail every bundle holding one. Pages and exports
    # show such a time as "out of range" instead.
    record = valid_wire_signed(wall_ms=253_402_300_801_000)
    assert over_the_wire(record).record.wall_ms == 253_402_300_801_000


@pytest.mark.parametrize(
    "field", ["v", "device_id", "seq", "prev", "kind", "wall_ms", "mono_ns", "body", "sig"]
)
def test_from_wire_rejects_missing_field(field: str) -> None:
    wire = valid_wire()
    del wire[field]
    with pytest.raises(MessageError, match=f"missing \\['{field}'\\]"):
        SignedRecord.from_wire(wire)


@pytest.mark.parametrize("wire", [None, [], "record", 7])
def test_from_wire_rejects_non_objects(wire: object) -> None:
    with pytest.raises(MessageError):
        SignedRecord.from_wire(wire)


def valid_wire_signed(**changes: Any) -> SignedRecord:
    fields = {
        "device_id": "dev-1",
        "seq": 7,
        "prev": GENESIS,
        "kind": "mark",
        "wall_ms": 5,
        "mono_ns": 6,
    }
    fields.update(changes)
    return JournalRecord(**fields).sign(DEVICE_KEY)


def test_seq_bounds_are_inclusive() -> None:
    for seq in (1, SEQ_MAX):
        assert over_the_wire(valid_wire_signed(seq=seq)).record.seq == seq


MEDIA_BODY = {"sha256": "ab" * 32, "size": 10, "media_type": "video/mp4"}


@pytest.mark.parametrize("kind", sorted(MEDIA_KINDS))
@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"size": 10, "media_type": "video/mp4"}, "sha256"),
        ({"sha256": "ab" * 32, "media_type": "video/mp4"}, "size"),
        ({"sha256": "ab" * 32, "size": 10}, "media_type"),
        ({**MEDIA_BODY, "media_type": ""}, "media_type"),
        ({**MEDIA_BODY, "size": -1}, "size"),
        ({**MEDIA_BODY, "sha256": "ab" * 31}, "sha256"),
        ({**MEDIA_BODY, "marked": "yes"}, "marked"),
        ({}, "media_type"),
    ],
)
def test_media_kinds_require_manifest(kind: str, body: dict[str, Any], match: str) -> None:
    with pytest.raises((MessageError, EncodingError), match=match):
        JournalRecord("dev-1", 1, GENESIS, kind, 0, 0, body)
    # The same body arriving on the wire is refused too.
    wire = valid_wire_signed(kind="mark", body=body).to_wire()
    wire["kind"] = kind
    with pytest.raises((MessageError, EncodingError), match=match):
        SignedRecord.from_wire(wire)
    # A complete manifest is accepted, and non-media kinds never need one.
    assert JournalRecord("dev-1", 1, GENESIS, kind, 0, 0, MEDIA_BODY).media == MediaInfo(
        bytes.fromhex("ab" * 32), 10, "video/mp4", False
    )
    JournalRecord("dev-1", 1, GENESIS, "mark", 0, 0, body)


@pytest.mark.parametrize("body", [{"t": 1.5}, {"n": 2**64}, {"x": {1: 2}}, {"b": b"raw"}])
def test_record_refuses_unsignable_body(body: dict[str, Any]) -> None:
    with pytest.raises(EncodingError):
        JournalRecord("dev-1", 1, GENESIS, "mark", 0, 0, body)


# --------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------


def test_check_link_classifications() -> None:
    head = build_chain(5)
    head_hash = head[-1].hash()
    nxt = JournalRecord("dev-1", 6, head_hash, "mark", 0, 0)
    assert check_link(5, head_hash, nxt) is Link.NEXT
    assert check_link(5, head_hash, dataclasses.replace(nxt, prev=GENESIS)) is Link.BROKEN
    assert check_link(5, head_hash, dataclasses.replace(nxt, seq=8)) is Link.GAP
    assert check_link(5, head_hash, dataclasses.replace(nxt, seq=7, prev=GENESIS)) is Link.GAP
    assert check_link(5, head_hash, dataclasses.replace(nxt, seq=5)) is Link.BEHIND
    assert check_link(5, head_hash, head[1].record) is Link.BEHIND
    # Empty chain: seq 1 from GENESIS is next, anything else is not.
    first = head[0].record
    assert check_link(0, GENESIS, first) is Link.NEXT
    assert check_link(0, GENESIS, dataclasses.replace(first, prev=head_hash)) is Link.BROKEN
    assert check_link(0, GENESIS, head[1].record) is Link.GAP


@settings(max_examples=200, deadline=None)
@given(head_seq=st.integers(0, 1000), seq=st.integers(1, 1003), same_prev=st.booleans())
def test_check_link_against_model(head_seq: int, seq: int, same_prev: bool) -> None:
    head_hash = hashlib.sha256(str(head_seq).encode()).digest()
    prev = head_hash if same_prev else flip_bit(head_hash, 0)
    link = check_link(head_seq, head_hash, JournalRecord("d", seq, prev, "mark", 0, 0))
    if seq <= head_seq:
        assert link is Link.BEHIND
    elif seq > head_seq + 1:
        assert link is Link.GAP
    else:
        assert link is (Link.NEXT if same_prev else Link.BROKEN)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), data=st.data())
def test_verify_chain_and_its_breakages(n: int, data: st.DataObject) -> None:
    chain = build_chain(n)
    assert verify_chain(chain, DEVICE_KEY.verify_key) == chain[-1].hash()
    assert verify_chain(chain[:-1], DEVICE_KEY.verify_key) == chain[-2].hash()
    assert verify_chain([], DEVICE_KEY.verify_key) == GENESIS

    i = data.draw(st.integers(0, n - 2), label="removed")
    with pytest.raises(ChainError, match="gap"):
        verify_chain(chain[:i] + chain[i + 1 :], DEVICE_KEY.verify_key)

    j = data.draw(st.integers(0, n - 2), label="swapped")
    swapped = list(chain)
    swapped[j], swapped[j + 1] = swapped[j + 1], swapped[j]
    with pytest.raises(ChainError):
        verify_chain(swapped, DEVICE_KEY.verify_key)

    # Replaying a record is BEHIND.
    with pytest.raises(ChainError, match="behind"):
        verify_chain([*chain[: j + 1], chain[j]], DEVICE_KEY.verify_key)

    # A validly signed replacement (a fork) breaks the link to its successor.
    k = data.draw(st.integers(0, n - 2), label="forked")
    old = chain[k].record
    forked = list(chain)
    forked[k] = dataclasses.replace(old, body={"i": "rewritten"}).sign(DEVICE_KEY)
    with pytest.raises(ChainError, match="broken"):
        verify_chain(forked, DEVICE_KEY.verify_key)

    # The right chain under the wrong key.
    with pytest.raises(SignatureError):
        verify_chain(chain, OTHER_KEY.verify_key)


def test_chain_does_not_start_mid_way() -> None:
    chain = build_chain(4)
    with pytest.raises(ChainError, match="gap"):
        verify_chain(chain[1:], DEVICE_KEY.verify_key)


# --------------------------------------------------------------------------------------------
# Journal batches
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    start=st.integers(0, 8),
    counter=st.integers(1, FIELD_MAX),
    device_id=device_ids,
)
def test_journal_batch_round_trip(n: int, start: int, counter: int, device_id: str) -> None:
    chain = build_chain(start + n, device_id=device_id)[start:]
    data = JournalBatch(device_id, counter, tuple(chain)).encode(DEVICE_KEY)
    assert JournalBatch.peek_device(data) == device_id
    batch = JournalBatch.decode(data, DEVICE_KEY.verify_key)
    assert batch == JournalBatch(device_id, counter, tuple(chain))
    with pytest.raises(SignatureError):
        JournalBatch.decode(data, OTHER_KEY.verify_key)
    # The envelope signature covers the counter: a replayed body with a new counter fails.
    obj = decode(data)
    obj["counter"] = counter - 1 if counter > 1 else 2
    with pytest.raises(SignatureError):
        JournalBatch.decode(canonical(obj), DEVICE_KEY.verify_key)


def test_journal_batch_rejections() -> None:
    chain = build_chain(5)
    vk = DEVICE_KEY.verify_key

    def roundtrip(records: list[SignedRecord], device_id: str = "dev-1", counter: int = 1) -> None:
        JournalBatch.decode(JournalBatch(device_id, counter, tuple(records)).encode(DEVICE_KEY), vk)

    roundtrip(chain)
    with pytest.raises(MessageError, match="consecutive"):
        roundtrip([chain[0], chain[2]])
    with pytest.raises(MessageError, match="consecutive"):
        roundtrip([chain[1], chain[0]])
    with pytest.raises(MessageError, match="consecutive"):
        roundtrip([chain[1], chain[1]])
    intruder = JournalRecord("dev-2", 3, chain[1].hash(), "mark", 0, 0).sign(DEVICE_KEY)
    with pytest.raises(MessageError, match="names device 'dev-2'"):
        roundtrip([chain[0], chain[1], intruder])
    with pytest.raises(MessageError, match="records must be a list"):
        roundtrip([])
    many = build_chain(MAX_BATCH_RECORDS + 1)
    roundtrip(many[:MAX_BATCH_RECORDS])
    with pytest.raises(MessageError, match="records must be a list"):
        roundtrip(many)
    with pytest.raises(MessageError, match="counter"):
        roundtrip(chain, counter=0)
    with pytest.raises(MessageError, match="device id"):
        JournalBatch.peek_device(canonical({"device_id": "a/b"}))


def test_journal_batch_envelope_checks() -> None:
    data = JournalBatch("dev-1", 3, tuple(build_chain(2))).encode(DEVICE_KEY)
    with pytest.raises(VersionError):
        JournalBatch.decode(resign(data, DEVICE_KEY, v=2), DEVICE_KEY.verify_key)
    obj = decode(data)
    obj["extra"] = 1
    with pytest.raises(MessageError, match="extra"):
        JournalBatch.decode(canonical(obj), DEVICE_KEY.verify_key)
    del obj["extra"], obj["sig"]
    with pytest.raises(MessageError, match="sig"):
        JournalBatch.decode(canonical(obj), DEVICE_KEY.verify_key)


# --------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(0, 200_000) | st.sampled_from([1, 65_536, 65_537, 200_000]),
    seed=st.binary(max_size=8),
    data=st.data(),
    rnd=st.randoms(use_true_random=False),
)
def test_chunk_then_reassemble(
    size: int, seed: bytes, data: st.DataObject, rnd: random.Random
) -> None:
    original = hashlib.shake_256(seed).digest(size) if size else b""
    chunk_size = data.draw(st.integers(max(1, size // 150), max(1, size)), label="chunk size")
    offsets = list(range(0, size, chunk_size)) or [0]
    payloads = [
        Chunk("dev-1", 42, off, original[off : off + chunk_size]).encode() for off in offsets
    ]
    duplicates = data.draw(st.lists(st.sampled_from(payloads), max_size=10), label="dups")
    arrival = payloads + duplicates
    rnd.shuffle(arrival)

    buf = bytearray(size)
    ranges: Ranges = ()
    for payload in arrival:
        chunk = Chunk.decode(payload)
        assert (chunk.device_id, chunk.seq) == ("dev-1", 42)
        assert chunk.offset % chunk_size == 0
        buf[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        ranges = add_range(ranges, chunk.offset, chunk.offset + len(chunk.data))
    assert bytes(buf) == original
    assert covered(ranges, size)
    assert missing(ranges, size) == []


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_flipped_chunk_data_is_detected(data: bytes, pos: int, bit: int) -> None:
    payload = Chunk("dev-1", 1, 0, data).encode()
    header_end = 2 + struct.unpack_from(">H", payload)[0]
    target = header_end + pos % len(data)
    with pytest.raises(MessageError, match="does not match its sha256"):
        Chunk.decode(flip_bit(payload, target, bit))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_unverified_decode_keeps_the_claim_for_a_later_check(
    data: bytes, pos: int, bit: int
) -> None:
    # The gateway decodes without hashing and checks the claim only if the whole file
    # fails; the claim must survive decoding so that check can still find the chunk.
    payload = Chunk("dev-1", 1, 0, data).encode()
    assert Chunk.decode(payload, verify=False).intact()
    header_end = 2 + struct.unpack_from(">H", payload)[0]
    flipped = Chunk.decode(flip_bit(payload, header_end + pos % len(data), bit), verify=False)
    assert flipped.sha256 == hashlib.sha256(data).digest()
    assert not flipped.intact()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=100), cut=st.integers(0, 10_000))
def test_truncated_chunk_is_rejected(data: bytes, cut: int) -> None:
    payload = Chunk("dev-1", 3, 1024, data).encode()
    truncated = payload[: cut % len(payload)]
    with pytest.raises((EncodingError, MessageError)):
        Chunk.decode(truncated)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", EncodingError),
        (b"\x00", EncodingError),
        (b"\x00\x10{}", EncodingError),
        (b"\x00\x00", EncodingError),
        (b"\x00\x02{}", VersionError),
        (b"\x00\x02[]" + b"data", EncodingError),
        (b"\xff\xff" + b"x" * 100, EncodingError),
    ],
)
def test_garbage_chunks(payload: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        Chunk.decode(payload)


def chunk_with_header(header: dict[str, Any], data: bytes = b"abc") -> bytes:
    raw = canonical(header)
    return struct.pack(">H", len(raw)) + raw + data


def test_chunk_header_checks() -> None:
    good = {
        "v": 1,
        "device_id": "d",
        "seq": 1,
        "offset": 0,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
    }
    assert Chunk.decode(chunk_with_header(good)) == Chunk(
        "d", 1, 0, b"abc", hashlib.sha256(b"abc").digest()
    )
    for changes, error in [
        ({"v": 2}, VersionError),
        ({"seq": 0}, MessageError),
        ({"offset": -1}, MessageError),
        ({"device_id": "#"}, MessageError),
        ({"sha256": "AB" * 32}, EncodingError),
        ({"extra": True}, MessageError),
    ]:
        with pytest.raises(error):
            Chunk.decode(chunk_with_header({**good, **changes}))


def test_oversized_chunk_rejected() -> None:
    data = bytes(MAX_CHUNK_SIZE + 1)
    with pytest.raises(MessageError, match="exceeds"):
        Chunk.decode(Chunk("d", 1, 0, data).encode())
    assert len(Chunk.decode(Chunk("d", 1, 0, data[:-1]).encode()).data) == MAX_CHUNK_SIZE


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200))
def test_chunk_decode_fuzz_raises_only_protocol_errors(payload: bytes) -> None:
    only_protocol_errors(lambda: Chunk.decode(payload))
    # The same bytes behind a header length that fits them, so the JSON parser sees them.
    only_protocol_errors(lambda: Chunk.decode(struct.pack(">H", len(payload)) + payload))


chunk_header_fields = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None]) | json_values,
        "device_id": device_ids | json_values,
        "seq": st.integers(-2, 2**65) | json_values,
        "offset": st.integers(-2, 2**65) | json_values,
        "sha256": hashes32.map(bytes.hex) | json_values,
        "other": json_values,
    },
)


@settings(max_examples=100, deadline=None)
@given(header=chunk_header_fields, data=st.binary(max_size=16))
def test_chunk_decode_structured_fuzz(header: dict[str, Any], data: bytes) -> None:
    try:
        raw = canonical(header)
    except EncodingError:
        assume(False)
        return
    only_protocol_errors(lambda: Chunk.decode(struct.pack(">H", len(raw)) + raw + data))


def test_chunk_with_deeply_nested_header_is_a_protocol_error() -> None:
    header = b"[" * 65_535
    with pytest.raises(ProtocolError):
        Chunk.decode(struct.pack(">H", len(header)) + header)


# --------------------------------------------------------------------------------------------
# Byte ranges
# --------------------------------------------------------------------------------------------


def model_bytes(ranges: Ranges) -> set[int]:
    return {b for s, e in ranges for b in range(s, e)}


def assert_normalised(ranges: Ranges) -> None:
    for s, e in ranges:
        assert 0 <= s < e
    for (_, e1), (s2, _) in itertools.pairwise(ranges):
        assert e1 < s2  # sorted, disjoint and not even adjacent


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 300),
    ops=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=25),
)
def test_ranges_against_set_model(size: int, ops: list[tuple[int, int]]) -> None:
    ranges: Ranges = ()
    model: set[int] = set()
    for a, b in ops:
        start, end = min(a, size), min(b, size)
        before = ranges
        ranges = add_range(ranges, start, end)
        if end <= start:
            assert ranges == before  # empty or inverted ranges are ignored
        model |= set(range(start, end))
        assert_normalised(ranges)
        assert model_bytes(ranges) == model

    everything = set(range(size))
    holes = missing(ranges, size)
    assert_normalised(tuple(holes))
    assert model_bytes(tuple(holes)) == everything - model
    assert all(0 <= s < e <= size for s, e in holes)
    assert covered(ranges, size) == (model >= everything)
    assert covered(ranges, size) == (holes == [])

    # The order chunks arrive in does not matter.
    again: Ranges = ()
    for a, b in reversed(ops):
        again = add_range(again, min(a, size), min(b, size))
    assert again == ranges


def test_ranges_examples() -> None:
    r = add_range((), 10, 20)
    assert r == ((10, 20),)
    assert add_range(r, 20, 30) == ((10, 30),)  # adjacent merges
    assert add_range(r, 0, 10) == ((0, 20),)
    assert add_range(r, 21, 30) == ((10, 20), (21, 30))
    assert add_range(((0, 5), (10, 15), (20, 25)), 4, 21) == ((0, 25),)
    assert missing(((10, 20), (21, 30)), 40) == [(0, 10), (20, 21), (30, 40)]
    assert missing((), 0) == []
    assert covered((), 0)
    assert not covered(((0, 9),), 10)
    assert covered(((0, 10),), 10)


def test_missing_stays_within_size() -> None:
    assert missing(((60, 70),), 50) == [(0, 50)]


# --------------------------------------------------------------------------------------------
# Upload control messages
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    device_id=device_ids,
    seq=seqs,
    size=u64s,
    sha=hashes32,
    chunk_size=st.integers(1, MAX_CHUNK_SIZE),
)
def test_upload_init_and_fin_round_trip(
    device_id: str, seq: int, size: int, sha: bytes, chunk_size: int
) -> None:
    init = UploadInit(device_id, seq, size, sha, chunk_size)
    assert UploadInit.decode(init.encode()) == init
    fin = UploadFin(device_id, seq)
    assert UploadFin.decode(fin.encode()) == fin


def test_upload_init_and_fin_rejections() -> None:
    init = UploadInit("d", 1, 10, bytes(32), 1024)
    good = decode(init.encode())
    for changes, error in [
        ({"chunk_size": 0}, MessageError),
        ({"chunk_size": MAX_CHUNK_SIZE + 1}, MessageError),
        ({"seq": 0}, MessageError),
        ({"size": -1}, MessageError),
        ({"sha256": "00"}, EncodingError),
        ({"v": 2}, VersionError),
        ({"device_id": "+"}, MessageError),
        ({"more": 1}, MessageError),
    ]:
        with pytest.raises(error):
            UploadInit.decode(canonical({**good, **changes}))
    with pytest.raises(MessageError):
        UploadFin.decode(canonical({"v": 1, "device_id": "d", "seq": 0}))
    with pytest.raises(MessageError):
        UploadFin.decode(canonical({"v": 1, "device_id": "d"}))
    with pytest.raises(VersionError):
        UploadFin.decode(canonical({"v": 3, "device_id": "d", "seq": 1}))


normalised_ranges = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(1, 500)), max_size=6
).map(lambda pairs: _fold_ranges(pairs))


def _fold_ranges(pairs: list[tuple[int, int]]) -> Ranges:
    out: Ranges = ()
    for start, length in pairs:
        out = add_range(out, start, start + length)
    return out


@settings(max_examples=60, deadline=None)
@given(
    device_id=device_ids,
    seq=seqs,
    state=st.sampled_from(["receiving", "complete", "rejected", "unknown"]),
    ranges=normalised_ranges,
    reason=texts,
    ts=u64s,
)
def test_upload_ack_round_trip(
    device_id: str, seq: int, state: str, ranges: Ranges, reason: str, ts: int
) -> None:
    ack = UploadAck(device_id, seq, state, ranges, reason, ts)
    data = ack.encode(GATEWAY_KEY)
    assert UploadAck.decode(data, GATEWAY_KEY.verify_key) == ack
    with pytest.raises(SignatureError):
        UploadAck.decode(data, DEVICE_KEY.verify_key)
    tampered = decode(data)
    tampered["state"] = "complete" if state != "complete" else "rejected"
    with pytest.raises(SignatureError):
        UploadAck.decode(canonical(tampered), GATEWAY_KEY.verify_key)


def test_upload_ack_ranges_and_state_checks() -> None:
    data = UploadAck("d", 1, "receiving", ((0, 10),), "", 5).encode(GATEWAY_KEY)
    vk = GATEWAY_KEY.verify_key
    merged = UploadAck.decode(
        resign(data, GATEWAY_KEY, ranges=[[20, 30], [0, 5], [4, 10], [10, 12]]), vk
    )
    assert merged.ranges == ((0, 12), (20, 30))
    for bad in ([[3, 3]], [[5, 2]], [[-1, 4]], [[0, 1, 2]], [[0, True]], [["0", 1]], "0-10", [5]):
        with pytest.raises(MessageError, match="range"):
            UploadAck.decode(resign(data, GATEWAY_KEY, ranges=bad), vk)
    with pytest.raises(MessageError, match="state"):
        UploadAck.decode(resign(data, GATEWAY_KEY, state="done"), vk)
    with pytest.raises(MessageError, match="reason"):
        UploadAck.decode(resign(data, GATEWAY_KEY, reason=7), vk)
    with pytest.raises(SignatureError):
        UploadAck.decode(resign(data, OTHER_KEY, ts_ms=6), vk)


@pytest.mark.parametrize("state", [["complete"], {"s": 1}], ids=["list", "object"])
def test_upload_ack_non_string_state_is_a_message_error(state: object) -> None:
    data = UploadAck("d", 1, "receiving", (), "", 5).encode(GATEWAY_KEY)
    with pytest.raises(MessageError):
        UploadAck.decode(resign(data, GATEWAY_KEY, state=state), GATEWAY_KEY.verify_key)


@settings(max_examples=60, deadline=None)
@given(
    device_id=device_ids,
    acked=u64s,
    head=hashes32,
    rejected=u64s,
    reason=texts,
    detail=texts,
    ts=u64s,
)
def test_journal_ack_round_trip(
    device_id: str, acked: int, head: bytes, rejected: int, reason: str, detail: str, ts: int
) -> None:
    ack = JournalAck(device_id, acked, head, rejected, reason, detail, ts)
    data = ack.encode(GATEWAY_KEY)
    assert JournalAck.decode(data, GATEWAY_KEY.verify_key) == ack
    with pytest.raises(SignatureError):
        JournalAck.decode(data, DEVICE_KEY.verify_key)
    tampered = decode(data)
    tampered["acked_through"] = acked + 1 if acked < FIELD_MAX else acked - 1
    with pytest.raises(SignatureError):
        JournalAck.decode(canonical(tampered), GATEWAY_KEY.verify_key)


def test_journal_ack_field_checks() -> None:
    data = JournalAck("d", 3, bytes(32), 0, "", "", 1).encode(GATEWAY_KEY)
    vk = GATEWAY_KEY.verify_key
    with pytest.raises(MessageError, match="strings"):
        JournalAck.decode(resign(data, GATEWAY_KEY, detail=None), vk)
    with pytest.raises(MessageError, match="acked_through"):
        JournalAck.decode(resign(data, GATEWAY_KEY, acked_through=-1), vk)
    with pytest.raises(EncodingError, match="head_hash"):
        JournalAck.decode(resign(data, GATEWAY_KEY, head_hash="00"), vk)
    with pytest.raises(VersionError):
        JournalAck.decode(resign(data, GATEWAY_KEY, v=2), vk)


# --------------------------------------------------------------------------------------------
# Receipts and tree heads
# --------------------------------------------------------------------------------------------


def make_receipt(before: int, after: int, sha: bytes = b"\x11" * 32, size: int = 1234) -> Receipt:
    """A receipt for an evidence leaf at index ``before`` of a real log of records."""
    chain = build_chain(before + after + 1)
    evidence_seq = chain[before].record.seq
    leaves = [record_leaf(r) for r in chain[:before]]
    leaves.append(evidence_leaf("dev-1", evidence_seq, sha, size, 99))
    leaves.extend(record_leaf(r) for r in chain[before + 1 :])
    leaf_hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    head = SignedTreeHead(len(leaves), merkle.root_from_leaf_hashes(leaf_hashes), 1_000).signed(
        GATEWAY_KEY
    )
    proof = tuple(merkle.inclusion_proof(before, leaf_hashes))
    return Receipt("dev-1", evidence_seq, sha, size, 99, before, head, proof)


@settings(max_examples=40, deadline=None)
@given(before=st.integers(0, 12), after=st.integers(0, 12), data=st.data())
def test_receipt_round_trip_and_tampering(before: int, after: int, data: st.DataObject) -> None:
    receipt = make_receipt(before, after)
    raw = receipt.encode(GATEWAY_KEY)
    vk = GATEWAY_KEY.verify_key
    assert Receipt.decode(raw, vk) == receipt
    assert merkle.verify_inclusion(
        merkle.leaf_hash(receipt.leaf()),
        receipt.log_index,
        receipt.tree_head.tree_size,
        receipt.inclusion_proof,
        receipt.tree_head.root_hash,
    )

    with pytest.raises(SignatureError):
        Receipt.decode(raw, DEVICE_KEY.verify_key)

    # Altered inclusion proof, outer object re-signed: the proof itself fails.
    proof = list(receipt.inclusion_proof)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        proof[k] = flip_bit(proof[k], data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7)))
    else:
        proof.append(receipt.tree_head.root_hash)
    bad = dataclasses.replace(receipt, inclusion_proof=tuple(proof))
    with pytest.raises(SignatureError, match="inclusion proof"):
        Receipt.decode(bad.encode(GATEWAY_KEY), vk)
    # ... and not re-signed: the outer signature fails.
    obj = decode(raw)
    obj["inclusion_proof"] = [p.hex() for p in proof]
    with pytest.raises(SignatureError):
        Receipt.decode(canonical(obj), vk)

    # Each fact the leaf commits to, changed after signing and re-signed, keeps the old proof.
    for changes in (
        {"sha256": flip_bit(receipt.sha256, data.draw(st.integers(0, 31)))},
        {"size": receipt.size + 1},
        {"received_at_ms": receipt.received_at_ms + 1},
        {"seq": receipt.seq + 1},
        {"device_id": "dev-2"},
    ):
        forged = dataclasses.replace(receipt, **changes)
        with pytest.raises(SignatureError, match="inclusion proof"):
            Receipt.decode(forged.encode(GATEWAY_KEY), vk)

    # A tree head the gateway did not sign, inside a receipt it did.
    foreign_head = dataclasses.replace(receipt.tree_head).signed(OTHER_KEY)
    with pytest.raises(SignatureError, match="tree head"):
        Receipt.decode(dataclasses.replace(receipt, tree_head=foreign_head).encode(GATEWAY_KEY), vk)
    # A properly signed tree head with another root.
    other_root = SignedTreeHead(
        receipt.tree_head.tree_size, flip_bit(receipt.tree_head.root_hash, 0), 1_000
    ).signed(GATEWAY_KEY)
    with pytest.raises(SignatureError, match="inclusion proof"):
        Receipt.decode(dataclasses.replace(receipt, tree_head=other_root).encode(GATEWAY_KEY), vk)


def test_receipt_log_index_must_match_proof() -> None:
    receipt = make_receipt(5, 6)
    vk = GATEWAY_KEY.verify_key
    for index in (4, 6, 12, 13):
        with pytest.raises(SignatureError, match="inclusion proof"):
            Receipt.decode(dataclasses.replace(receipt, log_index=index).encode(GATEWAY_KEY), vk)


def test_receipt_field_checks() -> None:
    raw = make_receipt(2, 2).encode(GATEWAY_KEY)
    vk = GATEWAY_KEY.verify_key
    with pytest.raises(MessageError, match="inclusion_proof must be a list"):
        Receipt.decode(resign(raw, GATEWAY_KEY, inclusion_proof="00"), vk)
    with pytest.raises(EncodingError, match="inclusion_proof"):
        Receipt.decode(resign(raw, GATEWAY_KEY, inclusion_proof=["00"]), vk)
    with pytest.raises(MessageError, match="tree head must be an object"):
        Receipt.decode(resign(raw, GATEWAY_KEY, tree_head=[]), vk)
    with pytest.raises(MessageError, match="seq"):
        Receipt.decode(resign(raw, GATEWAY_KEY, seq=0), vk)
    with pytest.raises(VersionError):
        Receipt.decode(resign(raw, GATEWAY_KEY, v=2), vk)


@settings(max_examples=40, deadline=None)
@given(size=u64s, root=hashes32, ts=u64s)
def test_signed_tree_head_round_trip(size: int, root: bytes, ts: int) -> None:
    head = SignedTreeHead(size, root, ts).signed(GATEWAY_KEY)
    wire = decode(canonical(head.to_wire()))
    assert SignedTreeHead.from_wire(wire, GATEWAY_KEY.verify_key) == head
    with pytest.raises(SignatureError, match="tree head"):
        SignedTreeHead.from_wire(wire, OTHER_KEY.verify_key)
    for name, value in (
        ("tree_size", size + 1 if size < FIELD_MAX else size - 1),
        ("root_hash", flip_bit(root, 7).hex()),
        ("timestamp_ms", ts + 1 if ts < FIELD_MAX else ts - 1),
    ):
        with pytest.raises(SignatureError):
            SignedTreeHead.from_wire({**wire, name: value}, GATEWAY_KEY.verify_key)


def test_unsigned_tree_head_rejected() -> None:
    wire = SignedTreeHead(1, bytes(32), 0).to_wire()  # sig is empty
    with pytest.raises(EncodingError):
        SignedTreeHead.from_wire(wire, GATEWAY_KEY.verify_key)
    del wire["sig"]
    with pytest.raises(MessageError):
        SignedTreeHead.from_wire(wire, GATEWAY_KEY.verify_key)


# --------------------------------------------------------------------------------------------
# Device state and telemetry
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(device_id=device_ids, online=st.booleans(), bd_seq=u64s, ts=times)
def test_device_state_round_trip(device_id: str, online: bool, bd_seq: int, ts: int) -> None:
    state = DeviceState(device_id, online, bd_seq, ts)
    assert DeviceState.decode(state.encode()) == state


def test_device_state_checks() -> None:
    good = decode(DeviceState("d", True, 1, 2).encode())
    with pytest.raises(MessageError, match="online"):
        DeviceState.decode(canonical({**good, "online": 1}))
    with pytest.raises(MessageError):
        DeviceState.decode(canonical({**good, "bd_seq": -1}))
    with pytest.raises(VersionError):
        DeviceState.decode(canonical({**good, "v": 2}))
    with pytest.raises(EncodingError):
        DeviceState.decode(b"")


@settings(max_examples=40, deadline=None)
@given(online=st.booleans(), session=st.text("0123456789abcdef-", min_size=1, max_size=64))
def test_gateway_state_round_trip(online: bool, session: str) -> None:
    key = SigningKey.generate()
    state = GatewayState(online, session)
    assert GatewayState.decode(state.encode(key), key.verify_key) == state


def test_gateway_state_is_signed_and_checked() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    signed = decode(GatewayState(False, "abc").encode(key))
    with pytest.raises(SignatureError):
        GatewayState.decode(GatewayState(False, "abc").encode(other), key.verify_key)
    with pytest.raises(SignatureError):  # "online" turned into "offline" after signing
        GatewayState.decode(canonical({**signed, "online": True}), key.verify_key)
    with pytest.raises(MessageError):  # as gateways before 2026-11-27 published it
        GatewayState.decode(canonical({"v": 1, "online": False, "session": "abc"}), key.verify_key)
    for bad in ({"session": ""}, {"session": "A B"}, {"session": "x" * 65}, {"kind": "ack"}):
        body = {k: v for k, v in {**signed, **bad}.items() if k != "sig"}
        with pytest.raises(MessageError):
            GatewayState.decode(canonical(sign_object(body, key)), key.verify_key)


telemetry_ints = st.integers(-1, FIELD_MAX)


@settings(max_examples=60, deadline=None)
@given(
    device_id=device_ids,
    ints=st.lists(telemetry_ints, min_size=8, max_size=8),
    recording=st.booleans(),
)
def test_telemetry_round_trip(device_id: str, ints: list[int], recording: bool) -> None:
    t = Telemetry(device_id, *ints[:7], battery_pct=ints[7], recording=recording)
    assert Telemetry.decode(t.encode()) == t


def test_telemetry_defaults_and_checks() -> None:
    minimal = Telemetry.decode(
        canonical(
            {
                "v": 1,
                "device_id": "d",
                "ts_ms": 5,
                "backlog_items": 0,
                "backlog_bytes": 0,
                "oldest_unacked_age_s": 0,
                "last_receipt_seq": 0,
                "journal_seq": 0,
                "storage_free_bytes": 0,
            }
        )
    )
    assert minimal.battery_pct == -1
    assert minimal.recording is False
    good = decode(minimal.encode())
    with pytest.raises(MessageError, match="recording"):
        Telemetry.decode(canonical({**good, "recording": 0}))
    with pytest.raises(MessageError, match="battery_pct"):
        Telemetry.decode(canonical({**good, "battery_pct": -2}))
    # Past a signed 64-bit integer: once stored, it stopped ingest with an OverflowError.
    with pytest.raises(MessageError, match="backlog_bytes"):
        Telemetry.decode(canonical({**good, "backlog_bytes": 2**63}))
    with pytest.raises(MessageError, match="unexpected"):
        Telemetry.decode(canonical({**good, "temperature": 20}))
    with pytest.raises(MessageError, match="missing"):
        Telemetry.decode(canonical({"v": 1, "device_id": "d"}))


# --------------------------------------------------------------------------------------------
# Every decoder, fuzzed
# --------------------------------------------------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "journal_batch": lambda b: JournalBatch.decode(b, DEVICE_KEY.verify_key),
    "peek_device": JournalBatch.peek_device,
    # Runs only when the envelope did not verify, i.e. on whatever a forger sends.
    "announced_keys": lambda b: JournalBatch.announced_keys(b, DEVICE_KEY.verify_key),
    "upload_init": UploadInit.decode,
    "upload_fin": UploadFin.decode,
    "chunk": Chunk.decode,
    "upload_ack": lambda b: UploadAck.decode(b, GATEWAY_KEY.verify_key),
    "journal_ack": lambda b: JournalAck.decode(b, GATEWAY_KEY.verify_key),
    "receipt": lambda b: Receipt.decode(b, GATEWAY_KEY.verify_key),
    "device_state": DeviceState.decode,
    "telemetry": Telemetry.decode,
    "record": lambda b: SignedRecord.from_wire(decode(b)),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=120))
def test_decoders_on_random_bytes(name: str, payload: bytes) -> None:
    only_protocol_errors(lambda: DECODERS[name](payload))


def sample_messages() -> dict[str, tuple[bytes, SigningKey | None]]:
    """One valid encoded message per decoder, and the key it is signed with (if any)."""
    chain = build_chain(2)
    return {
        "journal_batch": (JournalBatch("dev-1", 1, tuple(chain)).encode(DEVICE_KEY), DEVICE_KEY),
        "announced_keys": (
            JournalBatch("dev-1", 1, tuple(chain)).encode(DEVICE_KEY),
            DEVICE_KEY,
        ),
        "upload_init": (UploadInit("dev-1", 1, 10, bytes(32), 1024).encode(), None),
        "upload_fin": (UploadFin("dev-1", 1).encode(), None),
        "upload_ack": (
            UploadAck("dev-1", 1, "receiving", ((0, 5),), "", 1).encode(GATEWAY_KEY),
            GATEWAY_KEY,
        ),
        "journal_ack": (
            JournalAck("dev-1", 2, bytes(32), 0, "", "", 1).encode(GATEWAY_KEY),
            GATEWAY_KEY,
        ),
        "receipt": (make_receipt(1, 1).encode(GATEWAY_KEY), GATEWAY_KEY),
        "device_state": (DeviceState("dev-1", True, 1, 1).encode(), None),
        "telemetry": (Telemetry("dev-1", 1, 0, 0, 0, 0, 0, 0).encode(), None),
        "record": (chain[0].encode(), None),
    }


SAMPLES = sample_messages()


@pytest.mark.parametrize("name", sorted(SAMPLES))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_decoders_on_mutated_valid_messages(name: str, data: st.DataObject) -> None:
    raw, key = SAMPLES[name]
    DECODERS[name](raw)  # the unmutated sample is valid
    obj = decode(raw)
    obj.pop("sig", None)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        field = data.draw(st.sampled_from([*sorted(obj), "extra"]), label="field")
        if data.draw(st.booleans(), label="delete") and field in obj:
            del obj[field]
        else:
            obj[field] = data.draw(json_values, label="value")
    try:
        payload = canonical(sign_object(obj, key) if key is not None else obj)
    except EncodingError:
        assume(False)
        return
    only_protocol_errors(lambda: DECODERS[name](payload))


TELEMETRY_REQUIRED = [
    "backlog_items",
    "backlog_bytes",
    "oldest_unacked_age_s",
    "last_receipt_seq",
    "journal_seq",
    "storage_free_bytes",
]


@pytest.mark.parametrize("field", TELEMETRY_REQUIRED)
def test_telemetry_missing_field_is_a_message_error(field: str) -> None:
    obj = decode(Telemetry("dev-1", 1, 0, 0, 0, 0, 0, 0).encode())
    del obj[field]
    with pytest.raises(MessageError, match=field):
        Telemetry.decode(canonical(obj))


SURROGATE_SPOTS = {
    "journal_batch": (b'"body":{', b'"body":{"x":"\\ud800",'),
    "record": (b'"body":{', b'"body":{"x":"\\ud800",'),
    "upload_ack": (b'"reason":""', b'"reason":"\\ud800"'),
    "journal_ack": (b'"detail":""', b'"detail":"\\udfff"'),
    "receipt": (b'"device_id":"dev-1"', b'"device_id":"\\ud800"'),
}


@pytest.mark.parametrize("name", sorted(SURROGATE_SPOTS))
def test_lone_surrogate_is_a_protocol_error(name: str) -> None:
    raw, _ = SAMPLES[name]
    # Put a lone surrogate escape into a string the decoder reads before any other check
    # can refuse the message. The signature cannot match, so a SignatureError is expected.
    old, new = SURROGATE_SPOTS[name]
    assert raw.count(old) >= 1
    payload = raw.replace(old, new, 1)
    json.loads(payload)  # valid JSON, but refused by the strict decoder
    with pytest.raises(ProtocolError):
        DECODERS[name](payload)


# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------


def mqtt_match(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching with + and # (enough for these tests)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@settings(max_examples=60, deadline=None)
@given(device_id=device_ids)
def test_topic_round_trips(device_id: str) -> None:
    shared = gateway_subscriptions(shared=True)
    plain = gateway_subscriptions(shared=False)
    for kind in DeviceTopic:
        topic = device_topic(device_id, kind)
        assert topic.startswith(f"custody/v1/dev/{device_id}/")
        assert parse_device_topic(topic) == type(parse_device_topic(topic))(device_id, kind)
        # Exactly one gateway subscription receives it.
        assert sum(mqtt_match(f, topic) for f in plain) == 1
    for gkind in GatewayTopic:
        topic = gateway_topic(device_id, gkind)
        parsed = parse_gateway_topic(topic)
        assert (parsed.device_id, parsed.kind) == (device_id, gkind)
        assert mqtt_match(agent_subscriptions(device_id)[0], topic)
        assert not any(mqtt_match(f, topic) for f in plain)
    assert len(shared) == len(plain) == len(DeviceTopic)


def test_shared_subscriptions() -> None:
    shared = gateway_subscriptions(shared=True)
    assert all(f.startswith("$share/gateway/") for f in shared)
    assert [f.removeprefix("$share/gateway/") for f in shared] == gateway_subscriptions(
        shared=False
    )
    assert GATEWAY_STATE in agent_subscriptions("dev-1")


INVALID_IDS = ["", "a/b", "+", "#", "x" * 65, "dev 1", "-dev", ".dev", "dév", "a+", "a#b"]


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_invalid_device_ids_rejected(bad: str) -> None:
    with pytest.raises(MessageError, match="device id"):
        check_device_id(bad)
    for kind in DeviceTopic:
        with pytest.raises(MessageError):
            device_topic(bad, kind)
        with pytest.raises(MessageError):
            parse_device_topic(f"custody/v1/dev/{bad}/{kind.value}")
    for gkind in GatewayTopic:
        with pytest.raises(MessageError):
            gateway_topic(bad, gkind)
        with pytest.raises(MessageError):
            parse_gateway_topic(f"custody/v1/gw/{bad}/{gkind.value}")
    with pytest.raises(MessageError):
        agent_subscriptions(bad)


def test_device_id_length_limit() -> None:
    assert check_device_id("x" * 64) == "x" * 64
    assert check_device_id("0") == "0"


@pytest.mark.parametrize(
    "topic",
    [
        "custody/v1/dev/dev-1/unknown",
        "custody/v1/dev/dev-1",
        "custody/v1/dev/dev-1/up/init/more",
        "custody/v1/dev/dev-1/jack",
        "custody/v2/dev/dev-1/state",
        "custody/v1/gw/dev-1/state",
        "/custody/v1/dev/dev-1/state",
        "custody/v1/dev//state",
    ],
)
def test_parse_device_topic_rejects(topic: str) -> None:
    with pytest.raises(MessageError):
        parse_device_topic(topic)


def test_parse_gateway_topic_rejects() -> None:
    for topic in ("custody/v1/gw/state", "custody/v1/gw/dev-1/up/init", "custody/v1/dev/d/ack"):
        with pytest.raises(MessageError):
            parse_gateway_topic(topic)


@pytest.mark.parametrize("bad", ["dev-1\n", "x" * 64 + "\n"], ids=["short", "64+newline"])
def test_device_id_with_trailing_newline_rejected(bad: str) -> None:
    with pytest.raises(MessageError):
        check_device_id(bad)


@pytest.mark.parametrize("records", [5, "x", None, {"kind": "key_rotation"}])
def test_a_batch_whose_records_are_not_a_list_is_a_message_error(records: object) -> None:
    """Found by a tester: ``records: 5`` escaped as a TypeError from the key hand-over
    lookup the gateway runs when an envelope does not verify; no alarm, no ack."""
    obj = {"v": 1, "device_id": "dev-1", "counter": 99, "records": records, "sig": "00" * 64}
    raw = canonical(obj)
    assert JournalBatch.announced_keys(raw, DEVICE_KEY.verify_key) == []
    with pytest.raises(ProtocolError):
        JournalBatch.decode(raw, DEVICE_KEY.verify_key)


@pytest.mark.parametrize(
    "media_type",
    [
        "text/plain\r\nX-Evil: 1",
        "image/png\x00",
        "video/mp4; codecs=名",
        "mp4",
        "/x",
        "a/" + "b" * 300,
    ],
)
def test_a_media_record_with_a_malformed_media_type_is_refused(media_type: str) -> None:
    # It becomes the Content-Type of every download of the evidence, for ever.
    body = {"sha256": "00" * 32, "size": 1, "media_type": media_type}
    with pytest.raises(MessageError, match="media_type"):
        JournalRecord("dev-1", 7, GENESIS, "file", 5, 6, body)


@pytest.mark.parametrize(
    "media_type",
    ["video/mp4", "image/jpeg", "application/vnd.ms-excel", 'video/mp4; codecs="avc1.64001f"'],
)
def test_well_formed_media_types_are_kept(media_type: str) -> None:
    body = {"sha256": "00" * 32, "size": 1, "media_type": media_type}
    record = JournalRecord("dev-1", 7, GENESIS, "file", 5, 6, body)
    assert over_the_wire(record.sign(DEVICE_KEY)).record.body["media_type"] == media_type
