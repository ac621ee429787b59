"""MCU scenarios: a tester's script of what the device's hardware does over time.

A scenario is a TOML file::

    name = "patrol with a dead battery"
    speedup = 10.0                     # scenario seconds per wall second (default 1)

    [battery]                          # linear curve between points (t in seconds)
    points = [[0, 80], [600, 5]]
    every_s = 30                       # report interval
    charging_when_docked = true

    [gps]                              # a route: positions (micro-degrees) at times
    route = [[0, 39125000, 117200000], [300, 39130000, 117210000]]
    every_s = 1
    clock_skew_s = 0                   # GNSS minus device clock (a skewed device)

    [[event]]                          # one-off events
    at = 5
    kind = "button"                    # button | dock | tamper | temperature | storage
    button = "record"                  # record | mark | photo | power
    long = false

Unknown keys are errors (a typo in a test scenario must not silently do nothing). The
runner turns it into MCU events on a ``McuSimulator`` in real (or sped-up) time.
"""

from __future__ import annotations

import itertools
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from firmware_bridge.messages import (
    BatteryEvent,
    Button,
    ButtonEvent,
    DockEvent,
    Event,
    GpsFix,
    StorageEvent,
    TamperEvent,
    TemperatureEvent,
)
from simulators.mcu import McuSimulator

#: How long a scenario waits for its device to be ready before it starts anyway.
READY_WAIT_S = 30.0


class ScenarioError(ValueError):
    pass


class Battery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[tuple[float, int]] = Field(min_length=1)
    every_s: float = Field(30.0, gt=0)
    charging_when_docked: bool = True


class Gps(BaseModel):
    model_config = ConfigDict(extra="forbid")
    route: list[tuple[float, int, int]] = Field(min_length=1)
    every_s: float = Field(1.0, gt=0)
    clock_skew_s: float = 0.0  # GNSS time minus the device clock: a skewed device clock


