"""Cases, their steps, and the evidence bound to them (Arts. 12–21, 30).

**Steps.** A case (created by a case-handling system through the docking API, Art. 14)
has steps from the catalogue. A step's start and end may be *set* by the docking API or
by an officer's handheld terminal (a signed ``case_context`` journal record); once set,
a time changes only through an approved amendment (Art. 18). Every value a step ever
had is in ``step_history``.

**Binding.** Media is bound by its signed manifest (journal record), so it can be
bound — and counted as owed — before its bytes arrive. Explicit wins: a manifest
carrying ``case.step_id`` (the step the gateway pushed to the device, or the terminal
opened) is bound to it. Otherwise the officer (the device's assignment at capture time,
else the manifest's ``officer_id``) and time overlap decide: one candidate step binds;
several go to the review queue as ``ambiguous``; none wait there as ``unmatched`` and
are tried again as steps arrive. A binding is a row, never an edit: a newer row for the
same item supersedes it, and the history stays.

**Coverage.** Per step: the union of bound segments' [start, end) clipped to the step,
its share of the step, and every gap longer than ``GAP_THRESHOLD_MS`` with what the
journals of the step's devices say about it (a ``recording_stopped`` reason, a restart,
a refused start) or ``unexplained``. Due: 3 working days after the step ends on the
Chinese calendar (``gateway.calendar``); ``late`` when evidence arrived after that,
``overdue`` when it has passed and evidence is still owed.
"""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway import audit
from gateway.access import (
    Principal,
    agencies_under,
    device_agency,
    may_see_evidence,
    visible_agencies,
)
from gateway.alarms import raise_alarm
from gateway.calendar import due_date, lateness
from gateway.catalogue import Catalogue
from protocol.fields import TIME_MS_MAX
from protocol.upload import union

MEDIA_KINDS = ("segment", "photo", "file")
GAP_THRESHOLD_MS = 5_000
#: A gap's explanation may be journalled a little before it starts (the stop record
#: is written as the last segment closes).
EXPLAIN_SLACK_MS = 15_000
CASE_TYPES = ("inspection", "licensing", "penalty", "coercive_measure")


