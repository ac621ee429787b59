"""One deterministic encoding for every signed byte: canonical JSON (RFC 8785 subset).

Signatures and hashes are computed over these bytes, so two implementations must produce
exactly the same output for the same value. We use the RFC 8785 (JCS) rules restricted to
the value types the protocol needs: objects with string keys, arrays, strings, integers,
booleans and null. Floats are refused outright: their canonical form is a notorious source
of cross-language mismatch and nothing in the protocol needs them (times are integer
milliseconds / nanoseconds, GPS is integer micro-degrees).

Binary values travel as lowercase hex strings.

This module never does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from protocol.errors import EncodingError

#: Integers are limited to the range JSON parsers everywhere agree on exactly is not
#: enough for 64-bit sequence numbers, so we allow the full unsigned/signed 64-bit range
#: and say so: consumers must parse integers as 64-bit, not as doubles.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

JSONValue = Any


def _check(value: JSONValue, path: str) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise EncodingError(f"integer at {path} out of 64-bit range: {value}")
        return
    if isinstance(value, float):
        raise EncodingError(f"float at {path} is not allowed in signed data; use integers")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"object key at {path} is not a string: {key!r}")
            _check(item, f"{path}.{key}")
        return
    raise EncodingError(f"value at {path} has unsupported type {type(value).__name__}")


def _utf16_key(key: str) -> list[int]:
    # RFC 8785 sorts member names by their UTF-16 code units, not by code points.
    encoded = key.encode("utf-16-be")
    return [int.from_bytes(encoded[i : i + 2], "big") for i in range(0, len(encoded), 2)]


class _Unsupported(Exception):
    pass


def _sorted(value: JSONValue) -> JSONValue:
    """One pass: check types and sort keys. Errors are re-diagnosed by ``_check``."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _Unsupported
        return value
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(type(k) is str for k in keys):
            raise _Unsupported
        # For ASCII names, UTF-16 code-unit order is plain string order (the common case).
        if all(k.isascii() for k in keys):
            keys.sort()
        else:
            keys.sort(key=_utf16_key)
        return {k: _sorted(value[k]) for k in keys}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    raise _Unsupported


def canonical(value: JSONValue) -> bytes:
    """Encode ``value`` canonically. Raises ``EncodingError`` for unsupported values."""
    try:
        prepared = _sorted(value)
    except _Unsupported:
        _check(value, "$")  # raises with the path of the offending value
        raise EncodingError("value cannot be encoded canonically") from None
    text = json.dumps(prepared, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodingError("value contains a lone surrogate, which has no UTF-8 form") from exc


def _no_floats(text: str) -> Any:
    raise EncodingError(f"float {text} is not allowed in protocol messages")


def _no_constants(text: str) -> Any:
    raise EncodingError(f"{text} is not valid JSON")


#: Every integer of the protocol fits in 64 bits (20 digits); longer ones are refused
#: before Python converts them (a 5,000-digit one raised a ValueError no caller expected).
MAX_INT_DIGITS = 20


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise EncodingError(f"integer of {len(text.lstrip('-'))} digits is not allowed")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:
            raise EncodingError(f"duplicate key {key!r}")
        out[key] = val
    return out


def decode(data: bytes, *, what: str = "message") -> dict[str, Any]:
    """Parse a JSON object strictly: UTF-8, no floats, no duplicate keys, object at top."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingError(f"{what} is not UTF-8: {exc}") from exc
    try:
        value = json.loads(
            text,
            parse_float=_no_floats,
            parse_int=_int,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise EncodingError(f"{what} is not valid JSON: {exc.msg} at char {exc.pos}") from exc
    except RecursionError as exc:
        raise EncodingError(f"{what} is nested too deeply") from exc
    if "\\u" in text:
        # JSON escapes can smuggle in lone surrogates, which no UTF-8 encoder (and so no
        # signature check) can handle later; refuse them here.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodingError(f"{what} contains an invalid Unicode escape") from exc
    if not isinstance(value, dict):
        raise EncodingError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def from_hex(value: object, *, field: str, length: int | None = None) -> bytes:
    """Decode a hex field, checking type and (optionally) byte length."""
    if not isinstance(value, str):
        raise EncodingError(f"{field} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise EncodingError(f"{field} is not valid hex") from exc
    if value != raw.hex():
        raise EncodingError(f"{field} must be lowercase hex without separators")
    if length is not None and len(raw) != length:
        raise EncodingError(f"{field} must be {length} bytes, got {len(raw)}")
    return raw
