"""Cases and full-process recording: a penalty case walked through its steps.

Real parts throughout, in one process: three enrolled devices keep real (sealed, signed)
journals; what they send goes through the real ingest (signature, chain, upload, blob
store, transparency log), and the docking API, scopes, review and amendments are driven
through the real FastAPI app. The only thing the test controls is the clock the devices
stamp their records with, so steps can sit around the 2025 National Day holiday (Oct
1–8, with Sunday Sep 28 and Saturday Oct 11 as make-up working days).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.field import CST, O1, O2, O3, FieldWorld, at


class World(FieldWorld):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        assignments = {"cam-a": O1, "cam-b": O2, "cam-c": O1, "cam-x": O3}
        super().__init__(tmp_path, assignments, monkeypatch)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World(tmp_path, monkeypatch)
    yield w
    w.close()


def step_of(case: dict[str, Any], step_type: str) -> dict[str, Any]:
    return next(s for s in case["steps"] if s["step_type"] == step_type)


def test_a_penalty_case_through_its_steps(world: World) -> None:
    a, b, c = world.devices["cam-a"], world.devices["cam-b"], world.devices["cam-c"]
    # Evidence that arrives BEFORE the case is docked: the investigation's recordings.
    a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:06"))
    a.segment(at("2025-09-30T10:06"), at("2025-09-30T10:12"))
    a.record(at("2025-09-30T10:12:01"), "recording_stopped", reason="battery_low", recording_id=1)
    a.segment(at("2025-09-30T10:15"), at("2025-09-30T10:30"))
    b.segment(at("2025-09-30T09:55"), at("2025-09-30T10:05"))  # starts before the step
    a.deliver()
    b.deliver()
    queue = world.get("/api/v1/review-queue")
    assert {q["reason"] for q in queue} == {"unmatched"} and len(queue) == 4

    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    yesterday = dt.datetime.now(CST).date() - dt.timedelta(days=1)
    case = world.post(
        "/api/v1/cases",
        {
            "id": "HP-2025-0042",
            "agency_id": "hp-ue",
            "case_type": "penalty",
            "title": "unlicensed street vending, 12 Example Road",
            "steps": [
                {"step_type": "filing", "officers": [O1],
                 "start_ms": at("2025-09-30T09:00"), "end_ms": at("2025-09-30T09:30")},
                {"step_type": "investigation", "officers": [O1, O2],
                 "start_ms": at("2025-09-30T10:00"), "end_ms": at("2025-09-30T10:30")},
                {"step_type": "notification", "officers": [O1],
                 "start_ms": at("2025-09-30T14:00"), "end_ms": at("2025-09-30T14:20")},
                {"step_type": "hearing", "officers": [O1],
                 "start_ms": at(f"{yesterday}T10:00"), "end_ms": at(f"{yesterday}T10:20")},
                {"step_type": "service", "officers": [O2],
                 "start_ms": at("2025-10-09T09:00"), "end_ms": at("2025-10-09T09:10")},
                {"step_type": "execution", "officers": [O2], "start_ms": now - 600_000},
            ],
        },
    )  # fmt: skip
    # Docking the steps bound what was waiting; nothing is left in the queue.
    assert world.get("/api/v1/review-queue") == []
    hearing_id = step_of(case, "hearing")["step_id"]

    # Evidence arriving AFTER its step: the notification, with a gap nobody explained.
    a.segment(at("2025-09-30T14:00"), at("2025-09-30T14:08"))
    a.segment(at("2025-09-30T14:14"), at("2025-09-30T14:20"))
    a.deliver()
    # The hearing: recorded on the handheld (cam-c) carrying the step it was pushed.
    context = {"case_id": "HP-2025-0042", "step_id": hearing_id}
    c.segment(at(f"{yesterday}T09:59"), at(f"{yesterday}T10:10"), case=context)
    c.segment(at(f"{yesterday}T10:10"), at(f"{yesterday}T10:21"), case=context)
    c.deliver()
    # DURING the open execution step.
    b.segment(now - 300_000, now - 60_000)
    b.deliver()

    case = world.get("/api/v1/cases/HP-2025-0042")
    filing = step_of(case, "filing")
    assert not filing["recording_required"] and filing["due_day"] == "2025-10-11"

    inv = step_of(case, "investigation")
    assert inv["coverage_pct"] == 90.0  # 27 of 30 minutes
    assert len(inv["evidence"]) == 4
    assert {e["device_id"] for e in inv["evidence"]} == {"cam-a", "cam-b"}
    (gap,) = inv["gaps"]
    assert gap["duration_ms"] == 3 * 60_000 and gap["explained"]
    assert "battery_low" in gap["reasons"][0]["reason"]
    # Sep 30 ends: Oct 1–8 are holidays, Oct 9 and 10 work days, Sat Oct 11 a make-up day.
    assert inv["due_day"] == "2025-10-11" and inv["late"] and not inv["overdue"]
    assert {e["arrival"] for e in inv["evidence"]} == {"late"}

    note = step_of(case, "notification")
    (gap,) = note["gaps"]
    assert gap["duration_ms"] == 6 * 60_000 and not gap["explained"]
    assert gap["reasons"] == [{"reason": "unexplained"}]
    assert note["coverage_pct"] == 70.0 and note["late"]

    hearing = step_of(case, "hearing")
    assert hearing["coverage_pct"] == 100.0 and hearing["gaps"] == []
    assert not hearing["late"] and not hearing["overdue"]
    assert {e["arrival"] for e in hearing["evidence"]} == {"on_time"}

    # Ends Thu Oct 9: Fri Oct 10, the make-up Saturday Oct 11, Mon Oct 13. Nothing came.
    service = step_of(case, "service")
    assert service["due_day"] == "2025-10-13" and service["overdue"] and service["evidence"] == []

    execution = step_of(case, "execution")
    assert execution["due_day"] is None and not execution["late"] and not execution["overdue"]
    assert len(execution["evidence"]) == 1

    history = world.get("/api/v1/cases/HP-2025-0042/history")
    methods = {(h["device_id"], h["method"]) for h in history["bindings"]}
    assert ("cam-c", "explicit") in methods and ("cam-b", "officer_time") in methods

    by_officer = {s["officer"]: s for s in world.get("/api/v1/stats", by="officer")}
    assert by_officer[O1]["unexplained_gaps"] == 1  # the notification's
    assert by_officer[O2]["overdue_steps"] == 1
    text = world.get("/api/v1/stats", by="device", format="csv")
    devices = {row["device"]: row for row in csv.DictReader(io.StringIO(text))}
    assert devices["cam-a"]["evidence"] == "5" and devices["cam-c"]["evidence"] == "2"


def small_case(world: World, case_id: str, agency: str, officer: str) -> dict[str, Any]:
    return world.post(
        "/api/v1/cases",
        {
            "id": case_id,
            "agency_id": agency,
            "case_type": "inspection",
            "steps": [
                {"step_type": "on_site_inspection", "officers": [officer],
                 "start_ms": at("2025-09-30T10:00"), "end_ms": at("2025-09-30T10:30")},
                {"step_type": "notification", "officers": [officer],
                 "start_ms": at("2025-09-30T11:00"), "end_ms": at("2025-09-30T11:30")},
            ],
        },
    )  # fmt: skip


def test_a_binding_changes_only_by_an_approved_amendment_and_history_keeps_both(
    world: World,
) -> None:
    a = world.devices["cam-a"]
    case = small_case(world, "HP-7", "hp-ue", O1)
    inspection, notification = (s["step_id"] for s in case["steps"])
    seq = a.segment(at("2025-09-30T10:05"), at("2025-09-30T10:15"))
    a.deliver()
    clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    reviewer = world.user("hp-reviewer", "reviewer", agency_id="hp-ue")
    other_reviewer = world.user("hx-reviewer", "reviewer", agency_id="hx-ue")

    # There is no way to change a binding or a set time directly.
    r = world.api.patch(
        f"/api/v1/cases/HP-7/steps/{inspection}", json={"end_ms": at("2025-09-30T10:40")},
        headers=clerk,
    )  # fmt: skip
    assert r.status_code == 409 and "amendment" in r.json()["detail"]
    r = world.api.post(f"/api/v1/review-queue/cam-a/{seq}", json={"step_id": notification},
                       headers=reviewer)  # fmt: skip
    assert r.status_code == 404  # not in the queue: it is bound already

    rebind = world.post(
        "/api/v1/cases/HP-7/amendments",
        {"kind": "rebind", "payload": {"device_id": "cam-a", "seq": seq, "step_id": notification},
         "reason": "the clip shows the notification being read out"},
        clerk,
    )  # fmt: skip
    times = world.post(
        "/api/v1/cases/HP-7/amendments",
        {"kind": "step_times", "payload": {"step_id": inspection,
                                           "end_ms": at("2025-09-30T10:40")},
         "reason": "the case system recorded the end too early"},
        clerk,
    )  # fmt: skip
    report = world.get("/api/v1/cases/HP-7")
    assert [e["seq"] for e in step_of(report, "on_site_inspection")["evidence"]] == [seq]

    def decide(amendment: int, who: dict[str, str], approve: bool) -> Any:
        return world.api.post(
            f"/api/v1/amendments/{amendment}/decision",
            json={"approve": approve, "note": "checked"},
            headers=who,
        )

    assert decide(rebind["id"], clerk, True).status_code == 403  # not a reviewer
    assert decide(rebind["id"], other_reviewer, True).status_code == 404  # out of scope
    assert decide(rebind["id"], reviewer, True).json()["state"] == "approved"
    assert decide(rebind["id"], reviewer, False).status_code == 409  # decided once
    assert decide(times["id"], reviewer, True).json()["state"] == "approved"

    report = world.get("/api/v1/cases/HP-7")
    assert step_of(report, "on_site_inspection")["evidence"] == []
    assert [e["seq"] for e in step_of(report, "notification")["evidence"]] == [seq]
    assert step_of(report, "on_site_inspection")["end_ms"] == at("2025-09-30T10:40")
    history = world.get("/api/v1/cases/HP-7/history")
    mine = [h for h in history["bindings"] if h["seq"] == seq]
    assert [(h["step_id"], h["method"]) for h in mine] == [
        (inspection, "officer_time"),
        (notification, "amendment"),
    ]
    ends = [h for h in history["steps"] if h["step_id"] == inspection and h["field"] == "end_ms"]
    assert [(h["old"], h["new"]) for h in ends] == [
        (None, at("2025-09-30T10:30")),
        (at("2025-09-30T10:30"), at("2025-09-30T10:40")),
    ]
    assert "amendment" in ends[-1]["reason"]
    amendments = world.get("/api/v1/cases/HP-7/amendments")
    assert [a["state"] for a in amendments] == ["approved", "approved"]
    assert amendments[0]["reason"].startswith("the clip") and amendments[0]["decided_by"]


def test_ambiguous_evidence_waits_for_a_reviewer(world: World) -> None:
    a = world.devices["cam-a"]
    small_case(world, "HP-8", "hp-ue", O1)
    small_case(world, "HP-9", "hp-ue", O1)  # the same officer, the same hours
    seq = a.photo(at("2025-09-30T10:20"))
    a.deliver()
    (item,) = world.get("/api/v1/review-queue")
    assert item["reason"] == "ambiguous" and len(item["candidates"]) == 2
    reviewer = world.user("hp-reviewer", "reviewer", agency_id="hp-ue")
    target = item["candidates"][1]
    r = world.api.post(f"/api/v1/review-queue/cam-a/{seq}", json={"step_id": target},
                       headers=reviewer)  # fmt: skip
    assert r.status_code == 200, r.text
    assert world.get("/api/v1/review-queue") == []
    report = world.get("/api/v1/cases/HP-9")
    assert [e["seq"] for e in step_of(report, "on_site_inspection")["evidence"]] == [seq]


def opened_by_terminal(world: World, case_id: str) -> tuple[int, int]:
    """A case of one investigation step for O1, opened from O1's handheld terminal
    (``cam-c``) by a signed ``case_context`` record; (step id, when it opened)."""
    case = world.post(
        "/api/v1/cases",
        {"id": case_id, "agency_id": "hp-ue", "case_type": "penalty",
         "steps": [{"step_type": "investigation", "officers": [O1]}]},
    )  # fmt: skip
    step_id = case["steps"][0]["step_id"]
    opened = at("2026-11-20T09:00")
    world.devices["cam-c"].record(opened, "case_context", action="open", case_id=case_id,
                                  step_id=step_id, at_ms=opened)  # fmt: skip
    return step_id, opened


def test_the_terminal_opens_a_step_and_the_gateway_pushes_it_to_the_officers_devices(
    world: World,
) -> None:
    step_id, opened = opened_by_terminal(world, "HP-10")
    c = world.devices["cam-c"]  # the handheld terminal
    c.deliver()
    step = step_of(world.get("/api/v1/cases/HP-10"), "investigation")
    assert step["start_ms"] == opened and step["end_ms"] is None
    history = world.get("/api/v1/cases/HP-10/history")["steps"]
    assert history[-1]["actor"] == "device:cam-c" and "terminal" in history[-1]["reason"]
    # Both of O1's devices get the open step as a signed command.
    for device_id in ("cam-a", "cam-c"):
        commands = world.get(f"/api/v1/devices/{device_id}/commands")
        assert commands[-1]["name"] == "case_context"
        assert commands[-1]["args"] == {"case_id": "HP-10", "step_id": step_id}
    # Closing from the terminal clears the context on the devices.
    closed = at("2026-11-20T09:40")
    c.record(closed, "case_context", action="close", case_id="HP-10", step_id=step_id,
             at_ms=closed)  # fmt: skip
    c.deliver()
    assert step_of(world.get("/api/v1/cases/HP-10"), "investigation")["end_ms"] == closed
    assert world.get("/api/v1/devices/cam-a/commands")[-1]["args"] == {}


def test_a_terminal_time_past_9999_is_ignored_and_the_case_still_reads(world: World) -> None:
    # Stored as the step's end, it made the case, its coverage and the statistics answer
    # 422 for good (the due date three working days later cannot be computed).
    step_id, opened = opened_by_terminal(world, "HP-11")
    c = world.devices["cam-c"]
    c.record(opened, "case_context", action="close", case_id="HP-11", step_id=step_id,
             at_ms=253_402_300_801_000)  # fmt: skip
    c.deliver()
    step = step_of(world.get("/api/v1/cases/HP-11"), "investigation")
    assert step["start_ms"] == opened and step["end_ms"] is None
    assert world.api.get("/api/v1/stats", headers=world.admin).status_code == 200


def test_a_revoked_device_is_told_no_case_context(world: World) -> None:
    """A lost camera still assigned to the officer must not be sent, nor have queued, the
    open step's case id (found by a review: it was signed and queued for it)."""
    from gateway.registry import revoke

    revoke("cam-a", world.gw.root)
    step_id, opened = opened_by_terminal(world, "HP-11")
    c = world.devices["cam-c"]
    c.deliver()
    assert world.get("/api/v1/devices/cam-c/commands")[-1]["args"]["case_id"] == "HP-11"
    assert [x for x in world.get("/api/v1/devices/cam-a/commands")
            if x["name"] == "case_context"] == []  # fmt: skip


