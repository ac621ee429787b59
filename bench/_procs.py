"""What the benchmarks share: running ``custody`` processes, waiting on them, stopping them
(and their children), and reading their CPU time."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def custody_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "custody_cli", *args]


def run_custody(*args: str) -> str:
    result = subprocess.run(
        custody_cmd(*args), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    if result.returncode != 0:
        raise SystemExit(f"custody {' '.join(args[:2])} failed:\n{result.stderr}")
    return result.stdout


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def healthy(http: str) -> bool:
    try:
        return httpx.get(f"{http}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def cpu_s(proc: psutil.Process) -> float:
    """User + system seconds, 0 for a process that is gone."""
    try:
        times = proc.cpu_times()
        return float(times.user + times.system)
    except psutil.NoSuchProcess:
        return 0.0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM (``custody`` processes stop their own children, e.g. the broker its
    mosquitto), SIGKILL after ``timeout``; any child still running is killed too."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
