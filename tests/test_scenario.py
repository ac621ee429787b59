"""MCU scenarios: validated strictly, turned into the right events at the right times,
and played over a real pty into a real agent."""

from __future__ import annotations

from pathlib import Path

import pynmea2
import pytest

from firmware_bridge.messages import BatteryEvent, ButtonEvent, DockEvent, GpsFix
from simulators.mcu import McuSimulator
from simulators.scenario import Scenario, ScenarioError, ScenarioRunner, nmea_gga, timeline
from tests.conftest import run_custody, wait_for

PATROL = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "patrol.toml"


def test_shipped_scenario_timeline():
    events = timeline(Scenario.load(PATROL), 120)
    batteries = [e for _, e in events if isinstance(e, BatteryEvent)]
    assert [b.percent for b in batteries][:3] == [90, 88, 87]
    assert batteries[-1].percent == 70 and batteries[-1].charging  # docked at 110 s
    assert not batteries[0].charging
    presses = [(t, e.button.name.lower(), e.long_press) for t, e in events
               if isinstance(e, ButtonEvent)]  # fmt: skip
    # It records (a newcomer found `custody sim device` with it recorded nothing).
    assert presses == [
        (5, "record", False),
        (15, "mark", False),
        (60, "mark", True),
        (90, "record", False),
        (95, "photo", False),
    ]
    assert [t for t, e in events if isinstance(e, DockEvent)] == [110]
    fixes = [e for _, e in events if isinstance(e, GpsFix)]
    assert fixes[0].lat_e6 == 39_125_000 and fixes[-1].lon_e6 == 117_204_000
    assert [t for t, _ in events] == sorted(t for t, _ in events)


def test_generated_nmea_parses_back():
    sentence = nmea_gga(-33_868_800, 151_209_300, 0)
    msg = pynmea2.parse(sentence, check=True)
    assert abs(msg.latitude + 33.8688) < 1e-5 and abs(msg.longitude - 151.2093) < 1e-5


def test_bad_scenarios_are_refused_with_the_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[battery]\npoints = [[0, 50]]\nevry_s = 3\n')
    with pytest.raises(ScenarioError, match="evry_s"):
        Scenario.load(bad)
    bad.write_text('[[event]]\nat = 1\nkind = "explode"\n')
    with pytest.raises(ScenarioError, match="kind"):
        Scenario.load(bad)
    result = run_custody("sim", "mcu", "--port", str(tmp_path / "tty"), "--scenario", str(bad))
    assert result.returncode == 2 and "kind" in result.stderr


def test_scenario_played_into_a_running_agent(tmp_path, gateway, make_agent):
    scenario = tmp_path / "fast.toml"
    scenario.write_text(
        'name = "fast"\nspeedup = 20.0\n'
        "[battery]\npoints = [[0, 50], [40, 30]]\nevery_s = 5\n"
        '[[event]]\nat = 10\nkind = "button"\nbutton = "mark"\n'
    )
    port = tmp_path / "ttyMCU"
    mcu = McuSimulator(port)
    # Events sent before the agent opens the port are flushed by pyserial, as on a device.
    runner = ScenarioRunner(Scenario.load(scenario), mcu, ready=mcu.listening.is_set)
    try:
        agent = make_agent("cam-scn", gateway, mcu_port=str(port))
        agent.start()
        wait_for(lambda: gateway.get("/api/v1/journal", device_id="cam-scn"), 30, "boot")
        runner.start(until=40)
        runner.join(30)
        assert len(runner.sent) == 10  # 9 battery reports + 1 mark
        wait_for(
            lambda: any(
                r["kind"] == "mark" for r in gateway.get("/api/v1/journal", device_id="cam-scn")
            ),
            30,
            "the scenario's mark at the gateway",
        )

        def battery() -> int | None:
            dev = next(d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-scn")
            tele = dev["telemetry"] or {}
            return tele.get("battery_pct") if tele.get("battery_pct") == 30 else None

        wait_for(battery, 30, "the final battery level in telemetry")
    finally:
        runner.stop()
        mcu.close()