class CaseError(ValueError):
    """A request the docking API refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Item:
    """A piece of media as its signed manifest describes it."""

    device_id: str
    seq: int
    kind: str
    start_ms: int
    end_ms: int
    officer_id: str | None
    explicit_step: int | None
    body: dict[str, Any]


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


# -- registry helpers -----------------------------------------------------------------------


def officer_of_device(conn: sqlite3.Connection, device_id: str, at_ms: int) -> str | None:
    row = conn.execute(
        "SELECT officer_id FROM assignments WHERE device_id = ? AND from_ms <= ? "
        "ORDER BY from_ms DESC, id DESC LIMIT 1",
        [device_id, at_ms],
    ).fetchone()
    return str(row[0]) if row else None


def devices_of_officer(conn: sqlite3.Connection, officer_id: str) -> list[str]:
    """Devices currently assigned to the officer."""
    rows = conn.execute(
        "SELECT a.device_id FROM assignments a WHERE a.id = (SELECT b.id FROM assignments b "
        "WHERE b.device_id = a.device_id ORDER BY b.from_ms DESC, b.id DESC LIMIT 1) "
        "AND a.officer_id = ?",
        [officer_id],
    ).fetchall()
    return [r[0] for r in rows]


# -- cases and steps -------------------------------------------------------------------------


def case_row(conn: sqlite3.Connection, case_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, agency_id, case_type, title, catalogue_version, created_ms, created_by "
        "FROM cases WHERE id = ?",
        [case_id],
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "agency_id", "case_type", "title", "catalogue_version", "created_ms", "by")
    return dict(zip(keys, row, strict=True))


def step_row(conn: sqlite3.Connection, step_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, case_id, step_type, name, officers, recording_required, start_ms, end_ms "
        "FROM steps WHERE id = ?",
        [step_id],
    ).fetchone()
    if row is None:
        return None
    return {
        "id": row[0],
        "case_id": row[1],
        "step_type": row[2],
        "name": row[3],
        "officers": _loads(row[4]) or [],
        "recording_required": bool(row[5]),
        "start_ms": row[6],
        "end_ms": row[7],
    }


def steps_of(conn: sqlite3.Connection, case_id: str) -> list[dict[str, Any]]:
    ids = conn.execute("SELECT id FROM steps WHERE case_id = ? ORDER BY id", [case_id]).fetchall()
    return [s for (sid,) in ids if (s := step_row(conn, sid)) is not None]


def _check_writer(conn: sqlite3.Connection, who: Principal, agency_id: str) -> None:
    if who.role not in ("admin", "city_agency", "district_agency"):
        raise CaseError(f"role {who.role} may not write cases", 403)
    agencies = visible_agencies(conn, who)
    if agencies is not None and agency_id not in agencies:
        raise CaseError(f"agency {agency_id} is outside your scope", 403)


def create_case(
    conn: sqlite3.Connection,
    catalogue: Catalogue,
    who: Principal,
    case_id: str,
    agency_id: str,
    case_type: str,
    title: str,
    now_ms: int,
) -> None:
    if case_type not in catalogue.case_types:
        raise CaseError(
            f"case type {case_type!r} is not in catalogue {catalogue.version}; "
            f"known: {', '.join(sorted(catalogue.case_types))}"
        )
    if conn.execute("SELECT 1 FROM agencies WHERE id = ?", [agency_id]).fetchone() is None:
        raise CaseError(f"agency {agency_id!r} does not exist")
    _check_writer(conn, who, agency_id)
    if case_row(conn, case_id) is not None:
        raise CaseError(f"case {case_id!r} already exists", 409)
    conn.execute(
        "INSERT INTO cases(id, agency_id, case_type, title, catalogue_version, created_ms, "
        "created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [case_id, agency_id, case_type, title, catalogue.version, now_ms, who.name],
    )
    audit.record(conn, who.name, "case_create", f"case/{case_id}", now_ms, {"type": case_type})


def add_step(
    conn: sqlite3.Connection,
    catalogue: Catalogue,
    who: Principal,
    case_id: str,
    step_type: str,
    officers: list[str],
    start_ms: int | None,
    end_ms: int | None,
    now_ms: int,
) -> int:
    case = case_row(conn, case_id)
    if case is None:
        raise CaseError(f"no case {case_id!r}", 404)
    _check_writer(conn, who, case["agency_id"])
    kind = catalogue.case_types.get(case["case_type"])
    spec = kind.step(step_type) if kind is not None else None
    if spec is None:
        known = ", ".join(s.type for s in kind.steps) if kind else ""
        raise CaseError(
            f"step type {step_type!r} is not a {case['case_type']} step; known: {known}"
        )
    # A step's officers are the case agency's (or its branches'): naming another agency's
    # officer would bind that agency's recordings into this case and push this case to
    # its devices. The message does not say whether such an officer exists elsewhere.
    own = agencies_under(conn, case["agency_id"])
    for officer in officers:
        row = conn.execute("SELECT agency_id FROM officers WHERE id = ?", [officer]).fetchone()
        if row is None or row[0] not in own:
            raise CaseError(
                f"officer {officer!r} is not registered with agency {case['agency_id']} "
                "or its branches"
            )
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        raise CaseError("a step cannot end before it starts")
    cur = conn.execute(
        "INSERT INTO steps(case_id, step_type, name, officers, recording_required, start_ms, "
        "end_ms, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            case_id,
            step_type,
            spec.name,
            json.dumps(officers),
            int(spec.recording),
            start_ms,
            end_ms,
            now_ms,
        ],
    )
    step_id = int(cur.lastrowid or 0)
    for field, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if value is not None:
            _history(conn, step_id, who.name, field, None, value, "created", now_ms)
    audit.record(
        conn, who.name, "step_create", f"case/{case_id}/step/{step_id}", now_ms, {"type": step_type}
    )
    _push_context(conn, step_id, now_ms, who.name)
    return step_id


def _history(
    conn: sqlite3.Connection,
    step_id: int,
    actor: str,
    field: str,
    old: int | None,
    new: int | None,
    reason: str,
    now_ms: int,
) -> None:
    conn.execute(
        "INSERT INTO step_history(step_id, at_ms, actor, field, old, new, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [step_id, now_ms, actor, field, json.dumps(old), json.dumps(new), reason],
    )


def set_step_times(
    conn: sqlite3.Connection,
    actor: str,
    step_id: int,
    start_ms: int | None,
    end_ms: int | None,
    now_ms: int,
    *,
    reason: str = "docking",
    correction: bool = False,
) -> dict[str, Any]:
    """Set a step's times. Unset times may be set; a set time changes only as a
    ``correction`` (an approved amendment)."""
    step = step_row(conn, step_id)
    if step is None:
        raise CaseError(f"no step {step_id}", 404)
    new_start = step["start_ms"] if start_ms is None else start_ms
    new_end = step["end_ms"] if end_ms is None else end_ms
    for field, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if (
            value is not None
            and step[field] is not None
            and step[field] != value
            and not correction
        ):
            raise CaseError(
                f"step {step_id} {field} is already {step[field]}; changing it needs an "
                "approved amendment (POST /api/v1/cases/{id}/amendments)",
                409,
            )
    if new_start is not None and new_end is not None and new_end < new_start:
        raise CaseError("a step cannot end before it starts")
    for field, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if value is not None and value != step[field]:
            _history(conn, step_id, actor, field, step[field], value, reason, now_ms)
    conn.execute(
        "UPDATE steps SET start_ms = ?, end_ms = ? WHERE id = ?", [new_start, new_end, step_id]
    )
    audit.record(
        conn,
        actor,
        "step_times",
        f"case/{step['case_id']}/step/{step_id}",
        now_ms,
        {"start_ms": new_start, "end_ms": new_end, "reason": reason},
    )
    _push_context(conn, step_id, now_ms, actor)
    updated = step_row(conn, step_id)
    assert updated is not None
    return updated


def _push_context(conn: sqlite3.Connection, step_id: int, now_ms: int, actor: str) -> None:
    """Queue a signed ``case_context`` command to the devices of the step's officers: the
    step while it is open, an empty context once it has ended."""
    step = step_row(conn, step_id)
    if step is None or step["start_ms"] is None:
        return
    args: dict[str, Any] = (
        {"case_id": step["case_id"], "step_id": step_id} if step["end_ms"] is None else {}
    )
    for officer in step["officers"]:
        for device_id in devices_of_officer(conn, officer):
            status = conn.execute(
                "SELECT status FROM devices WHERE device_id = ?", [device_id]
            ).fetchone()
            if status is None or status[0] != "active":
                continue  # a lost device is told nothing, not even which case is open
            cmd_id = conn.execute(
                "SELECT coalesce(max(cmd_id), 0) + 1 FROM commands WHERE device_id = ?",
                [device_id],
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO commands(device_id, cmd_id, name, args, issued_ms, expires_ms, "
                "state, created_by) VALUES (?, ?, 'case_context', ?, ?, ?, 'pending', ?)",
                [device_id, cmd_id, json.dumps(args), now_ms, now_ms + 3600_000, actor],
            )


def _device_may_touch(conn: sqlite3.Connection, device_id: str, case_id: str, at_ms: int) -> bool:
    """Whether a device (its officer's agency at ``at_ms``) may set a time in, or bind
    straight into, ``case_id``: only within its own agency's cases (and their branches')."""
    case = case_row(conn, case_id)
    if case is None:
        return False
    own = agencies_under(conn, str(case["agency_id"]))
    # At the device's time, or now: a segment starts up to its pre-event before the press
    # and a device clock may lag, so the first recording after an assignment would
    # otherwise read as the previous holder's.
    return any(device_agency(conn, device_id, at) in own for at in (at_ms, None))


def apply_terminal_context(
    conn: sqlite3.Connection, device_id: str, seq: int, body: dict[str, Any], now_ms: int
) -> None:
    """A signed ``case_context`` record from a handheld terminal opens or closes a step.
    What is already set stays (the terminal cannot rewrite history either)."""
    step_id = body.get("step_id")
    at = body.get("at_ms")
    action = body.get("action")
    if not isinstance(step_id, int) or not isinstance(at, int) or action not in ("open", "close"):
        return
    if isinstance(at, bool) or not 0 <= at <= TIME_MS_MAX:
        # Stored as a step's end, a time past 9999 made the case, its coverage and the
        # statistics fail for good (its due date cannot be computed): ignored, like any
        # other context that cannot apply. The journal keeps what the terminal signed.
        return
    step = step_row(conn, step_id)
    if step is None or not _device_may_touch(conn, device_id, str(step["case_id"]), at):
        return
    field = "start_ms" if action == "open" else "end_ms"
    if step[field] is not None:
        return
    try:
        set_step_times(
            conn,
            f"device:{device_id}",
            step_id,
            at if action == "open" else None,
            at if action == "close" else None,
            now_ms,
            reason=f"terminal (journal seq {seq})",
        )
    except CaseError:
        return


# -- binding ---------------------------------------------------------------------------------


class MalformedRecord(ValueError):
    """A signed media record whose body cannot be read as a manifest (a time that is not
    a time). The journal keeps it (it is what the device signed, and the chain must go
    on); binding does not guess: it goes to the review queue as ``malformed``."""


def _ms(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= TIME_MS_MAX:
        raise MalformedRecord(f"{name} is {value!r}, not a time in Unix ms")
    return value


def _item(
    conn: sqlite3.Connection, device_id: str, seq: int, kind: str, record: str, strict: bool = True
) -> Item:
    """The media record as binding sees it. ``strict=False`` (for an item a reviewer bound
    by hand) never raises: a malformed time reads as the record's own signed ``wall_ms``,
    or 0 when that is unusable too, so one such item cannot fail a case's reports."""
    rec = json.loads(record)
    body = rec.get("body", {})
    wall = 0
    try:
        if not isinstance(body, dict):
            raise MalformedRecord("its body is not an object")
        wall = _ms(rec.get("wall_ms", 0), "wall_ms")
        if kind == "segment":
            start = _ms(body.get("start_wall_ms", wall), "start_wall_ms")
            end = _ms(body.get("end_wall_ms", start), "end_wall_ms")
            if end < start:
                raise MalformedRecord(f"end_wall_ms {end} is before start_wall_ms {start}")
        elif kind == "photo":
            start = end = _ms(body.get("taken_wall_ms", wall), "taken_wall_ms")
        else:
            start = end = wall
    except MalformedRecord:
        if strict:
            raise
        start = end = wall
        if not isinstance(body, dict):
            body = {}
    case = body.get("case") if isinstance(body.get("case"), dict) else {}
    step = case.get("step_id") if case else None
    officer = officer_of_device(conn, device_id, start) or body.get("officer_id")
    return Item(
        device_id,
        seq,
        kind,
        start,
        end,
        officer if isinstance(officer, str) else None,
        step if isinstance(step, int) else None,
        body,
    )


