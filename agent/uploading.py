"""Per-upload state on the device and the bandwidth cap: bookkeeping for the relay."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from agent.outbox import MediaItem
from agent.sealed import MediaReader
from protocol.upload import Ranges

log = logging.getLogger("custody.agent.relay")


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

    def distrust_stored_hashes(self, why: str) -> None:
        """Hash every chunk of this upload as it is sent, from now on.

        The gateway drops a chunk whose bytes fail the hash sent with it and asks again;
        its promise to decide in the end (``hash_mismatch`` after a few rounds) rests on
        a resent chunk carrying the hash of the bytes actually sent. A stored hash can
        disagree with them if the sealed file was swapped for another one sealed with the
        same key, or the row was damaged: authentication proves the key, not the row.
        So the first sign of a resend ends their use for this upload; that costs one
        hash per chunk, never a loop.
        """
        if self.chunk_hashes:
            log.info("seq %d: %s; hashing its chunks as they are sent", self.item.seq, why)
        self.chunk_hashes = b""

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
