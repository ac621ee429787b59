"""Each agency sees and changes only its own data (Art. 22), through writes too.

Found by a tester probing every route as one agency (Heping, ``hp-ue``) against another
(Hexi, ``hx-ue``): reads were scoped, but an operator could take over another agency's
camera by assigning it, an amendment could pull another agency's recording into one's own
case (or out of theirs), a step could name another agency's officer (binding their
recordings, pushing the case to their devices), the transparency log handed out every
device's signed records, and a device could set times in another agency's case.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.field import O1, O3, FieldDevice, FieldWorld, at


class World(FieldWorld):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(tmp_path, {"cam-a": O1, "cam-x": O3}, monkeypatch)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World(tmp_path, monkeypatch)
    yield w
    w.close()


def hexi_case(world: World) -> tuple[int, int]:
    """Hexi's case with one recorded step; returns (its step id, cam-x's segment seq)."""
    case = world.post(
        "/api/v1/cases",
        {
            "id": "HX-1",
            "agency_id": "hx-ue",
            "case_type": "inspection",
            "steps": [
                {"step_type": "on_site_inspection", "officers": [O3],
                 "start_ms": at("2025-09-30T10:00"), "end_ms": at("2025-09-30T10:30")},
            ],
        },
    )  # fmt: skip
    x = world.devices["cam-x"]
    seq = x.segment(at("2025-09-30T10:00"), at("2025-09-30T10:20"))
    x.deliver()
    return int(case["steps"][0]["step_id"]), seq


def heping_case(world: World, who: dict[str, str]) -> int:
    r = world.api.post(
        "/api/v1/cases",
        json={
            "id": "HP-1",
            "agency_id": "hp-ue",
            "case_type": "inspection",
            "steps": [
                {"step_type": "on_site_inspection", "officers": [O1],
                 "start_ms": at("2025-09-30T10:00"), "end_ms": at("2025-09-30T10:30")},
            ],
        },
        headers=who,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return int(r.json()["steps"][0]["step_id"])


def rebind(world: World, who: dict[str, str], device_id: str, seq: int, step_id: int | None) -> int:
    """Ask, in HP-1, to move (device_id, seq) to ``step_id``: the answer's status."""
    r = world.api.post(
        "/api/v1/cases/HP-1/amendments",
        json={
            "kind": "rebind",
            "payload": {"device_id": device_id, "seq": seq, "step_id": step_id},
            "reason": "mine",
        },
        headers=who,
    )
    return r.status_code


def media_of(world: World, who: dict[str, str], evidence_id: int) -> int:
    return world.api.get(f"/api/v1/evidence/{evidence_id}/media", headers=who).status_code


def test_an_operator_cannot_take_another_agencys_camera(world: World) -> None:
    _, _ = hexi_case(world)
    hp_operator = world.user("hp-op", "operator", agency_id="hp-ue")
    hp_clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    (evidence,) = world.get("/api/v1/evidence", device_id="cam-x")
    r = world.api.post(
        "/api/v1/devices/cam-x/assignment",
        json={"officer_id": O1, "from_ms": 0},
        headers=hp_operator,
    )
    # Exactly what a device that does not exist answers.
    missing = world.api.post(
        "/api/v1/devices/cam-nowhere/assignment",
        json={"officer_id": O1, "from_ms": 0},
        headers=hp_operator,
    )
    assert (r.status_code, r.json()["detail"]) == (404, "device cam-x is not enrolled")
    assert missing.status_code == 404
    assert media_of(world, hp_clerk, evidence["id"]) == 404
    # Nor hand its own camera to the other agency's officer.
    r = world.api.post(
        "/api/v1/devices/cam-a/assignment", json={"officer_id": O3}, headers=hp_operator
    )
    assert r.status_code == 422 and "not registered" in r.text
    # Within its own agency it still can, from now on; not backdated over who held it.
    r = world.api.post(
        "/api/v1/devices/cam-a/assignment", json={"officer_id": O1}, headers=hp_operator
    )
    assert r.status_code == 201, r.text
    r = world.api.post(
        "/api/v1/devices/cam-a/assignment",
        json={"officer_id": O1, "from_ms": 0},
        headers=hp_operator,
    )
    assert r.status_code == 422 and "current assignment" in r.text, r.text


def test_an_amendment_cannot_move_another_agencys_recording(world: World) -> None:
    hx_step, seq = hexi_case(world)
    hp_clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    hp_reviewer = world.user("hp-rev", "reviewer", agency_id="hp-ue")
    hp_step = heping_case(world, hp_clerk)
    (evidence,) = world.get("/api/v1/evidence", device_id="cam-x")
    covered = world.get("/api/v1/cases/HX-1")["steps"][0]["coverage_pct"]
    assert covered and covered > 0
    for step_id in (hp_step, None):  # into Heping's case, or out of Hexi's
        assert rebind(world, hp_clerk, "cam-x", seq, step_id) == 404
    # Media that does not exist at all is refused the same way.
    assert rebind(world, hp_clerk, "cam-zz", 1, hp_step) == 404
    assert world.get("/api/v1/cases/HP-1/amendments", hp_reviewer) == []
    assert media_of(world, hp_clerk, evidence["id"]) == 404
    hx = world.get("/api/v1/cases/HX-1")
    assert hx["steps"][0]["step_id"] == hx_step and hx["steps"][0]["coverage_pct"] == covered