def candidate_steps(conn: sqlite3.Connection, item: Item) -> list[int]:
    if item.officer_id is None:
        return []
    rows = conn.execute(
        "SELECT s.id, s.officers, s.start_ms, s.end_ms FROM steps s WHERE s.start_ms IS NOT NULL "
        "AND s.start_ms <= ? AND (s.end_ms IS NULL OR s.end_ms >= ?)",
        [item.end_ms, item.start_ms],
    ).fetchall()
    return [int(r[0]) for r in rows if item.officer_id in (_loads(r[1]) or [])]


def current_binding(conn: sqlite3.Connection, device_id: str, seq: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, step_id, method, at_ms, actor, note FROM bindings WHERE device_id = ? "
        "AND seq = ? ORDER BY id DESC LIMIT 1",
        [device_id, seq],
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "step_id", "method", "at_ms", "actor", "note")
    return dict(zip(keys, row, strict=True))


def bind(
    conn: sqlite3.Connection,
    device_id: str,
    seq: int,
    step_id: int | None,
    method: str,
    actor: str,
    now_ms: int,
    note: str = "",
) -> None:
    conn.execute(
        "INSERT INTO bindings(device_id, seq, step_id, method, at_ms, actor, note) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [device_id, seq, step_id, method, now_ms, actor, note],
    )
    conn.execute(
        "UPDATE review_queue SET state = 'resolved' WHERE device_id = ? AND seq = ?",
        [device_id, seq],
    )
    audit.record(
        conn,
        actor,
        "bind",
        f"evidence/{device_id}/{seq}",
        now_ms,
        {"step_id": step_id, "method": method},
    )


