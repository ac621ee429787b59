"""Conditions the gateway watches: alarms that are raised while something *is* true and
resolve themselves when it stops being true.

``gateway.alarms`` records anomalies that *happened* (a forged batch, a hash mismatch);
they stay until a person deals with them. The kinds here (``WATCH_KINDS``) describe a
state of the fleet or of a case that can end by itself:

``device_offline_backlog``
    an active device has been offline (``devices.online = 0``) for more than
    ``OFFLINE_GRACE_MS`` since it was last heard from, and its last telemetry reported a
    backlog the gateway still does not hold all of (``_still_owed``): evidence exists
    that the gateway does not have.
``battery_low_recording``
    the last telemetry says the device is recording on 0–``BATTERY_LOW_PCT`` % battery
    (``-1``, unknown, is not low).
``storage_low``
    the last telemetry says fewer than ``STORAGE_LOW_MIN`` minutes of recording still fit.
``evidence_overdue`` (Art. 19)
    ``cases.coverage(step)["overdue"]``: the 3-working-day deadline has passed and
    evidence is still owed. One alarm per step.
``recording_outside_step`` (Art. 20)
    segments the binding pass put in the review queue as ``unmatched`` more than
    ``UNMATCHED_GRACE_MS`` ago. One alarm per recording (its segments share the
    manifest's ``recording_id``; a segment without one is its own recording), so a
    two-hour patrol is one alarm, not twenty.
``step_without_recording``
    a step that requires whole-course recording has ended and no segment is bound to it.

Device conditions read the last telemetry a device sent, online or not: a device that
went dark at 8 % battery is still shown as such until it says otherwise.

**Episodes.** ``watch`` raises one alarm row per stretch of time a condition holds, with
dedupe key ``{kind}|{device_id}|{subject} since {first_ms}``, and resolves it when the
condition stops holding (state ``resolved`` and an ``auto_resolve`` event by
``gateway`` in ``alarm_events``). A condition that comes back later is a new alarm, so
each row's first and last times describe one stretch. An alarm that a person resolved
while its condition still held stays resolved (they decided it is handled: a step that
was never recorded will not become recorded); the gateway adds a ``cleared`` event once
the condition ends, and raises a new alarm only if it returns after that. While an
alarm is open or acknowledged, ``last_ms`` is the last time the condition was seen and
``detail`` its latest description.

**Cost.** ``watch`` runs every second on the ingest thread, inside its write
transaction, so every second it spends delays devices' acknowledgements. Device
conditions read the ``devices`` table on every call. Case conditions read steps,
bindings and the review queue, which grow with every recording; their deadlines are
minutes to days, so they are evaluated at most once per ``CASE_CHECK_MS`` (the last pass
time is in ``watch_passes``, so several gateway processes share one cadence).

This module never deletes an alarm or changes what an alarm is about (its kind, device,
dedupe key and first time); it writes only inside the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from gateway import cases
from gateway.alarms import raise_alarm
from protocol.journal import MEDIA_KINDS

log = logging.getLogger("custody.gateway.watch")
events = logging.getLogger("custody.events")

DEVICE_KINDS = ("device_offline_backlog", "battery_low_recording", "storage_low")
CASE_KINDS = ("evidence_overdue", "recording_outside_step", "step_without_recording")
#: Listed in ``gateway.alarms.ALARM_KINDS`` too (alarms cannot import this module).
WATCH_KINDS = frozenset(DEVICE_KINDS + CASE_KINDS)

ACTOR = "gateway"
#: Event actions only the gateway writes: the condition ended (``auto_resolve`` also
#: resolved the alarm; ``cleared`` notes it on an alarm a person had resolved already).
#: An alarm with either event is closed for good.
CLOSING_ACTIONS = ("auto_resolve", "cleared")

OFFLINE_GRACE_MS = 60_000
BATTERY_LOW_PCT = 15
STORAGE_LOW_MIN = 60
UNMATCHED_GRACE_MS = 10 * 60_000
CASE_CHECK_MS = 60_000

_SINCE = " since "
# A binding row is current when no newer row exists for the same item.
_CURRENT = (
    "b.id = (SELECT max(c.id) FROM bindings c WHERE c.device_id = b.device_id AND c.seq = b.seq)"
)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create ``alarm_events`` and ``watch_passes`` and the indexes ``watch`` relies on
    (idempotent; run where the rest of the schema is created)."""
    for statement in (
        # Every change of an alarm's state, by a person (gateway.api_ops) or the gateway.
        "CREATE TABLE IF NOT EXISTS alarm_events (id INTEGER PRIMARY KEY, "
        "alarm_id INTEGER NOT NULL REFERENCES alarms(id), at_ms INTEGER NOT NULL, "
        "actor TEXT NOT NULL, action TEXT NOT NULL, note TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX IF NOT EXISTS alarm_events_alarm ON alarm_events(alarm_id)",
        "CREATE TABLE IF NOT EXISTS watch_passes (name TEXT PRIMARY KEY, at_ms INTEGER NOT NULL)",
        # What the once-a-second and once-a-minute passes look up.
        "CREATE INDEX IF NOT EXISTS alarms_kind_state ON alarms(kind, state)",
        "CREATE INDEX IF NOT EXISTS bindings_step ON bindings(step_id)",
        "CREATE INDEX IF NOT EXISTS review_queue_open ON review_queue(state, reason)",
    ):
        db.execute(statement)


