"""Who is asking, and what they may see (Art. 22): users, roles, tokens, scopes.

Roles (``ROLES``): ``city_judicial`` (the city judicial bureau: sees everything),
``district_judicial`` (its district), ``city_agency`` (a city-level enforcement agency:
its own system, including its district branches), ``district_agency`` (its own data),
``reviewer`` (approves or rejects amendments within its scope), ``operator`` (the device
fleet: commands), ``auditor`` (reads the audit log within its scope). The gateway's admin
token (``DIR/admin.token``) is the built-in ``admin`` with every right; it creates the
registry and the users.

A user's scope is where they sit: an agency (that agency and every agency whose
``parent_id`` chain leads to it), or a district (every agency in that district), or —
for the city judicial bureau only — everything. Everything else follows from it: a
case is visible when its agency is, a device when the agency of the officer it is
assigned to is, evidence when its device or the case it is bound to is. Out of scope
looks exactly like absent (404), so scope boundaries do not leak what exists.

Passwords are hashed with argon2id; API tokens are random and stored only as sha256.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = frozenset(
    {
        "city_judicial",
        "district_judicial",
        "city_agency",
        "district_agency",
        "reviewer",
        "operator",
        "auditor",
    }
)
#: Who may create and update cases and steps (the docking API) and request amendments.
CASE_WRITERS = frozenset({"admin", "city_agency", "district_agency"})
#: Who may approve or reject an amendment.
REVIEWERS = frozenset({"admin", "reviewer"})
#: Who may read the audit log.
AUDIT_READERS = frozenset({"admin", "auditor", "city_judicial", "district_judicial"})
#: Who may send commands to devices and assign them.
OPERATORS = frozenset({"admin", "operator"})

TOKEN_TTL_MS = 12 * 3600 * 1000
_hasher = PasswordHasher()


class AccessError(ValueError):
    """A registry or user request that cannot be carried out, and why."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    agency_id: str | None = None
    district: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees_everything(self) -> bool:
        return self.is_admin or (
            self.agency_id is None and self.district is None and self.role != "district_judicial"
        )


ADMIN = Principal("admin", "admin")


def hash_password(password: str) -> str:
    if len(password) < 10:
        raise AccessError("passwords must be at least 10 characters")
    return _hasher.hash(password)


def check_password(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(conn: sqlite3.Connection, user: str, now_ms: int, label: str = "login") -> str:
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO tokens(token_hash, user, label, created_ms, expires_ms) "
        "VALUES (?, ?, ?, ?, ?)",
        [token_hash(token), user, label, now_ms, now_ms + TOKEN_TTL_MS if label == "login" else 0],
    )
    return token


def principal_for_token(conn: sqlite3.Connection, token: str, now_ms: int) -> Principal | None:
    row = conn.execute(
        "SELECT u.name, u.role, u.agency_id, u.district, t.expires_ms FROM tokens t "
        "JOIN users u ON u.name = t.user WHERE t.token_hash = ? AND u.disabled = 0",
        [token_hash(token)],
    ).fetchone()
    if row is None or (row[4] and row[4] < now_ms):
        return None
    return Principal(row[0], row[1], row[2], row[3])


def login(conn: sqlite3.Connection, name: str, password: str) -> Principal | None:
    row = conn.execute(
        "SELECT password_hash, role, agency_id, district FROM users "
        "WHERE name = ? AND disabled = 0",
        [name],
    ).fetchone()
    if row is None or not row[0] or not check_password(row[0], password):
        return None
    return Principal(name, row[1], row[2], row[3])


