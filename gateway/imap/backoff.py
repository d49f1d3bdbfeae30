"""Reconnect delays: capped exponential backoff with full jitter, reset after a success.

    backoff = Backoff(base=1.0, cap=300.0)
    while True:
        try:
            await sync_once()
            backoff.reset()
        except AccountUnavailable:
            await asyncio.sleep(backoff.next_delay())

Attempt n (from 0) waits a uniformly random time in [0, min(cap, base * 2**n)] ("full
jitter"), so many accounts on one server that failed together do not come back in step.
`AccountAuthError` is not a reason to retry at all: the account needs reconnecting.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive failed attempts (see the module docstring)."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, *,
                 rand: Callable[[], float] = random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rand = rand

    def ceiling(self) -> float:
        """The largest delay the next attempt may get."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        delay = self.ceiling() * self._rand()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