def test_a_step_names_only_its_own_agencys_officers(world: World) -> None:
    hexi_case(world)
    hp_clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    heping_case(world, hp_clerk)
    r = world.api.post(
        "/api/v1/cases/HP-1/steps",
        json={
            "step_type": "notification",
            "officers": [O3],
            "start_ms": at("2025-09-30T10:00"),
            "end_ms": at("2025-09-30T10:30"),
        },
        headers=hp_clerk,
    )
    assert r.status_code == 422 and "not registered with agency hp-ue" in r.text, r.text
    nobody = world.api.post(
        "/api/v1/cases/HP-1/steps",
        json={"step_type": "notification", "officers": ["99999999"]},
        headers=hp_clerk,
    )
    assert nobody.json()["detail"].replace("'99999999'", "X") == r.json()["detail"].replace(
        f"'{O3}'", "X"
    )
    # Not even the admin can: a case's officers are its agency's.
    r = world.api.post(
        "/api/v1/cases/HP-1/steps",
        json={"step_type": "notification", "officers": [O3]},
        headers=world.admin,
    )
    assert r.status_code == 422


def test_the_log_gives_out_only_leaves_in_scope(world: World) -> None:
    hexi_case(world)
    a = world.devices["cam-a"]
    a.segment(at("2025-09-30T11:00"), at("2025-09-30T11:10"))
    a.deliver()
    hp_clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    size = world.get("/api/v1/log/tree-head")["tree_size"]
    seen: dict[str, list[Any]] = {"hp": [], "hidden": []}
    for index in range(size):
        admin_leaf = world.get(f"/api/v1/log/proof/{index}")["leaf"]
        r = world.api.get(f"/api/v1/log/proof/{index}", headers=hp_clerk)
        device = admin_leaf.get("device_id") or (admin_leaf.get("record") or {}).get("device_id")
        if device == "cam-x":
            assert r.status_code == 404, r.text
            seen["hidden"].append(index)
        elif device == "cam-a":
            assert r.status_code == 200 and r.json()["leaf"] == admin_leaf
            seen["hp"].append(index)
    assert seen["hp"] and seen["hidden"]


def open_from(device: FieldDevice, step_id: int) -> None:
    """A signed terminal record opening step ``step_id`` of Hexi's case at 12:00."""
    when = at("2025-09-30T12:00")
    device.record(when, "case_context", action="open", case_id="HX-1", step_id=step_id, at_ms=when)


def test_a_device_cannot_write_into_another_agencys_case(world: World) -> None:
    hx_step, _ = hexi_case(world)
    world.post(
        "/api/v1/cases/HX-1/steps",
        {"step_type": "notification", "officers": [O3]},
    )
    hx = world.get("/api/v1/cases/HX-1")
    open_step = next(s for s in hx["steps"] if s["start_ms"] is None)
    a = world.devices["cam-a"]  # Heping's
    # A signed terminal record opening Hexi's step, and a segment claiming to belong to it.
    open_from(a, open_step["step_id"])
    seq = a.segment(
        at("2025-09-30T12:01"),
        at("2025-09-30T12:05"),
        case={"case_id": "HX-1", "step_id": hx_step},
    )
    a.deliver()
    hx = world.get("/api/v1/cases/HX-1")
    assert next(s for s in hx["steps"] if s["step_id"] == open_step["step_id"])["start_ms"] is None
    bound = world.ingest.db.execute(
        "SELECT step_id FROM bindings WHERE device_id = 'cam-a' AND seq = ?", [seq]
    ).fetchall()
    assert (hx_step,) not in bound
    # Hexi's own device still can.
    x = world.devices["cam-x"]
    open_from(x, open_step["step_id"])
    x.deliver()
    hx = world.get("/api/v1/cases/HX-1")
    opened = next(s for s in hx["steps"] if s["step_id"] == open_step["step_id"])
    assert opened["start_ms"] == at("2025-09-30T12:00")


def test_an_amendment_out_of_scope_answers_like_one_that_does_not_exist(world: World) -> None:
    hx_step, seq = hexi_case(world)
    hx_clerk = world.user("hx-clerk", "district_agency", agency_id="hx-ue")
    r = world.api.post(
        "/api/v1/cases/HX-1/amendments",
        json={
            "kind": "step_times",
            "payload": {"step_id": hx_step, "end_ms": at("2025-09-30T10:31")},
            "reason": "clock",
        },
        headers=hx_clerk,
    )
    assert r.status_code == 201, r.text
    amendment = r.json()["id"]
    for role in ("district_agency", "operator", "auditor", "reviewer"):
        who = world.user(f"hp-{role}", role, agency_id="hp-ue")
        theirs = world.api.post(
            f"/api/v1/amendments/{amendment}/decision", json={"approve": True}, headers=who
        )
        nothing = world.api.post(
            "/api/v1/amendments/9999/decision", json={"approve": True}, headers=who
        )
        assert theirs.status_code == nothing.status_code == 404, (role, theirs.text)


def test_a_device_handed_on_does_not_take_its_past_recordings_along(world: World) -> None:
    """Ownership for a rebind is the agency that held the device when it recorded (as
    binding reads it), not whoever holds it now."""
    _, seq = hexi_case(world)  # cam-x recorded for Hexi, bound to HX-1
    world.post("/api/v1/devices/cam-x/assignment", {"officer_id": O1})  # now Heping's
    hp_clerk = world.user("hp-clerk", "district_agency", agency_id="hp-ue")
    hp_step = heping_case(world, hp_clerk)
    assert rebind(world, hp_clerk, "cam-x", seq, hp_step) == 404
