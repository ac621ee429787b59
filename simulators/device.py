"""One complete simulated device: MCU firmware on a pty + the real agent + synthetic camera.

``SimDevice`` is what ``custody sim device`` and ``custody sim fleet`` run per device.
Nothing in it is a mock: the agent is the real ``custody agent`` process (so it can really
be killed), it talks to the MCU simulator over a real pseudo-terminal, records the
synthetic camera through the real encoder, and uploads through a real broker.

Power follows the scenario's battery: when the MCU reports 0 % the device loses power
(the agent is SIGKILLed, as a flat battery does), and it boots again when the battery
reports charge (docked and charging). ``kill`` does the same on demand (a crash).

``DeviceCounts`` is read straight from the device's database (read-only; WAL lets it
look while the agent writes): what was captured, uploaded, receipted, is still buffered,
was found corrupt (and journalled), and what was *lost* — a buffered file that vanished
before its receipt, which must be zero.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import load_config
from firmware_bridge.messages import BatteryEvent
from simulators.mcu import McuSimulator
from simulators.scenario import Scenario, ScenarioRunner

SUMMED = (
    "recordings",
    "segments",
    "photos",
    "marks",
    "captured",
    "captured_bytes",
    "uploaded",
    "receipted",
    "backlog",
    "corrupt",
    "lost",
)


@dataclass
class DeviceCounts:
    device_id: str
    recordings: int = 0
    segments: int = 0
    photos: int = 0
    marks: int = 0
    captured: int = 0
    captured_bytes: int = 0
    uploaded: int = 0  # every byte acknowledged by the gateway
    receipted: int = 0
    backlog: int = 0
    corrupt: int = 0  # refused for upload after a failed check, and journalled
    lost: int = 0  # vanished before a receipt
    boots: int = 0
    stops: dict[str, int] = field(default_factory=dict)
    recorded_s: float = 0.0


def read_counts(device_id: str, data_dir: Path) -> DeviceCounts:
    counts = DeviceCounts(device_id)
    path = data_dir / "agent.db"
    if not path.exists():
        return counts
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        for kind, n in conn.execute("SELECT kind, count(*) FROM journal GROUP BY kind"):
            if kind == "recording_started":
                counts.recordings = n
            elif kind == "segment":
                counts.segments = n
            elif kind == "photo":
                counts.photos = n
            elif kind == "mark":
                counts.marks = n
            elif kind == "boot":
                counts.boots = n
        rows = conn.execute("SELECT state, reason, size, acked_bytes FROM media").fetchall()
        for state, reason, size, acked in rows:
            counts.captured += 1
            counts.captured_bytes += size
            if state == "receipted" or acked >= size:
                counts.uploaded += 1
            if state == "receipted":
                counts.receipted += 1
            elif state == "pending":
                counts.backlog += 1
            elif reason == "missing_on_device":
                counts.lost += 1
            else:
                counts.corrupt += 1
    finally:
        conn.close()
    return counts


class SimDevice:
    def __init__(
        self,
        config: Path,
        scenario: Scenario,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        camera: tuple[int, int, float] = (640, 360, 15.0),
        audio: bool = True,
    ) -> None:
        self.config = config
        self.scenario = scenario
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        given = {**os.environ, **(env or {})}
        agent = load_config(
            config, environ={k: v for k, v in given.items() if k.startswith("CUSTODY_AGENT_")}
        )
        self.device_id = agent.device_id
        self.data_dir = agent.data_dir
        self.log_path = workdir / f"{self.device_id}.log"
        width, height, fps = camera
        self.env = {
            **os.environ,
            "CUSTODY_AGENT_CAMERA": "synthetic",
            "CUSTODY_AGENT_CAMERA_WIDTH": str(width),
            "CUSTODY_AGENT_CAMERA_HEIGHT": str(height),
            "CUSTODY_AGENT_CAMERA_FPS": str(fps),
            "CUSTODY_AGENT_MCU_PORT": str(workdir / f"{self.device_id}.tty"),
            **({"CUSTODY_AGENT_AUDIO": "synthetic"} if audio else {}),
            **(env or {}),
        }
        self.mcu: McuSimulator | None = None
        self.runner: ScenarioRunner | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.powered = False
        self.kills = 0
        self.power_losses = 0
        self._seen = 0
        self._lock = threading.Lock()

    # -- processes -----------------------------------------------------------------------

    def start(self) -> None:
        self.mcu = McuSimulator(Path(self.env["CUSTODY_AGENT_MCU_PORT"]))
        self.boot()
        # The scenario's clock starts when the agent listens on its serial port: pyserial
        # flushes whatever arrived before the port was open, so a button pressed at 1 s
        # during a slow boot was simply lost.
        self.runner = ScenarioRunner(self.scenario, self.mcu, ready=self.mcu.listening.is_set)
        self.runner.start()

    def boot(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "custody_cli",
                        "-v",
                        "agent",
                        "--config",
                        str(self.config),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            self.powered = True

    def kill(self) -> None:
        """Power cut or crash: SIGKILL, nothing flushed, nothing said."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
                self.kills += 1
            self.powered = False

    def shutdown(self, timeout: float = 60.0) -> None:
        """A clean power-off: the agent closes its recording (reason ``shutdown``)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.powered = False

    def poll(self) -> None:
        """Follow the battery: 0 % cuts the power, charge brings the device back."""
        if self.runner is None:
            return
        sent = self.runner.sent[self._seen :]
        self._seen += len(sent)
        for event in sent:
            if not isinstance(event, BatteryEvent):
                continue
            if event.percent == 0 and self.powered:
                self.power_losses += 1
                self.kill()
            elif event.percent > 0 and not self.powered and event.charging:
                self.boot()

    @property
    def scenario_done(self) -> bool:
        return self.runner is not None and not self.runner.running

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        self.shutdown()
        if self.mcu is not None:
            self.mcu.close()

    def _agent_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith("CUSTODY_AGENT_")}

    def counts(self) -> DeviceCounts:
        return read_counts(self.device_id, self.data_dir)

    def final_counts(self) -> DeviceCounts:
        """``counts`` plus what only the (sealed) journal bodies say: stop reasons and
        seconds recorded. Opens the device as its owner, so only once the agent stopped."""
        from agent.service import Device

        counts = self.counts()
        device = Device(load_config(self.config, environ=self._agent_env()))
        try:
            for rec in device.journal.records("recording_stopped"):
                reason = str(rec.body.get("reason"))
                counts.stops[reason] = counts.stops.get(reason, 0) + 1
            counts.recorded_s = (
                sum(
                    int(rec.body.get("duration_ms", 0)) for rec in device.journal.records("segment")
                )
                / 1000
            )
        finally:
            device.close()
        return counts


def render_table(rows: list[DeviceCounts]) -> str:
    """The summary testers read at the end: one line per device and a total."""
    head = (
        f"{'device':12} {'recs':>4} {'segs':>5} {'photos':>6} {'marks':>5} {'captured':>9} "
        f"{'MiB':>7} {'uploaded':>8} {'receipted':>9} {'backlog':>7} {'corrupt':>7} "
        f"{'lost':>4}  stops"
    )
    lines = [head, "-" * len(head)]
    total = DeviceCounts("total")
    for c in rows:
        stops = ", ".join(f"{k} {v}" for k, v in sorted(c.stops.items())) or "-"
        lines.append(
            f"{c.device_id:12} {c.recordings:>4} {c.segments:>5} {c.photos:>6} {c.marks:>5} "
            f"{c.captured:>9} {c.captured_bytes / 2**20:>7.1f} {c.uploaded:>8} "
            f"{c.receipted:>9} {c.backlog:>7} {c.corrupt:>7} {c.lost:>4}  {stops}"
        )
        for name in SUMMED:
            setattr(total, name, getattr(total, name) + getattr(c, name))
    if len(rows) > 1:
        lines.append("-" * len(head))
        lines.append(
            f"{'total':12} {total.recordings:>4} {total.segments:>5} {total.photos:>6} "
            f"{total.marks:>5} {total.captured:>9} {total.captured_bytes / 2**20:>7.1f} "
            f"{total.uploaded:>8} {total.receipted:>9} {total.backlog:>7} {total.corrupt:>7} "
            f"{total.lost:>4}"
        )
    return "\n".join(lines)


def progress_line(c: DeviceCounts, elapsed: float, duration: float, width: int = 20) -> str:
    done = min(1.0, elapsed / duration) if duration > 0 else 1.0
    bar = "#" * round(done * width) + "-" * (width - round(done * width))
    return (
        f"{c.device_id:12} [{bar}] {elapsed:5.0f}/{duration:.0f}s  segs {c.segments:3}  "
        f"receipted {c.receipted:3}/{c.captured:<3} backlog {c.backlog:3}  lost {c.lost}"
    )


def wait_drained(devices: list[SimDevice], timeout: float) -> bool:
    """Until every device's buffer is receipted (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.counts().backlog == 0 for d in devices):
            return True
        time.sleep(0.5)
    return False