def record_event(
    conn: sqlite3.Connection, alarm_id: int, actor: str, action: str, note: str, now_ms: int
) -> None:
    conn.execute(
        "INSERT INTO alarm_events(alarm_id, at_ms, actor, action, note) VALUES (?, ?, ?, ?, ?)",
        [alarm_id, now_ms, actor, action, note],
    )


@dataclass(frozen=True)
class Condition:
    """A condition that holds now. ``subject`` names what it is about within its kind
    (a device, a step, a recording); ``device_id`` is whose alarm list shows it."""

    kind: str
    subject: str
    device_id: str
    detail: str


@dataclass(frozen=True)
class _Live:
    id: int
    state: str


def watch(conn: sqlite3.Connection, now_ms: int) -> None:
    """Raise alarms for conditions that hold and resolve those that no longer do; call
    inside a write transaction (the ingest thread's housekeeping, every second)."""
    holding = _device_conditions(conn, now_ms)
    kinds: tuple[str, ...] = DEVICE_KINDS
    if _case_pass_due(conn, now_ms):
        holding += _case_conditions(conn, now_ms)
        kinds += CASE_KINDS
    wanted = {(c.kind, c.subject): c for c in holding}
    live = _live_alarms(conn, kinds)
    for ident, condition in wanted.items():
        alarm = live.get(ident)
        if alarm is None:
            _raise(conn, condition, now_ms)
        elif alarm.state != "resolved":
            conn.execute(
                "UPDATE alarms SET last_ms = ?, detail = ? WHERE id = ?",
                [now_ms, condition.detail, alarm.id],
            )
    for ident, alarm in live.items():
        if ident in wanted:
            continue
        if alarm.state == "resolved":
            record_event(conn, alarm.id, ACTOR, "cleared", "the condition no longer holds", now_ms)
            continue
        conn.execute("UPDATE alarms SET state = 'resolved' WHERE id = ?", [alarm.id])
        record_event(conn, alarm.id, ACTOR, "auto_resolve", "the condition no longer holds", now_ms)
        log.info("alarm %d (%s %s) resolved: the condition no longer holds", alarm.id, *ident)


def _raise(conn: sqlite3.Connection, condition: Condition, now_ms: int) -> None:
    """A new alarm for a new episode of the condition (its own dedupe key)."""
    key = f"{condition.subject}{_SINCE}{now_ms}"
    raise_alarm(conn, condition.kind, condition.device_id, condition.detail, now_ms, key)


