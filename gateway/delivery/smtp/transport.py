"""`SMTPTransport`: the `Transport` the daemon uses. One message per `send()`, on a
pooled connection to its destination; `send_mx()` resolves a domain and tries its
exchangers in turn. Opening connections is `connect`, the transaction `transaction`,
the pool `pool`; this module puts them together and labels what escapes them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.delivery.mx import MXResolver
from gateway.delivery.smtp import transaction
from gateway.delivery.smtp.connect import Connector
from gateway.delivery.smtp.failures import Failure, Outcome, Stale, TLSFailure
from gateway.delivery.smtp.pool import Conn, Counters, Pool, Pools
from gateway.delivery.transport import Destination, RcptResult, TLSMode, reply_line
from gateway.errors import MailError

_log = logging.getLogger("gateway.delivery.transport")  # one logger for the whole client


class SMTPTransport:
    """SMTP client with a per-destination connection pool; one message per `send()`."""

    #: At most this many addresses are tried for one `send_mx()` (Postfix: smtp_mx_address_limit).
    mx_address_limit = 10

    def __init__(self, helo: str, *, connect_timeout: float, command_timeout: float,
                 idle_timeout: float = 10, per_destination: int = 10,
                 reuse_time: float = 300.0, reuse_count: int = 100,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`reuse_time` / `reuse_count`: a connection is not reused once it is that many
        seconds old or has carried that many messages (0: no limit); `clock` is what
        its age is measured with."""
        self.counters = Counters()
        self._pools = Pools(idle_timeout=idle_timeout, per_destination=per_destination,
                            quit_timeout=min(5.0, command_timeout), reuse_time=reuse_time,
                            reuse_count=reuse_count, clock=clock)
        self._connector = Connector(helo, connect_timeout=connect_timeout,
                                    command_timeout=command_timeout, counters=self.counters)
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self.per_destination = per_destination

    def set_reuse_limits(self, reuse_time: float, reuse_count: int) -> None:
        """New `reuse_time` / `reuse_count` (a reload): pooled connections are checked
        against them the next time they would be reused."""
        self._pools.reuse_time = reuse_time
        self._pools.reuse_count = reuse_count

    # -- the Transport protocol --------------------------------------------------------
    async def send(self, dest: Destination, mail_from: str, rcpts: list[str],
                   data: bytes) -> list[RcptResult]:
        """Deliver `data` to `rcpts` at `dest`; one result per recipient, in order."""
        return (await self._send_guarded(dest, mail_from, rcpts, data)).results

    async def send_mx(self, resolver: MXResolver, domain: str, mail_from: str,
                      rcpts: list[str], data: bytes, *, port: int, tls: TLSMode,
                      ca_file: str | None) -> list[RcptResult]:
        """Deliver to the mail exchangers of `domain` (all `rcpts` must be in it).

        DNS failures come back as results too: 5.1.2 (no such domain), 5.1.10
        (null MX), 5.4.4 (no address), 4.4.3 (DNS temporarily failing).
        """
        if not rcpts:
            return []
        try:
            hosts = await resolver.resolve(domain)
        except MailError as exc:
            return [RcptResult(rcpt=r, code=exc.code, status=exc.status,
                               text=reply_line(exc.text)) for r in rcpts]
        last: Outcome | None = None
        tried = 0
        for host in hosts:
            for address in host.addresses:
                if tried >= self.mx_address_limit:
                    break
                tried += 1
                dest = Destination(host=host.name, port=port, tls=tls,
                                   tls_required=tls == "starttls", ca_file=ca_file,
                                   address=address)
                out = await self._send_guarded(dest, mail_from, rcpts, data)
                if not out.next_mx:
                    return out.results
                _log.info("mx host failed, trying the next: %s", out.results[0].reply)
                last = out
        if last is None:  # the resolver returns at least one address; be safe anyway
            return [RcptResult(rcpt=r, code=451, status="4.4.4",
                               text=f"no mail exchanger address for {domain}") for r in rcpts]
        return last.results

    async def close(self) -> None:
        """Close every idle pooled connection (QUIT); connections in use close when done."""
        await self._pools.close()

    # -- figures (for tests and benchmarks) ------------------------------------------------
    @property
    def idle_connections(self) -> int:
        """Pooled connections waiting for a message."""
        return self._pools.idle_connections

    @property
    def connections_opened(self) -> int:
        return self.counters.opened

    @property
    def connections_reused(self) -> int:
        return self.counters.reused

    @property
    def transactions_pipelined(self) -> int:
        return self.counters.pipelined

    # -- one message --------------------------------------------------------------------
    async def _send_guarded(self, dest: Destination, mail_from: str, rcpts: list[str],
                            data: bytes) -> Outcome:
        if not rcpts:
            return Outcome([])
        try:
            return await self._send(dest, mail_from, rcpts, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the scheduler down with it
            _log.exception("transport failed unexpectedly for %s", dest.where)
            return Failure(451, "4.3.0", f"internal error delivering to {dest.where}: "
                           f"{type(exc).__name__}: {exc}").outcome(rcpts)

    async def _send(self, dest: Destination, mail_from: str, rcpts: list[str],
                    data: bytes) -> Outcome:
        key, pool = self._pools.enter(dest)
        try:
            async with pool.sem:
                return await self._session(key, pool, dest, mail_from, rcpts, data)
        finally:
            self._pools.leave(key, pool)

    async def _session(self, key: Destination, pool: Pool, dest: Destination,
                       mail_from: str, rcpts: list[str], data: bytes) -> Outcome:
        conn = self._pools.take_idle(pool)
        if conn is not None:
            try:
                return await self._transaction(key, pool, conn, mail_from, rcpts, data,
                                               reused=True)
            except Stale:
                _log.debug("pooled connection to %s was dead; opening a new one", conn.remote)
        try:
            conn = await self._open(dest)
        except TLSFailure as exc:
            if dest.tls != "opportunistic":
                return exc.outcome(rcpts)
            _log.info("TLS failed with %s, retrying in plaintext: %s", dest.where, exc.text)
            try:
                conn = await self._open(dest, starttls=False)
            except Failure as exc2:
                return exc2.outcome(rcpts)
        except Failure as exc:
            return exc.outcome(rcpts)
        try:
            return await self._transaction(key, pool, conn, mail_from, rcpts, data,
                                           reused=False)
        except Stale:  # pragma: no cover - only raised for reused connections
            raise AssertionError("fresh connection reported stale") from None

    async def _open(self, dest: Destination, *, starttls: bool = True) -> Conn:
        smtp, remote = await self._connector.open(dest, starttls=starttls)
        return Conn(smtp, remote, self._pools.generation, opened_at=self._pools.clock())

    async def _transaction(self, key: Destination, pool: Pool, conn: Conn, mail_from: str,
                           rcpts: list[str], data: bytes, *, reused: bool) -> Outcome:
        """MAIL, RCPT..., DATA on an open connection; pool the connection when it is clean."""
        conn.keep = False
        conn.uses += 1
        try:
            return await transaction.run(conn, mail_from, rcpts, data, reused=reused,
                                         timeout=self.command_timeout, counters=self.counters)
        finally:
            self._pools.put_back(key, pool, conn)
