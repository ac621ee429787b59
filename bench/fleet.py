"""Fleet capacity: how many telemetry-only devices one gateway keeps fresh, and the fleet page.

A private broker (mutual TLS, per-device ACLs, as in production) and a gateway run as
their own processes. Simulated devices (``bench/_fleetsim.py``: one process per CPU, each
driving many paho clients from one selector loop) connect as real devices do, each with
its own certificate, publish a retained birth and then a ``Telemetry`` every
``--interval`` seconds from a random phase. The fleet grows in steps (``--steps``, always
starting at N=10, the baseline); each step is held for ``--warmup`` intervals after its
last device connected, then measured over ``--window`` intervals. Devices are registered
at the gateway in bulk (``bench._fleetsim.register_devices``: the rows ``enroll`` writes).

Freshness of a device's state is what the gateway stored when it stored it:
``devices.last_seen_ms`` (the gateway's clock at ingest) minus the stored telemetry's
``ts_ms`` (the device's clock when it published; same machine, same clock). The gateway
database is read (read-only) every second and each new (device, ts_ms) counted once.
A step holds when every device is connected, freshness p99 < 2 intervals, and no
device's latest stored state is older than 2 intervals at the window's end. The ramp
stops at the first step that does not hold, or at the largest fleet the open-file limit
allows (mosquitto holds one socket per device and inherits this process's limit).

Fleet page: ``GET /dashboard/fleet`` with the admin token (its first page: 200 rows, no
filter, as an operator first sees it), wall time on localhost, median of
``--page-requests`` after one untimed request, taken after each step's window while the
fleet keeps publishing (an operator looks at the page while the fleet runs).

Prints a line per step, the largest N held and, last, ``fleet_page_ratio: X`` (page time
at that N / at N=10). Nothing is asserted.
Usage: python bench/fleet.py [--interval 10] [--steps 10,1000,...] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._fleetsim import Simulators, register_devices  # noqa: E402
from bench._procs import cpu_s, custody_cmd, healthy, stop_process, wait_until  # noqa: E402
from gateway.broker import free_port  # noqa: E402
from gateway.datadir import DataDir  # noqa: E402

MIB = 2**20
BASELINE_N = 10
DEFAULT_STEPS = "1000,2500,5000,10000,15000,20000"
FD_RESERVE = 100  # mosquitto's own files: listener, logs, config, CRL


def raise_fd_limit() -> int:
    """Every device is a socket here and in mosquitto (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Freshness:
    """New (device, ts_ms) pairs in the gateway database and how late each was stored."""

    def __init__(self, db_path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        self.seen: dict[str, int] = {}
        self.delays_ms: list[int] = []

    def rows(self) -> list[tuple[str, int | None, int | None]]:
        return self.conn.execute(
            "SELECT device_id, last_seen_ms, json_extract(telemetry, '$.ts_ms') FROM devices "
            "WHERE status = 'active'"
        ).fetchall()

    def start(self) -> None:
        self.seen = {d: ts for d, _, ts in self.rows() if ts is not None}
        self.delays_ms = []

    def poll(self) -> None:
        for device_id, stored, ts in self.rows():
            if ts is not None and stored is not None and self.seen.get(device_id) != ts:
                self.seen[device_id] = ts
                self.delays_ms.append(stored - ts)

    def stale(self, older_than_ms: float) -> int:
        """Devices whose latest stored state was published more than ``older_than_ms`` ago."""
        now = time.time_ns() // 1_000_000
        return sum(1 for _, _, ts in self.rows() if ts is None or now - ts > older_than_ms)


def fleet_page_ms(http: str, token: str, requests: int) -> tuple[float, int]:
    """(median wall ms, body bytes) of GET /dashboard/fleet as admin."""
    times = []
    size = 0
    with httpx.Client(
        base_url=http, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as client:
        for i in range(requests + 1):
            t0 = time.perf_counter()
            r = client.get("/dashboard/fleet")
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise SystemExit(f"/dashboard/fleet answered {r.status_code}: {r.text[:300]}")
            size = len(r.content)
            if i:  # the first one warms templates and caches
                times.append(elapsed * 1000)
    return statistics.median(times), size


@dataclass
class Step:
    n: int
    connected: int
    failed: int
    lost: int
    samples: int
    expected: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    stale: int
    lag_p99_ms: float
    cpu: dict[str, float]  # % of one core over the window
    rss_mib: dict[str, float]
    page_ms: float
    page_kib: float
    connect_s: float
    errors: list[str]

    def held(self, interval: float) -> bool:
        return (
            self.connected == self.n
            and self.failed == 0
            and self.lost == 0
            and self.samples > 0
            and self.p99_ms < 2 * interval * 1000
            and self.stale == 0
        )


def run_step(
    n: int,
    args: argparse.Namespace,
    sims: Simulators,
    fresh: Freshness,
    gw_dir: Path,
    creds_dir: Path,
    procs: dict[str, list[psutil.Process]],
    http: str,
    token: str,
) -> Step:
    interval = args.interval
    ids = [f"sim-{i:05d}" for i in range(sims.added, n)]
    t0 = time.monotonic()
    sims.add(register_devices(gw_dir, creds_dir, ids))
    report = sims.report()
    deadline = t0 + 60 + len(ids) / 50
    errors = list(report.errors)
    while report.connecting and time.monotonic() < deadline:
        time.sleep(0.5)
        report = sims.report()
        errors += report.errors
    connect_s = time.monotonic() - t0
    time.sleep(args.warmup * interval)
    sims.report()  # schedule lag from here on
    cpu0 = {k: sum(cpu_s(p) for p in ps) for k, ps in procs.items()}
    w0 = time.monotonic()
    fresh.start()
    window = args.window * interval
    while time.monotonic() < w0 + window:
        time.sleep(max(0.0, min(1.0, w0 + window - time.monotonic())))
        fresh.poll()
    wall = time.monotonic() - w0
    stale = fresh.stale(2 * interval * 1000)
    cpu = {k: (sum(cpu_s(p) for p in ps) - cpu0[k]) / wall * 100 for k, ps in procs.items()}
    report = sims.report()
    errors += report.errors
    rss = {}
    for k in ("gateway", "mosquitto", "simulators"):
        with contextlib.suppress(psutil.NoSuchProcess):
            rss[k] = sum(p.memory_info().rss for p in procs[k]) / MIB
    page_ms, page_bytes = fleet_page_ms(http, token, args.page_requests)
    delays = [float(d) for d in fresh.delays_ms]
    return Step(
        n=n,
        connected=report.connected,
        failed=report.failed,
        lost=report.lost,
        samples=len(delays),
        expected=round(n * window / interval),
        p50_ms=percentile(delays, 0.50),
        p99_ms=percentile(delays, 0.99),
        max_ms=max(delays, default=math.nan),
        stale=stale,
        lag_p99_ms=percentile(report.lag_ms, 0.99),
        cpu=cpu,
        rss_mib=rss,
        page_ms=page_ms,
        page_kib=page_bytes / 1024,
        connect_s=connect_s,
        errors=errors,
    )


def print_step(step: Step, interval: float) -> None:
    cpu = " ".join(f"{k} {v:.0f}%" for k, v in step.cpu.items())
    rss = " ".join(f"{k} {v:.0f} MiB" for k, v in step.rss_mib.items())
    verdict = "held" if step.held(interval) else "FAILED"
    print(
        f"N={step.n}: connected {step.connected} (in {step.connect_s:.1f} s), failed "
        f"{step.failed}, lost {step.lost}; freshness p50 {step.p50_ms:.0f} ms p99 "
        f"{step.p99_ms:.0f} ms max {step.max_ms:.0f} ms over {step.samples}/{step.expected} "
        f"updates; stale {step.stale}; simulator schedule lag p99 {step.lag_p99_ms:.0f} ms; "
        f"cpu (% of a core) {cpu}; rss {rss}; fleet page {step.page_ms:.1f} ms "
        f"({step.page_kib:.0f} KiB): {verdict}",
        flush=True,
    )
    for line in step.errors[:5]:
        print(f"  {line}", flush=True)
    if len(step.errors) > 5:
        print(f"  ... and {len(step.errors) - 5} more", flush=True)


def start_custody(log: IO[bytes], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(custody_cmd(*args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def plan_steps(spec: str, fd_limit: int) -> tuple[list[int], int | None]:
    """(fleet sizes, the fd cap if it cut the ramp short)."""
    cap = fd_limit - FD_RESERVE
    wanted = sorted({BASELINE_N, *(int(x) for x in spec.split(",") if x.strip())})
    steps = [n for n in wanted if n <= cap]
    if len(steps) < len(wanted):
        steps.append(cap)
        return steps, cap
    return steps, None


def log_problems(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line for line in lines if "ERROR" in line or "Traceback" in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=10, help="telemetry interval, s")
    ap.add_argument("--steps", default=DEFAULT_STEPS, help="fleet sizes after N=10")
    ap.add_argument("--warmup", type=float, default=1, help="intervals before the window")
    ap.add_argument("--window", type=float, default=2, help="measured intervals per step")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="simulator procs")
    ap.add_argument("--page-requests", type=int, default=5)
    args = ap.parse_args()
    fd_limit = raise_fd_limit()
    steps, fd_cap = plan_steps(args.steps, fd_limit)
    started = time.monotonic()
    results: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="custody-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        gw_dir = tmp / "gateway"
        data = DataDir.open(gw_dir)
        port, http_port = free_port(), free_port()
        http = f"http://127.0.0.1:{http_port}"
        # Forked first, while this process has no threads.
        sims = Simulators(args.workers, port, args.interval)
        children: list[subprocess.Popen[bytes]] = []
        logs: list[IO[bytes]] = []
        try:
            logs.append(open(tmp / "broker.log", "wb"))  # noqa: SIM115
            broker = start_custody(
                logs[-1], "broker", "--port", str(port), "--data", str(tmp / "broker"),
                "--tls", str(gw_dir),
            )  # fmt: skip
            children.append(broker)
            wait_until(lambda: psutil.Process(broker.pid).children(), 15, "mosquitto")
            logs.append(open(tmp / "gateway.log", "wb"))  # noqa: SIM115
            gateway = start_custody(
                logs[-1], "gateway", "--data", str(gw_dir), "--broker",
                f"mqtts://127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}",
            )  # fmt: skip
            children.append(gateway)
            wait_until(lambda: healthy(http), 30, "gateway /healthz")
            procs = {
                "gateway": [psutil.Process(gateway.pid)],
                "mosquitto": psutil.Process(broker.pid).children(),
                "simulators": sims.ps,
                "bench": [psutil.Process()],
            }
            fresh = Freshness(data.db_path)
            print(
                f"fleet: telemetry every {args.interval:g} s over mutual TLS, "
                f"{args.workers} simulator processes, {os.cpu_count()} CPUs; per step "
                f"warm-up {args.warmup:g} + window {args.window:g} intervals; open-file "
                f"limit {fd_limit}; steps {','.join(map(str, steps))}",
                flush=True,
            )
            for n in steps:
                step = run_step(
                    n, args, sims, fresh, gw_dir, tmp / "devices", procs, http,
                    data.admin_token(),
                )  # fmt: skip
                print_step(step, args.interval)
                results.append(step)
                if not step.held(args.interval):
                    break
        finally:
            sims.stop()
            for proc in reversed(children):
                stop_process(proc)
            for log in logs:
                log.close()
        problems = log_problems(tmp / "gateway.log") + log_problems(tmp / "broker.log")
    held = [s for s in results if s.held(args.interval)]
    if results and not results[-1].held(args.interval):
        limit = f"N={results[-1].n} did not hold"
    elif fd_cap is not None:
        limit = f"the open-file limit ({fd_limit}: at most {fd_cap} devices); the gateway held"
    else:
        limit = "the last step of --steps; the gateway held"
    print(f"errors in the gateway and broker logs: {len(problems)}")
    for line in problems[:5]:
        print(f"  {line}")
    print(f"ramp ended by: {limit}")
    print(f"bench_seconds: {time.monotonic() - started:.0f}")
    if not held or held[0].n != BASELINE_N:
        print(f"largest_n_held: 0 (N={BASELINE_N} did not hold)")
        print("fleet_page_ratio: nan")
        return
    base, top = held[0], held[-1]
    print(f"largest_n_held: {top.n}")
    print(f"freshness_p99_ms_at_n: {top.p99_ms:.0f}")
    print(f"fleet_page_ms_at_{BASELINE_N}: {base.page_ms:.1f}")
    print(f"fleet_page_ms_at_n: {top.page_ms:.1f}")
    print(f"fleet_page_ratio: {top.page_ms / base.page_ms:.2f}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
