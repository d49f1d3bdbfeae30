"""The global cap on IMAP connections: slots handed out first come, first served.

    slots = ConnectionSlots(cfg.sync.max_connections)
    async with slots.hold():
        ...one IMAP connection...

Tailers hold a slot for as long as their connection is open (IDLE included) and give it
up when others have waited a poll interval (see `gateway.imap.tailer`); the Sent-copy
appender holds one for a burst of APPENDs. `resize()` applies a reloaded limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["ConnectionSlots"]


class ConnectionSlots:
    """At most `limit` IMAP connections at once, handed out first come, first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self.waiting:
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()          # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        if self.in_use > self.limit:    # shrunk by a reload: do not hand this one on
            self.in_use -= 1
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # the slot goes straight to the next waiter
                return
        self.in_use = max(0, self.in_use - 1)

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        while self.in_use < self.limit and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
