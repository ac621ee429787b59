"""The HTTP routes for the registry, cases (the docking API, Art. 14), review, amendments,
statistics, sampling, the audit log and case export.

Kept apart from ``gateway.api`` (evidence, devices, the log) so each file reads as one
subject; both share the same dependencies (``db``, ``caller``) and scope rules.
"""

import csv
import datetime as dt
import io
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import sqlite_utils
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.background import BackgroundTask

from gateway import audit, cases
from gateway.access import (
    AUDIT_READERS,
    OPERATORS,
    REVIEWERS,
    AccessError,
    Principal,
    check_user_scope,
    hash_password,
    issue_token,
    login,
    may_see_case,
    visible_agencies,
    visible_devices,
)
from gateway.catalogue import Catalogue
from gateway.datadir import DataDir
from gateway.db import transaction
from protocol.fields import INT_MAX, TIME_MS_MAX


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


#: SQLite's integers are signed 64-bit: a larger id, sequence number or offset would
#: overflow in the driver (a 500), so every integer that reaches a query is declared with
#: these bounds where it enters, and a wrong one answers 422 naming the field.
INT64_MIN, INT64_MAX = -(2**63), INT_MAX
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
#: A time in Unix milliseconds: 1970 up to ``TIME_MS_MAX`` (see there).
TimeMs = Annotated[
    int, Field(ge=0, le=TIME_MS_MAX, description="Unix milliseconds, 1970 to 9999-01-01")
]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def utc_datetime(ms: object) -> dt.datetime | None:
    """Unix milliseconds as a UTC datetime, or None when ``ms`` is no time the gateway
    shows as a date: negative, past ``TIME_MS_MAX`` (the range the API takes in), or not
    a number. Such a value can be stored, and rows are never rewritten: a device record
    dated year 10000 was once accepted, and ``datetime`` refused it on every later read
    (500 on every list that held it). Show it with ``not_a_date`` instead."""
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= TIME_MS_MAX:
        return None
    return _EPOCH + dt.timedelta(milliseconds=ms)  # exact, unlike fromtimestamp(ms / 1000)


def not_a_date(ms: object) -> str:
    """How every page, JSON field and export shows a time ``utc_datetime`` refuses: the raw
    milliseconds, marked, e.g. ``out of range: 253402300801000 ms``. Not clamped: a clamped
    date would put words in a signed record's mouth; the raw value is what it says. A
    JSON field that holds an ISO date holds this string instead, so it stays a string."""
    return f"out of range: {ms} ms"


def iso(ms: int | None, timespec: str = "milliseconds") -> str | None:
    """``ms`` as ISO 8601 in UTC (``None`` stays ``None``); see ``not_a_date``."""
    if ms is None:
        return None
    when = utc_datetime(ms)
    return when.isoformat(timespec=timespec) if when else not_a_date(ms)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(Strict):
    name: str
    password: str