def bind_pending(conn: sqlite3.Connection, now_ms: int) -> int:
    """Bind every media manifest that has no binding yet (see the module docstring);
    returns how many were bound. Runs inside the caller's transaction."""
    rows = conn.execute(
        "SELECT j.device_id, j.seq, j.kind, j.record FROM journal j WHERE j.kind IN "
        "('segment', 'photo', 'file') AND NOT EXISTS (SELECT 1 FROM bindings b WHERE "
        "b.device_id = j.device_id AND b.seq = j.seq) AND NOT EXISTS (SELECT 1 FROM "
        "review_queue q WHERE q.device_id = j.device_id AND q.seq = j.seq AND "
        "q.reason IN ('ambiguous', 'malformed'))"
    ).fetchall()
    bound = 0
    for device_id, seq, kind, record in rows:
        try:
            item = _item(conn, device_id, seq, kind, record)
        except MalformedRecord as exc:
            # One bad record must not stop binding for everyone (it did: every pass
            # failed on it). A reviewer can still bind it by hand.
            _queue(conn, device_id, seq, "malformed", [], now_ms)
            raise_alarm(
                conn,
                "bad_record",
                device_id,
                f"{kind} record seq {seq} is signed but unreadable as a manifest ({exc}); kept "
                "in the journal, not bound: see the review queue",
                now_ms,
                key=f"record {seq}",
            )
            continue
        explicit = step_row(conn, item.explicit_step) if item.explicit_step is not None else None
        if explicit is not None and _device_may_touch(
            conn, device_id, str(explicit["case_id"]), item.start_ms
        ):
            bind(conn, device_id, seq, item.explicit_step, "explicit", "gateway", now_ms)
            bound += 1
            continue
        steps = candidate_steps(conn, item)
        if len(steps) == 1:
            bind(conn, device_id, seq, steps[0], "officer_time", "gateway", now_ms)
            bound += 1
        else:
            _queue(conn, device_id, seq, "ambiguous" if steps else "unmatched", steps, now_ms)
    return bound


