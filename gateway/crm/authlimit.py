"""SMTP AUTH lockout kept in the store, so every worker process and node counts the same failures.

A client IP is locked out while it has `max_failures` failed attempts within `window`
seconds (rows of ``auth_failures``); a success clears its rows. The local in-memory
:class:`~gateway.smtp.protocol.AuthLimiter` is kept as well, so a store that cannot
be reached still leaves the lockout of this process in force (logged), never none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.models import auth_failures_table as t
from gateway.crm.store import Store


class StoreAuthLimiter:
    """Failed AUTH attempts per client IP in a sliding window, shared through the store."""

    def __init__(self, store: Store, max_failures: int, window: float, *,
                 local: Any = None, clock: Callable[[], float] = time.time,
                 log: Any = None) -> None:
        self.store = store
        self.max_failures = max_failures
        self.window = window
        self.local = local          # an AuthLimiter (this process's own count), or None
        self.clock = clock
        self.log = log or structlog.get_logger("mailgw.auth")

    async def is_blocked(self, ip: str) -> bool:
        if self.local is not None and self.local.blocked(ip):
            return True
        since = self.clock() - self.window
        try:
            async with self.store.engine.connect() as conn:
                n = (await conn.execute(sa.select(sa.func.count()).select_from(t).where(
                    t.c.ip == ip, t.c.at > since))).scalar() or 0
        except (SQLAlchemyError, OSError) as exc:
            self.log.warning("auth_failures_unreadable", error=str(exc)[:200])
            return False    # the local count above still applies
        return int(n) >= self.max_failures

    async def record_failure(self, ip: str) -> None:
        if self.local is not None:
            self.local.failed(ip)
        now = self.clock()
        try:
            async with self.store.engine.begin() as conn:
                await conn.execute(sa.insert(t).values(ip=ip, at=now))
                # old rows of this IP (the index makes it cheap); other IPs' age out with theirs
                await conn.execute(sa.delete(t).where(t.c.ip == ip, t.c.at <= now - self.window))
        except (SQLAlchemyError, OSError) as exc:
            self.log.warning("auth_failure_unrecorded", error=str(exc)[:200])

    async def record_success(self, ip: str) -> None:
        if self.local is not None:
            self.local.succeeded(ip)
        try:
            async with self.store.engine.begin() as conn:
                await conn.execute(sa.delete(t).where(t.c.ip == ip))
        except (SQLAlchemyError, OSError) as exc:
            self.log.warning("auth_failures_not_cleared", error=str(exc)[:200])
