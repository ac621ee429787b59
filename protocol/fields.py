"""Field checks shared by every message decoder: exact field sets, ranged integers, version.

Decoders are strict on purpose (Art. 27: non-conforming data must not get in): a missing or
unexpected field is an error naming the field, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from protocol.errors import MessageError, VersionError

VERSION = 1
U64_MAX = 2**64 - 1


def int_field(obj: dict[str, Any], name: str, lo: int = 0, hi: int = U64_MAX) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MessageError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_version(obj: dict[str, Any], what: str) -> None:
    if obj.get("v") != VERSION:
        raise VersionError(f"{what} version {obj.get('v')!r} is not supported (want {VERSION})")


def check_fields(
    obj: dict[str, Any], what: str, required: Set[str], optional: Set[str] = frozenset()
) -> None:
    missing = required - obj.keys()
    extra = obj.keys() - required - optional
    if missing or extra:
        raise MessageError(
            f"{what} fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