def check_user_scope(
    conn: sqlite3.Connection, role: str, agency_id: str | None, district: str | None
) -> None:
    """A user's place must fit their role (a district agency user sits in a district
    agency, a district judicial bureau in a district, the city bureau nowhere narrower)."""
    if role not in ROLES:
        raise AccessError(f"unknown role {role!r}; known: {', '.join(sorted(ROLES))}")
    level = None
    if agency_id is not None:
        row = conn.execute("SELECT level FROM agencies WHERE id = ?", [agency_id]).fetchone()
        if row is None:
            raise AccessError(f"agency {agency_id!r} does not exist")
        level = row[0]
    if role == "city_judicial" and (agency_id or district):
        raise AccessError("the city judicial bureau sees everything: no agency or district")
    if role == "district_judicial" and (not district or agency_id):
        raise AccessError("a district judicial bureau user needs a district (and no agency)")
    if role == "city_agency" and level != "city":
        raise AccessError("a city_agency user needs a city-level agency")
    if role == "district_agency" and level != "district":
        raise AccessError("a district_agency user needs a district-level agency")
    if agency_id and district:
        raise AccessError("give an agency or a district, not both")


def agencies_under(conn: sqlite3.Connection, agency_id: str) -> set[str]:
    """``agency_id`` and its branches, all the way down."""
    children: dict[str, list[str]] = {}
    for aid, parent in conn.execute("SELECT id, parent_id FROM agencies").fetchall():
        if parent:
            children.setdefault(parent, []).append(aid)
    seen: set[str] = set()
    todo = [agency_id]
    while todo:
        aid = todo.pop()
        if aid not in seen:
            seen.add(aid)
            todo.extend(children.get(aid, []))
    return seen


def visible_agencies(conn: sqlite3.Connection, who: Principal) -> set[str] | None:
    """The agency ids ``who`` may see, or None for all."""
    if who.sees_everything:
        return None
    if who.agency_id is not None:
        return agencies_under(conn, who.agency_id)
    rows = conn.execute("SELECT id, district FROM agencies").fetchall()
    return {aid for aid, district in rows if district == who.district}


def device_agency(conn: sqlite3.Connection, device_id: str, at_ms: int | None = None) -> str | None:
    """The agency of the officer the device is assigned to (at ``at_ms``, else now)."""
    row = conn.execute(
        "SELECT o.agency_id FROM assignments a JOIN officers o ON o.id = a.officer_id "
        "WHERE a.device_id = ? AND (? IS NULL OR a.from_ms <= ?) "
        "ORDER BY a.from_ms DESC, a.id DESC LIMIT 1",
        [device_id, at_ms, at_ms],
    ).fetchone()
    return str(row[0]) if row else None


def visible_devices(conn: sqlite3.Connection, who: Principal) -> set[str] | None:
    agencies = visible_agencies(conn, who)
    return None if agencies is None else _devices_of(conn, agencies)


def _devices_of(conn: sqlite3.Connection, agencies: set[str]) -> set[str]:
    # One query for the whole fleet: each device's latest assignment wins.
    latest: dict[str, str] = {}
    for device_id, agency in conn.execute(
        "SELECT a.device_id, o.agency_id FROM assignments a JOIN officers o "
        "ON o.id = a.officer_id ORDER BY a.from_ms, a.id"
    ).fetchall():
        latest[device_id] = agency
    return {d for d, agency in latest.items() if agency in agencies}


def may_see_case(conn: sqlite3.Connection, who: Principal, case_agency: str) -> bool:
    agencies = visible_agencies(conn, who)
    return agencies is None or case_agency in agencies


def evidence_visibility(conn: sqlite3.Connection, who: Principal) -> Callable[[str, int], bool]:
    """Whether ``who`` may see a piece of evidence (device, seq): its device is in scope,
    or the case it is bound to is. The scope is worked out once, for a whole list."""
    agencies = visible_agencies(conn, who)
    if agencies is None:
        return lambda device_id, seq: True
    devices = _devices_of(conn, agencies)

    def visible(device_id: str, seq: int) -> bool:
        if device_id in devices:
            return True
        row = conn.execute(
            "SELECT c.agency_id FROM bindings b JOIN steps s ON s.id = b.step_id "
            "JOIN cases c ON c.id = s.case_id WHERE b.device_id = ? AND b.seq = ? "
            "ORDER BY b.id DESC LIMIT 1",
            [device_id, seq],
        ).fetchone()
        return row is not None and row[0] in agencies

    return visible


def may_see_evidence(conn: sqlite3.Connection, who: Principal, device_id: str, seq: int) -> bool:
    return evidence_visibility(conn, who)(device_id, seq)
