"""A clock that moves only when a test moves it, for components that take `clock=`."""

from __future__ import annotations


class FakeClock:
    """Call it for the time (seconds since the epoch, as time.time); `advance()` moves it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds`; the new time."""
        self.now += seconds
        return self.now
