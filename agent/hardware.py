"""What the device's MCU says, as the agent sees it (through ``firmware_bridge``).

``DeviceHardware`` keeps the latest battery, dock, GPS, temperature and tamper state for
telemetry, and journals what a supervisor must be able to see later as signed records:
the tamper switch (``tamper``), the officer's mark button (``mark``) and the offset
between the device clock and GNSS time (``clock_sync``, when it first becomes known, when
it moves by more than ``CLOCK_DRIFT_MS``, and every ``CLOCK_EVERY_S``). Every event is
also passed to ``listeners`` (the recorder: record/photo buttons, battery-low stops).

It runs on the serial link's reader thread with its own journal connection, so the relay
is never blocked by a slow UART.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pynmea2

from agent.journal import Journal, now_ms
from firmware_bridge.link import LinkError, SerialLink
from firmware_bridge.messages import (
    BatteryEvent,
    Button,
    ButtonEvent,
    DeviceInfo,
    DockEvent,
    Event,
    GetInfo,
    GpsFix,
    Led,
    TamperEvent,
    TemperatureEvent,
    Vibrate,
)

log = logging.getLogger("custody.agent.hardware")

LED_RED, LED_GREEN = 1, 2
CLOCK_DRIFT_MS = 1000
CLOCK_EVERY_S = 600.0


def gnss_time_ms(sentence: str, now_ms: int) -> int | None:
    """UTC time of an NMEA fix in ms. GGA carries no date: take the date that puts the
    fix nearest to ``now_ms`` (a fix just before midnight read just after it)."""
    try:
        msg = pynmea2.parse(sentence)
    except pynmea2.ParseError:
        return None
    stamp = getattr(msg, "timestamp", None)
    if not isinstance(stamp, dt.time):
        return None
    date = getattr(msg, "datestamp", None)
    today = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date()
    days = [date] if isinstance(date, dt.date) else [today + dt.timedelta(d) for d in (-1, 0, 1)]
    candidates = [
        round(dt.datetime.combine(d, stamp.replace(tzinfo=dt.UTC)).timestamp() * 1000) for d in days
    ]
    return min(candidates, key=lambda c: abs(c - now_ms))


@dataclass(frozen=True)
class HardwareState:
    battery_pct: int = -1
    charging: bool | None = None
    docked: bool | None = None
    tamper_open: bool | None = None
    gps_lat_e6: int | None = None
    gps_lon_e6: int | None = None
    temperature_centi: int | None = None
    firmware: str | None = None  # "serial/firmware" as the MCU reports it


class DeviceHardware:
    def __init__(self, url: str, journal: Journal) -> None:
        self.journal = journal
        self.state = HardwareState()
        self.listeners: list[Callable[[Event], None]] = []
        self.clock_offset_ms: int | None = None
        self._clock_logged: tuple[int, float] | None = None
        self._lock = threading.Lock()
        self.link = SerialLink(url, self.on_event)

    def start(self) -> None:
        self.link.start()
        threading.Thread(target=self._ask_info, name="mcu-info", daemon=True).start()

    def _ask_info(self) -> None:
        """Ask the MCU who it is once the port is open (for telemetry and the fleet page)."""
        if self.link.connected.wait(30):
            try:
                self.link.send(GetInfo())
            except LinkError as exc:
                log.warning("cannot ask the MCU for its device info: %s", exc)

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
                self._clock_sync(event.sentence)
        elif isinstance(event, DeviceInfo):
            self._update(firmware=f"{event.serial}/{event.firmware}"[:64])
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
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the serial reader
                log.exception("hardware listener failed on %s", event)

    def indicate_recording(self, recording: bool) -> None:
        """Tell the wearer: red LED while recording, green when not, a short buzz on each
        change (what a body camera does, so no one records or stops unknowingly)."""
        try:
            self.link.send(Led(LED_RED if recording else LED_GREEN, 0))
            self.link.send(Vibrate(200 if recording else 100))
        except LinkError as exc:
            log.warning("cannot signal the recording state to the MCU: %s", exc)

    def _clock_sync(self, sentence: str) -> None:
        local = now_ms()
        gnss = gnss_time_ms(sentence, local)
        if gnss is None:
            return
        offset = gnss - local  # positive: the device clock is behind GNSS time
        self.clock_offset_ms = offset
        last = self._clock_logged
        now = time.monotonic()
        if last is None or abs(offset - last[0]) > CLOCK_DRIFT_MS or now - last[1] > CLOCK_EVERY_S:
            self._clock_logged = (offset, now)
            self.journal.append(
                "clock_sync", {"source": "gnss", "offset_ms": offset, "reference_ms": gnss}
            )
