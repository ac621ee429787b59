"""Tests for protocol.encoding: canonical JSON (RFC 8785 subset) and its strict decoder.

Every signature and hash in custody is computed over ``canonical`` bytes, so the properties
checked here are the ones two independent implementations must agree on: the same value
always gives the same bytes (whatever the dict insertion order), members are ordered by
UTF-16 code units, and the decoder accepts exactly what the encoder can produce (no floats,
no duplicate keys, UTF-8, an object at the top).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.encoding import INT_MAX, INT_MIN, canonical, decode, from_hex
from protocol.errors import EncodingError, ProtocolError

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

# Characters that stress the encoder: quotes, backslashes, control characters, the last BMP
# code point, astral-plane characters (surrogate pairs in UTF-16), combining marks.
TRICKY = 'aZ0 "\\/\n\t\x00\x1f\x7fé€\u2028\ufeff\uffff😀𝄞\U0010ffff\u0301'

texts = st.text(st.characters(codec="utf-8"), max_size=12) | st.text(
    st.sampled_from(TRICKY), max_size=8
)
leaves = st.none() | st.booleans() | st.integers(INT_MIN, INT_MAX) | texts


def json_values_keyed(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(keys, children, max_size=4),
        max_leaves=16,
    )


json_values = json_values_keyed(texts)
json_objects = st.dictionaries(texts, json_values, max_size=6)


def strict_equal(a: Any, b: Any) -> bool:
    """Equality that also tells ``True`` from ``1`` (Python's ``==`` does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def shuffled(value: Any, rnd: random.Random) -> Any:
    """The same value with every dict rebuilt in a random insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rnd) for v in value]
    return value


def key_orders(data: bytes) -> list[list[str]]:
    """The member order of every object in ``data``, as the bytes present them."""
    orders: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        orders.append([k for k, _ in pairs])
        return dict(pairs)

    json.loads(data.decode("utf-8"), object_pairs_hook=hook)
    return orders


def utf16_units(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare exactly like the sequence of 16-bit code units.
    return key.encode("utf-16-be")


# --------------------------------------------------------------------------------------------
# Round trip and determinism
# --------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(obj=json_objects)
def test_decode_inverts_canonical(obj: dict[str, Any]) -> None:
    encoded = canonical(obj)
    decoded = decode(encoded)
    assert decoded == obj
    assert strict_equal(decoded, obj)
    # Canonical bytes are a fixed point: re-encoding the decoded value changes nothing.
    assert canonical(decoded) == encoded


@settings(max_examples=80, deadline=None)
@given(obj=json_objects, rnd=st.randoms(use_true_random=False))
def test_canonical_ignores_dict_insertion_order(obj: dict[str, Any], rnd: random.Random) -> None:
    assert canonical(shuffled(obj, rnd)) == canonical(obj)


@settings(max_examples=80, deadline=None)
@given(obj=json_objects)
def test_canonical_members_sorted_by_utf16_code_units(obj: dict[str, Any]) -> None:
    for order in key_orders(canonical(obj)):
        assert order == sorted(order, key=utf16_units)
        assert len(set(order)) == len(order)


BMP_KEYS = st.text(st.characters(max_codepoint=0xD7FF), max_size=8)


@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(BMP_KEYS, json_values_keyed(BMP_KEYS), max_size=6))
def test_canonical_matches_sorted_compact_json_for_bmp_keys(obj: dict[str, Any]) -> None:
    # Below the surrogate range UTF-16 order is code-point order, so the output must equal
    # the standard library's sorted, compact, non-ASCII-escaping serialisation.
    expected = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert canonical(obj) == expected.encode("utf-8")


def test_astral_key_sorts_before_ffff_key() -> None:
    # U+1F600 is 0xD83D 0xDE00 in UTF-16, which sorts before 0xFFFF, although its code point
    # is larger. Code-point order (Python's default) would put U+FFFF first.
    obj = {"\uffff": 1, "😀": 2, "a": 3, "\ue000": 4}
    assert sorted(obj) == ["a", "\ue000", "\uffff", "😀"]  # code-point order, for contrast
    assert canonical(obj) == '{"a":3,"😀":2,"\ue000":4,"\uffff":1}'.encode()
    assert key_orders(canonical({"z": {"\uffff": 0, "𝄞": 0}})) == [["𝄞", "\uffff"], ["z"]]


def test_canonical_exact_bytes() -> None:
    value = {"b": [1, True, None, "x"], "a": {"d": -1, "c": ""}, "é": '\n"\\'}
    assert (
        canonical(value) == b'{"a":{"c":"","d":-1},"b":[1,true,null,"x"],"\xc3\xa9":"\\n\\"\\\\"}'
    )
    # No whitespace and no ASCII escaping of non-ASCII text.
    assert canonical({"k": "€😀"}) == '{"k":"€😀"}'.encode()


def test_integer_range_is_64_bit() -> None:
    for ok in (INT_MIN, -1, 0, 2**53 + 1, 2**63, INT_MAX):
        assert decode(canonical({"n": ok})) == {"n": ok}
    for bad in (INT_MIN - 1, INT_MAX + 1, 2**100):
        with pytest.raises(EncodingError, match="out of 64-bit range"):
            canonical({"n": bad})
        with pytest.raises(EncodingError):
            canonical([[bad]])


# --------------------------------------------------------------------------------------------
# What canonical refuses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        0.0,
        float("nan"),
        float("inf"),
        float("-inf"),
        {"a": 1.0},
        {"a": [1, {"b": float("nan")}]},
        [float("inf")],
    ],
)
def test_canonical_rejects_floats(value: Any) -> None:
    with pytest.raises(EncodingError, match="float"):
        canonical(value)


@pytest.mark.parametrize(
    "value",
    [
        {1: "a"},
        {"a": {None: 1}},
        {"a": b"bytes"},
        {"a": {1, 2}},
        {"a": object()},
        {"a": 1j},
    ],
)
def test_canonical_rejects_unsupported_types(value: Any) -> None:
    with pytest.raises(EncodingError):
        canonical(value)


# --------------------------------------------------------------------------------------------
# What decode refuses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1.0}',
        b'{"a":1e3}',
        b'{"a":-0.5}',
        b'{"a":[1,2,3.25]}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":{"b":NaN}}',
    ],
)
def test_decode_rejects_floats_and_nan(data: bytes) -> None:
    with pytest.raises(EncodingError):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1,"a":1}',
        b'{"a":1,"b":2,"a":3}',
        b'{"x":{"k":true,"k":false}}',
        b'{"x":[{"k":1,"k":2}]}',
        b'{"\\u0061":1,"a":2}',  # the same key, once escaped
    ],
)
def test_decode_rejects_duplicate_keys(data: bytes) -> None:
    with pytest.raises(EncodingError, match="duplicate key"):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\xff"}',
        b'{"a":"\xc3"}',  # truncated two-byte sequence
        b'{"a":"\xed\xa0\x80"}',  # a UTF-8-encoded surrogate (CESU-8)
        b'{"a":"\xc0\xaf"}',  # overlong encoding of "/"
        '{"a":"é"}'.encode("latin-1"),
        '{"a":1}'.encode("utf-16"),
    ],
)
def test_decode_rejects_non_utf8(data: bytes) -> None:
    with pytest.raises(EncodingError, match="not UTF-8"):
        decode(data)


@pytest.mark.parametrize("data", [b"[]", b"[{}]", b"1", b'"s"', b"null", b"true", b"false", b"-7"])
def test_decode_rejects_non_object_top(data: bytes) -> None:
    with pytest.raises(EncodingError, match="must be a JSON object"):
        decode(data)


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"a"}', b"{'a':1}", b'{"a":1,}', b'{"a":1} x', b"\xef\xbb\xbf{}"]
)
def test_decode_rejects_malformed_json(data: bytes) -> None:
    with pytest.raises(EncodingError):
        decode(data, what="frame")


@pytest.mark.parametrize("digits", [21, 5000, 100_000])
def test_decode_refuses_integers_longer_than_64_bits_as_an_encoding_error(digits: int) -> None:
    # Python refuses to convert over 4,300 digits with a plain ValueError: that escaped
    # the gateway's ingest as a traceback, where every other malformed payload raises an
    # alarm. No protocol integer needs more than 20 digits.
    for sign in ("", "-"):
        with pytest.raises(EncodingError, match="integer of"):
            decode(b'{"wall_ms": ' + sign.encode() + b"9" * digits + b"}", what="record")


def test_decode_keeps_every_64_bit_integer() -> None:
    for value in (2**64 - 1, -(2**63), 0):
        assert decode(canonical({"n": value})) == {"n": value}


def test_decode_error_names_what() -> None:
    with pytest.raises(EncodingError, match="^receipt is not valid JSON"):
        decode(b"{", what="receipt")


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=64)
    | st.text(st.sampled_from('{}[]":,0123-e.tfnul\\ "a'), max_size=40).map(str.encode)
)
def test_decode_raises_only_encoding_error(data: bytes) -> None:
    try:
        result = decode(data)
    except EncodingError:
        return
    assert isinstance(result, dict)


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udfff", b"\\udc00x"], ids=["hi", "lo", "lo-x"])
def test_decode_output_is_always_canonically_encodable(escape: bytes) -> None:
    data = b'{"a":"' + escape + b'"}'
    try:
        value = decode(data)
    except EncodingError:
        return  # refusing it at the decoder is fine
    # Whatever decode accepts must re-encode (signatures are checked over canonical bytes);
    # if it cannot, the refusal must at least be a protocol error.
    try:
        canonical(value)
    except EncodingError:
        return


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"a":' * 5_000, b'{"a":' + b"[" * 5_000],
    ids=["arrays", "objects", "object-then-arrays"],
)
def test_decode_deep_nesting_raises_encoding_error(data: bytes) -> None:
    with pytest.raises(EncodingError):
        decode(data)


# --------------------------------------------------------------------------------------------
# from_hex
# --------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=64))
def test_from_hex_round_trip(raw: bytes) -> None:
    assert from_hex(raw.hex(), field="f") == raw
    assert from_hex(raw.hex(), field="f", length=len(raw)) == raw


@pytest.mark.parametrize(
    ("value", "length", "message"),
    [
        ("AB" * 32, 32, "lowercase"),
        ("aB", None, "lowercase"),
        ("abc", None, "not valid hex"),
        ("a", None, "not valid hex"),
        ("zz", None, "not valid hex"),
        ("0xab", None, "not valid hex"),
        ("ab cd", None, "lowercase"),
        (" abcd", None, "lowercase"),
        ("ab" * 31, 32, "must be 32 bytes, got 31"),
        ("ab" * 33, 32, "must be 32 bytes, got 33"),
        ("", 32, "must be 32 bytes, got 0"),
        (None, None, "hex string"),
        (12, None, "hex string"),
        (b"ab", None, "hex string"),
        (["ab"], None, "hex string"),
    ],
)
def test_from_hex_rejects(value: object, length: int | None, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        from_hex(value, field="thing", length=length)


def test_encoding_error_is_a_protocol_error() -> None:
    assert issubclass(EncodingError, ProtocolError)
    assert EncodingError.reason == "bad_encoding"
