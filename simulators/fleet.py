"""A fleet of simulated devices and the faults real fleets meet, on a schedule.

Each device is a ``SimDevice`` (MCU simulator + real agent + synthetic camera) whose
MQTT connection runs through its own ``FaultyLink``, so a network drop hits one device
the way a dead zone does. The faults (``FAULTS``), each given to one device in turn:

- ``network``: the device's link is cut for a while (connections die, reconnects fail);
- ``broker``: the broker is restarted under everyone (needs a broker the fleet owns);
- ``kill``: the agent is SIGKILLed mid-recording and booted again (a crash);
- ``battery``: the battery runs flat while recording (a signed ``battery_low`` stop, then
  power loss at 0 %), and the device boots again on the charger;
- ``storage``: a small buffer fills during a long dead zone (``storage_full``);
- ``skew``: the device clock is 5 s off GNSS time (``clock_sync`` records, an alarm);
- ``tamper``: a byte of a buffered, not yet uploaded file is flipped on the device's
  storage during a dead zone (detected, journalled as ``media_corrupt``, never uploaded
  as if valid).

At the end every device is given time to hand over what it holds, and the summary says
what was captured, uploaded, receipted, found corrupt, and lost — which must be zero.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simulators.device import DeviceCounts, SimDevice, progress_line, wait_drained
from simulators.netfault import FaultyLink
from simulators.scenario import Battery, Gps, OneOff, Scenario

FAULTS = ("network", "broker", "kill", "battery", "storage", "skew", "tamper")


def parse_faults(value: str) -> list[str]:
    if value in ("", "none"):
        return []
    if value == "all":
        return list(FAULTS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return names


def patrol(duration: float, *, battery_death: bool = False, skew_s: float = 0.0) -> Scenario:
    """Record from t=6 s (after some pre-event), a photo, a mark halfway, stop and dock
    near the end (or die on the way)."""
    route = [(0.0, 39_125_000, 117_200_000), (duration, 39_127_000, 117_204_000)]
    events = [
        OneOff(at=6, kind="button", button="record"),
        OneOff(at=duration * 0.3, kind="button", button="photo"),
        OneOff(at=duration * 0.5, kind="button", button="mark"),
    ]
    if battery_death:
        dead, dock = duration * 0.45, duration * 0.6
        battery = Battery(
            points=[(0, 10), (dead, 0), (dock + 1, 0), (dock + 2, 40)],
            every_s=1,
            charging_when_docked=True,
        )
        events.append(OneOff(at=dock, kind="dock", docked=True))
    else:
        battery = Battery(points=[(0, 90), (duration, 80)], every_s=5)
        events += [
            OneOff(at=max(4.0, duration - 8), kind="button", button="record"),
            OneOff(at=max(5.0, duration - 6), kind="dock", docked=True),
        ]
    return Scenario(
        name="fleet patrol",
        duration_s=duration,
        speedup=1.0,
        battery=battery,
        gps=Gps(route=route, every_s=1, clock_skew_s=skew_s),
        event=events,
    )


@dataclass(order=True)
class _Action:
    at: float
    what: str = field(compare=False)
    device: int = field(compare=False)


class Fleet:
    def __init__(
        self,
        configs: list[Path],
        broker: tuple[str, int],
        workdir: Path,
        *,
        duration: float,
        faults: list[str],
        restart_broker: Callable[[], None] | None = None,
        camera: tuple[int, int, float] = (320, 180, 15.0),
        seed: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        if "broker" in faults and restart_broker is None:
            raise ValueError("the broker fault needs a broker the fleet started itself")
        self.duration = duration
        self.faults = faults
        self.restart_broker = restart_broker
        self.rng = random.Random(seed)
        self.links: list[FaultyLink] = []
        self.devices: list[SimDevice] = []
        self.log: list[str] = []
        owner = {f: i % len(configs) for i, f in enumerate(faults)} if configs else {}
        for i, config in enumerate(configs):
            link = FaultyLink(broker)
            self.links.append(link)
            mine = {f for f, o in owner.items() if o == i}
            device_env = {
                "CUSTODY_AGENT_BROKER": f"mqtts://127.0.0.1:{link.port}",
                "CUSTODY_AGENT_SEGMENT_S": "4",
                "CUSTODY_AGENT_PRE_EVENT_S": "2",
                **(env or {}),
            }
            if "storage" in mine:
                device_env |= {
                    "CUSTODY_AGENT_STORAGE_QUOTA_MIB": "1",
                    "CUSTODY_AGENT_VIDEO_CRF": "4",
                }
            scenario = patrol(
                duration, battery_death="battery" in mine, skew_s=5.0 if "skew" in mine else 0.0
            )
            self.devices.append(SimDevice(config, scenario, workdir, env=device_env, camera=camera))
        self.plan = self._plan(owner)

    def _plan(self, owner: dict[str, int]) -> list[_Action]:
        d = self.duration
        plan = []
        for fault, i in owner.items():
            at = d * self.rng.uniform(0.25, 0.45)
            if fault == "network":
                plan.append(_Action(at, "cut:8", i))
            elif fault == "broker":
                plan.append(_Action(d * 0.55, "broker", i))
            elif fault == "kill":
                plan += [_Action(at, "kill", i), _Action(at + 2, "boot", i)]
            elif fault == "storage":
                plan.append(_Action(8, f"cut:{max(16.0, d * 0.5):.0f}", i))
            elif fault == "tamper":
                plan += [_Action(at, "cut:12", i), _Action(at + 9, "tamper", i)]
        return sorted(plan)

    def _do(self, action: _Action) -> None:
        dev = self.devices[action.device]
        what = action.what
        if what.startswith("cut:"):
            seconds = float(what[4:])
            self.links[action.device].cut(seconds)
            self.log.append(f"{dev.device_id}: network down for {seconds:g} s")
        elif what == "broker" and self.restart_broker is not None:
            self.log.append("broker restarted")
            self.restart_broker()
        elif what == "kill":
            dev.kill()
            self.log.append(f"{dev.device_id}: agent killed (SIGKILL)")
        elif what == "boot":
            dev.boot()
            self.log.append(f"{dev.device_id}: rebooted")
        elif what == "tamper":
            flipped = tamper_buffered_file(dev)
            self.log.append(f"{dev.device_id}: flipped a byte in {flipped or '(nothing buffered)'}")

    def run(self, stop: Callable[[], bool], drain_s: float = 120.0) -> list[DeviceCounts]:
        tty = sys.stdout.isatty()
        for dev in self.devices:
            dev.start()
        start = time.monotonic()
        plan = list(self.plan)
        next_print = 0.0
        drawn = 0
        try:
            while not stop() and (elapsed := time.monotonic() - start) < self.duration:
                while plan and plan[0].at <= elapsed:
                    self._do(plan.pop(0))
                for dev in self.devices:
                    dev.poll()
                if elapsed >= next_print:
                    lines = [
                        progress_line(d.counts(), elapsed, self.duration) for d in self.devices
                    ]
                    lines += self.log[-3:]
                    if tty:
                        sys.stdout.write("\x1b[F\x1b[K" * drawn + "\n".join(lines) + "\n")
                        drawn = len(lines)
                        next_print = elapsed + 0.5
                    else:
                        sys.stdout.write("\n".join(lines) + "\n\n")
                        next_print = elapsed + 10.0
                    sys.stdout.flush()
                time.sleep(0.25)
            # End of shift: the camera is switched off (a recording still running is
            # closed with reason ``shutdown``) and on again in the dock, to hand over.
            for dev in self.devices:
                if dev.runner is not None:
                    dev.runner.stop()
                dev.shutdown()
                dev.boot()
            for link in self.links:
                link.cut(0)  # coverage everywhere for the hand-over
            print(f"\ndraining: up to {drain_s:g} s for every device to be receipted", flush=True)
            wait_drained(self.devices, drain_s)
        finally:
            for dev in self.devices:
                dev.stop()
            for link in self.links:
                link.close()
        return [dev.final_counts() for dev in self.devices]


def tamper_buffered_file(dev: SimDevice) -> str | None:
    """Flip one byte in the middle of a buffered, not yet receipted media file."""
    db = dev.data_dir / "agent.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT path FROM media WHERE state = 'pending' AND acked_bytes = 0 ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    for (name,) in rows:
        path = dev.data_dir / "media" / name
        try:
            with open(path, "r+b") as f:
                size = f.seek(0, 2)
                if size < 64:
                    continue
                f.seek(size // 2)
                byte = f.read(1)
                f.seek(size // 2)
                f.write(bytes([byte[0] ^ 0x40]))
            return str(name)
        except FileNotFoundError:
            continue
    return None
