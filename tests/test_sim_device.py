"""End to end: ``custody sim device`` through whole scenarios, checked at the gateway.

A real broker (TLS), a real gateway, and ``custody sim device``: the MCU simulator on a
pseudo-terminal plays the scenario (buttons, battery, GPS, dock), the real agent process
records the synthetic camera, and everything is read back from the gateway's API — the
journal the gateway accepted and the media it stores, decoded again with PyAV.
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from simulators.camera import gradient
from tests.conftest import FAST_AGENT_ENV, ROOT, Gateway, custody_cmd, run_custody, wait_for

W, H, FPS = 320, 180, 15.0

pytestmark = pytest.mark.chaos


def enroll(gateway: Gateway, tmp_path: Path, device_id: str) -> Path:
    dev_dir = tmp_path / "devices" / device_id
    result = run_custody(
        "enroll",
        device_id,
        "--gateway-data",
        str(gateway.data),
        "--out",
        str(dev_dir),
        "--broker",
        gateway.broker.url,
    )
    assert result.returncode == 0, result.stderr
    return dev_dir / "agent.toml"


def sim_device(
    config: Path, scenario: str, tmp_path: Path, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    proc = sim_device_async(config, scenario, tmp_path, **env)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def sim_device_async(
    config: Path, scenario: str, tmp_path: Path, **env: str
) -> subprocess.Popen[str]:
    path = tmp_path / "scenario.toml"
    path.write_text(scenario)
    full_env = {
        **os.environ,
        **FAST_AGENT_ENV,
        "CUSTODY_AGENT_OFFICER_ID": "31010012",
        **{f"CUSTODY_AGENT_{k.upper()}": v for k, v in env.items()},
    }
    return subprocess.Popen(
        custody_cmd(
            "sim",
            "device",
            "--config",
            str(config),
            "--scenario",
            str(path),
            "--size",
            f"{W}x{H}@{FPS:g}",
            "--work",
            str(tmp_path / "work"),
            "--drain",
            "90",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=full_env,
    )


def gateway_journal(gateway: Gateway, device_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = gateway.get("/api/v1/journal", device_id=device_id)
    return [{**r["record"], "seq": r["seq"]} for r in rows]


def media_by_seq(gateway: Gateway, device_id: str) -> dict[int, dict[str, Any]]:
    return {e["seq"]: e for e in gateway.evidence(device_id)}


def decode_mp4(data: bytes) -> tuple[list[Any], float, list[str]]:
    with av.open(io.BytesIO(data)) as c:
        codecs = [s.codec_context.name for s in c.streams]
        frames = list(c.decode(video=0))
    first, last = frames[0], frames[-1]
    duration = (last.pts + last.duration - first.pts) * float(last.time_base)
    return [f.to_ndarray(format="bgr24") for f in frames], duration, codecs


PATROL = """
name = "record, mark, stop, dock"
duration_s = 50

[battery]
points = [[0, 80], [50, 75]]
every_s = 5

[gps]
route = [[0, 39125000, 117200000], [50, 39126000, 117202000]]
every_s = 1

[[event]]
at = 7
kind = "button"
button = "record"

[[event]]
at = 25
kind = "button"
button = "mark"

[[event]]
at = 42
kind = "button"
button = "record"

[[event]]
at = 45
kind = "dock"
docked = true
"""


def test_sim_device_records_a_patrol_that_arrives_whole_at_the_gateway(
    gateway: Gateway, tmp_path: Path
) -> None:
    config = enroll(gateway, tmp_path, "cam-sim1")
    result = sim_device(config, PATROL, tmp_path, pre_event_s="5", segment_s="10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost" in result.stdout and "cam-sim1" in result.stdout

    journal = gateway_journal(gateway, "cam-sim1")
    kinds = [r["kind"] for r in journal]
    started = [r for r in journal if r["kind"] == "recording_started"]
    stopped = [r for r in journal if r["kind"] == "recording_stopped"]
    assert [r["body"]["reason"] for r in started] == ["button"]
    assert [r["body"]["reason"] for r in stopped] == ["button"]
    assert "mark" in kinds and "clock_sync" in kinds
    mark = next(r for r in journal if r["kind"] == "mark")
    assert mark["body"]["source"] == "button" and "gps" in mark["body"]

    rid = started[0]["body"]["recording_id"]
    segments = [r for r in journal if r["kind"] == "segment" and r["body"]["recording_id"] == rid]
    assert stopped[0]["body"]["segments"] == len(segments)
    bodies = [s["body"] for s in segments]
    pre = [b for b in bodies if b["pre_event"]]
    assert pre and not bodies[-1]["pre_event"]
    # The segments cover the whole recording, pre-event seconds included, without holes.
    for a, b in itertools.pairwise(bodies):
        assert abs(b["start_mono_us"] - a["end_mono_us"]) <= 1e6 / FPS + 2000
    covered_s = (bodies[-1]["end_mono_us"] - bodies[0]["start_mono_us"]) / 1e6
    pressed_s = 42 - 7
    assert covered_s >= pressed_s + 5 - 1.5, covered_s
    assert started[0]["body"]["pre_event_ms"] >= 4000

    stored = media_by_seq(gateway, "cam-sim1")
    background = gradient(W, H)
    for seg in segments:
        item = stored[seg["seq"]]
        assert item["verified"] and item["media_type"] == "video/mp4"
        data = gateway.get(f"/api/v1/evidence/{item['id']}/media")
        frames, duration, codecs = decode_mp4(data)
        body = seg["body"]
        assert codecs == ["h264", "aac"]
        assert len(frames) == body["frames"]
        assert abs(duration * 1000 - body["duration_ms"]) <= 1000 / FPS
        assert body["officer_id"] == "31010012" and "gps" in body
        # Watermark: the overlay rows differ from the raw synthetic scene there.
        top = frames[0][:8].astype(int)
        assert np.abs(top - background[:8]).mean() > 40


BATTERY_DEATH = """
name = "the battery dies while recording"
duration_s = 40

