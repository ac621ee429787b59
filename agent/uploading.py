"""Per-upload state on the device and the bandwidth cap: bookkeeping for the relay."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.outbox import MediaItem
from agent.sealed import MediaReader
from protocol.upload import Ranges


@dataclass
class Upload:
    item: MediaItem
    phase: str = "init"  # init → sending → fin
    acked: Ranges = ()
    inflight: dict[int, tuple[int, float]] = field(default_factory=dict)  # offset → (len, t)
    last_tx: float = 0.0
    file: MediaReader | None = None
    resumed_from: int | None = None
    chunk_size: int = 0  # what ``chunk_hashes`` (stored at capture) was computed for
    chunk_hashes: bytes = b""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TokenBucket:
    """Upload bandwidth cap; ``rate`` 0 means unlimited."""

    def __init__(self, rate: int, burst: int) -> None:
        self.rate = rate
        # A fifth of a second's worth: enough to fill a pump cycle, small enough that
        # the cap holds over short intervals too.
        self.burst = max(burst, rate // 5)
        self.tokens = float(self.burst)
        self.at = time.monotonic()

    def take(self, n: int) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True