ROLES = {
    # user: (role, place, sees Heping's case, sees Hexi's case)
    "city-bureau": ("city_judicial", {}, True, True),
    "heping-bureau": ("district_judicial", {"district": "heping"}, True, False),
    "hexi-bureau": ("district_judicial", {"district": "hexi"}, False, True),
    "city-um": ("city_agency", {"agency_id": "tj-ue"}, True, True),
    "city-market": ("city_agency", {"agency_id": "tj-mkt"}, False, False),
    "heping-um": ("district_agency", {"agency_id": "hp-ue"}, True, False),
    "hexi-um": ("district_agency", {"agency_id": "hx-ue"}, False, True),
}


def test_every_scope_boundary_of_art_22(world: World) -> None:
    a, x = world.devices["cam-a"], world.devices["cam-x"]
    small_case(world, "HP-1", "hp-ue", O1)
    small_case(world, "HX-1", "hx-ue", O3)
    a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:10"))
    x.segment(at("2025-09-30T10:00"), at("2025-09-30T10:10"))
    a.deliver()
    x.deliver()
    evidence = {e["device_id"]: e["id"] for e in world.get("/api/v1/evidence")}
    users = {name: (world.user(name, role, **place), hp, hx)
             for name, (role, place, hp, hx) in ROLES.items()}  # fmt: skip
    for name, (who, sees_hp, sees_hx) in users.items():
        listed = {c["id"] for c in world.get("/api/v1/cases", who)}
        assert listed == {c for c, seen in (("HP-1", sees_hp), ("HX-1", sees_hx)) if seen}, name
        devices = {d["device_id"] for d in world.get("/api/v1/devices", who)}
        assert ("cam-a" in devices, "cam-x" in devices) == (sees_hp, sees_hx), name
        for case_id, device_id, allowed in (("HP-1", "cam-a", sees_hp), ("HX-1", "cam-x", sees_hx)):
            want = 200 if allowed else 404
            for path in (
                f"/api/v1/cases/{case_id}",
                f"/api/v1/evidence/{evidence[device_id]}",
                f"/api/v1/evidence/{evidence[device_id]}/media",
                f"/api/v1/cases/{case_id}/export",
            ):
                r = world.api.get(path, headers=who)
                assert r.status_code == want, (name, path, r.status_code, r.text[:200])
    # Audited either way: every refusal is in the chain too, and the chain is intact.
    log = world.get("/api/v1/audit")
    assert log["chain_intact"], log["problems"]
    actions = {(e["actor"], e["action"]) for e in log["entries"]}
    assert ("hexi-um", "download_refused") in actions and ("hexi-um", "download") in actions
    assert ("city-market", "export_refused") in actions and ("city-um", "export") in actions
    assert ("heping-bureau", "case_view_refused") in actions
    # Writes are scoped too: Hexi cannot dock a case for Heping.
    r = world.api.post(
        "/api/v1/cases",
        json={"id": "HP-2", "agency_id": "hp-ue", "case_type": "inspection"},
        headers=users["hexi-um"][0],
    )
    assert r.status_code == 403
    # And an auditor reads only what their scope covers.
    auditor = world.user("hx-auditor", "auditor", agency_id="hx-ue")
    targets = {e["target"].split("/")[1] for e in world.get("/api/v1/audit", auditor)["entries"]}
    assert "HP-1" not in targets and "cam-a" not in targets and "HX-1" in targets


