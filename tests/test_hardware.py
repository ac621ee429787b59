"""The agent listens to the device's MCU over a real pseudo-terminal: the mark button and
the tamper switch become signed journal records at the gateway (tamper raises an alarm),
and battery, dock and GPS show up in telemetry."""

from __future__ import annotations

from firmware_bridge.messages import (
    BatteryEvent,
    Button,
    ButtonEvent,
    DockEvent,
    GpsFix,
    TamperEvent,
)
from simulators.mcu import McuSimulator
from tests.conftest import wait_for

NMEA = "$GPGGA,092750.000,3907.5000,N,11712.0000,E,1,8,1.03,61.7,M,55.2,M,,*61"


def test_mcu_events_reach_the_journal_and_telemetry(tmp_path, gateway, make_agent):
    port = tmp_path / "ttyMCU"
    mcu = McuSimulator(port)
    try:
        agent = make_agent("cam-hw", gateway, mcu_port=str(port))
        agent.start()
        wait_for(lambda: gateway.get("/api/v1/journal", device_id="cam-hw"), 30, "boot record")
        # pyserial flushes what came before the agent opened the port, as on a device.
        wait_for(mcu.listening.is_set, 30, "the agent on the serial port")
        mcu.send(BatteryEvent(64, 3800, False))
        mcu.send(DockEvent(False))
        mcu.send(GpsFix(0, 0, True, NMEA))
        mcu.send(ButtonEvent(Button.MARK, False))
        mcu.send(TamperEvent(True))

        def kinds() -> dict[str, dict]:
            return {
                r["kind"]: r["record"] for r in gateway.get("/api/v1/journal", device_id="cam-hw")
            }

        wait_for(lambda: {"mark", "tamper"} <= kinds().keys(), 30, "mark and tamper records")
        mark = kinds()["mark"]["body"]
        assert mark["source"] == "button"
        assert mark["gps"] == {"lat_e6": 39_125_000, "lon_e6": 117_200_000}
        alarm = wait_for(lambda: gateway.alarms(kind="tamper", device_id="cam-hw"), 30, "alarm")
        assert "tamper switch" in alarm[0]["detail"]

        def telemetry() -> dict | None:
            dev = next(d for d in gateway.get("/api/v1/devices") if d["device_id"] == "cam-hw")
            tele = dev["telemetry"]
            ready = tele and tele.get("battery_pct") == 64 and tele.get("firmware")
            return tele if ready else None

        tele = wait_for(telemetry, 30, "telemetry with the MCU's battery")
        assert tele["docked"] is False and tele["tamper_open"] is True
        assert tele["gps_lat_e6"] == 39_125_000
        # The agent asked the MCU who it is (GET_INFO) and reports it.
        assert tele["firmware"] == f"{mcu.info.serial}/{mcu.info.firmware}"
    finally:
        mcu.close()