class OneOff(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: float = Field(ge=0)
    kind: Literal["button", "dock", "tamper", "temperature", "storage"]
    button: Literal["record", "mark", "photo", "power"] | None = None
    long: bool = False
    docked: bool | None = None
    opened: bool | None = None
    centi_celsius: int | None = None
    inserted: bool | None = None
    free_mib: int | None = None


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "unnamed"
    duration_s: float | None = Field(None, gt=0)
    speedup: float = Field(1.0, gt=0)
    battery: Battery | None = None
    gps: Gps | None = None
    event: list[OneOff] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Scenario:
        try:
            return cls.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ScenarioError(f"scenario {path}: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ScenarioError(f"scenario {path} is invalid: {problems}") from exc


def _interpolate(points: Sequence[tuple[float, ...]], t: float) -> tuple[float, ...]:
    if t <= points[0][0]:
        return points[0][1:]
    for (t0, *a), (t1, *b) in itertools.pairwise(points):
        if t0 <= t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return tuple(x + (y - x) * f for x, y in zip(a, b, strict=True))
    return points[-1][1:]


def nmea_gga(lat_e6: int, lon_e6: int, when: float) -> str:
    """A GGA sentence with a correct checksum for the position."""

    def dm(value_e6: int, width: int) -> str:
        deg = abs(value_e6) // 1_000_000
        minutes = (abs(value_e6) % 1_000_000) * 60 / 1_000_000
        return f"{deg:0{width}d}{minutes:07.4f}"

    hms = time.strftime("%H%M%S", time.gmtime(when)) + f".{int(when * 100) % 100:02d}"
    body = (
        f"GPGGA,{hms},{dm(lat_e6, 2)},{'N' if lat_e6 >= 0 else 'S'},"
        f"{dm(lon_e6, 3)},{'E' if lon_e6 >= 0 else 'W'},1,8,1.0,50.0,M,0.0,M,,"
    )
    checksum = 0
    for ch in body.encode("ascii"):
        checksum ^= ch
    return f"${body}*{checksum:02X}"


def _one_off(e: OneOff) -> Event:
    if e.kind == "button":
        return ButtonEvent(Button[(e.button or "record").upper()], e.long)
    if e.kind == "dock":
        return DockEvent(bool(e.docked))
    if e.kind == "tamper":
        return TamperEvent(bool(e.opened))
    if e.kind == "temperature":
        return TemperatureEvent(e.centi_celsius or 0)
    return StorageEvent(bool(e.inserted), e.free_mib or 0)


def _docked_at(scenario: Scenario, t: float) -> bool:
    """The dock state after the last dock event at or before ``t`` (undocked at first)."""
    docks = [e for e in scenario.event if e.kind == "dock" and e.at <= t]
    return bool(max(docks, key=lambda e: e.at).docked) if docks else False


@dataclass(order=True)
class _Due:
    at: float
    order: int
    event: Any = field(compare=False)


def timeline(scenario: Scenario, until: float) -> list[tuple[float, Event]]:
    """Every event of the scenario up to ``until`` scenario seconds, in time order."""
    due: list[_Due] = []
    n = 0
    for e in sorted(scenario.event, key=lambda e: e.at):
        if e.at <= until:
            due.append(_Due(e.at, n, _one_off(e)))
            n += 1
    if scenario.battery is not None:
        b = scenario.battery
        points = [(float(t), float(p)) for t, p in b.points]
        t = 0.0
        while t <= until:
            docked = _docked_at(scenario, t)
            (pct,) = _interpolate(points, t)
            percent = max(0, min(100, round(pct)))
            mv = 3300 + percent * 9
            due.append(_Due(t, n, BatteryEvent(percent, mv, docked and b.charging_when_docked)))
            n += 1
            t += b.every_s
    if scenario.gps is not None:
        g = scenario.gps
        route = [(float(t), float(lat), float(lon)) for t, lat, lon in g.route]
        t = 0.0
        while t <= until:
            lat, lon = _interpolate(route, t)
            sentence = nmea_gga(round(lat), round(lon), time.time() + t)
            due.append(_Due(t, n, GpsFix(round(lat), round(lon), True, sentence)))
            n += 1
            t += g.every_s
    return [(d.at, d.event) for d in sorted(due)]


class ScenarioRunner:
    """Plays a scenario on an MCU simulator in (sped-up) real time, on its own thread."""

    def __init__(
        self,
        scenario: Scenario,
        mcu: McuSimulator,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """``ready``, when given, says when the scenario's clock may start (polled for up
        to ``READY_WAIT_S``)."""
        self.scenario = scenario
        self.mcu = mcu
        self.ready = ready
        self.sent: list[Event] = []
        #: ``time.monotonic()`` when the scenario's clock started (None: not yet).
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, until: float | None = None) -> None:
        limit = until if until is not None else (self.scenario.duration_s or 3600.0)
        self._thread = threading.Thread(target=self._run, args=(limit,), daemon=True)
        self._thread.start()

    def _run(self, until: float) -> None:
        if self.ready is not None:
            deadline = time.monotonic() + READY_WAIT_S
            while not self.ready() and time.monotonic() < deadline:
                if self._stop.wait(0.05):
                    return
        start = self.started_at = time.monotonic()
        for at, event in timeline(self.scenario, until):
            if self._stop.wait(max(0.0, start + at / self.scenario.speedup - time.monotonic())):
                return
            if isinstance(event, GpsFix):
                # NMEA carries the time it is sent (a sped-up scenario does not speed up
                # the satellites); the skew makes the device clock disagree with it.
                skew = self.scenario.gps.clock_skew_s if self.scenario.gps else 0.0
                sentence = nmea_gga(event.lat_e6, event.lon_e6, time.time() + skew)
                event = GpsFix(event.lat_e6, event.lon_e6, event.fix, sentence)
            self.mcu.send(event)
            self.sent.append(event)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.join(5)
