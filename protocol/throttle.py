"""When a recurring problem deserves a line at WARNING: the first time, whenever its reason
changes, and then once per ``every`` seconds while it lasts.

A device in a dead zone fails to connect every few seconds, a full disk refuses every
chunk a device resends: a line each time buries the log, none at all leaves an operator
guessing. Pure (the caller keeps the clock and does the logging), so the agent, the
gateway and the firmware bridge share it without sharing I/O.
"""

from __future__ import annotations


class Throttle:
    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._said: tuple[str, float] | None = None  # (reason, when) last said

    def due(self, reason: str, now: float) -> bool:
        """Whether to say ``reason`` now (and, if so, remember that it was said)."""
        said = self._said
        if said is None or said[0] != reason or now - said[1] >= self.every:
            self._said = (reason, now)
            return True
        return False

    @property
    def active(self) -> bool:
        """A problem has been said and not reset since."""
        return self._said is not None

    def reset(self) -> None:
        """The problem is over: the next one is news at once."""
        self._said = None
