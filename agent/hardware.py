"""What the device's MCU says, as the agent sees it (through ``firmware_bridge``).

``DeviceHardware`` keeps the latest battery, dock, GPS, temperature and tamper state for
telemetry, and journals what a supervisor must be able to see later as signed records:
the tamper switch (``tamper``) and the officer's mark button (``mark``). Recording
start/stop by button, battery-low stops and clock sync from GPS come with capture
(issue #4); the events already arrive here.

It runs on the serial link's reader thread with its own journal connection, so the relay
is never blocked by a slow UART.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

from agent.journal import Journal
from firmware_bridge.link import SerialLink
from firmware_bridge.messages import (
    BatteryEvent,
    Button,
    ButtonEvent,
    DockEvent,
    Event,
    GpsFix,
    TamperEvent,
    TemperatureEvent,
)

log = logging.getLogger("custody.agent.hardware")


@dataclass(frozen=True)
class HardwareState:
    battery_pct: int = -1
    charging: bool | None = None
    docked: bool | None = None
    tamper_open: bool | None = None
    gps_lat_e6: int | None = None
    gps_lon_e6: int | None = None
    temperature_centi: int | None = None


class DeviceHardware:
    def __init__(self, url: str, journal: Journal) -> None:
        self.journal = journal
        self.state = HardwareState()
        self._lock = threading.Lock()
        self.link = SerialLink(url, self.on_event)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    def _update(self, **changes: object) -> None:
        with self._lock:
            self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def on_event(self, event: Event) -> None:
        if isinstance(event, BatteryEvent):
            self._update(battery_pct=event.percent, charging=event.charging)
        elif isinstance(event, DockEvent):
            self._update(docked=event.docked)
        elif isinstance(event, GpsFix):
            if event.fix:
                self._update(gps_lat_e6=event.lat_e6, gps_lon_e6=event.lon_e6)
        elif isinstance(event, TemperatureEvent):
            self._update(temperature_centi=event.centi_celsius)
        elif isinstance(event, TamperEvent):
            changed = self.state.tamper_open != event.opened
            self._update(tamper_open=event.opened)
            if changed:
                self.journal.append("tamper", {"opened": event.opened, "source": "mcu"})
        elif isinstance(event, ButtonEvent) and event.button is Button.MARK:
            state = self.state
            body: dict[str, object] = {"source": "button", "long_press": event.long_press}
            if state.gps_lat_e6 is not None:
                body["gps"] = {"lat_e6": state.gps_lat_e6, "lon_e6": state.gps_lon_e6}
            self.journal.append("mark", body)
