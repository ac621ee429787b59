"""A synthetic byte source: "segments" of reproducible bytes, without a camera.

Relay tests and ``bench/relay.py`` need evidence whose bytes they can regenerate and
whose size they choose, cheaply; real capture is ``agent.recorder``. Every ``interval_s``
it closes a "segment" of ``size`` pseudo-random bytes (seeded by device id and segment
number) and captures it through ``Outbox.add_blocks``, the path real capture uses. Every
``mark_every``-th segment is marked by the "officer", so marked-first upload ordering
shows up.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

from agent.outbox import Outbox

BLOCK = 64 * 1024


def segment_bytes(device_id: str, index: int, size: int) -> Iterator[bytes]:
    """Deterministic content: SHAKE-256 keyed by (device, index), streamed in blocks."""
    xof = hashlib.shake_256(f"{device_id}/{index}".encode())
    stream = xof.digest(size)
    for pos in range(0, size, BLOCK):
        yield stream[pos : pos + BLOCK]


class SegmentSource:
    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        *,
        interval_s: float = 2.0,
        size: int = 256 * 1024,
        mark_every: int = 5,
    ) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self.interval_s = interval_s
        self.size = size
        self.mark_every = mark_every
        self.produced = 0

    def capture_one(self) -> int:
        index = self.produced
        marked = self.mark_every > 0 and index % self.mark_every == self.mark_every - 1
        seq = self.outbox.add_blocks(
            segment_bytes(self.device_id, index, self.size),
            kind="segment",
            media_type="application/x-custody-synthetic",
            marked=marked,
            body={"segment_index": index, "source": "synthetic"},
        )
        self.produced += 1
        return seq

    def run(self, stop: threading.Event, count: int | None = None) -> None:
        while not stop.is_set() and (count is None or self.produced < count):
            self.capture_one()
            stop.wait(self.interval_s)