class AgencyRequest(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str
    level: str = Field(pattern=r"^(city|district)$")
    district: str | None = None
    parent_id: str | None = None


class OfficerRequest(Strict):
    id: str = Field(description="enforcement certificate number", min_length=1, max_length=64)
    name: str
    agency_id: str


class AssignmentRequest(Strict):
    officer_id: str
    from_ms: TimeMs | None = Field(None, description="default: now")


class UserRequest(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    role: str
    agency_id: str | None = None
    district: str | None = None
    password: str | None = Field(None, description="for interactive login (argon2id-hashed)")


class StepRequest(Strict):
    step_type: str
    officers: list[str] = Field(default_factory=list)
    start_ms: TimeMs | None = None
    end_ms: TimeMs | None = None


class CaseRequest(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    agency_id: str
    case_type: str
    title: str = ""
    steps: list[StepRequest] = Field(default_factory=list)

    @field_validator("id", mode="before")
    @classmethod
    def addressable(cls, value: Any) -> Any:
        """A case is read back at ``/api/v1/cases/{id}``: an id with ``/`` in it was
        created and then answered 404 everywhere, and ``.``/``..`` are path steps."""
        if isinstance(value, str) and ("/" in value or value in (".", "..")):
            raise ValueError(
                f"case id {value!r} cannot be addressed in a URL: no '/', and not '.' or "
                "'..' (use letters, digits and _ . : -)"
            )
        return value


class StepTimes(Strict):
    start_ms: TimeMs | None = None
    end_ms: TimeMs | None = None


class AmendmentRequest(Strict):
    kind: str = Field(description="rebind | step_times")
    payload: dict[str, Any]
    reason: str


class RebindPayload(Strict):
    device_id: str
    seq: Int64
    step_id: Int64 | None = None


class StepTimesPayload(Strict):
    step_id: Int64
    start_ms: TimeMs | None = None
    end_ms: TimeMs | None = None


#: What each kind of amendment carries (checked when it is asked for: it is carried out
#: only later, when a reviewer approves it).
PAYLOADS: dict[str, type[Strict]] = {"rebind": RebindPayload, "step_times": StepTimesPayload}


class Decision(Strict):
    approve: bool
    note: str = ""


class ReviewBinding(Strict):
    step_id: Int64 | None


def add_case_routes(
    app: FastAPI,
    data: DataDir,
    catalogue: Catalogue,
    db: Callable[[], Iterator[sqlite_utils.Database]],
    caller: Callable[..., Principal],
) -> None:
    Db = Annotated[sqlite_utils.Database, Depends(db)]
    Caller = Annotated[Principal, Depends(caller)]

    def refuse(exc: cases.CaseError | AccessError) -> HTTPException:
        status = exc.status if isinstance(exc, cases.CaseError) else 422
        return HTTPException(status, str(exc))

    def admin_only(who: Principal) -> None:
        if not who.is_admin:
            raise HTTPException(403, "only the gateway admin manages the registry")

    def visible_case(
        conn: sqlite_utils.Database, who: Principal, case_id: str, action: str = ""
    ) -> dict[str, Any]:
        """The case, or 404 when it does not exist or is out of scope. With ``action``,
        the access is audited either way (refusals as ``<action>_refused``)."""
        case = cases.case_row(conn.conn, case_id)
        allowed = case is not None and may_see_case(conn.conn, who, case["agency_id"])
        if action:
            with transaction(conn) as c:
                name = action if allowed else f"{action}_refused"
                audit.record(c, who.name, name, f"case/{case_id}", now_ms())
        if case is None or not allowed:
            raise HTTPException(404, f"no case {case_id}")
        return case

    # -- login and registry ----------------------------------------------------------

    @app.post("/api/v1/login", tags=["access"])
    def do_login(body: LoginRequest, conn: Db) -> dict[str, Any]:
        """Exchange a user's password for a bearer token (valid 12 hours)."""
        who = login(conn.conn, body.name, body.password)
        with transaction(conn) as c:
            if who is None:
                audit.record(c, body.name, "login_failed", f"user/{body.name}", now_ms())
                token = None
            else:
                token = issue_token(c, who.name, now_ms())
                audit.record(c, who.name, "login", f"user/{who.name}", now_ms())
        if token is None:
            raise HTTPException(401, "wrong name or password")
        return {"token": token, "role": who.role if who else None}

    @app.post("/api/v1/agencies", tags=["registry"], status_code=201)
    def add_agency(body: AgencyRequest, conn: Db, who: Caller) -> dict[str, Any]:
        admin_only(who)
        if body.level == "district" and not body.district:
            raise HTTPException(422, "a district-level agency needs its district")
        with transaction(conn) as c:
            if (
                body.parent_id
                and not c.execute(
                    "SELECT 1 FROM agencies WHERE id = ?", [body.parent_id]
                ).fetchone()
            ):
                raise HTTPException(422, f"parent agency {body.parent_id} does not exist")
            try:
                c.execute(
                    "INSERT INTO agencies(id, name, level, district, parent_id, created_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [body.id, body.name, body.level, body.district, body.parent_id, now_ms()],
                )
            except sqlite3.IntegrityError as exc:
                raise HTTPException(409, f"agency {body.id} already exists") from exc
            audit.record(c, who.name, "agency_create", f"agency/{body.id}", now_ms())
        return body.model_dump()

    @app.get("/api/v1/agencies", tags=["registry"])
    def agencies(conn: Db, who: Caller) -> list[dict[str, Any]]:
        allowed = visible_agencies(conn.conn, who)
        rows = conn.execute(
            "SELECT id, name, level, district, parent_id FROM agencies ORDER BY id"
        ).fetchall()
        keys = ("id", "name", "level", "district", "parent_id")
        return [dict(zip(keys, r, strict=True)) for r in rows if allowed is None or r[0] in allowed]

    @app.post("/api/v1/officers", tags=["registry"], status_code=201)
    def add_officer(body: OfficerRequest, conn: Db, who: Caller) -> dict[str, Any]:
        admin_only(who)
        with transaction(conn) as c:
            if not c.execute("SELECT 1 FROM agencies WHERE id = ?", [body.agency_id]).fetchone():
                raise HTTPException(422, f"agency {body.agency_id} does not exist")
            try:
                c.execute(
                    "INSERT INTO officers(id, name, agency_id, created_ms) VALUES (?, ?, ?, ?)",
                    [body.id, body.name, body.agency_id, now_ms()],
                )
            except sqlite3.IntegrityError as exc:
                raise HTTPException(409, f"officer {body.id} already exists") from exc
            audit.record(c, who.name, "officer_create", f"officer/{body.id}", now_ms())
        return body.model_dump()

    @app.get("/api/v1/officers", tags=["registry"])
    def officers(conn: Db, who: Caller) -> list[dict[str, Any]]:
        allowed = visible_agencies(conn.conn, who)
        rows = conn.execute("SELECT id, name, agency_id FROM officers ORDER BY id").fetchall()
        return [
            {
                "id": r[0],
                "name": r[1],
                "agency_id": r[2],
                "devices": cases.devices_of_officer(conn.conn, r[0]),
            }
            for r in rows
            if allowed is None or r[2] in allowed
        ]

    @app.post("/api/v1/devices/{device_id}/assignment", tags=["registry"], status_code=201)
    def assign(device_id: str, body: AssignmentRequest, conn: Db, who: Caller) -> dict[str, Any]:
        """Hand a device to an officer from ``from_ms`` on (evidence captured after that
        is the officer's). Assignments are kept, never overwritten."""
        if who.role not in OPERATORS:
            raise HTTPException(403, f"role {who.role} may not assign devices")
        start = body.from_ms if body.from_ms is not None else now_ms()
        with transaction(conn) as c:
            # A scoped operator hands over only devices of its own agencies, and only to
            # their officers (anything else answers as if it did not exist): otherwise one
            # agency could take another's camera, and with it its evidence.
            agencies = visible_agencies(c, who)
            devices = visible_devices(c, who)
            if not c.execute("SELECT 1 FROM devices WHERE device_id = ?", [device_id]).fetchone():
                raise HTTPException(404, f"device {device_id} is not enrolled")
            if devices is not None and device_id not in devices:
                raise HTTPException(404, f"device {device_id} is not enrolled")
            officer = c.execute(
                "SELECT agency_id FROM officers WHERE id = ?", [body.officer_id]
            ).fetchone()
            if officer is None or (agencies is not None and officer[0] not in agencies):
                raise HTTPException(422, f"officer {body.officer_id} is not registered")
            latest = c.execute(
                "SELECT max(from_ms) FROM assignments WHERE device_id = ?", [device_id]
            ).fetchone()[0]
            if agencies is not None and latest is not None and start < latest:
                # Evidence belongs to whoever held the device when it recorded: a scoped
                # operator hands a device on from now, it does not rewrite who held it.
                raise HTTPException(
                    422, f"from_ms must not be before the device's current assignment ({latest})"
                )
            c.execute(
                "INSERT INTO assignments(device_id, officer_id, from_ms, by) VALUES (?, ?, ?, ?)",
                [device_id, body.officer_id, start, who.name],
            )
            audit.record(
                c, who.name, "assign", f"device/{device_id}", now_ms(), {"officer": body.officer_id}
            )
        return {"device_id": device_id, "officer_id": body.officer_id, "from_ms": start}

    @app.post("/api/v1/users", tags=["access"], status_code=201)
    def add_user(body: UserRequest, conn: Db, who: Caller) -> dict[str, Any]:
        admin_only(who)
        try:
            check_user_scope(conn.conn, body.role, body.agency_id, body.district)
            hashed = hash_password(body.password) if body.password else None
        except AccessError as exc:
            raise refuse(exc) from exc
        with transaction(conn) as c:
            try:
                c.execute(
                    "INSERT INTO users(name, role, agency_id, district, password_hash, "
                    "created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    [body.name, body.role, body.agency_id, body.district, hashed, now_ms()],
                )
            except sqlite3.IntegrityError as exc:
                raise HTTPException(409, f"user {body.name} already exists") from exc
            audit.record(
                c, who.name, "user_create", f"user/{body.name}", now_ms(), {"role": body.role}
            )
        return {k: v for k, v in body.model_dump().items() if k != "password"}

    @app.post("/api/v1/users/{name}/tokens", tags=["access"], status_code=201)
    def add_token(name: str, conn: Db, who: Caller, label: str = "api") -> dict[str, Any]:
        """A long-lived API token for a case-handling system or a script (shown once)."""
        admin_only(who)
        with transaction(conn) as c:
            if not c.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
                raise HTTPException(404, f"no user {name}")
            token = issue_token(c, name, now_ms(), label=label or "api")
            audit.record(c, who.name, "token_issue", f"user/{name}", now_ms(), {"label": label})
        return {"user": name, "token": token}

    # -- cases (the docking API) -----------------------------------------------------

    @app.get("/api/v1/catalogue", tags=["cases"])
    def get_catalogue(who: Caller) -> dict[str, Any]:
        return catalogue.model_dump()

    @app.post("/api/v1/cases", tags=["cases"], status_code=201)
    def create_case(body: CaseRequest, conn: Db, who: Caller) -> dict[str, Any]:
        now = now_ms()
        try:
            with transaction(conn) as c:
                cases.create_case(
                    c, catalogue, who, body.id, body.agency_id, body.case_type, body.title, now
                )
                for step in body.steps:
                    cases.add_step(
                        c, catalogue, who, body.id, step.step_type, step.officers,
                        step.start_ms, step.end_ms, now,
                    )  # fmt: skip
                cases.bind_pending(c, now)
        except cases.CaseError as exc:
            raise refuse(exc) from exc
        return cases.case_report(conn.conn, body.id, now_ms())

    @app.get("/api/v1/cases", tags=["cases"])
    def list_cases(
        conn: Db, who: Caller, agency_id: str | None = None, case_type: str | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for case_id in cases.visible_case_ids(conn.conn, who):
            case = cases.case_row(conn.conn, case_id)
            assert case is not None
            if (agency_id and case["agency_id"] != agency_id) or (
                case_type and case["case_type"] != case_type
            ):
                continue
            out.append(case)
        return out

    @app.get("/api/v1/cases/{case_id}", tags=["cases"])
    def get_case(case_id: str, conn: Db, who: Caller) -> dict[str, Any]:
        """The case with every step's coverage, gaps (and their reasons), due date and
        late/overdue flags, and the evidence bound to it."""
        visible_case(conn, who, case_id, "case_view")
        return cases.case_report(conn.conn, case_id, now_ms())

    @app.post("/api/v1/cases/{case_id}/steps", tags=["cases"], status_code=201)
    def add_step(case_id: str, body: StepRequest, conn: Db, who: Caller) -> dict[str, Any]:
        visible_case(conn, who, case_id)
        now = now_ms()
        try:
            with transaction(conn) as c:
                step_id = cases.add_step(
                    c, catalogue, who, case_id, body.step_type, body.officers,
                    body.start_ms, body.end_ms, now,
                )  # fmt: skip
                cases.bind_pending(c, now)
        except cases.CaseError as exc:
            raise refuse(exc) from exc
        return cases.coverage(conn.conn, step_id, now_ms())

    @app.patch("/api/v1/cases/{case_id}/steps/{step_id}", tags=["cases"])
    def update_step(
        case_id: str, step_id: Int64, body: StepTimes, conn: Db, who: Caller
    ) -> dict[str, Any]:
        """Set a step's start or end. A time already set changes only by an approved
        amendment (409 here)."""
        case = visible_case(conn, who, case_id)
        step = cases.step_row(conn.conn, step_id)
        if step is None or step["case_id"] != case_id:
            raise HTTPException(404, f"no step {step_id} in case {case_id}")
        now = now_ms()
        try:
            with transaction(conn) as c:
                cases._check_writer(c, who, case["agency_id"])
                cases.set_step_times(c, who.name, step_id, body.start_ms, body.end_ms, now)
                cases.bind_pending(c, now)
        except cases.CaseError as exc:
            raise refuse(exc) from exc
        return cases.coverage(conn.conn, step_id, now_ms())

    @app.get("/api/v1/cases/{case_id}/history", tags=["cases"])
    def history(case_id: str, conn: Db, who: Caller) -> dict[str, Any]:
        """Every value each step's times ever had, and every binding ever made."""
        visible_case(conn, who, case_id)
        steps = conn.execute(
            "SELECT h.step_id, h.at_ms, h.actor, h.field, h.old, h.new, h.reason FROM "
            "step_history h JOIN steps s ON s.id = h.step_id WHERE s.case_id = ? ORDER BY h.id",
            [case_id],
        ).fetchall()
        bindings = conn.execute(
            "SELECT b.device_id, b.seq, b.step_id, b.method, b.at_ms, b.actor, b.note FROM "
            "bindings b WHERE b.step_id IN (SELECT id FROM steps WHERE case_id = ?) OR "
            "EXISTS (SELECT 1 FROM bindings o JOIN steps s ON s.id = o.step_id WHERE "
            "s.case_id = ? AND o.device_id = b.device_id AND o.seq = b.seq) ORDER BY b.id",
            [case_id, case_id],
        ).fetchall()
        return {
            "steps": [
                dict(
                    zip(
                        ("step_id", "at_ms", "actor", "field", "old", "new", "reason"),
                        (*r[:4], json.loads(r[4]), json.loads(r[5]), r[6]),
                        strict=True,
                    )
                )
                for r in steps
            ],  # fmt: skip
            "bindings": [
                dict(
                    zip(
                        ("device_id", "seq", "step_id", "method", "at_ms", "actor", "note"),
                        r,
                        strict=True,
                    )
                )
                for r in bindings
            ],  # fmt: skip
        }

    # -- review queue and amendments -------------------------------------------------

    @app.get("/api/v1/review-queue", tags=["cases"])
    def review_queue(conn: Db, who: Caller) -> list[dict[str, Any]]:
        visible = visible_devices(conn.conn, who)
        rows = conn.execute(
            "SELECT device_id, seq, reason, candidates, opened_ms FROM review_queue "
            "WHERE state = 'open' ORDER BY opened_ms"
        ).fetchall()
        return [
            {"device_id": r[0], "seq": r[1], "reason": r[2], "candidates": json.loads(r[3]),
             "opened_ms": r[4]}
            for r in rows
            if visible is None or r[0] in visible
        ]  # fmt: skip

    @app.post("/api/v1/review-queue/{device_id}/{seq}", tags=["cases"])
    def resolve_review(
        device_id: str, seq: Int64, body: ReviewBinding, conn: Db, who: Caller
    ) -> dict[str, Any]:
        """A reviewer binds an item the gateway could not (its first binding; changing a
        binding afterwards is an amendment)."""
        if who.role not in REVIEWERS:
            raise HTTPException(403, "only a reviewer resolves the review queue")
        visible = visible_devices(conn.conn, who)
        if visible is not None and device_id not in visible:
            raise HTTPException(404, f"no review item {device_id}/{seq}")
        with transaction(conn) as c:
            row = c.execute(
                "SELECT state FROM review_queue WHERE device_id = ? AND seq = ?", [device_id, seq]
            ).fetchone()
            if row is None or row[0] != "open":
                raise HTTPException(404, f"no open review item {device_id}/{seq}")
            if body.step_id is not None:
                step = cases.step_row(c, body.step_id)
                case = cases.case_row(c, step["case_id"]) if step else None
                if case is None or not may_see_case(c, who, case["agency_id"]):
                    raise HTTPException(422, f"no step {body.step_id}")
            cases.bind(c, device_id, seq, body.step_id, "review", who.name, now_ms())
        return {"device_id": device_id, "seq": seq, "step_id": body.step_id}

    @app.post("/api/v1/cases/{case_id}/amendments", tags=["cases"], status_code=201)
    def request_amendment(
        case_id: str, body: AmendmentRequest, conn: Db, who: Caller
    ) -> dict[str, Any]:
        """Ask for a correction (``rebind``: ``{"device_id", "seq", "step_id"}``;
        ``step_times``: ``{"step_id", "start_ms"?, "end_ms"?}``) with a reason; nothing
        changes until a reviewer approves it."""
        visible_case(conn, who, case_id)
        payload = body.payload
        if body.kind in PAYLOADS:
            try:
                checked = PAYLOADS[body.kind].model_validate(payload)
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                raise RequestValidationError(
                    [{**e, "loc": ("body", "payload", *e["loc"])} for e in errors]
                ) from exc
            payload = checked.model_dump(exclude_unset=True)
        try:
            with transaction(conn) as c:
                amendment_id = cases.request_amendment(
                    c, who, case_id, body.kind, payload, body.reason, now_ms()
                )
        except cases.CaseError as exc:
            raise refuse(exc) from exc
        row = cases.amendment_row(conn.conn, amendment_id)
        assert row is not None
        return row

    @app.get("/api/v1/cases/{case_id}/amendments", tags=["cases"])
    def amendments(case_id: str, conn: Db, who: Caller) -> list[dict[str, Any]]:
        visible_case(conn, who, case_id)
        ids = conn.execute(
            "SELECT id FROM amendments WHERE case_id = ? ORDER BY id", [case_id]
        ).fetchall()
        return [a for (i,) in ids if (a := cases.amendment_row(conn.conn, i)) is not None]

    @app.post("/api/v1/amendments/{amendment_id}/decision", tags=["cases"])
    def decide(amendment_id: Int64, body: Decision, conn: Db, who: Caller) -> dict[str, Any]:
        try:
            with transaction(conn) as c:
                return cases.decide_amendment(
                    c, who, amendment_id, body.approve, body.note, now_ms()
                )
        except cases.CaseError as exc:
            raise refuse(exc) from exc

    # -- statistics, sampling, audit, export -------------------------------------------

    @app.get("/api/v1/stats", tags=["statistics"])
    def stats(
        conn: Db,
        who: Caller,
        by: Annotated[str, Query(pattern="^(agency|officer|device)$")] = "agency",
        format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    ) -> Any:
        """Per agency, officer or device (Arts. 21, 31), within the caller's scope."""
        rows = cases.statistics(conn.conn, who, by, now_ms())
        if format == "json":
            return rows
        out = io.StringIO()
        fields = [by] + [k for k in (rows[0] if rows else {}) if k != by]
        writer = csv.DictWriter(out, fieldnames=fields or [by])
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv")

    @app.get("/api/v1/sample", tags=["statistics"])
    def sample(
        conn: Db,
        who: Caller,
        size: Annotated[int, Query(ge=1, le=1000)] = 10,
        seed: str = "",
    ) -> dict[str, Any]:
        """A reproducible random sample of cases in scope (Art. 30): give the ``seed`` back
        and the same sample comes out."""
        seed = seed or dt.date.today().isoformat()
        picked = cases.sample_cases(conn.conn, who, size, seed)
        with transaction(conn) as c:
            audit.record(c, who.name, "sample", "cases", now_ms(), {"seed": seed, "cases": picked})
        return {"seed": seed, "size": size, "cases": picked}

    @app.get("/api/v1/audit", tags=["access"])
    def audit_log(
        conn: Db,
        who: Caller,
        after_id: Annotated[Int64, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict[str, Any]:
        """The hash-chained audit log (and whether the chain is intact)."""
        if who.role not in AUDIT_READERS:
            raise HTTPException(403, f"role {who.role} may not read the audit log")
        rows = conn.execute(
            "SELECT id, at_ms, actor, action, target, detail, prev_hash, hash FROM audit "
            "WHERE id > ? ORDER BY id LIMIT ?",
            [after_id, limit],
        ).fetchall()
        if not who.sees_everything:
            cases_ok = set(cases.visible_case_ids(conn.conn, who))
            devices_ok = visible_devices(conn.conn, who) or set()
            rows = [r for r in rows if _in_scope(str(r[4]), cases_ok, devices_ok)]
        keys = ("id", "at_ms", "actor", "action", "target", "detail", "prev_hash", "hash")
        problems = audit.verify_chain(conn.conn)
        return {
            "chain_intact": not problems,
            "problems": problems[:20],
            "entries": [
                {**dict(zip(keys, r, strict=True)), "detail": json.loads(r[5] or "{}")}
                for r in rows
            ],
        }

    @app.get("/api/v1/cases/{case_id}/export", tags=["cases"])
    def export(case_id: str, conn: Db, who: Caller) -> FileResponse:
        """The case file as a bundle anyone can verify offline (``custody verify``)."""
        visible_case(conn, who, case_id, "export")
        from gateway.export import ExportError, export_bundle

        report = cases.case_report(conn.conn, case_id, now_ms())
        items = export_items(report)
        if not items:
            # As the CLI says it; a bundle of nothing would prove nothing.
            raise HTTPException(409, f"case {case_id} has no received evidence to export yet")
        tmp = Path(tempfile.mkdtemp(prefix="custody-export-"))
        out = tmp / f"{safe_name(case_id)}.zip"

        def cleanup() -> None:
            out.unlink(missing_ok=True)
            tmp.rmdir()

        try:
            export_bundle(
                data, conn, items, out, case=report_case(report), coverage=report,
                coverage_html=coverage_html(report), actor=who.name,
            )  # fmt: skip
        except ExportError as exc:
            # Evidence the gateway lists but cannot vouch for (a blob gone or damaged):
            # say which, and leave no half-written bundle behind.
            cleanup()
            raise HTTPException(409, str(exc)) from exc

        return FileResponse(
            out, media_type="application/zip", filename=out.name, background=BackgroundTask(cleanup)
        )


def resolve_case(
    db: sqlite_utils.Database, case_id: str
) -> tuple[dict[str, Any], list[tuple[str, int]], dict[str, Any], str]:
    """What ``custody export CASE_ID`` bundles: the case, its received evidence, and its
    coverage report (JSON and HTML)."""
    from gateway.errors import GatewayError

    try:
        report = cases.case_report(db.conn, case_id, now_ms())
    except cases.CaseError as exc:
        raise GatewayError(str(exc)) from exc
    items = export_items(report)
    if not items:
        raise GatewayError(f"case {case_id} has no received evidence to export yet")
    return report_case(report), items, report, coverage_html(report)


def _in_scope(target: str, case_ids: set[str], device_ids: set[str]) -> bool:
    parts = target.split("/")
    if parts[0] == "case" and len(parts) > 1:
        return parts[1] in case_ids
    if parts[0] in ("evidence", "device") and len(parts) > 1:
        return parts[1] in device_ids
    return False


def safe_name(case_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)


def export_items(report: dict[str, Any]) -> list[tuple[str, int]]:
    """The evidence of a case that the gateway holds (bound and received)."""
    return sorted(
        {
            (e["device_id"], e["seq"])
            for step in report["steps"]
            for e in step["evidence"]
            if e["evidence_id"] is not None
        }
    )


def report_case(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "steps"}


def _ms(value: int | None) -> str:
    if value is None:
        return "—"
    when = utc_datetime(value)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else not_a_date(value)


def coverage_html(report: dict[str, Any]) -> str:
    """A page a supervisor can read without tools: steps, coverage, gaps and reasons."""
    from html import escape

    rows = []
    for s in report["steps"]:
        gaps = "".join(
            f"<li>{_ms(g['start_ms'])} – {_ms(g['end_ms'])} ({g['duration_ms'] // 1000} s): "
            + escape("; ".join(r["reason"] for r in g["reasons"]))
            + "</li>"
            for g in s["gaps"]
        )
        flags = " ".join(f for f in ("late", "overdue") if s.get(f)) or "on time"
        pct = "—" if s["coverage_pct"] is None else f"{s['coverage_pct']}%"
        rows.append(
            f"<tr><td>{escape(s['name'])}</td><td>{_ms(s['start_ms'])}</td>"
            f"<td>{_ms(s['end_ms'])}</td><td>{'yes' if s['recording_required'] else 'no'}</td>"
            f"<td>{pct}</td><td>{len(s['evidence'])}</td><td>{escape(str(s['due_day']))}</td>"
            f"<td>{flags}</td><td><ul>{gaps}</ul></td></tr>"
        )
    return str(
        "<!doctype html><meta charset=utf-8><title>case "
        + escape(report["id"])
        + "</title><style>body{font-family:sans-serif}td,th{border:1px solid #999;"
        "padding:4px;vertical-align:top}table{border-collapse:collapse}</style>"
        f"<h1>Case {escape(report['id'])}</h1><p>{escape(report.get('title') or '')} — "
        f"{escape(report['case_type'])}, agency {escape(report['agency_id'])}</p>"
        "<table><tr><th>step</th><th>start</th><th>end</th><th>recording required</th>"
        "<th>coverage</th><th>evidence</th><th>due</th><th>arrival</th><th>gaps</th></tr>"
        + "".join(rows)
        + "</table>"
    )
