"""Pooled SMTP connections, per destination: at most `per_destination` in use at once,
an idle one reused by the next message to the same destination (every `Destination`
field equal but `address` and `token`, which takes no part in equality) and closed
with QUIT after `idle_timeout`.

Reuse is capped as Postfix's client caps it (smtp_connection_reuse_time_limit and
smtp_connection_reuse_count_limit): a connection older than `reuse_time` seconds, or
that has carried `reuse_count` transactions, is closed with QUIT instead of going back
to the pool (0: no limit), so an upstream reload or a changed route is seen even under
steady traffic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from aiosmtplib import SMTP, SMTPException

from gateway.delivery.transport import Destination


@dataclass
class Counters:
    """What the pool and the sessions did (for tests and benchmarks)."""

    opened: int = 0     # connections opened
    reused: int = 0     # transactions on a connection that had carried one before
    pipelined: int = 0  # transactions sent as one pipelined batch


@dataclass(eq=False)
class Conn:
    smtp: SMTP
    remote: str
    generation: int
    opened_at: float = 0.0  # the pool clock's value when it was opened
    uses: int = 0           # transactions it has carried
    expiry: asyncio.TimerHandle | None = None
    clean: bool = True  # no transaction left open: the next one needs no RSET
    keep: bool = False  # the last transaction left it fit for the pool


@dataclass(eq=False)
class Pool:
    sem: asyncio.Semaphore
    idle: list[Conn] = field(default_factory=list)
    users: int = 0  # senders holding or waiting for the semaphore


class Pools:
    """Every destination's pool. `close()` starts a new generation: connections of an
    older one are closed when their transaction ends instead of going idle."""

    def __init__(self, *, idle_timeout: float, per_destination: int,
                 quit_timeout: float, reuse_time: float = 0.0, reuse_count: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_destination < 1:
            raise ValueError("per_destination must be at least 1")
        self.idle_timeout = idle_timeout
        self.reuse_time = reuse_time
        self.reuse_count = reuse_count
        self.clock = clock
        self.quit_timeout = quit_timeout
        self.per_destination = per_destination
        self.generation = 0
        self._pools: dict[Destination, Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def enter(self, dest: Destination) -> tuple[Destination, Pool]:
        """The pool for `dest` and its key, counted as used until `leave()`."""
        key = replace(dest, address=None)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(asyncio.Semaphore(self.per_destination))
        pool.users += 1
        return key, pool

    def leave(self, key: Destination, pool: Pool) -> None:
        pool.users -= 1
        self._forget_if_unused(key, pool)

    def take_idle(self, pool: Pool) -> Conn | None:
        """An idle connection that still looks connected, or None."""
        while pool.idle:
            conn = pool.idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if conn.smtp.is_connected and not self.worn_out(conn):
                return conn
            self._quit_later(conn)
        return None

    def worn_out(self, conn: Conn) -> bool:
        """The connection has been used long enough or often enough: no more reuse."""
        if self.reuse_count > 0 and conn.uses >= self.reuse_count:
            return True
        return self.reuse_time > 0 and self.clock() - conn.opened_at >= self.reuse_time

    def put_back(self, key: Destination, pool: Pool, conn: Conn) -> None:
        """After a transaction: idle when it left the connection fit (`conn.keep`), else
        close it."""
        if conn.keep and conn.smtp.is_connected:
            self._release(key, pool, conn)
        else:
            conn.smtp.close()

    async def close(self) -> None:
        """Close every idle connection (QUIT); connections in use close when done."""
        self.generation += 1
        for pool in list(self._pools.values()):
            for conn in pool.idle:
                if conn.expiry is not None:
                    conn.expiry.cancel()
                self._quit_later(conn)
            pool.idle.clear()
        self._pools = {k: p for k, p in self._pools.items() if p.users}
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def idle_connections(self) -> int:
        return sum(len(p.idle) for p in self._pools.values())

    def _release(self, key: Destination, pool: Pool, conn: Conn) -> None:
        if (conn.generation != self.generation or self.idle_timeout <= 0
                or self.worn_out(conn)):
            self._quit_later(conn)
            return
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.idle_timeout, self._expire, key, pool, conn)
        pool.idle.append(conn)

    def _expire(self, key: Destination, pool: Pool, conn: Conn) -> None:
        conn.expiry = None
        if conn in pool.idle:
            pool.idle.remove(conn)
            self._quit_later(conn)
        self._forget_if_unused(key, pool)

    def _forget_if_unused(self, key: Destination, pool: Pool) -> None:
        if pool.users == 0 and not pool.idle and self._pools.get(key) is pool:
            del self._pools[key]

    def _quit_later(self, conn: Conn) -> None:
        task = asyncio.get_running_loop().create_task(quit_smtp(conn.smtp, self.quit_timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def quit_smtp(smtp: SMTP, timeout: float) -> None:
    """QUIT if still connected (errors ignored), then close."""
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=timeout)
    except (SMTPException, OSError, TimeoutError):
        pass
    finally:
        smtp.close()