def _queue(
    conn: sqlite3.Connection,
    device_id: str,
    seq: int,
    reason: str,
    candidates: list[int],
    now_ms: int,
) -> None:
    """Put (or keep) an item in the review queue for a reviewer to bind by hand."""
    conn.execute(
        "INSERT INTO review_queue(device_id, seq, reason, candidates, state, opened_ms) "
        "VALUES (?, ?, ?, ?, 'open', ?) ON CONFLICT(device_id, seq) DO UPDATE SET "
        "reason = excluded.reason, candidates = excluded.candidates",
        [device_id, seq, reason, json.dumps(candidates), now_ms],
    )


# -- coverage and deadlines ------------------------------------------------------------------


def bound_items(conn: sqlite3.Connection, step_id: int) -> list[tuple[Item, dict[str, Any]]]:
    """Media currently bound to the step, with its evidence row (if the bytes arrived)."""
    rows = conn.execute(
        "SELECT b.device_id, b.seq FROM bindings b WHERE b.id = (SELECT max(c.id) FROM "
        "bindings c WHERE c.device_id = b.device_id AND c.seq = b.seq) AND b.step_id = ? "
        "ORDER BY b.device_id, b.seq",
        [step_id],
    ).fetchall()
    out = []
    for device_id, seq in rows:
        j = conn.execute(
            "SELECT kind, record FROM journal WHERE device_id = ? AND seq = ?", [device_id, seq]
        ).fetchone()
        if j is None:
            continue
        ev = conn.execute(
            "SELECT id, sha256, size, verified, received_ms, media_type FROM evidence "
            "WHERE device_id = ? AND seq = ?",
            [device_id, seq],
        ).fetchone()
        evidence = (
            {
                "id": ev[0],
                "sha256": ev[1],
                "size": ev[2],
                "verified": bool(ev[3]),
                "received_ms": ev[4],
                "media_type": ev[5],
            }
            if ev
            else {}
        )
        out.append((_item(conn, device_id, seq, j[0], j[1], strict=False), evidence))
    return out


def _explain(
    conn: sqlite3.Connection, devices: list[str], start: int, end: int
) -> list[dict[str, Any]]:
    """What the journals of ``devices`` say about [start, end): stops with their reasons,
    refused starts, restarts."""
    reasons = []
    for device_id in devices:
        # A stop is written as the last segment closes (just before the gap); a restart
        # explains a gap only if it happened inside it.
        rows = conn.execute(
            "SELECT seq, kind, wall_ms, record FROM journal WHERE device_id = ? AND ("
            "(kind = 'recording_stopped' AND wall_ms BETWEEN ? AND ?) OR "
            "(kind = 'boot' AND wall_ms BETWEEN ? AND ?)) ORDER BY seq",
            [device_id, start - EXPLAIN_SLACK_MS, end, start, end],
        ).fetchall()
        for seq, kind, wall, record in rows:
            body = json.loads(record).get("body", {})
            if kind == "boot":
                text = "the device restarted"
            elif body.get("refused"):
                text = f"a {body.get('refused')} start was refused: {body.get('reason')}"
            else:
                text = f"recording stopped: {body.get('reason')}"
            reasons.append(
                {"device_id": device_id, "seq": seq, "kind": kind, "at_ms": wall, "reason": text}
            )
    return reasons