[battery]
points = [[0, 12], [14, 0], [24, 0], [25, 30]]
every_s = 1

[[event]]
at = 3
kind = "button"
button = "record"

[[event]]
at = 23
kind = "dock"
docked = true
"""


def test_battery_death_mid_recording_is_explained_and_nothing_is_lost(
    gateway: Gateway, tmp_path: Path
) -> None:
    config = enroll(gateway, tmp_path, "cam-sim2")
    result = sim_device(config, BATTERY_DEATH, tmp_path, pre_event_s="0", segment_s="4")
    assert result.returncode == 0, result.stdout + result.stderr

    journal = gateway_journal(gateway, "cam-sim2")
    stops = [r["body"] for r in journal if r["kind"] == "recording_stopped"]
    assert stops[0]["reason"] == "battery_low"
    # The device lost power at 0 % and booted again on the charger.
    assert [r["kind"] for r in journal].count("boot") >= 2
    rid = stops[0]["recording_id"]
    segments = [r for r in journal if r["kind"] == "segment" and r["body"]["recording_id"] == rid]
    assert len(segments) == stops[0]["segments"] >= 2
    stored = media_by_seq(gateway, "cam-sim2")
    assert all(stored[s["seq"]]["verified"] for s in segments)
    alarms = gateway.alarms(device_id="cam-sim2")
    assert any(a["kind"] == "battery_low" for a in alarms)


STILL_RECORDING = """
name = "recording when the scenario ends"
duration_s = 10

[[event]]
at = 2
kind = "button"
button = "record"
"""


def test_a_scenario_ending_mid_recording_hands_over_its_last_segment(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Found by a tester: the drain passed while the recording was still open, then the
    device's stop made a last segment nobody uploaded, and the run exited 0 with it in the
    backlog. Now the device powers off cleanly first; and --duration counts scenario time
    (the press at 2 s happens however slowly the agent boots)."""
    config = enroll(gateway, tmp_path, "cam-sim4")
    result = sim_device(config, STILL_RECORDING, tmp_path, pre_event_s="0", segment_s="3")
    assert result.returncode == 0, result.stdout + result.stderr
    journal = gateway_journal(gateway, "cam-sim4")
    kinds = [r["kind"] for r in journal]
    assert "recording_started" in kinds and "recording_stopped" in kinds
    stop = next(r["body"] for r in journal if r["kind"] == "recording_stopped")
    assert stop["reason"] == "shutdown"
    segments = [r for r in journal if r["kind"] == "segment"]
    assert len(segments) == stop["segments"] >= 2
    stored = media_by_seq(gateway, "cam-sim4")
    assert all(s["seq"] in stored and stored[s["seq"]]["verified"] for s in segments)
    table = result.stdout.split("draining:", 1)[1]
    row = next(line for line in table.splitlines() if line.startswith("cam-sim4"))
    assert row.split()[9] == "0", table  # the backlog column


def test_storage_exhaustion_stops_with_a_signed_reason_and_an_alarm(
    gateway: Gateway, tmp_path: Path
) -> None:
    config = enroll(gateway, tmp_path, "cam-sim3")
    scenario = """
name = "storage runs out in a dead zone"
duration_s = 30

[[event]]
at = 2
kind = "button"
button = "record"
"""
    # A dead zone (the broker is down): no receipts free any space, and the buffer is
    # capped at 1 MiB of near-lossless video, so it fills within seconds.
    gateway.broker.stop()
    proc = sim_device_async(
        config,
        scenario,
        tmp_path,
        pre_event_s="0",
        segment_s="2",
        storage_quota_mib="1",
        video_crf="4",
    )
    try:
        time.sleep(22)
        gateway.broker.start()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    journal = gateway_journal(gateway, "cam-sim3")
    stops = [r["body"] for r in journal if r["kind"] == "recording_stopped"]
    assert stops and stops[0]["reason"] == "storage_full"
    segments = [r for r in journal if r["kind"] == "segment"]
    assert len(segments) == stops[0]["segments"] >= 1
    stored = media_by_seq(gateway, "cam-sim3")
    assert all(stored[s["seq"]]["verified"] for s in segments)
    assert any(a["kind"] == "storage_full" for a in gateway.alarms(device_id="cam-sim3"))