def test_random_review_sample_is_reproducible_within_scope(world: World) -> None:
    for n in range(12):
        agency = "hp-ue" if n % 2 else "hx-ue"
        officer = O1 if n % 2 else O3
        small_case(world, f"C-{n:02d}", agency, officer)
    heping = world.user("heping-bureau", "district_judicial", district="heping")
    first = world.get("/api/v1/sample", heping, size=3, seed="2026-Q4")
    again = world.get("/api/v1/sample", heping, size=3, seed="2026-Q4")
    assert first == again and len(first["cases"]) == 3
    assert all(int(c[2:]) % 2 == 1 for c in first["cases"])  # Heping's only
    other = world.get("/api/v1/sample", heping, size=3, seed="2027-Q1")
    assert other["seed"] == "2027-Q1"


def test_a_case_exported_through_the_api_and_the_cli_verifies_offline(
    world: World, tmp_path: Path
) -> None:
    import subprocess
    import tempfile
    import zipfile

    from gateway.blobs import BlobStore
    from protocol.bundle import verify_bundle
    from protocol.signing import VerifyKey
    from tests.conftest import ROOT, custody_cmd

    a = world.devices["cam-a"]
    small_case(world, "HP-3", "hp-ue", O1)
    # Nothing received for it yet: a clear refusal, not a 500 and a stray temp directory.
    tmp_root = Path(tempfile.gettempdir())
    before = set(tmp_root.glob("custody-export-*"))
    r = world.api.get("/api/v1/cases/HP-3/export", headers=world.admin)
    assert r.status_code == 409 and "no received evidence" in r.json()["detail"], r.text
    assert set(tmp_root.glob("custody-export-*")) == before
    a.segment(at("2025-09-30T10:00"), at("2025-09-30T10:20"))
    a.record(at("2025-09-30T10:20:01"), "recording_stopped", reason="button", recording_id=1)
    a.segment(at("2025-09-30T11:00"), at("2025-09-30T11:30"))
    a.deliver()
    r = world.api.get("/api/v1/cases/HP-3/export", headers=world.admin)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    key = VerifyKey.from_hex(world.gw.signing_key().verify_key.hex)
    verdict = verify_bundle(files, key)
    assert verdict.ok, verdict.problems
    assert verdict.checked["media"] == 2
    assert b"HP-3" in files["coverage.html"] and b"on_site_inspection" in files["coverage.json"]

    out = tmp_path / "HP-3.zip"
    export = subprocess.run(
        custody_cmd("export", "HP-3", "--out", str(out), "--gateway-data", str(world.gw.root)),
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    verify = subprocess.run(
        custody_cmd("verify", str(out), "--gateway-key", key.hex),
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stdout.startswith("VERIFIED"), verify.stdout
    # A changed coverage report is caught too: it is in the signed manifest.
    with zipfile.ZipFile(out) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["coverage.json"] = members["coverage.json"].replace(b'"late": true', b'"late": false')
    bad = verify_bundle(members, key)
    assert not bad.ok and any("coverage.json" in str(p) for p in bad.problems)
    log = world.get("/api/v1/audit")
    assert log["chain_intact"], log["problems"]
    assert {"export", "export_item"} <= {e["action"] for e in log["entries"]}
    # The API's export is the caller's, item by item.
    assert {e["actor"] for e in log["entries"] if e["action"] == "export_item"} >= {"admin"}
    # A blob that went missing from the store is named, and no partial bundle is left.
    sha = world.get("/api/v1/evidence", device_id="cam-a")[0]["sha256"]
    BlobStore(world.gw.blobs).path(sha).unlink()
    r = world.api.get("/api/v1/cases/HP-3/export", headers=world.admin)
    assert r.status_code == 409 and "cam-a seq 1 is missing" in r.text, r.text
    assert set(tmp_root.glob("custody-export-*")) == before


def test_the_audit_chain_is_covered_by_the_transparency_log(world: World) -> None:
    small_case(world, "HP-4", "hp-ue", O1)
    world.get("/api/v1/cases/HP-4")
    world.ingest.housekeeping()
    db = world.ingest.db
    last_id, head = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    through, logged_head, index = db.execute(
        "SELECT through_id, head, log_index FROM audit_checkpoints ORDER BY through_id DESC"
    ).fetchone()
    assert (through, logged_head) == (last_id, head)
    leaf = world.get(f"/api/v1/log/proof/{index}")["leaf"]
    assert leaf == {"v": 1, "type": "audit", "through_id": last_id, "head": head}
    # Rewriting an old audit row breaks the chain from there on.
    db.execute("UPDATE audit SET actor = 'someone else' WHERE id = 1")
    log = world.get("/api/v1/audit")
    assert not log["chain_intact"] and "audit row 1" in log["problems"][0]


def test_a_json_body_sent_as_a_form_is_told_what_to_send(world: World) -> None:
    body = '{"id": "xq-ue", "name": "Xiqing UM", "level": "city"}'
    # What `curl -d` does without -H 'Content-Type: application/json'.
    r = world.api.post(
        "/api/v1/agencies",
        content=body,
        headers={**world.admin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["detail"]
    assert "application/x-www-form-urlencoded" in r.json()["detail"]
    # Nothing was created; the same body as JSON is taken.
    assert "xq-ue" not in {a["id"] for a in world.get("/api/v1/agencies")}
    r = world.api.post(
        "/api/v1/agencies",
        content=body,
        headers={**world.admin, "Content-Type": "application/json"},
    )
    assert r.status_code in (200, 201), r.text
    # A JSON body that is wrong keeps FastAPI's own field-by-field 422.
    r = world.api.post("/api/v1/agencies", json={"id": "x"}, headers=world.admin)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"


def test_a_signed_segment_with_a_time_that_is_not_a_time_does_not_stop_binding(
    world: World,
) -> None:
    """Found by a tester: a signed segment with ``start_wall_ms: "abc"`` was accepted (it is
    what the device signed) and then made every binding pass fail, for every device, for
    good. It now waits in the review queue as ``malformed`` with a ``bad_record`` alarm."""
    a, b = world.devices["cam-a"], world.devices["cam-c"]  # both O1's
    small_case(world, "HP-9", "hp-ue", O1)
    bad = a.segment(at("2025-09-30T10:01"), at("2025-09-30T10:05"), start_wall_ms="abc")
    a.deliver()
    good = b.segment(at("2025-09-30T10:02"), at("2025-09-30T10:06"))
    b.deliver()
    world.ingest.housekeeping()
    queue = {(q["device_id"], q["seq"]): q for q in world.get("/api/v1/review-queue")}
    assert queue[("cam-a", bad)]["reason"] == "malformed"
    alarms = world.get("/api/v1/alarms", kind="bad_record", device_id="cam-a")
    assert alarms and "start_wall_ms is 'abc'" in alarms[0]["detail"]
    # The journal kept the record, and binding went on for everyone else.
    assert any(r["seq"] == bad for r in world.get("/api/v1/journal", device_id="cam-a"))
    db = world.ingest.db
    assert db.execute(
        "SELECT 1 FROM bindings WHERE device_id = 'cam-c' AND seq = ?", [good]
    ).fetchone(), "cam-c's segment was not bound"
    world.ingest.housekeeping()  # and the next pass neither fails nor raises it again
    assert world.get("/api/v1/alarms", kind="bad_record")[0]["count"] == 1


def test_a_malformed_item_bound_by_hand_does_not_break_the_case(world: World) -> None:
    """A reviewer binds a ``malformed`` item by hand, as its alarm says to; the case's
    reports must still render (a time past what dates can hold made them all fail)."""
    a = world.devices["cam-a"]
    small_case(world, "HP-8", "hp-ue", O1)
    far = 2**62  # times in a signed body, valid as a message, past any date
    a.clock(at("2025-09-30T10:00"))  # the record's own time is held within range
    seq = a.device.outbox.add_blocks(
        [b"segment"],
        kind="segment",
        media_type="video/mp4",
        body={"start_wall_ms": far, "end_wall_ms": far, "duration_ms": 0},
    )
    a.deliver()
    world.ingest.housekeeping()
    queue = {(q["device_id"], q["seq"]): q for q in world.get("/api/v1/review-queue")}
    assert queue[("cam-a", seq)]["reason"] == "malformed"
    step = world.get("/api/v1/cases/HP-8")["steps"][0]["step_id"]
    reviewer = world.user("hp-rev", "reviewer", agency_id="hp-ue")
    r = world.api.post(
        f"/api/v1/review-queue/cam-a/{seq}", json={"step_id": step}, headers=reviewer
    )
    assert r.status_code in (200, 201), r.text
    assert world.api.get("/api/v1/cases/HP-8", headers=world.admin).status_code == 200
    world.ingest.housekeeping()  # the watch reads bound items too
