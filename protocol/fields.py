"""Field checks shared by every message decoder: exact field sets, ranged integers, version.

Decoders are strict on purpose (Art. 27: non-conforming data must not get in): a missing or
unexpected field is an error naming the field, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from protocol.errors import MessageError, VersionError

VERSION = 1
#: The largest integer a message field may carry: what SQLite's and PostgreSQL's
#: signed 64-bit integers hold. (The canonical encoding allows up to 2**64 - 1; a
#: sequence number, offset or time past 2**63 - 1 is no use to anyone, and once it made
#: storing telemetry fail with an OverflowError that stopped ingest.)
INT_MAX = 2**63 - 1
#: A time in Unix milliseconds that dates can still be computed from: up to a year before
#: Python's last date, so a deadline some days after it, and a page showing it, stay
#: representable (a later time could be stored, and then failed every report).
TIME_MS_MAX = 253_370_764_800_000  # 9999-01-01T00:00:00Z


def int_field(obj: dict[str, Any], name: str, lo: int = 0, hi: int = INT_MAX) -> int:
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
