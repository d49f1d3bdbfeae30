"""Batch store writes off the delivery path: queue items, flush in batches, retry on failure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from gateway.crm.store import AcceptedMessage, EventRecord, Store
from gateway.errors import StoreError


class StoreWriter:
    """Never blocks its callers; keeps items and retries with backoff while the store is down."""

    def __init__(self, store: Store, *, batch: int = 200, max_delay: float = 0.05,
                 log: Any = None) -> None:
        self.store = store
        self.batch = batch
        self.max_delay = max_delay
        self.log = log or structlog.get_logger("mailgw.store")
        self._accepted: list[AcceptedMessage] = []
        self._events: list[EventRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.written = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._accepted) + len(self._events) + self._inflight

    _inflight = 0

    def add_accepted(self, a: AcceptedMessage) -> None:
        self._accepted.append(a)
        self._wake.set()

    def add_event(self, e: EventRecord) -> None:
        self._events.append(e)
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def _flush_once(self) -> None:
        acc, self._accepted = self._accepted[: self.batch], self._accepted[self.batch:]
        room = max(self.batch - len(acc), 0) or self.batch
        evs, self._events = self._events[:room], self._events[room:]
        if not acc and not evs:
            return
        self._inflight = len(acc) + len(evs)
        try:
            await self.store.record(acc, evs)
        except BaseException:
            # keep them, in order, for the next try
            self._accepted[:0] = acc
            self._events[:0] = evs
            raise
        finally:
            self._inflight = 0
        self.written += len(acc) + len(evs)

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            if not self._accepted and not self._events:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.max_delay)  # let a batch gather
            while self._accepted or self._events:
                try:
                    await self._flush_once()
                    backoff = 0.5
                except (StoreError, OSError) as exc:
                    self.failures += 1
                    self.log.error("store_write_failed", error=str(exc), retry_in=backoff,
                                   pending=self.pending)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

    async def stop(self, timeout: float) -> int:
        """Flush what is left (trying until timeout); return how many items were not written."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._accepted or self._events) and loop.time() < deadline:
            try:
                await asyncio.wait_for(self._flush_once(), max(deadline - loop.time(), 0.1))
            except (StoreError, OSError, TimeoutError) as exc:
                self.log.error("store_write_failed", error=str(exc), pending=self.pending)
                await asyncio.sleep(min(0.5, max(deadline - loop.time(), 0)))
        lost = len(self._accepted) + len(self._events)
        if lost:
            self.log.error("store_items_unwritten", count=lost)
        return lost