def coverage(
    conn: sqlite3.Connection, step_id: int, now_ms: int, gap_threshold_ms: int = GAP_THRESHOLD_MS
) -> dict[str, Any]:
    step = step_row(conn, step_id)
    if step is None:
        raise CaseError(f"no step {step_id}", 404)
    items = bound_items(conn, step_id)
    report: dict[str, Any] = {
        "step_id": step_id,
        "case_id": step["case_id"],
        "step_type": step["step_type"],
        "name": step["name"],
        "officers": step["officers"],
        "recording_required": step["recording_required"],
        "start_ms": step["start_ms"],
        "end_ms": step["end_ms"],
        "evidence": [],
    }
    start, end = step["start_ms"], step["end_ms"]
    due = due_date(end) if end is not None else None
    flags = {"late": False, "overdue": False}
    for item, ev in items:
        state = lateness(ev.get("received_ms"), due, now_ms) if due is not None else "pending"
        if ev and not ev.get("verified"):
            state = "pending" if state != "overdue" else state
        flags["late"] |= state == "late"
        flags["overdue"] |= state == "overdue"
        report["evidence"].append(
            {
                "device_id": item.device_id,
                "seq": item.seq,
                "kind": item.kind,
                "start_ms": item.start_ms,
                "end_ms": item.end_ms,
                "received_ms": ev.get("received_ms"),
                "evidence_id": ev.get("id"),
                "sha256": ev.get("sha256") or item.body.get("sha256"),
                "arrival": state,
            }
        )
    report["due_ms"] = due.due_ms if due else None
    report["due_day"] = due.due_day.isoformat() if due else None
    report["due_estimated"] = due.estimated if due else None
    if start is None:
        report.update(covered_ms=0, duration_ms=None, coverage_pct=None, gaps=[])
        report.update(flags)
        return report
    stop = end if end is not None else now_ms
    duration = max(0, stop - start)
    segments = [
        (max(start, i.start_ms), min(stop, i.end_ms))
        for i, _ in items
        if i.kind == "segment" and i.end_ms > start and i.start_ms < stop
    ]
    covered = list(union(segments))
    covered_ms = sum(b - a for a, b in covered)
    gaps = []
    cursor = start
    devices = sorted(
        {i.device_id for i, _ in items}
        | {d for officer in step["officers"] for d in devices_of_officer(conn, officer)}
    )
    for a, b in [*covered, (stop, stop)] if step["recording_required"] else []:
        if a - cursor > gap_threshold_ms:
            reasons = _explain(conn, devices, cursor, a)
            gaps.append(
                {
                    "start_ms": cursor,
                    "end_ms": a,
                    "duration_ms": a - cursor,
                    "explained": bool(reasons),
                    "reasons": reasons or [{"reason": "unexplained"}],
                }
            )
        cursor = max(cursor, b)
    if (
        due is not None
        and step["recording_required"]
        and not items
        and lateness(None, due, now_ms) == "overdue"
    ):
        flags["overdue"] = True
    report.update(
        covered_ms=covered_ms,
        duration_ms=duration,
        coverage_pct=round(100 * covered_ms / duration, 1) if duration else 100.0,
        gaps=gaps,
    )
    report.update(flags)
    return report


def case_report(conn: sqlite3.Connection, case_id: str, now_ms: int) -> dict[str, Any]:
    case = case_row(conn, case_id)
    if case is None:
        raise CaseError(f"no case {case_id!r}", 404)
    steps = [coverage(conn, s["id"], now_ms) for s in steps_of(conn, case_id)]
    return {**case, "steps": steps}


# -- amendments ------------------------------------------------------------------------------


def _check_rebind_item(
    conn: sqlite3.Connection, who: Principal, case_id: str, device_id: str, seq: int
) -> None:
    """A rebind moves media the caller can see, and only into or out of this case: its
    device is in the case agency's scope, or it is bound to this case now. Anything else
    answers like media that does not exist."""
    row = conn.execute(
        "SELECT kind, record FROM journal WHERE device_id = ? AND seq = ? AND kind IN "
        "('segment', 'photo', 'file')",
        [device_id, seq],
    ).fetchone()
    case = case_row(conn, case_id)
    assert case is not None
    own = agencies_under(conn, str(case["agency_id"]))
    bound = conn.execute(
        "SELECT c.id, c.agency_id FROM bindings b JOIN steps s ON s.id = b.step_id "
        "JOIN cases c ON c.id = s.case_id WHERE b.device_id = ? AND b.seq = ? "
        "ORDER BY b.id DESC LIMIT 1",
        [device_id, seq],
    ).fetchone()
    if row is None:
        raise CaseError(f"no media {device_id}/{seq} that this case may rebind", 404)
    item = _item(conn, device_id, seq, row[0], row[1], strict=False)
    # Whose it is: the agency the device was with when it recorded (as binding reads it),
    # not the one it has now (a device handed on does not take its past along).
    owned = device_agency(conn, device_id, item.start_ms) in own
    if (
        not may_see_evidence(conn, who, device_id, seq)
        # Bound elsewhere: only out of a case of this agency (or its branches).
        or (bound is not None and bound[0] != case_id and bound[1] not in own)
        or not (owned or (bound is not None and bound[0] == case_id))
    ):
        raise CaseError(f"no media {device_id}/{seq} that this case may rebind", 404)


