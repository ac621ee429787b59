"""Capture cost: the real agent recording 1080p30 against a bare PyAV encode, same run.

custody: ``custody agent`` as a process with the synthetic camera at 1920x1080, 30 fps,
recording from the start (no pre-event buffer): capture, watermark, H.264 in fMP4
segments, then sha256, seal, fsync and a signed ``segment`` record per segment (the path
every frame takes on a device). Two runs, each on its own freshly enrolled device:

(a) capture alone: the broker is not running yet, so nothing is uploaded (the relay only
    retries its connection, with backoff). CPU time is the agent process's user+system
    time over a window that opens ``--warmup`` seconds after the agent journals the start
    of the recording (imports, key loading and the first encoder are outside it) and
    lasts ``--seconds``. The frames captured in the window come from the segment records
    (each segment's frame count, prorated by how much of its [start, end) capture-clock
    span falls inside the window; the capture clock is the system monotonic clock the
    bench reads too).
(b) capture during a full-speed upload: ``--backlog-mib`` of random files are added with
    ``custody agent add`` before the agent starts, then broker and gateway (mutual TLS,
    as in production) run while the agent records and uploads. The upload rate is the
    growth of the gateway's ``bytes_received`` (``/api/v1/uploads``) over the window.
    Broker and gateway share this machine's cores with the agent; on a device they do not.

Frames dropped are what the agent's ``recording_stopped`` record says (all drops since
the recording started, camera and queue), read from the device journal after SIGTERM.
Peak RSS is sampled every 0.2 s over each whole run.

Baseline: the same number of frames as (a) captured in its window, rendered by
``SyntheticCamera.render`` and fed to ``agent.encoder.SegmentEncoder`` with the agent's
encoder settings (veryfast, crf 26, 6 Mbit/s cap) and a fresh encoder every segment, as
the agent cuts them; no watermark, hashing or storage. The baseline hands PyAV the BGR
frames (PyAV's swscale converts them to YUV 4:2:0, as a plain PyAV encode does); the
agent converts with OpenCV on its capture thread instead, which is part of what it is
measured on. Only the encode is timed (x264's
``zerolatency`` tune slices frames, so its threads are done when ``add_frame`` returns);
the time rendering took is printed separately, because on a device the camera draws the
picture, while here the synthetic camera's drawing runs inside the agent process.

Prints ``capture_vs_encode_cpu_ratio: X`` (custody CPU (a) / baseline CPU) as its last
line. Nothing is asserted; targets: 0 frames dropped, peak RSS <= 250 MiB, ratio <= 1.25.
Usage: python bench/capture.py [--seconds 15] [--warmup 3] [--backlog-mib 3072]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.camera import Frame  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.encoder import EncoderSettings, SegmentEncoder  # noqa: E402
from agent.service import Device  # noqa: E402
from bench._procs import (  # noqa: E402
    cpu_s,
    custody_cmd,
    healthy,
    run_custody,
    stop_process,
    wait_until,
)
from gateway.broker import free_port  # noqa: E402
from protocol.encoding import decode  # noqa: E402
from protocol.journal import SignedRecord  # noqa: E402
from simulators.camera import SyntheticCamera  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 30
MIB = 1024 * 1024
BACKLOG_FILE = 4 * MIB
BACKLOG_BATCH = 128  # files per `custody agent add`
RSS_EVERY_S = 0.2
RENDER_BATCH = 30  # frames rendered ahead of each timed encode (6 MiB each)
STARTED = re.compile(r"recording \d+ started")


class RssSampler:
    """Peak resident memory of one process, sampled on a thread until ``stop``."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(RSS_EVERY_S)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class CaptureRun:
    window_s: float = 0.0
    cpu_s: float = 0.0
    frames_in_window: float = 0.0
    frames_total: int = 0
    segments: int = 0
    dropped: int = -1
    peak_rss: int = 0
    others_cpu_s: float = 0.0  # broker and gateway, in the window
    uploaded_bytes: int = 0  # in the window
    uploaded_by_end: int = 0  # since the agent started, at the window's end


