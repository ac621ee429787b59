"""The operators' dashboard in a real browser: Debian's Chromium, headless, via Playwright.

Everything behind the pages is real: a broker on TLS, the gateway process, agent
processes recording the synthetic camera. Screenshots of every page go to
``test-artifacts/screenshots/`` (the README's pictures come from there).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Gateway, wait_for

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"
W, H, FPS = 320, 180, 15.0

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (`make test` or `make chromium` installs it)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Admin:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.headers = {"Authorization": f"Bearer {gateway.token}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.request(
            method, self.gateway.base + path, json=body, headers=self.headers, timeout=30
        )
        assert r.status_code in (200, 201, 202), (path, r.status_code, r.text)
        return r.json()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(browser: Any, gateway: Gateway, name: str, password: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(gateway.base + "/dashboard/fleet")
    assert page.url.endswith("/dashboard/login")  # not logged in: sent to the login page
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/fleet")
    return page


def test_the_dashboard_in_a_browser(
    browser: Any, gateway: Gateway, make_agent: Any, tmp_path: Path
) -> None:
    admin = Admin(gateway)
    admin.call("POST", "/api/v1/agencies", {"id": "tj-ue", "name": "City UM", "level": "city"})
    for agency, district in (("hp-ue", "heping"), ("hx-ue", "hexi")):
        body = {"id": agency, "name": agency, "level": "district", "district": district}
        admin.call("POST", "/api/v1/agencies", {**body, "parent_id": "tj-ue"})
    admin.call("POST", "/api/v1/officers", {"id": "12010001", "name": "Li", "agency_id": "hp-ue"})
    admin.call("POST", "/api/v1/officers", {"id": "12020001", "name": "Wu", "agency_id": "hx-ue"})
    camera = {"camera": "synthetic", "camera_width": str(W), "camera_height": str(H),
              "camera_fps": str(FPS), "pre_event_s": "0", "segment_s": "3"}  # fmt: skip
    heping = make_agent("cam-hp", gateway, record_on_start="true", **camera)
    hexi = make_agent("cam-hx", gateway)
    admin.call(
        "POST", "/api/v1/devices/cam-hp/assignment", {"officer_id": "12010001", "from_ms": 0}
    )
    admin.call(
        "POST", "/api/v1/devices/cam-hx/assignment", {"officer_id": "12020001", "from_ms": 0}
    )
    for name, role, place in (
        ("hp-operator", "operator", {"agency_id": "hp-ue"}),
        ("hx-clerk", "district_agency", {"agency_id": "hx-ue"}),
    ):
        admin.call("POST", "/api/v1/users", {"name": name, "role": role,
                                             "password": "a-long-password", **place})  # fmt: skip
    start = int(time.time() * 1000)
    case = admin.call(
        "POST",
        "/api/v1/cases",
        {"id": "HP-2026-0100", "agency_id": "hp-ue", "case_type": "penalty",
         "title": "obstruction of a fire lane",
         "steps": [{"step_type": "investigation", "officers": ["12010001"], "start_ms": start}]},
    )  # fmt: skip
    step_id = case["steps"][0]["step_id"]
    heping.start()
    hexi.start()

    def online(device_id: str) -> bool:
        return any(
            d["device_id"] == device_id and d["online"]
            for d in admin.call("GET", "/api/v1/devices")
        )

    wait_for(lambda: online("cam-hp") and online("cam-hx"), 30, "both devices online")

    # An operator logs in and sees the fleet of their scope, live.
    page = log_in(browser, gateway, "hp-operator", "a-long-password")
    row = page.locator("#dev-cam-hp")
    assert row.locator('[data-f="state"]').inner_text() == "online"
    assert page.locator("#dev-cam-hx").count() == 0  # Hexi's camera is not theirs
    page.evaluate("window.__notReloaded = true")
    shot(page, "fleet")

    # Recording for 7 s, a stop from the operator (signed reason `remote`), 8 s of nothing,
    # then the step ends: a gap the journal explains.
    time.sleep(7)
    admin.call("POST", "/api/v1/devices/cam-hp/commands", {"name": "record_stop"})

    def stopped() -> bool:
        journal = admin.call("GET", "/api/v1/journal?device_id=cam-hp")
        return any(r["kind"] == "recording_stopped" for r in journal)

    wait_for(stopped, 30, "the remote stop at the gateway")
    time.sleep(8)
    admin.call("PATCH", f"/api/v1/cases/HP-2026-0100/steps/{step_id}",
               {"end_ms": int(time.time() * 1000)})  # fmt: skip

    # The Hexi device goes offline; the Heping operator's table does not show it, so watch
    # the Heping device go offline instead: the row changes without a reload.
    heping.stop()
    page.wait_for_function(
        "document.querySelector('#dev-cam-hp [data-f=state]').textContent === 'offline'",
        timeout=30_000,
    )
    assert page.evaluate("window.__notReloaded") is True
    assert "offline" in (row.get_attribute("class") or "")
    shot(page, "fleet-offline")

    # The case page: the gap with its reason, and a segment that plays.
    def all_in() -> bool:
        report = admin.call("GET", "/api/v1/cases/HP-2026-0100")
        evidence = report["steps"][0]["evidence"]
        return bool(evidence) and all(e["evidence_id"] for e in evidence)

    wait_for(all_in, 60, "the recording received and bound")
    page.goto(gateway.base + "/dashboard/cases")
    page.click("text=HP-2026-0100")
    page.wait_for_url("**/dashboard/cases/HP-2026-0100")
    # The step began before the camera did; on a slow machine that start is a gap of its
    # own (over 5 s), listed first. The gap this test made is the one after the stop.
    gaps = page.locator("ul.gaps li")
    texts = [gaps.nth(i).inner_text() for i in range(gaps.count())]
    remote = [t for t in texts if "recording stopped: remote" in t]
    assert remote, texts
    assert all("restarted" not in t for t in remote)  # the boot was before the recording
    video = page.locator("video").first
    video.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('video').readyState >= 1", timeout=30_000)
    duration = page.evaluate("document.querySelector('video').duration")
    manifest_ms = int(video.get_attribute("data-manifest-ms") or 0)
    # Chromium reports a fragmented MP4's duration up to its last frame's start, or to the
    # end of its audio when that is longer: the tone read until the encoder took the last
    # frame, so a loaded machine adds tens of milliseconds. Never shorter than the video.
    late = duration * 1000 - manifest_ms
    assert -(1000 / FPS + 1) <= late <= 250, (duration, manifest_ms)
    shot(page, "case")
    page.goto(gateway.base + "/dashboard/devices/cam-hp")
    assert page.locator("svg[aria-label='telemetry history']").count() == 1
    assert "dropped frame" in page.locator("[data-f=camera]").inner_text()
    shot(page, "device")
    page.goto(gateway.base + "/dashboard/alarms")
    shot(page, "alarms")

    # Someone from Hexi sees neither Heping's device nor its case.
    other = log_in(browser, gateway, "hx-clerk", "a-long-password")
    assert other.locator("#dev-cam-hp").count() == 0
    assert other.locator("#dev-cam-hx").count() == 1
    other.goto(gateway.base + "/dashboard/cases")
    assert other.locator("text=HP-2026-0100").count() == 0
    response = other.goto(gateway.base + "/dashboard/cases/HP-2026-0100")
    assert response is not None and response.status == 404
    shot(other, "out-of-scope")
    hexi.stop()