def request_amendment(
    conn: sqlite3.Connection,
    who: Principal,
    case_id: str,
    kind: str,
    payload: dict[str, Any],
    reason: str,
    now_ms: int,
) -> int:
    case = case_row(conn, case_id)
    if case is None:
        raise CaseError(f"no case {case_id!r}", 404)
    _check_writer(conn, who, case["agency_id"])
    if not reason.strip():
        raise CaseError("an amendment needs a reason")
    if kind == "rebind":
        step_id = payload.get("step_id")
        if not isinstance(payload.get("device_id"), str) or not isinstance(payload.get("seq"), int):
            raise CaseError("rebind needs device_id (string) and seq (integer)")
        _check_rebind_item(conn, who, case_id, payload["device_id"], payload["seq"])
        if step_id is not None:
            step = step_row(conn, step_id) if isinstance(step_id, int) else None
            if step is None or step["case_id"] != case_id:
                raise CaseError(f"step {step_id} is not a step of case {case_id}")
    elif kind == "step_times":
        step = step_row(conn, payload.get("step_id", -1))
        if step is None or step["case_id"] != case_id:
            raise CaseError(f"step {payload.get('step_id')} is not a step of case {case_id}")
        if "start_ms" not in payload and "end_ms" not in payload:
            raise CaseError("step_times needs start_ms and/or end_ms")
        start = payload.get("start_ms", step["start_ms"])
        end = payload.get("end_ms", step["end_ms"])
        if start is not None and end is not None and end < start:
            # Refused now, not when a reviewer approves it days later.
            raise CaseError(
                f"step_times would make step {step['id']} end ({end}) before it starts ({start})"
            )
    else:
        raise CaseError(f"unknown amendment kind {kind!r}; known: rebind, step_times")
    cur = conn.execute(
        "INSERT INTO amendments(kind, case_id, payload, reason, state, requested_by, "
        "requested_ms) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        [kind, case_id, json.dumps(payload), reason, who.name, now_ms],
    )
    amendment_id = int(cur.lastrowid or 0)
    audit.record(
        conn,
        who.name,
        "amendment_request",
        f"case/{case_id}/amendment/{amendment_id}",
        now_ms,
        {"kind": kind, "reason": reason},
    )
    return amendment_id


def amendment_row(conn: sqlite3.Connection, amendment_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, kind, case_id, payload, reason, state, requested_by, requested_ms, "
        "decided_by, decided_ms, decision_note FROM amendments WHERE id = ?",
        [amendment_id],
    ).fetchone()
    if row is None:
        return None
    keys = (
        "id",
        "kind",
        "case_id",
        "payload",
        "reason",
        "state",
        "requested_by",
        "requested_ms",
        "decided_by",
        "decided_ms",
        "decision_note",
    )
    out = dict(zip(keys, row, strict=True))
    out["payload"] = _loads(out["payload"])
    return out


def decide_amendment(
    conn: sqlite3.Connection,
    who: Principal,
    amendment_id: int,
    approve: bool,
    note: str,
    now_ms: int,
) -> dict[str, Any]:
    amendment = amendment_row(conn, amendment_id)
    if amendment is None:
        raise CaseError(f"no amendment {amendment_id}", 404)
    case = case_row(conn, amendment["case_id"])
    assert case is not None
    # Out of scope first: it must answer exactly like an amendment that does not exist
    # (a 403 here told anyone which amendment ids other agencies have).
    agencies = visible_agencies(conn, who)
    if agencies is not None and case["agency_id"] not in agencies:
        raise CaseError(f"no amendment {amendment_id}", 404)
    if who.role not in ("admin", "reviewer"):
        raise CaseError("only a reviewer approves or rejects amendments", 403)
    p = amendment["payload"]
    if amendment["kind"] == "rebind" and approve:
        # Checked again at decision: scope and bindings may have moved since the request.
        _check_rebind_item(conn, who, str(amendment["case_id"]), p["device_id"], p["seq"])
    if amendment["state"] != "pending":
        raise CaseError(f"amendment {amendment_id} is already {amendment['state']}", 409)
    if who.name == amendment["requested_by"]:
        raise CaseError("an amendment is decided by someone other than who asked for it", 403)
    state = "approved" if approve else "rejected"
    conn.execute(
        "UPDATE amendments SET state = ?, decided_by = ?, decided_ms = ?, decision_note = ? "
        "WHERE id = ?",
        [state, who.name, now_ms, note, amendment_id],
    )
    actor = f"amendment:{amendment_id}"
    if approve and amendment["kind"] == "rebind":
        bind(conn, p["device_id"], p["seq"], p.get("step_id"), "amendment", actor, now_ms, note)
    elif approve and amendment["kind"] == "step_times":
        set_step_times(
            conn,
            actor,
            p["step_id"],
            p.get("start_ms"),
            p.get("end_ms"),
            now_ms,
            reason=f"amendment {amendment_id}: {amendment['reason']}",
            correction=True,
        )
    audit.record(
        conn,
        who.name,
        f"amendment_{state}",
        f"case/{amendment['case_id']}/amendment/{amendment_id}",
        now_ms,
        {"note": note},
    )
    decided = amendment_row(conn, amendment_id)
    assert decided is not None
    return decided