@pytest.mark.timeout(900)  # its own limit is 400 s, above the suite's 300 s per test
def test_sim_fleet_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    """Three devices, every fault of ``simulators.fleet.FAULTS``, and the verdict."""
    result = subprocess.run(
        custody_cmd(
            "sim",
            "fleet",
            "--devices",
            "3",
            "--duration",
            "40",
            "--faults",
            "all",
            "--data",
            str(tmp_path / "fleet"),
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **FAST_AGENT_ENV},
        timeout=400,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert "lost: 0" in out
    table = out[out.index("device       recs") :]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:5]}
    assert set(rows) == {"sim-01", "sim-02", "sim-03"}
    for fault in ("network down", "agent killed", "broker restarted", "flipped a byte"):
        assert fault in out, fault
    alarms = next(line for line in out.splitlines() if line.startswith("alarms: "))
    for kind in ("battery_low", "storage_full", "media_corrupt", "clock_offset"):
        assert kind in alarms, alarms
    # The flipped file was caught on the device and journalled, not uploaded as valid.
    assert rows["sim-01"][10] == "1"  # the corrupt column


def test_remote_start_photo_and_stop_through_the_gateway_api(
    gateway: Gateway, make_agent: Any
) -> None:
    """The operator's remote control: signed commands start and stop a recording (reason
    ``remote``) and take a photo; telemetry reports recording state and headroom."""
    agent = make_agent(
        "cam-remote",
        gateway,
        camera="synthetic",
        camera_width=str(W),
        camera_height=str(H),
        camera_fps=str(FPS),
        pre_event_s="0",
        segment_s="2",
    )
    agent.start()
    headers = {"Authorization": f"Bearer {gateway.token}"}

    def command(name: str) -> None:
        r = httpx.post(
            f"{gateway.base}/api/v1/devices/cam-remote/commands",
            json={"name": name, "args": {"note": "operator"}},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 202, r.text

    def telemetry() -> dict[str, Any]:
        devices = gateway.get("/api/v1/devices")
        tele: dict[str, Any] = (
            next(d for d in devices if d["device_id"] == "cam-remote")["telemetry"] or {}
        )
        return tele

    wait_for(lambda: telemetry().get("storage_headroom_min"), 30, "headroom in telemetry")
    command("record_start")
    wait_for(lambda: telemetry().get("recording") is True, 30, "recording in telemetry")
    command("photo")
    time.sleep(3)
    command("record_stop")

    def kinds(kind: str) -> list[dict[str, Any]]:
        return [r for r in gateway_journal(gateway, "cam-remote") if r["kind"] == kind]

    wait_for(lambda: kinds("recording_stopped"), 30, "the stop at the gateway")
    assert kinds("recording_started")[0]["body"]["reason"] == "remote"
    assert kinds("recording_started")[0]["body"]["detail"] == "operator"
    assert kinds("recording_stopped")[0]["body"]["reason"] == "remote"
    photo = wait_for(lambda: kinds("photo"), 30, "the photo")[0]
    stored = wait_for(lambda: media_by_seq(gateway, "cam-remote").get(photo["seq"]), 30, "photo")
    assert stored["media_type"] == "image/jpeg"
    jpeg = gateway.get(f"/api/v1/evidence/{stored['id']}/media")
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert photo["body"]["source"] == "remote" and photo["body"]["width"] == W


def test_an_open_step_is_pushed_to_the_device_and_its_segments_carry_it(
    gateway: Gateway, make_agent: Any
) -> None:
    """Docking API → signed case_context command → the recording device's manifests →
    explicit binding at the gateway."""
    agent = make_agent(
        "cam-case",
        gateway,
        camera="synthetic",
        camera_width=str(W),
        camera_height=str(H),
        camera_fps=str(FPS),
        pre_event_s="0",
        segment_s="2",
        record_on_start="true",
    )
    headers = {"Authorization": f"Bearer {gateway.token}"}

    def post(path: str, body: dict[str, Any], method: str = "POST") -> Any:
        r = httpx.request(method, gateway.base + path, json=body, headers=headers, timeout=30)
        assert r.status_code in (200, 201), r.text
        return r.json()

    post("/api/v1/agencies", {"id": "hp-ue", "name": "Heping", "level": "district",
                              "district": "heping"})  # fmt: skip
    post("/api/v1/officers", {"id": "12010001", "name": "Li", "agency_id": "hp-ue"})
    post("/api/v1/devices/cam-case/assignment", {"officer_id": "12010001", "from_ms": 0})
    agent.start()
    wait_for(
        lambda: any(d["device_id"] == "cam-case" and d["online"]
                    for d in gateway.get("/api/v1/devices")),
        30, "the device online",
    )  # fmt: skip
    now = int(time.time() * 1000)
    case = post(
        "/api/v1/cases",
        {"id": "HP-LIVE", "agency_id": "hp-ue", "case_type": "penalty",
         "steps": [{"step_type": "investigation", "officers": ["12010001"], "start_ms": now}]},
    )  # fmt: skip
    step_id = case["steps"][0]["step_id"]

    def carried() -> list[dict[str, Any]]:
        return [
            r for r in gateway_journal(gateway, "cam-case")
            if r["kind"] == "segment" and r["body"].get("case", {}).get("step_id") == step_id
        ]  # fmt: skip

    segment = wait_for(carried, 60, "a segment carrying the pushed step")[0]
    assert segment["body"]["case"] == {"case_id": "HP-LIVE", "step_id": step_id}

    def bound_explicitly() -> bool:
        history = gateway.get("/api/v1/cases/HP-LIVE/history")["bindings"]
        return any(h["seq"] == segment["seq"] and h["method"] == "explicit" for h in history)

    wait_for(bound_explicitly, 30, "the explicit binding")
    # Closing the step clears the context on the device.
    post(f"/api/v1/cases/HP-LIVE/steps/{step_id}", {"end_ms": int(time.time() * 1000)}, "PATCH")
    wait_for(  # sent, and (by its signed journal) carried out by the device
        lambda: gateway.get("/api/v1/devices/cam-case/commands")[-1]["state"] == "executed",
        30, "the cleared context carried out",
    )  # fmt: skip


def test_a_crash_mid_segment_loses_at_most_about_a_second(gateway: Gateway, tmp_path: Path) -> None:
    """SIGKILL in the middle of a 10 s segment: the fragments already spooled to disk
    become a `recovered` segment at the next boot, and the gap is explained (`reboot`)."""
    from simulators.device import SimDevice
    from simulators.scenario import OneOff, Scenario

    config = enroll(gateway, tmp_path, "cam-crash")
    scenario = Scenario(
        name="crash", duration_s=60, speedup=1.0,
        event=[OneOff(at=1, kind="button", button="record")],
    )  # fmt: skip
    env = {**FAST_AGENT_ENV, "CUSTODY_AGENT_SEGMENT_S": "10", "CUSTODY_AGENT_PRE_EVENT_S": "0"}
    device = SimDevice(config, scenario, tmp_path / "work", env=env, camera=(W, H, FPS))
    device.start()
    try:
        # Recording starts at 1 s of the scenario (whose clock starts when the agent
        # listens to its MCU): wait for the start to reach the gateway, then let ~6 s of
        # the 10 s segment be spooled (a fragment a second), whatever the machine's load.
        wait_for(
            lambda: any(
                r["kind"] == "recording_started" for r in gateway_journal(gateway, "cam-crash")
            ),
            60,
            "the recording's start at the gateway",
        )
        time.sleep(5.5)
        killed_ms = int(time.time() * 1000)
        device.kill()
        device.boot()

        def recovered() -> list[dict[str, Any]]:
            return [
                r for r in gateway_journal(gateway, "cam-crash")
                if r["kind"] == "segment" and r["body"].get("recovered")
            ]  # fmt: skip

        (segment,) = wait_for(recovered, 60, "the recovered segment at the gateway")
        body = segment["body"]
        assert body["recording_id"] == 1 and body["segment_index"] == 0
        # By design at most ≈ 2 s are lost (1 s fragments, spooled every second), plus
        # whatever the encoder lagged behind on a loaded machine.
        assert body["end_wall_ms"] >= killed_ms - 3000, killed_ms - body["end_wall_ms"]
        stored = wait_for(
            lambda: media_by_seq(gateway, "cam-crash").get(segment["seq"]), 60, "its bytes"
        )
        data = gateway.get(f"/api/v1/evidence/{stored['id']}/media")
        frames, duration, codecs = decode_mp4(data)
        assert len(frames) == body["frames"] and codecs[0] == "h264"
        journal = gateway_journal(gateway, "cam-crash")
        stop = next(r for r in journal if r["kind"] == "recording_stopped")
        assert stop["body"]["reason"] == "reboot" and stop["seq"] > segment["seq"]
        resumed = [r for r in journal if r["kind"] == "recording_started"]
        assert [r["body"]["reason"] for r in resumed] == ["button", "reboot"]
    finally:
        device.stop()