class AgentRun:
    """One ``custody agent`` process recording from a synthetic 1080p30 camera."""

    def __init__(self, config: Path, log: Path, segment_s: float) -> None:
        env = {
            **os.environ,
            "CUSTODY_AGENT_CAMERA": "synthetic",
            "CUSTODY_AGENT_CAMERA_WIDTH": str(WIDTH),
            "CUSTODY_AGENT_CAMERA_HEIGHT": str(HEIGHT),
            "CUSTODY_AGENT_CAMERA_FPS": str(FPS),
            "CUSTODY_AGENT_RECORD_ON_START": "true",
            "CUSTODY_AGENT_PRE_EVENT_S": "0",
            "CUSTODY_AGENT_STORAGE_RESERVE_MIB": "0",
            "CUSTODY_AGENT_SEGMENT_S": str(segment_s),
        }
        self.log = log
        self.started = threading.Event()
        self.started_mono = 0.0
        self._log = open(log, "w", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            custody_cmd("agent", "--config", str(config)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.rss = RssSampler(self.proc.pid)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self._log.write(line)
            if not self.started.is_set() and STARTED.search(line):
                self.started_mono = time.monotonic()
                self.started.set()

    def wait_started(self, timeout: float = 60) -> float:
        wait_until(
            lambda: self.started.is_set() or self.proc.poll() is not None,
            timeout,
            "the agent to start recording",
        )
        if not self.started.is_set():
            raise self.failed(f"the agent exited with {self.proc.returncode} before recording")
        return self.started_mono

    def failed(self, what: str) -> SystemExit:
        """Stop the agent; the error to raise, with the end of what the agent printed (its
        log is in a temporary directory that is about to go)."""
        self.stop()
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
        return SystemExit(f"{what}; the agent printed:\n{tail}")

    def stop(self) -> int:
        stop_process(self.proc)
        peak = self.rss.stop()
        self._reader.join(timeout=5)
        self._log.close()
        return peak


def read_journal(config: Path) -> list[tuple[str, dict[str, Any]]]:
    """(kind, body) of every record, in order. Records are sealed with the data key; the
    journal opens them (``_open`` is what ``unacked`` uses, for acked records too)."""
    device = Device(load_config(config))
    try:
        rows = device.db.execute("SELECT seq, record FROM journal ORDER BY seq").fetchall()
        out = []
        for seq, raw in rows:
            data = device.journal._open(int(seq), bytes(raw))
            record = SignedRecord.from_wire(decode(data, what="stored record")).record
            out.append((record.kind, dict(record.body)))
        return out
    finally:
        device.close()


def frames_between(segments: list[dict[str, Any]], t0_ns: int, t1_ns: int) -> float:
    """Frames captured in [t0, t1): each segment's frames, prorated by its overlap."""
    total = 0.0
    for body in segments:
        start, end = body["start_mono_us"] * 1000, body["end_mono_us"] * 1000
        overlap = min(end, t1_ns) - max(start, t0_ns)
        if overlap > 0 and end > start:
            total += body["frames"] * overlap / (end - start)
    return total


def uploaded_bytes(http: str, token: str, device_id: str) -> int:
    r = httpx.get(
        f"{http}/api/v1/uploads",
        params={"device_id": device_id},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    r.raise_for_status()
    return sum(int(u["bytes_received"]) for u in r.json())


def capture(
    config: Path,
    log: Path,
    segment_s: float,
    warmup: float,
    seconds: float,
    upload: tuple[str, str, str] | None = None,
    others: Sequence[psutil.Process] = (),
) -> CaptureRun:
    """Run the agent, measure a window of ``seconds`` after ``warmup``, stop it, and read
    what it journalled. ``upload`` = (gateway URL, admin token, device id) to also
    measure what reached the gateway in the window, ``others`` (broker, gateway) to also
    measure their CPU time in it."""
    run = CaptureRun()
    agent = AgentRun(config, log, segment_s)
    try:
        started = agent.wait_started()
        time.sleep(max(0.0, started + warmup - time.monotonic()))
        t0_ns, cpu0 = time.monotonic_ns(), cpu_s(agent.ps)
        others0 = sum(cpu_s(p) for p in others)
        up0 = uploaded_bytes(*upload) if upload else 0
        time.sleep(seconds)
        t1_ns, cpu1 = time.monotonic_ns(), cpu_s(agent.ps)
        others1 = sum(cpu_s(p) for p in others)
        up1 = uploaded_bytes(*upload) if upload else 0
        if agent.proc.poll() is not None:
            raise agent.failed(f"the agent exited with {agent.proc.returncode} while recording")
    finally:
        run.peak_rss = agent.stop()
    run.window_s = (t1_ns - t0_ns) / 1e9
    run.cpu_s = cpu1 - cpu0
    run.others_cpu_s = others1 - others0
    run.uploaded_bytes = up1 - up0
    run.uploaded_by_end = up1
    records = read_journal(config)
    segments = [body for kind, body in records if kind == "segment"]
    stops = [body for kind, body in records if kind == "recording_stopped"]
    run.frames_in_window = frames_between(segments, t0_ns, t1_ns)
    run.frames_total = sum(int(b["frames"]) for b in segments)
    run.segments = len(segments)
    if stops:
        run.dropped = int(stops[-1].get("dropped_frames", -1))
    return run


def baseline_encode(frames: int, segment_s: float) -> tuple[float, float]:
    """(encode CPU s, render CPU s) for ``frames`` synthetic frames through SegmentEncoder."""
    me = psutil.Process()
    camera = SyntheticCamera(WIDTH, HEIGHT, FPS)
    settings = EncoderSettings(WIDTH, HEIGHT, float(FPS))
    frame_ns = round(1e9 / FPS)
    per_segment = round(segment_s * FPS)
    start_ms = time.time_ns() // 1_000_000
    encode = render = 0.0
    encoder: SegmentEncoder | None = None
    n = 0
    while n < frames:
        c0 = cpu_s(me)
        batch = [camera.render(i) for i in range(n, min(frames, n + RENDER_BATCH))]
        c1 = cpu_s(me)
        for image in batch:
            if encoder is None:
                encoder = SegmentEncoder(settings)
            encoder.add_frame(Frame(image, n * frame_ns, start_ms + n * frame_ns // 1_000_000))
            n += 1
            if n % per_segment == 0:
                encoder.close()
                encoder = None
        if n >= frames and encoder is not None:
            encoder.close()
        c2 = cpu_s(me)
        render += c1 - c0
        encode += c2 - c1
        del batch
    return encode, render


def add_backlog(config: Path, directory: Path, mib: int) -> int:
    """Queue ``mib`` MiB of distinct random files with ``custody agent add``, in batches
    (each batch's source files are deleted once the outbox holds its sealed copies)."""
    directory.mkdir()
    block = np.random.default_rng(0).bytes(BACKLOG_FILE)
    count = max(1, mib * MIB // BACKLOG_FILE)
    for first in range(0, count, BACKLOG_BATCH):
        files = []
        for i in range(first, min(count, first + BACKLOG_BATCH)):
            path = directory / f"backlog-{i:04d}.bin"
            # One random block, a distinct head per file: every file has its own sha256.
            path.write_bytes(i.to_bytes(8, "big") + block[8:])
            files.append(path)
        run_custody("agent", "add", "--config", str(config), *map(str, files))
        for path in files:
            path.unlink()
    return count * BACKLOG_FILE


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=3, help="seconds after recording starts")
    ap.add_argument("--backlog-mib", type=int, default=3072, help="upload backlog for run (b)")
    ap.add_argument("--segment-s", type=float, default=5, help="agent segment length")
    args = ap.parse_args()
    procs: list[subprocess.Popen[Any]] = []
    logs: list[IO[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="custody-bench-capture-") as tmp_name:
        tmp = Path(tmp_name)
        gw_dir = tmp / "gateway"
        port, http_port = free_port(), free_port()
        broker_url = f"mqtts://127.0.0.1:{port}"
        configs = {}
        for dev in ("bench-alone", "bench-upload"):
            run_custody(
                "enroll",
                dev,
                "--gateway-data",
                str(gw_dir),
                "--out",
                str(tmp / dev),
                "--broker",
                broker_url,
            )
            configs[dev] = tmp / dev / "agent.toml"
        try:
            # (a) no broker yet: the agent only captures (and retries its connection).
            alone = capture(
                configs["bench-alone"],
                tmp / "agent-alone.log",
                args.segment_s,
                args.warmup,
                args.seconds,
            )

            backlog_bytes = add_backlog(configs["bench-upload"], tmp / "backlog", args.backlog_mib)

            logs.append(open(tmp / "broker.log", "wb"))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    custody_cmd(
                        "broker",
                        "--port",
                        str(port),
                        "--data",
                        str(tmp / "broker"),
                        "--tls",
                        str(gw_dir),
                    ),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
            wait_until(lambda: port_open(port), 15, "the broker")
            logs.append(open(tmp / "gateway.log", "wb"))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    custody_cmd(
                        "gateway",
                        "--data",
                        str(gw_dir),
                        "--broker",
                        broker_url,
                        "--http",
                        f"127.0.0.1:{http_port}",
                    ),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
            http = f"http://127.0.0.1:{http_port}"
            wait_until(lambda: healthy(http), 30, "gateway /healthz")
            token = (gw_dir / "admin.token").read_text().strip()
            gw_ps = [psutil.Process(p.pid) for p in procs]
            gw_ps += [c for p in gw_ps for c in p.children(recursive=True)]
            # (b) the same capture while the backlog goes up at full speed.
            during = capture(
                configs["bench-upload"],
                tmp / "agent-upload.log",
                args.segment_s,
                args.warmup,
                args.seconds,
                upload=(http, token, "bench-upload"),
                others=gw_ps,
            )
        finally:
            for proc in reversed(procs):
                stop_process(proc, timeout=15)
            for log in logs:
                log.close()

        frames = round(alone.frames_in_window)
        encode_cpu, render_cpu = baseline_encode(frames, args.segment_s)

    left = max(0, backlog_bytes - during.uploaded_by_end)
    print(
        f"capture: synthetic {WIDTH}x{HEIGHT} @ {FPS} fps, watermark, H.264 veryfast crf 26, "
        f"{args.segment_s:g} s segments hashed, sealed, fsync'd and signed"
    )
    print(f"window: {args.seconds:g} s, from {args.warmup:g} s after the recording started")
    print(
        f"(a) alone: {alone.segments} segments, {alone.frames_total} frames stored, "
        f"agent peak rss {alone.peak_rss / MIB:.0f} MiB"
    )
    print(
        f"(b) with a {backlog_bytes / MIB:.0f} MiB backlog over mutual TLS: "
        f"{during.segments} segments, {during.frames_total} frames stored, "
        f"agent peak rss {during.peak_rss / MIB:.0f} MiB, cpu in the window: agent "
        f"{during.cpu_s:.2f} s, broker+gateway {during.others_cpu_s:.2f} s; "
        f"{left / MIB:.0f} MiB of the backlog left at the window's end"
    )
    if left == 0:
        print("note: the backlog ran out inside the window (rate understated): raise --backlog-mib")
    print(f"frames_captured_alone: {frames}")
    print(f"frames_dropped_alone: {alone.dropped}")
    print(f"frames_dropped_during_upload: {during.dropped}")
    print(f"upload_mib_s_during_capture: {during.uploaded_bytes / MIB / during.window_s:.1f}")
    print(f"agent_peak_rss_mib: {max(alone.peak_rss, during.peak_rss) / MIB:.0f}")
    print(f"synthetic_render_cpu_s: {render_cpu:.2f}")
    print(f"baseline_encode_cpu_s: {encode_cpu:.2f}")
    print(f"custody_capture_cpu_s: {alone.cpu_s:.2f}")
    print(f"capture_vs_encode_cpu_ratio: {alone.cpu_s / encode_cpu:.2f}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