# -- statistics and sampling -----------------------------------------------------------------


def visible_case_ids(conn: sqlite3.Connection, who: Principal) -> list[str]:
    agencies = visible_agencies(conn, who)
    rows = conn.execute("SELECT id, agency_id FROM cases ORDER BY id").fetchall()
    return [r[0] for r in rows if agencies is None or r[1] in agencies]


def sample_cases(conn: sqlite3.Connection, who: Principal, size: int, seed: str) -> list[str]:
    """A reproducible random sample (Art. 30): the same seed and the same cases in scope
    give the same sample, so a reviewer can show how it was drawn."""
    ids = visible_case_ids(conn, who)
    return sorted(random.Random(seed).sample(ids, min(size, len(ids))))


def statistics(
    conn: sqlite3.Connection, who: Principal, by: str, now_ms: int
) -> list[dict[str, Any]]:
    """Per agency, officer or device (Arts. 21, 31): steps, recorded steps, coverage,
    gaps, late and overdue, evidence count and bytes."""
    if by not in ("agency", "officer", "device"):
        raise CaseError("by must be agency, officer or device")
    groups: dict[str, dict[str, Any]] = {}

    def group(key: str) -> dict[str, Any]:
        return groups.setdefault(
            key,
            {
                by: key,
                "steps": 0,
                "steps_requiring_recording": 0,
                "steps_fully_covered": 0,
                "coverage_pct_sum": 0.0,
                "gaps": 0,
                "unexplained_gaps": 0,
                "late_steps": 0,
                "overdue_steps": 0,
                "evidence": 0,
                "evidence_bytes": 0,
            },
        )

    for case_id in visible_case_ids(conn, who):
        case = case_row(conn, case_id)
        assert case is not None
        for step in steps_of(conn, case_id):
            rep = coverage(conn, step["id"], now_ms)
            if by == "agency":
                keys = {case["agency_id"]}
            elif by == "officer":
                keys = set(step["officers"])
            else:
                keys = {e["device_id"] for e in rep["evidence"]}
            for key in keys:
                g = group(key)
                g["steps"] += 1
                if step["recording_required"]:
                    g["steps_requiring_recording"] += 1
                    if rep["coverage_pct"] is not None:
                        g["coverage_pct_sum"] += rep["coverage_pct"]
                        g["steps_fully_covered"] += rep["coverage_pct"] >= 100.0
                g["gaps"] += len(rep["gaps"])
                g["unexplained_gaps"] += sum(not gap["explained"] for gap in rep["gaps"])
                g["late_steps"] += rep["late"]
                g["overdue_steps"] += rep["overdue"]
                mine = [e for e in rep["evidence"] if by != "device" or e["device_id"] == key]
                g["evidence"] += len(mine)
                g["evidence_bytes"] += sum(
                    (
                        conn.execute(
                            "SELECT coalesce(size, 0) FROM evidence WHERE id = ?",
                            [e["evidence_id"]],
                        ).fetchone()
                        or [0]
                    )[0]
                    for e in mine
                    if e["evidence_id"]
                )
    out = []
    for g in groups.values():
        n = g.pop("coverage_pct_sum")
        required = g["steps_requiring_recording"]
        g["mean_coverage_pct"] = round(n / required, 1) if required else None
        out.append(g)
    return sorted(out, key=lambda g: str(g[by]))
