"""What ingest hands back to the MQTT layer: messages to publish, and the clock it stamps."""

from __future__ import annotations

import time
from dataclasses import dataclass


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
