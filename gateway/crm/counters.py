"""Daily send counts per sender for the `max_per_day` policy: checked at RCPT, counted at acceptance.

A sender's count is the number of recipients of the messages accepted from that
envelope address on the current UTC day. Counts live in the store's
``send_counters`` table so every node of a cluster sees them; each node keeps a
cache that it writes through (every accepted message adds its recipients at once in
memory, and in the database from a background task) and re-reads from the database
at most every :data:`REFRESH` seconds, so other nodes' mail counts within that time.
Worker processes of one node (`workers`) share a sender's sessions, which the kernel
hands to any of them: there the cache is read through at every check (`refresh=0`), so
another worker's mail counts as soon as its write is committed.
When the store cannot be read, the check answers "unknown" and the caller refuses
with a temporary error: a cap is never silently ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.models import send_counters_table
from gateway.crm.store import Store
from gateway.errors import StoreError

REFRESH = 60.0


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class SendCounts:
    """Today's recipients per sender: a write-through cache over ``send_counters``."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 log: Any = None, refresh: float | None = None) -> None:
        self.store = store
        #: how long a count read from the store is trusted (default :data:`REFRESH`)
        self.refresh = REFRESH if refresh is None else refresh
        self.clock = clock
        self.log = log or structlog.get_logger("mailgw.limits")
        self._cache: dict[tuple[str, str], tuple[int, float]] = {}   # -> (count, read at)
        self._pending: dict[tuple[str, str], int] = {}               # not yet in the database
        self._flush: asyncio.Task[None] | None = None

    async def today(self, sender: str) -> int:
        """Recipients accepted from `sender` today (StoreError when the store is unreachable)."""
        now = self.clock()
        key = (sender.lower(), utc_day(now))
        hit = self._cache.get(key)
        if hit is not None and now - hit[1] < self.refresh:
            return hit[0]
        try:
            async with self.store.engine.connect() as conn:
                stored = (await conn.execute(sa.select(send_counters_table.c.count).where(
                    send_counters_table.c.sender == key[0],
                    send_counters_table.c.day == key[1]))).scalar() or 0
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read send counts", exc) from exc
        count = int(stored) + self._pending.get(key, 0)
        self._cache[key] = (count, now)
        if len(self._cache) > 100_000:   # yesterday's senders
            today = key[1]
            self._cache = {k: v for k, v in self._cache.items() if k[1] == today}
        return count

    def add(self, sender: str, recipients: int) -> None:
        """Count an accepted message (never waits; written to the store in the background)."""
        now = self.clock()
        key = (sender.lower(), utc_day(now))
        count, at = self._cache.get(key, (0, 0.0))
        self._cache[key] = (count + recipients, at)
        self._pending[key] = self._pending.get(key, 0) + recipients
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write pending counts to the store; kept for the next flush if that fails."""
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except StoreError as exc:
                for k, n in batch.items():
                    self._pending[k] = self._pending.get(k, 0) + n
                self.log.warning("send_counts_unwritten", error=str(exc), senders=len(batch))
                return

    async def _write(self, batch: dict[tuple[str, str], int]) -> None:
        store = self.store
        try:
            async with store.engine.begin() as conn:
                for (sender, day), n in batch.items():
                    stmt = store.insert(send_counters_table).values(sender=sender, day=day, count=n)
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[send_counters_table.c.sender, send_counters_table.c.day],
                        set_={"count": send_counters_table.c.count + n})
                    await conn.execute(stmt)
        except (SQLAlchemyError, OSError) as exc:
            raise store.error("cannot write send counts", exc) from exc

    async def close(self) -> None:
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        await self.flush()
