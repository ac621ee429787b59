"""Operations: condition alarms that raise and resolve themselves (``gateway.watch``), the
alarm lifecycle through the API, and ``GET /metrics``.

Real parts in one process (``tests/field.py``): enrolled devices with real signed journals
and outboxes, the real ingest (telemetry, birth/death state, journal, uploads), the real
FastAPI app with its own authentication and scopes. The test controls one thing: the
clock ``watch`` and the binding pass are run with (``World.tick``), so "offline for a
minute" or "unmatched for ten minutes" take no waiting. Ticks run at or after the real
clock, which stamped what ingest stored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import cases, metrics
from gateway.db import transaction
from gateway.watch import watch
from protocol.encoding import decode
from protocol.journal import SignedRecord
from protocol.signing import SigningKey
from protocol.topics import DeviceTopic, device_topic
from protocol.upload import JournalBatch
from tests.field import O1, O3, FieldWorld, at, now


class World(FieldWorld):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, {"cam-a": O1, "cam-x": O3})

    def tick(self, at_ms: int) -> None:
        """One housekeeping second at ``at_ms``: the binding pass, then the watch."""
        with transaction(self.db) as conn:
            cases.bind_pending(conn, at_ms)
            watch(conn, at_ms)

    def alarms(self, kind: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/alarms", kind=kind))

    def alarm(self, alarm_id: int) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/alarms/{alarm_id}"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def events(alarm: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["actor"], e["action"]) for e in alarm["events"]]


# -- watch: device conditions ----------------------------------------------------------------


def test_a_device_that_went_offline_after_its_backlog_arrived_owes_nothing(world: World) -> None:
    # Found by a tester: a clean shutdown right after the receipts. The last telemetry
    # predated the uploads and still counted them, and a minute later the gateway raised
    # "holding 2 item(s) that the gateway does not have yet" for evidence it held.
    a = world.devices["cam-a"]
    a.state(True)
    first = a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:05"))
    a.segment(at("2025-09-30T10:05"), at("2025-09-30T10:06"))
    a.telemetry(backlog_items=2, backlog_bytes=5_000, journal_seq=first + 1)
    a.deliver()  # both arrive after that telemetry
    a.state(False)
    (last_seen,) = world.db.execute(
        "SELECT last_seen_ms FROM devices WHERE device_id = 'cam-a'"
    ).fetchone()
    world.tick(last_seen + 120_000)
    assert world.alarms("device_offline_backlog") == []

    # What the gateway still lacks keeps the alarm: a record of a file never uploaded.
    a.state(True)
    owed = a.segment(at("2025-09-30T10:10"), at("2025-09-30T10:15"))
    a.send_journal()  # the record arrives, its file does not
    a.telemetry(backlog_items=1, backlog_bytes=2_048, journal_seq=owed)
    a.state(False)
    (last_seen,) = world.db.execute(
        "SELECT last_seen_ms FROM devices WHERE device_id = 'cam-a'"
    ).fetchone()
    world.tick(last_seen + 120_000)
    (alarm,) = world.alarms("device_offline_backlog")
    assert "1 item(s)" in alarm["detail"]


def test_what_an_offline_device_owes_is_read_once_per_absence_not_every_second(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It reads the device's whole history (≈ 0.1 s at 300,000 records), and the watch
    # runs every second, in the ingest thread's write transaction, for every such device.
    from gateway import watch as watch_module

    calls: list[str] = []
    real = watch_module._still_owed
    monkeypatch.setattr(
        watch_module, "_still_owed", lambda c, d, h: (calls.append(d), real(c, d, h))[1]
    )
    a = world.devices["cam-a"]
    a.state(True)
    seq = a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:05"))
    a.telemetry(backlog_items=1, backlog_bytes=2_048, journal_seq=seq)
    a.deliver()
    a.state(False)
    (last_seen,) = world.db.execute(
        "SELECT last_seen_ms FROM devices WHERE device_id = 'cam-a'"
    ).fetchone()
    for second in range(5):
        world.tick(last_seen + 61_000 + 1000 * second)
    assert calls == ["cam-a"] and world.alarms("device_offline_backlog") == []


def test_device_conditions_raise_alarms_that_resolve_themselves(world: World) -> None:
    a, x = world.devices["cam-a"], world.devices["cam-x"]
    a.state(True)
    x.state(True)
    # Four records (and their files) the gateway has never seen.
    a.telemetry(backlog_items=4, backlog_bytes=4_000_000, oldest_unacked_age_s=90, journal_seq=4)
    x.telemetry(backlog_items=0)  # offline owing nothing is no alarm
    a.state(False)
    x.state(False)
    (last_seen,) = world.db.execute(
        "SELECT last_seen_ms FROM devices WHERE device_id = 'cam-a'"
    ).fetchone()

    world.tick(last_seen + 60_000)  # a minute is the grace, not yet an alarm
    assert world.alarms("device_offline_backlog") == []
    world.tick(last_seen + 60_001)
    (offline,) = world.alarms("device_offline_backlog")
    assert (offline["device_id"], offline["state"]) == ("cam-a", "open")
    assert "4 item(s), 4000000 bytes" in offline["detail"] and "90 s" in offline["detail"]
    (row,) = world.db.execute(
        "SELECT dedupe, count, first_ms FROM alarms WHERE id = ?", [offline["id"]]
    ).fetchall()
    # The same dedupe shape as gateway.alarms.raise_alarm: kind|device|key.
    assert row == (f"device_offline_backlog|cam-a|cam-a since {last_seen + 60_001}", 1,
                   last_seen + 60_001)  # fmt: skip
    world.tick(last_seen + 70_000)  # still holds: the same alarm, not a second one
    assert [a["id"] for a in world.alarms("device_offline_backlog")] == [offline["id"]]

    a.state(True)  # back: a new session
    t = now()
    world.tick(t)
    resolved = world.alarm(offline["id"])
    assert resolved["state"] == "resolved"
    assert events(resolved) == [("gateway", "auto_resolve")]
    assert resolved["last_at"] == world.alarm(offline["id"])["last_at"]

    # Battery: only while recording, only 0..15 % (-1 is "unknown").
    for step, (recording, battery) in enumerate(((True, 16), (False, 5), (True, -1))):
        a.telemetry(recording=recording, battery_pct=battery)
        world.tick(t + 1000 * (step + 1))
    assert world.alarms("battery_low_recording") == []
    a.telemetry(recording=True, battery_pct=15)
    world.tick(t + 5000)
    (battery_alarm,) = world.alarms("battery_low_recording")
    assert "15 %" in battery_alarm["detail"] and battery_alarm["state"] == "open"
    a.telemetry(battery_pct=9)
    world.tick(t + 6000)
    (still,) = world.alarms("battery_low_recording")
    assert still["id"] == battery_alarm["id"] and "9 %" in still["detail"]
    assert still["count"] == 1 and still["last_at"] > battery_alarm["last_at"]
    a.telemetry(recording=False)  # stopped recording: nothing left to lose to the battery
    world.tick(t + 7000)
    assert world.alarm(battery_alarm["id"])["state"] == "resolved"

    # Storage: fewer than 60 minutes of headroom.
    a.telemetry(storage_headroom_min=60)
    world.tick(t + 8000)
    assert world.alarms("storage_low") == []
    a.telemetry(storage_headroom_min=59)
    world.tick(t + 9000)
    (storage,) = world.alarms("storage_low")
    assert storage["device_id"] == "cam-a" and "59 min" in storage["detail"]
    a.telemetry(storage_headroom_min=600)
    world.tick(t + 10_000)
    assert world.alarm(storage["id"])["state"] == "resolved"

    # Nothing was deleted: every alarm ever raised is still there.
    ids = {r[0] for r in world.db.execute("SELECT id FROM alarms")}
    assert {offline["id"], battery_alarm["id"], storage["id"]} <= ids


def test_a_person_resolving_a_standing_condition_is_not_overruled(world: World) -> None:
    a = world.devices["cam-a"]
    operator = world.user("hp-op", "operator", agency_id="hp-ue")
    a.telemetry(storage_headroom_min=30)
    t = now()
    world.tick(t)
    (first,) = world.alarms("storage_low")
    r = world.api.post(f"/api/v1/alarms/{first['id']}/resolve",
                       json={"note": "replacement card ordered"}, headers=operator)  # fmt: skip
    assert r.status_code == 200, r.text
    world.tick(t + 1000)  # still 30 minutes: the person's decision stands
    assert [(x["id"], x["state"]) for x in world.alarms("storage_low")] == [
        (first["id"], "resolved")
    ]
    a.telemetry(storage_headroom_min=600)
    world.tick(t + 2000)  # the condition ended: noted, so that a return is a new alarm
    assert events(world.alarm(first["id"])) == [("hp-op", "resolve"), ("gateway", "cleared")]
    world.tick(t + 3000)  # noted once
    assert len(world.alarm(first["id"])["events"]) == 2

    a.telemetry(storage_headroom_min=20)
    world.tick(t + 4000)
    second = next(x for x in world.alarms("storage_low") if x["id"] != first["id"])
    assert second["state"] == "open" and "20 min" in second["detail"]
    # Acknowledged, then the condition ends: the gateway resolves it.
    r = world.api.post(f"/api/v1/alarms/{second['id']}/acknowledge", json={"note": "seen"},
                       headers=operator)  # fmt: skip
    assert r.status_code == 200, r.text
    a.telemetry(storage_headroom_min=600)
    world.tick(t + 5000)
    done = world.alarm(second["id"])
    assert done["state"] == "resolved"
    assert events(done) == [("hp-op", "acknowledge"), ("gateway", "auto_resolve")]
    assert done["events"][0]["note"] == "seen"


# -- watch: case conditions ------------------------------------------------------------------


def test_a_step_never_recorded_then_its_evidence_arriving_late(world: World) -> None:
    a = world.devices["cam-a"]
    case = world.post(
        "/api/v1/cases",
        {"id": "HP-1", "agency_id": "hp-ue", "case_type": "penalty",
         "steps": [
             {"step_type": "filing", "officers": [O1],
              "start_ms": at("2025-09-30T09:00"), "end_ms": at("2025-09-30T09:30")},
             {"step_type": "investigation", "officers": [O1],
              "start_ms": at("2025-09-30T10:00"), "end_ms": at("2025-09-30T10:30")},
         ]},
    )  # fmt: skip
    steps = {s["step_type"]: s["step_id"] for s in case["steps"]}
    inv = steps["investigation"]
    t = now()
    world.tick(t)
    # Filing needs no recording; the investigation does, and nothing is bound to it.
    (without,) = world.alarms("step_without_recording")
    assert without["device_id"] == "cam-a"  # the officer's device: its operators see it
    assert f"step {inv} (investigation" in without["detail"]
    (overdue,) = world.alarms("evidence_overdue")
    assert f"step {inv} " in overdue["detail"] and "2025-10-11" in overdue["detail"]
    assert "no recording is bound" in overdue["detail"]
    # On the dashboard, an alarm about a step links to its case.
    page = world.api.get("/dashboard/alarms", headers=world.admin).text
    assert f'href="/dashboard/cases/HP-1#step-{inv}"' in page

    # The manifest arrives (and binds), the bytes do not: recorded, but still owed.
    a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:30"))
    a.send_journal()
    world.tick(t + 60_000)
    assert world.alarm(without["id"])["state"] == "resolved"
    (still,) = world.alarms("evidence_overdue")
    assert still["id"] == overdue["id"] and still["state"] == "open"
    assert "1 bound item(s) have not arrived" in still["detail"]

    a.send_media()
    world.tick(t + 120_000)
    assert world.alarm(overdue["id"])["state"] == "resolved"
    report = next(s for s in world.get("/api/v1/cases/HP-1")["steps"] if s["step_id"] == inv)
    assert report["late"] and not report["overdue"]  # what the alarm followed


def test_a_recording_outside_every_step_and_its_resolution(world: World) -> None:
    a = world.devices["cam-a"]
    a.segment(at("2026-05-06T10:00"), at("2026-05-06T10:06"), recording_id=7)
    a.segment(at("2026-05-06T10:06"), at("2026-05-06T10:12"), recording_id=7)
    loose = a.segment(at("2026-05-07T08:00"), at("2026-05-07T08:05"))  # no recording id
    a.send_journal()
    a.send_media()
    t = now()
    world.tick(t)  # the binding pass queues all three as unmatched
    assert {q["reason"] for q in world.get("/api/v1/review-queue")} == {"unmatched"}
    world.tick(t + 600_000)  # ten minutes is the grace
    assert world.alarms("recording_outside_step") == []
    world.tick(t + 660_000)
    alarms = {x["detail"].split(" on ")[0]: x for x in world.alarms("recording_outside_step")}
    assert set(alarms) == {"recording 7", f"seq {loose}"}  # one per recording, not per segment
    assert all(x["device_id"] == "cam-a" for x in alarms.values())
    detail = alarms["recording 7"]["detail"]
    assert "2026-05-06T02:00:00+00:00 to 2026-05-06T02:12:00+00:00; journal seq 1, 2" in detail

    # The step is docked later; the binding pass binds the recording at once, but the
    # case conditions are looked at once a minute.
    world.post(
        "/api/v1/cases",
        {"id": "HP-2", "agency_id": "hp-ue", "case_type": "inspection",
         "steps": [{"step_type": "on_site_inspection", "officers": [O1],
                    "start_ms": at("2026-05-06T09:55"), "end_ms": at("2026-05-06T10:15")}]},
    )  # fmt: skip
    world.tick(t + 665_000)
    assert world.alarm(alarms["recording 7"]["id"])["state"] == "open"
    world.tick(t + 720_000)
    assert world.alarm(alarms["recording 7"]["id"])["state"] == "resolved"
    assert world.alarm(alarms[f"seq {loose}"]["id"])["state"] == "open"

    # A reviewer records that the other one belongs to no step.
    reviewer = world.user("hp-reviewer", "reviewer", agency_id="hp-ue")
    world.post(f"/api/v1/review-queue/cam-a/{loose}", {"step_id": None}, reviewer)
    world.tick(t + 780_000)
    assert world.alarm(alarms[f"seq {loose}"]["id"])["state"] == "resolved"
    assert world.alarms("step_without_recording") == []  # HP-2's step is recorded


# -- lifecycle -------------------------------------------------------------------------------


def test_alarm_lifecycle_scope_roles_conflicts_and_audit(world: World) -> None:
    a, x = world.devices["cam-a"], world.devices["cam-x"]
    a.telemetry(storage_headroom_min=10)
    x.telemetry(storage_headroom_min=10)
    world.tick(now())
    mine = next(x for x in world.alarms("storage_low") if x["device_id"] == "cam-a")["id"]
    theirs = next(x for x in world.alarms("storage_low") if x["device_id"] == "cam-x")["id"]
    hp_op = world.user("hp-op", "operator", agency_id="hp-ue")
    hx_op = world.user("hx-op", "operator", agency_id="hx-ue")
    hp_auditor = world.user("hp-aud", "auditor", agency_id="hp-ue")

    def post(alarm_id: int, action: str, who: dict[str, str], note: str = "") -> Any:
        return world.api.post(f"/api/v1/alarms/{alarm_id}/{action}", json={"note": note},
                              headers=who)  # fmt: skip

    assert world.api.get("/api/v1/alarms/999999", headers=world.admin).status_code == 404
    assert post(999999, "acknowledge", world.admin).status_code == 404
    assert world.api.post(f"/api/v1/alarms/{mine}/acknowledge", json={}).status_code == 401
    # Out of scope looks exactly like absent.
    assert world.api.get(f"/api/v1/alarms/{mine}", headers=hx_op).status_code == 404
    assert post(mine, "acknowledge", hx_op).status_code == 404
    # In scope but not an operator: may look, may not act.
    assert world.api.get(f"/api/v1/alarms/{mine}", headers=hp_auditor).status_code == 200
    assert post(mine, "acknowledge", hp_auditor).status_code == 403
    assert post(mine, "resolve", hp_auditor).status_code == 403
    bad = world.api.post(f"/api/v1/alarms/{mine}/acknowledge", json={"note": "x", "by": "me"},
                         headers=hp_op)  # fmt: skip
    assert bad.status_code == 422
    assert world.alarm(mine)["state"] == "open" and world.alarm(mine)["events"] == []

    r = post(mine, "acknowledge", hp_op, "driving over with a spare card")
    assert r.status_code == 200 and r.json()["state"] == "acknowledged"
    again = post(mine, "acknowledge", hp_op)
    assert again.status_code == 409 and "acknowledged" in again.json()["detail"]
    r = post(mine, "resolve", hp_op, "card swapped")
    assert r.status_code == 200 and r.json()["state"] == "resolved"
    assert post(mine, "resolve", hp_op).status_code == 409
    assert post(mine, "acknowledge", hp_op).status_code == 409  # a resolved alarm stays so
    # Open straight to resolved is allowed (the admin sees every device).
    r = post(theirs, "resolve", world.admin, "false reading, sensor replaced")
    assert r.status_code == 200 and r.json()["state"] == "resolved"

    shown = world.alarm(mine)
    assert [(e["actor"], e["action"], e["note"]) for e in shown["events"]] == [
        ("hp-op", "acknowledge", "driving over with a spare card"),
        ("hp-op", "resolve", "card swapped"),
    ]
    assert all(e["at"] for e in shown["events"])
    log = world.get("/api/v1/audit")
    assert log["chain_intact"], log["problems"]
    rows = [(e["actor"], e["action"], e["target"], e["detail"]) for e in log["entries"]
            if e["action"].startswith("alarm_")]  # fmt: skip
    assert rows == [
        ("hp-op", "alarm_acknowledge", f"alarm/{mine}",
         {"kind": "storage_low", "device_id": "cam-a", "from": "open",
          "note": "driving over with a spare card"}),
        ("hp-op", "alarm_resolve", f"alarm/{mine}",
         {"kind": "storage_low", "device_id": "cam-a", "from": "acknowledged",
          "note": "card swapped"}),
        ("admin", "alarm_resolve", f"alarm/{theirs}",
         {"kind": "storage_low", "device_id": "cam-x", "from": "open",
          "note": "false reading, sensor replaced"}),
    ]  # fmt: skip


# -- metrics ---------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass
class Exposition:
    types: dict[str, str]
    helps: dict[str, str]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse_labels(text: str) -> dict[str, str]:
    labels, i = {}, 0
    while i < len(text):
        m = _LABEL.match(text, i)
        assert m, f"bad label at {text[i:]!r}"
        i, chars = m.end(), []
        while text[i] != '"':
            if text[i] == "\\":
                chars.append(_UNESCAPE[text[i + 1]])
                i += 2
            else:
                chars.append(text[i])
                i += 1
        labels[m.group(1)] = "".join(chars)
        i += 1
        if i < len(text):
            assert text[i] == ",", text[i:]
            i += 1
    return labels


def parse_exposition(text: str) -> Exposition:
    """Text format 0.0.4, strictly: HELP and TYPE before a family's samples, every
    sample of a declared family, no duplicate series."""
    assert text.endswith("\n")
    out = Exposition({}, {}, {})
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            out.helps[name] = help_text.replace("\\n", "\n").replace("\\\\", "\\")
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name in out.helps, f"TYPE before HELP for {name}"
            out.types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels = m.group(1), parse_labels(m.group(2) or "")
            family = next(
                (f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in out.types),
                None,
            )
            assert family is not None, f"{name} has no TYPE"
            assert family == name or out.types[family] == "histogram", name
            key = (name, frozenset(labels.items()))
            assert key not in out.samples, f"duplicate series {key}"
            out.samples[key] = float(m.group(3))
    return out


def test_exposition_escapes_label_values_and_help() -> None:
    tricky = 'a "quoted" \\path\\ and a\nnewline'
    text = metrics.render(
        [
            metrics.Family(
                "custody_test",
                "gauge",
                "help with \\ and\nnewline",
                (
                    metrics.Sample((("v", tricky),), 1.5),
                    metrics.Sample((("v", ""),), float("inf")),
                ),
            )
        ]
    )
    assert '{v="a \\"quoted\\" \\\\path\\\\ and a\\nnewline"} 1.5' in text
    parsed = parse_exposition(text)
    assert parsed.value("custody_test", v=tricky) == 1.5
    assert parsed.value("custody_test", v="") == float("inf")
    assert parsed.helps["custody_test"] == "help with \\ and\nnewline"


def test_metrics_are_computed_from_the_database_and_need_an_operator(world: World) -> None:
    a, x = world.devices["cam-a"], world.devices["cam-x"]
    a.state(True)
    x.state(True)
    x.state(False)
    a.segment(at("2026-05-06T10:00"), at("2026-05-06T10:06"))
    a.segment(at("2026-05-06T10:06"), at("2026-05-06T10:12"))
    a.send_journal()
    a.send_media()
    a.telemetry(backlog_items=3, backlog_bytes=3000)
    x.telemetry(backlog_items=5, backlog_bytes=5000, storage_headroom_min=10)
    # Refused input: a batch signed by a key that is not the device's (twice), and a
    # telemetry message that does not decode.
    a.device.journal.append("mark", {"note": "forged envelope"})
    records = tuple(SignedRecord.from_wire(decode(r)) for _, r in a.device.journal.unacked(9))
    forged = JournalBatch("cam-a", 99, records).encode(SigningKey.generate())
    for _ in range(2):
        world.ingest.handle(device_topic("cam-a", DeviceTopic.JOURNAL), forged)
    world.ingest.handle(device_topic("cam-x", DeviceTopic.TELEMETRY), b"\x00 not telemetry")
    world.tick(now())
    (low,) = world.alarms("storage_low")
    world.post(f"/api/v1/alarms/{low['id']}/acknowledge", {"note": "seen"})

    # Who may scrape: the whole fleet's numbers, so an operator who sees everything.
    assert world.api.get("/metrics").status_code == 401
    world.post("/api/v1/users", {"name": "prometheus", "role": "operator"})
    token = world.post("/api/v1/users/prometheus/tokens", {})["token"]
    for who, status in (
        (world.user("hp-op", "operator", agency_id="hp-ue"), 403),
        (world.user("city-aud", "auditor"), 403),
        ({"Authorization": f"Bearer {token}"}, 200),
        (world.admin, 200),
    ):
        assert world.api.get("/metrics", headers=who).status_code == status
    r = world.api.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse_exposition(r.text)

    assert m.types["custody_journal_records_total"] == "counter"
    assert m.types["custody_receipt_latency_seconds"] == "histogram"
    assert m.value("custody_devices", state="online") == 1
    assert m.value("custody_devices", state="offline") == 1
    (journal,) = world.db.execute("SELECT count(*) FROM journal").fetchone()
    assert journal == 2 and m.value("custody_journal_records_total") == journal
    evidence = world.get("/api/v1/evidence")
    assert m.value("custody_evidence_total") == len(evidence) == 2
    assert m.value("custody_evidence_bytes_total") == sum(e["size"] for e in evidence)
    failures = m.series("custody_verification_failures_total")
    assert {dict(k)["kind"] for k in failures} == set(metrics.VERIFICATION_FAILURES)
    assert m.value("custody_verification_failures_total", kind="bad_signature") == 2
    assert m.value("custody_verification_failures_total", kind="bad_message") == 1
    assert sum(failures.values()) == 3

    listed = Counter((x["kind"], x["state"]) for x in world.get("/api/v1/alarms"))
    assert listed[("storage_low", "acknowledged")] == 1
    series = {(dict(k)["kind"], dict(k)["state"]): v for k, v in m.series("custody_alarms").items()}
    assert set(listed) <= set(series)
    assert all(series[key] == listed.get(key, 0) for key in series)

    assert m.value("custody_backlog_items") == 8
    assert m.value("custody_backlog_bytes") == 8000

    waits = [
        max(0, received - captured)
        for received, captured in world.db.execute("SELECT received_ms, captured_ms FROM evidence")
    ]
    buckets = sorted(
        (
            (float(dict(k)["le"]), v)
            for k, v in m.series("custody_receipt_latency_seconds_bucket").items()
        )
    )
    assert [le for le, _ in buckets][-1] == float("inf")
    assert all(v == sum(w <= le * 1000 for w in waits) for le, v in buckets)
    assert m.value("custody_receipt_latency_seconds_count") == len(waits) == 2
    assert m.value("custody_receipt_latency_seconds_sum") == pytest.approx(sum(waits) / 1000)
    # Everything in the journal arrived seconds ago, well inside the minute.
    assert m.value("custody_ingest_records_per_second") * 60 == pytest.approx(journal)


def test_telemetry_history_keeps_a_day(world: World) -> None:
    """Pruned by housekeeping (not on every telemetry message): older rows go, new stay."""
    from gateway.ingest import TELEMETRY_KEEP_MS

    a = world.devices["cam-a"]
    a.telemetry(battery_pct=50)
    old = now() - TELEMETRY_KEEP_MS - 60_000
    world.db.execute(
        "INSERT INTO telemetry_log(device_id, at_ms, battery_pct) VALUES ('cam-a', ?, 90)", [old]
    )
    assert world.db.execute("SELECT count(*) FROM telemetry_log").fetchone()[0] == 2
    world.ingest.housekeeping()
    rows = world.db.execute("SELECT battery_pct FROM telemetry_log").fetchall()
    assert rows == [(50,)]


def test_device_page_says_how_the_camera_fares(world: World) -> None:
    """Dropped frames and uploads held back for the encoder, from telemetry to the page."""
    a, x = world.devices["cam-a"], world.devices["cam-x"]
    a.state(True)
    x.state(True)
    a.telemetry(recording=True, dropped_frames=1, yields_to_capture=37)
    x.telemetry()  # no camera: says nothing of one
    page = world.api.get("/dashboard/devices/cam-a", headers=world.admin).text
    assert '<dd data-f="camera">1 dropped frame · uploads waited for the encoder 37×</dd>' in page
    a.telemetry(dropped_frames=0, yields_to_capture=38)
    page = world.api.get("/dashboard/devices/cam-a", headers=world.admin).text
    assert "0 dropped frames · uploads waited for the encoder 38×" in page
    page = world.api.get("/dashboard/devices/cam-x", headers=world.admin).text
    assert '<dd data-f="camera">—</dd>' in page


def test_telemetry_is_written_in_batches_and_in_order(world: World, monkeypatch) -> None:
    """A burst of telemetry is one transaction, written before any other kind of message
    is handled and when the service's batch is done (``flush``)."""
    import gateway.ingest as ingest_mod
    from protocol.state import DeviceState, Telemetry

    a, x = world.devices["cam-a"], world.devices["cam-x"]
    a.state(True)
    x.state(True)
    transactions = []
    real = ingest_mod.transaction

    def counting(db: Any, **kw: Any) -> Any:
        transactions.append(kw)
        return real(db, **kw)

    monkeypatch.setattr(ingest_mod, "transaction", counting)

    def tele(device_id: str, battery: int) -> bytes:
        return Telemetry(device_id, now(), 0, 0, 0, 0, 0, 10**9, battery_pct=battery).encode()

    def stored(device_id: str) -> Any:
        (text,) = world.db.execute(
            "SELECT telemetry FROM devices WHERE device_id = ?", [device_id]
        ).fetchone()
        return decode(text.encode())["battery_pct"] if text else None

    logged = world.db.execute("SELECT count(*) FROM telemetry_log").fetchone()[0]
    for battery in range(50, 60):
        for d in ("cam-a", "cam-x"):
            world.ingest.handle(device_topic(d, DeviceTopic.TELEMETRY), tele(d, battery))
    assert transactions == [] and stored("cam-a") is None  # not yet written
    # Another kind of message: what came before it is stored first, in one transaction.
    world.ingest.handle(
        device_topic("cam-x", DeviceTopic.STATE), DeviceState("cam-x", False, 1, now()).encode()
    )
    assert transactions[0] == {"durable": False} and len(transactions) == 2  # + the state's
    assert (stored("cam-a"), stored("cam-x")) == (59, 59)  # the latest of each device
    assert world.db.execute("SELECT count(*) FROM telemetry_log").fetchone()[0] == logged + 20
    world.ingest.handle(device_topic("cam-a", DeviceTopic.TELEMETRY), tele("cam-a", 7))
    assert stored("cam-a") == 59
    world.ingest.flush()  # the service's batch is done
    assert stored("cam-a") == 7
    # A long burst is written every TELEMETRY_BATCH messages, not held without bound.
    transactions.clear()
    for i in range(ingest_mod.TELEMETRY_BATCH):
        world.ingest.handle(device_topic("cam-a", DeviceTopic.TELEMETRY), tele("cam-a", i % 90))
    assert len(transactions) == 1 and stored("cam-a") == (ingest_mod.TELEMETRY_BATCH - 1) % 90