def _live_alarms(conn: sqlite3.Connection, kinds: Iterable[str]) -> dict[tuple[str, str], _Live]:
    """The current episode of each condition of ``kinds``: open, acknowledged, or
    resolved by a person while the condition still held."""
    kinds = tuple(kinds)
    marks = ", ".join("?" * len(kinds))
    closing = ", ".join("?" * len(CLOSING_ACTIONS))
    rows = conn.execute(
        f"SELECT id, kind, dedupe, state FROM alarms WHERE kind IN ({marks}) AND "
        "state IN ('open', 'acknowledged') "
        "UNION ALL "
        f"SELECT a.id, a.kind, a.dedupe, a.state FROM alarms a WHERE a.kind IN ({marks}) AND "
        f"a.state = 'resolved' AND NOT EXISTS (SELECT 1 FROM alarm_events e WHERE "
        f"e.alarm_id = a.id AND e.action IN ({closing})) ORDER BY 1",
        [*kinds, *kinds, *CLOSING_ACTIONS],
    ).fetchall()
    live: dict[tuple[str, str], _Live] = {}
    for alarm_id, kind, dedupe, state in rows:
        _, _, key = str(dedupe).split("|", 2)
        subject, since, _ = key.rpartition(_SINCE)
        if since:  # else raised by someone else under a watched kind: not ours to resolve
            live[(kind, subject)] = _Live(int(alarm_id), str(state))
    return live


def _case_pass_due(conn: sqlite3.Connection, now_ms: int) -> bool:
    row = conn.execute("SELECT at_ms FROM watch_passes WHERE name = 'cases'").fetchone()
    # A clock that went backwards (now before the last pass) runs a pass rather than none.
    if row is not None and 0 <= now_ms - int(row[0]) < CASE_CHECK_MS:
        return False
    conn.execute(
        "INSERT INTO watch_passes(name, at_ms) VALUES ('cases', ?) "
        "ON CONFLICT(name) DO UPDATE SET at_ms = excluded.at_ms",
        [now_ms],
    )
    return True


