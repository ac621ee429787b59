"""Bounded memory: a 2 GiB file streams through agent and gateway without either growing.

The gateway writes chunks to a part file at their offsets and hashes as they come, so
its resident memory must not grow with the file's size (target: < ~50 MiB for 2 GiB).
The agent reads one chunk at a time within its window. Peak RSS of both real processes
is sampled while the upload runs; this is a memory bound, not a timing.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for

MiB = 1024 * 1024
SIZE = 2048 * MiB


def write_big_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = hashlib.shake_256(b"big").digest(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            # Vary each block a little so no layer can get away with deduplicating.
            chunk = i.to_bytes(8, "big") + block[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


class PeakRSS:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


@pytest.mark.chaos
@pytest.mark.timeout(900)  # ~6 GiB through a shared disk; it waits up to 600 s itself
def test_two_gib_file_does_not_grow_gateway_or_agent_memory(tmp_path, gateway, make_agent):
    agent = make_agent("cam-big", gateway)
    warmup = tmp_path / "warmup.bin"
    warmup.write_bytes(b"w" * (4 * MiB))
    agent.add(warmup)
    agent.start()
    wait_for(lambda: len(gateway.evidence("cam-big")) == 1, 60, "warm-up upload")
    assert gateway.proc is not None and agent.proc is not None
    gw_base = psutil.Process(gateway.proc.pid).memory_info().rss
    agent_base = psutil.Process(agent.proc.pid).memory_info().rss
    gw_peak, agent_peak = PeakRSS(gateway.proc.pid), PeakRSS(agent.proc.pid)

    big = tmp_path / "big.bin"
    sha = write_big_file(big, SIZE)
    agent.add(big)
    big.unlink()  # the device holds its own copy now
    wait_for(lambda: len(gateway.evidence("cam-big")) == 2, 600, "2 GiB upload")
    gw_growth = (gw_peak.close() - gw_base) / MiB
    agent_growth = (agent_peak.close() - agent_base) / MiB
    print(f"gateway RSS growth {gw_growth:.1f} MiB, agent RSS growth {agent_growth:.1f} MiB")
    item = next(e for e in gateway.evidence("cam-big") if e["size"] == SIZE)
    assert item["sha256"] == sha and item["verified"]
    assert gw_growth < 50, f"gateway grew {gw_growth:.1f} MiB for a 2 GiB file"
    assert agent_growth < 50, f"agent grew {agent_growth:.1f} MiB for a 2 GiB file"
