"""The fleet page at scale: filtered and paged by the server, live updates that carry only
what changed, and a device page that looks up one device, not the fleet.

Real parts in one process (``tests/field.py``): enrolled devices with real signed state
and telemetry through the real ingest, the real FastAPI app with its scopes. The page
size is lowered for the test so that a handful of devices make several pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import dashboard
from gateway.access import Principal
from gateway.dashboard import FleetFeed, FleetView, fleet_rows
from gateway.db import connect
from tests.field import O1, O2, O3, FieldWorld


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FieldWorld]:
    monkeypatch.setattr(dashboard, "PAGE_ROWS", 3)
    # Heping: cam-a, cam-b, cam-c, cam-d, cam-e (O1 and O2); Hexi: cam-x (O3).
    w = FieldWorld(
        tmp_path,
        {"cam-a": O1, "cam-b": O1, "cam-c": O2, "cam-d": O2, "cam-e": O2, "cam-x": O3},
    )
    yield w
    w.close()


ADMIN = Principal("admin", "admin")


def rows_on(page: str) -> list[str]:
    return re.findall(r'<tr id="dev-([^"]+)"', page)


def test_pages_and_filters_are_the_servers(world: FieldWorld) -> None:
    for name in ("cam-a", "cam-c", "cam-x"):
        world.devices[name].state(True)
    world.devices["cam-c"].telemetry(recording=True, battery_pct=9)  # needs attention

    page = world.get("/dashboard/fleet")
    assert rows_on(page) == ["cam-a", "cam-b", "cam-c"]
    assert "6 devices" in page and "page 1 of 2" in page
    assert 'href="/dashboard/fleet?page=2"' in page and 'rel="prev"' not in page
    page = world.get("/dashboard/fleet", page=2)
    assert rows_on(page) == ["cam-d", "cam-e", "cam-x"] and "rows 4–6 of 6" in page
    assert rows_on(world.get("/dashboard/fleet", page=99)) == ["cam-d", "cam-e", "cam-x"]

    page = world.get("/dashboard/fleet", state="online")
    assert rows_on(page) == ["cam-a", "cam-c", "cam-x"] and "3 of 6 devices" in page
    assert 'rel="next"' not in page  # one page
    assert rows_on(world.get("/dashboard/fleet", state="offline")) == ["cam-b", "cam-d", "cam-e"]
    assert rows_on(world.get("/dashboard/fleet", state="recording")) == ["cam-c"]
    assert rows_on(world.get("/dashboard/fleet", state="attention")) == ["cam-c"]
    # Text matches any shown field: the device, its officer, …
    assert rows_on(world.get("/dashboard/fleet", q=O3)) == ["cam-x"]
    page = world.get("/dashboard/fleet", q=O2)
    assert rows_on(page) == ["cam-c", "cam-d", "cam-e"]
    page = world.get("/dashboard/fleet", q="CAM-", state="offline", page=1)
    assert rows_on(page) == ["cam-b", "cam-d", "cam-e"]
    # The filters travel with the pages and the live updates.
    page = world.get("/dashboard/fleet", q="cam")
    assert 'href="/dashboard/fleet?q=cam&amp;page=2"' in page
    assert 'data-live="/dashboard/events?q=cam&amp;page=1"' in page
    page = world.get("/dashboard/fleet", q="nothing like it")
    assert rows_on(page) == [] and "No device matches this filter." in page
    # An unknown state is no filter rather than an error.
    assert len(rows_on(world.get("/dashboard/fleet", state="bogus"))) == 3


def test_a_district_user_pages_through_their_own_devices_only(world: FieldWorld) -> None:
    clerk = world.user("hx-clerk", "district_agency", agency_id="hx-ue")
    page = world.get("/dashboard/fleet", who=clerk)
    assert rows_on(page) == ["cam-x"] and "1 device<" in page and "page 1 of" not in page
    assert rows_on(world.get("/dashboard/fleet", who=clerk, q="cam-a")) == []
    r = world.api.get("/dashboard/devices/cam-a", headers=clerk)
    assert r.status_code == 404
    assert "cam-x" in world.get("/dashboard/devices/cam-x", who=clerk)


def test_the_device_page_reads_one_device(world: FieldWorld) -> None:
    world.devices["cam-d"].state(True)
    world.devices["cam-d"].telemetry(battery_pct=55)
    conn = connect(world.gw.db_path)
    try:
        admin = ADMIN
        (row,) = fleet_rows(conn, admin, ["cam-d"])
        assert row["device_id"] == "cam-d" and row["battery"] == "55%" and row["online"]
        assert fleet_rows(conn, admin, ["cam-nope"]) == []
    finally:
        conn.conn.close()
    page = world.get("/dashboard/devices/cam-d")
    assert "55%" in page
    assert world.api.get("/dashboard/devices/cam-nope", headers=world.admin).status_code == 404


def test_live_updates_carry_only_what_changed(world: FieldWorld) -> None:
    conn = connect(world.gw.db_path)
    try:
        everyone, online = FleetView(), FleetView(state="online")

        def page(view: FleetView) -> list[dict[str, Any]]:
            return view.rows(conn, ADMIN).rows

        feed = FleetFeed()
        first = feed.update(page(everyone))
        assert first is not None
        assert first["ids"] == ["cam-a", "cam-b", "cam-c"]
        assert [r["device_id"] for r in first["rows"]] == ["cam-a", "cam-b", "cam-c"]
        assert all("last_seen" not in r and "last_seen_ms" in r for r in first["rows"])
        assert feed.update(page(everyone)) is None  # nothing changed: nothing sent

        world.devices["cam-b"].state(True)
        world.devices["cam-b"].telemetry(battery_pct=42)
        world.devices["cam-e"].telemetry(battery_pct=41)  # on another page: not this one's
        event = feed.update(page(everyone))
        assert event is not None and "ids" not in event
        assert [(r["device_id"], r["battery"]) for r in event["rows"]] == [("cam-b", "42%")]

        # A page filtered to online devices hears when its membership changes.
        watching = FleetFeed()
        assert watching.update(page(online))["ids"] == ["cam-b"]  # type: ignore[index]
        world.devices["cam-a"].state(True)
        event = watching.update(page(online))
        assert event is not None and event["ids"] == ["cam-a", "cam-b"]
        assert [r["device_id"] for r in event["rows"]] == ["cam-a"]
        world.devices["cam-a"].state(False)
        event = watching.update(page(online))
        assert event is not None and event["ids"] == ["cam-b"] and event["rows"] == []
    finally:
        conn.conn.close()


def test_an_unfiltered_page_builds_only_its_own_rows(
    world: FieldWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open fleet page refreshes every second: with thousands of devices it must not
    build every device's row to show 200 of them."""
    built: list[int] = []
    real = dashboard.fleet_rows

    def counting(conn: Any, who: Principal, only: Any = None) -> list[dict[str, Any]]:
        rows = real(conn, who, only)
        built.append(len(rows))
        return rows

    monkeypatch.setattr(dashboard, "fleet_rows", counting)
    conn = connect(world.gw.db_path)
    try:
        shown = FleetView(page=2).rows(conn, ADMIN)
        assert [r["device_id"] for r in shown.rows] == ["cam-d", "cam-e", "cam-x"]
        assert (shown.matching, shown.total, shown.pages, shown.first) == (6, 6, 2, 4)
        assert built == [3]
        built.clear()
        clerk = Principal("hx-clerk", "district_agency", agency_id="hx-ue")
        shown = FleetView().rows(conn, clerk)
        assert [r["device_id"] for r in shown.rows] == ["cam-x"] and built == [1]
        built.clear()
        world.devices["cam-e"].state(True)
        shown = FleetView(state="online").rows(conn, ADMIN)  # online is a column
        assert [r["device_id"] for r in shown.rows] == ["cam-e"] and built == [1]
        assert (shown.matching, shown.total, shown.pages) == (1, 6, 1)
        built.clear()
        shown = FleetView(state="offline", page=2).rows(conn, ADMIN)
        assert [r["device_id"] for r in shown.rows] == ["cam-d", "cam-x"] and built == [2]
        assert (shown.matching, shown.total, shown.first) == (5, 6, 4)
        built.clear()
        shown = FleetView(q="cam").rows(conn, ADMIN)  # text looks at what rows show
        assert len(shown.rows) == 3 and shown.matching == 6 and built == [6]
        built.clear()
        shown = FleetView(state="attention").rows(conn, ADMIN)
        assert shown.rows == [] and built == [6]
    finally:
        conn.conn.close()


def test_a_revoked_device_stays_on_the_fleet_page_as_revoked(world: FieldWorld) -> None:
    """Cut off, it may still hold evidence someone must fetch from it by hand: listed as
    revoked (never online), found by the offline filter, flagged while it has a backlog."""
    from gateway.registry import revoke

    x = world.devices["cam-x"]
    x.state(True)
    x.telemetry(backlog_items=3)
    revoke("cam-x", world.gw.root)
    rows = {r["device_id"]: r for r in fleet_rows(connect(world.gw.db_path), ADMIN)}
    assert rows["cam-x"]["state"] == "revoked" and rows["cam-x"]["online"] is False
    assert rows["cam-x"]["attention"]
    assert "cam-x" in rows_on(world.get("/dashboard/fleet", state="offline", page=2))
    assert "cam-x" not in rows_on(world.get("/dashboard/fleet", state="online"))
    assert ">revoked</td>" in world.get("/dashboard/fleet", page=2)