def _iso(ms: int | None) -> str:
    if ms is None:
        return "an unknown time"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _int(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- devices ---------------------------------------------------------------------------------


#: ``_still_owed`` answers, per (database, device): (last_seen_ms, journal_seq, owed,
#: checked at). It reads a device's whole history up to ``journal_seq`` (≈ 0.1 s at 300,000
#: records) and ``watch`` runs every second for every device offline with a backlog, in
#: the ingest thread's write transaction. While a device stays offline nothing of its
#: can arrive, so the answer stands until it is heard from again; "owed" is asked again
#: once a minute (a last file may still have been verifying when it went).
_OWED: OrderedDict[tuple[str, str], tuple[int | None, int | None, bool, int]] = OrderedDict()
OWED_CACHE_MAX = 4096
OWED_RECHECK_MS = 60_000


def _still_owed_cached(
    conn: sqlite3.Connection,
    database: str,
    device_id: str,
    last_seen: int | None,
    head: int | None,
    now_ms: int,
) -> bool:
    key = (database, device_id)
    hit = _OWED.get(key)
    if hit is not None and hit[:2] == (last_seen, head):
        owed, checked = hit[2], hit[3]
        if not owed or now_ms - checked < OWED_RECHECK_MS:
            return owed
    owed = _still_owed(conn, device_id, head)
    _OWED[key] = (last_seen, head, owed, now_ms)
    _OWED.move_to_end(key)
    while len(_OWED) > OWED_CACHE_MAX:
        _OWED.popitem(last=False)
    return owed


def _still_owed(conn: sqlite3.Connection, device_id: str, head: int | None) -> bool:
    """Whether the backlog a device's last telemetry reported is still not all here.

    Telemetry is sent every few seconds, so the last one before a device goes offline
    often predates the uploads that emptied its backlog (a clean shutdown right after
    its receipts, say): trusted alone, it raised "evidence the gateway does not have"
    for evidence the gateway had. What the device held then was its journal up to
    ``journal_seq`` and the files those records describe: owed while a record is missing
    here, or a file is neither stored nor refused (a refused file stays on the device,
    journalled, and no longer counts as backlog there). Without a ``journal_seq`` the
    telemetry is taken at its word.
    """
    if head is None or head <= 0:
        return head is None
    (records,) = conn.execute(
        "SELECT count(*) FROM journal WHERE device_id = ? AND seq <= ?", [device_id, head]
    ).fetchone()
    if records < head:
        return True
    kinds = sorted(MEDIA_KINDS)
    missing = conn.execute(
        "SELECT 1 FROM journal j WHERE j.device_id = ? AND j.seq <= ? "
        f"AND j.kind IN ({', '.join('?' * len(kinds))}) "
        "AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.device_id = j.device_id "
        "AND e.seq = j.seq) "
        "AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.device_id = j.device_id "
        "AND u.seq = j.seq AND u.state = 'rejected') ORDER BY j.seq DESC LIMIT 1",
        [device_id, head, *kinds],
    ).fetchone()
    return missing is not None


def _device_conditions(conn: sqlite3.Connection, now_ms: int) -> list[Condition]:
    rows = conn.execute(
        "SELECT device_id, online, last_seen_ms, telemetry FROM devices "
        "WHERE status = 'active' AND telemetry IS NOT NULL ORDER BY device_id"
    ).fetchall()
    found = []
    database = str(conn.execute("PRAGMA database_list").fetchone()[2])  # the cache's key
    for device_id, online, last_seen, text in rows:
        try:
            tele = json.loads(text)
        except ValueError:
            continue  # written by ingest from a validated message; nothing to judge by
        if not isinstance(tele, dict):
            continue
        items, size = _int(tele, "backlog_items") or 0, _int(tele, "backlog_bytes") or 0
        offline_ms = now_ms - last_seen if not online and last_seen is not None else 0
        if (
            offline_ms > OFFLINE_GRACE_MS
            and items > 0
            and _still_owed_cached(
                conn, database, device_id, last_seen, _int(tele, "journal_seq"), now_ms
            )
        ):
            oldest = _int(tele, "oldest_unacked_age_s")
            found.append(
                Condition(
                    "device_offline_backlog",
                    device_id,
                    device_id,
                    f"{device_id} has been offline since {_iso(last_seen)} holding {items} "
                    f"item(s), {size} bytes, that the gateway does not have yet"
                    + (f" (the oldest {oldest} s old when last heard from)" if oldest else "")
                    + ": bring it back into network coverage or dock it",
                )
            )
        battery = _int(tele, "battery_pct")
        recording = tele.get("recording") is True
        if recording and battery is not None and 0 <= battery <= BATTERY_LOW_PCT:
            found.append(
                Condition(
                    "battery_low_recording",
                    device_id,
                    device_id,
                    f"{device_id} is recording on {battery} % battery and will stop when it "
                    "runs out: swap or charge the battery",
                )
            )
        headroom = _int(tele, "storage_headroom_min")
        if headroom is not None and headroom < STORAGE_LOW_MIN:
            found.append(
                Condition(
                    "storage_low",
                    device_id,
                    device_id,
                    f"{device_id} has room for {headroom} min of recording (under "
                    f"{STORAGE_LOW_MIN}); it stops recording when full: let it upload its "
                    "backlog or dock it",
                )
            )
    return found


# -- cases -----------------------------------------------------------------------------------


def _case_conditions(conn: sqlite3.Connection, now_ms: int) -> list[Condition]:
    return [
        *_steps_without_recording(conn, now_ms),
        *_overdue_steps(conn, now_ms),
        *_recordings_outside_steps(conn, now_ms),
    ]


def _step_device(conn: sqlite3.Connection, step_id: int, officers: list[str]) -> str:
    """Whose alarm list shows a step's alarm (alarms are scoped by device): the first
    device with media bound to the step, else its first officer's device, else none."""
    row = conn.execute(
        f"SELECT b.device_id FROM bindings b WHERE b.step_id = ? AND {_CURRENT} "
        "ORDER BY b.device_id, b.seq LIMIT 1",
        [step_id],
    ).fetchone()
    if row is not None:
        return str(row[0])
    for officer in officers:
        devices = sorted(cases.devices_of_officer(conn, officer))
        if devices:
            return devices[0]
    return ""


def _step_label(step: dict[str, Any]) -> str:
    return f"step {step['id']} ({step['name']}) of case {step['case_id']}"


def _steps_without_recording(conn: sqlite3.Connection, now_ms: int) -> list[Condition]:
    rows = conn.execute(
        "SELECT s.id FROM steps s WHERE s.recording_required = 1 AND s.end_ms IS NOT NULL "
        "AND s.end_ms < ? AND NOT EXISTS (SELECT 1 FROM bindings b JOIN journal j ON "
        "j.device_id = b.device_id AND j.seq = b.seq WHERE b.step_id = s.id AND "
        f"j.kind = 'segment' AND {_CURRENT}) ORDER BY s.id",
        [now_ms],
    ).fetchall()
    found = []
    for (step_id,) in rows:
        step = cases.step_row(conn, step_id)
        assert step is not None
        found.append(
            Condition(
                "step_without_recording",
                f"step {step_id}",
                _step_device(conn, step_id, step["officers"]),
                f"{_step_label(step)} requires whole-course recording and ended "
                f"{_iso(step['end_ms'])}, but no recording is bound to it: bind the "
                "recording through the review queue, or have the agency explain why",
            )
        )
    return found


def _overdue_steps(conn: sqlite3.Connection, now_ms: int) -> list[Condition]:
    # Cheap pre-selection (``coverage`` decides): an ended step that still owes evidence,
    # i.e. media bound to it whose bytes never arrived, or no media at all when recording
    # is required.
    rows = conn.execute(
        "SELECT s.id FROM steps s WHERE s.end_ms IS NOT NULL AND s.end_ms < ? AND ("
        f"EXISTS (SELECT 1 FROM bindings b WHERE b.step_id = s.id AND {_CURRENT} AND NOT "
        "EXISTS (SELECT 1 FROM evidence e WHERE e.device_id = b.device_id AND e.seq = b.seq)) "
        "OR (s.recording_required = 1 AND NOT EXISTS (SELECT 1 FROM bindings b WHERE "
        f"b.step_id = s.id AND {_CURRENT}))) ORDER BY s.id",
        [now_ms],
    ).fetchall()
    found = []
    for (step_id,) in rows:
        report = cases.coverage(conn, step_id, now_ms)
        if not report["overdue"]:
            continue
        missing = [e for e in report["evidence"] if e["arrival"] == "overdue"]
        owed = (
            f"{len(missing)} bound item(s) have not arrived"
            if missing
            else "no recording is bound to it"
        )
        found.append(
            Condition(
                "evidence_overdue",
                f"step {step_id}",
                _step_device(conn, step_id, report["officers"]),
                f"{_step_label({**report, 'id': step_id})}: evidence was due by "
                f"{report['due_day']} (3 working days after the step, Art. 19) and {owed}: "
                "have the devices upload, or bind the recordings that belong to it",
            )
        )
    return found


def _recordings_outside_steps(conn: sqlite3.Connection, now_ms: int) -> list[Condition]:
    rows = conn.execute(
        "SELECT q.device_id, q.seq, j.record FROM review_queue q JOIN journal j ON "
        "j.device_id = q.device_id AND j.seq = q.seq WHERE q.state = 'open' AND "
        "q.reason = 'unmatched' AND j.kind = 'segment' AND q.opened_ms < ? "
        "ORDER BY q.device_id, q.seq",
        [now_ms - UNMATCHED_GRACE_MS],
    ).fetchall()
    recordings: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for device_id, seq, record in rows:
        body = json.loads(record).get("body", {})
        recording = _int(body, "recording_id")
        name = f"recording {recording}" if recording is not None else f"seq {seq}"
        start = _int(body, "start_wall_ms") or 0
        end = _int(body, "end_wall_ms") or start
        recordings.setdefault((device_id, name), []).append((seq, start, end))
    found = []
    for (device_id, name), segments in recordings.items():
        seqs = ", ".join(str(s) for s, _, _ in segments)
        found.append(
            Condition(
                "recording_outside_step",
                f"{device_id} {name}",
                device_id,
                f"{name} on {device_id} ({_iso(min(s for _, s, _ in segments))} to "
                f"{_iso(max(e for _, _, e in segments))}; journal seq {seqs}) matches no case "
                f"step after {UNMATCHED_GRACE_MS // 60_000} minutes (Art. 20): bind it to its "
                "step through the review queue, or record that it belongs to none",
            )
        )
    return found
