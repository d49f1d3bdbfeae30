"""Hand one message to one SMTP destination and say, per recipient, what became of it.

`Transport.send()` never raises for SMTP or network trouble: every failure is turned
into a `RcptResult` labelled temporary (4xx, retry later) or permanent (5xx, bounce)
right here, where the reason is known, so that nothing downstream has to guess.

How failures are labelled::

    connect refused / reset / unreachable ......... 451 4.4.1  every recipient
    connect or greeting timed out ................. 451 4.4.1  every recipient
    connection lost or timed out mid-session ...... 451 4.4.2  recipients without an answer
    greeting 4xx/5xx ("refused to talk to me") .... 4xx        every recipient (5xx softened,
                                                               like Postfix smtp_skip_5xx_greeting)
    STARTTLS required but not offered ............. 451 4.7.4  every recipient
    TLS handshake or certificate failure .......... 451 4.7.5  every recipient
    AUTH rejected (535) or not offered ............ 454 4.7.8 / 4.7.0  (an admin fixes the
                                                               credentials; nothing bounces)
    EHLO/HELO 5xx, MAIL FROM 5xx .................. the reply, every recipient
    RCPT reply .................................... the reply, that recipient
    DATA reply .................................... the reply, every accepted recipient
    UTF-8 envelope, server without SMTPUTF8 ....... 550 5.6.7  every recipient (RFC 6531)

Connections are pooled per destination: after a transaction the connection goes
idle; the next message to the same destination (every `Destination` field equal
but `address`: host, port, TLS settings, credentials) reuses it, and an idle
connection is closed (QUIT) after `idle_timeout`. A transaction that ended with the
reply to the message (or to a refused MAIL FROM) leaves the server in its initial
state (RFC 5321 4.1.4), so the next one starts with MAIL FROM at once; any other
ending (every recipient refused, DATA refused) is cleared with RSET first. At most
`per_destination` connections to one destination are open at any time; further
senders wait. A reused connection that turns out dead (RSET or MAIL FROM fails with
421 or a disconnect, before any recipient was answered) is replaced once by a
fresh one. A connection lost during
or after DATA is never retried here: the server may have taken the message, and
the scheduler's next attempt is the retry (4.4.2).

8-bit data: BODY=8BITMIME is requested when the message has 8-bit bytes and the
server offers it. When the server does not offer it the message is still sent as
it is, unconverted: nearly every server copes, and converting to quoted-printable
(what RFC 6152 would ask) would change signed bytes and break DKIM. SMTPUTF8 is requested
when the envelope or the header block is non-ASCII and the server offers it; a
non-ASCII envelope to a server without SMTPUTF8 bounces with 5.6.7, a non-ASCII
header block alone is sent anyway.

`send_mx()` adds MX routing: resolve, then try each exchanger's addresses in
preference order, moving on after connection-level failures and 4xx replies to
the greeting, EHLO or MAIL FROM (like Postfix), and stopping at the first host
that gave an answer about the recipients.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.email import quote_address

from gateway.delivery.mx import MXResolver
from gateway.errors import MailError
from gateway.mail.headers import header_block
from gateway.mail.wire import has_bare_newline

__all__ = ["Destination", "RcptResult", "TLSMode", "Transport", "dot_stuff", "parse_reply"]

_log = logging.getLogger(__name__)

TLSMode = Literal["none", "starttls", "implicit", "opportunistic"]
_TLS_MODES = ("none", "starttls", "implicit", "opportunistic")

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_TEXT = 900  # keeps "<code> <status> <text>" well under 998 octets (DSN lines, logs)


@dataclass(frozen=True)
class Destination:
    """Where to deliver: one SMTP server and how to talk to it.

    `tls`: 'none' (plaintext), 'starttls' (upgrade, certificate verified against
    `ca_file` or the system store; with `tls_required` a server without STARTTLS is
    a temporary failure, without it the session stays plaintext), 'implicit' (TLS
    from the first byte, verified), 'opportunistic' (STARTTLS when offered, no
    verification, plaintext when not offered or when the handshake fails; Postfix
    `may`). `verify=False` turns verification off for 'starttls'/'implicit'.

    `address`, when set, is the IP address to connect to; `host` then only names the
    server (TLS SNI and certificate name, logs, `RcptResult.remote`). `send_mx` uses
    it to connect to the addresses it resolved through its own DNS resolver.
    """

    host: str
    port: int
    tls: TLSMode = "none"
    tls_required: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    verify: bool = True
    address: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(_TLS_MODES)}, not {self.tls!r}")

    @property
    def where(self) -> str:
        """`host[address]:port` or `host:port` (for messages before a connection exists)."""
        if self.address and self.address != self.host:
            return f"{self.host}[{self.address}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RcptResult:
    """What one delivery attempt did for one recipient.

    `code` is always 2xx, 4xx or 5xx; `status` the RFC 3463 enhanced code (from the
    server's reply when it gave one of the same class, else `<class>.0.0`); `text`
    the reply text on one line; `remote` "host[ip]:port" of the server that answered,
    None when no server answered (connection failed, DNS).
    """

    rcpt: str
    code: int
    status: str
    text: str
    remote: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def reply(self) -> str:
        """The reply as one line, e.g. `550 5.1.1 no such user`."""
        return f"{self.code} {self.status} {self.text}".rstrip()

    @classmethod
    def from_reply(cls, rcpt: str, code: int, message: str, remote: str | None) -> RcptResult:
        """Build from a raw server reply (code and possibly multi-line text)."""
        code, status, text = parse_reply(code, message)
        return cls(rcpt=rcpt, code=code, status=status, text=text, remote=remote)


def parse_reply(code: int, message: str) -> tuple[int, str, str]:
    """(code, multi-line text) -> (code, enhanced status, one-line text).

    A code outside 2xx/4xx/5xx (a 3xx where none belongs, garbage) becomes a
    temporary 451 4.5.0 so that it can never count as delivered or bounce a message.
    """
    if not (200 <= code < 300 or 400 <= code < 600):
        return 451, "4.5.0", _clean(f"unexpected reply {code} {message}")
    klass = str(code)[0]
    status: str | None = None
    parts: list[str] = []
    for line in message.splitlines():
        line = line.strip()
        m = _ENHANCED.match(line)
        if m and m.group(1) == klass:
            status = status or ".".join(m.groups())
            line = line[m.end():].strip()
        if line:
            parts.append(line)
    return code, status or f"{klass}.0.0", _clean(" ".join(parts))


def _clean(text: str) -> str:
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."


# -- internal control flow ----------------------------------------------------------


class _Failure(Exception):
    """A failure that applies to every recipient still without an answer."""

    def __init__(self, code: int, status: str, text: str, *, remote: str | None = None,
                 next_mx: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = _clean(text)
        self.remote = remote
        self.next_mx = next_mx

    def result(self, rcpt: str) -> RcptResult:
        return RcptResult(rcpt=rcpt, code=self.code, status=self.status, text=self.text,
                          remote=self.remote)

    def outcome(self, rcpts: Sequence[str]) -> _Outcome:
        return _Outcome([self.result(r) for r in rcpts], next_mx=self.next_mx)


class _TLSFailure(_Failure):
    """The TLS handshake failed (opportunistic TLS then retries in plaintext)."""


class _Stale(Exception):
    """A pooled connection turned out dead before the transaction got anywhere."""


@dataclass
class _Outcome:
    results: list[RcptResult]
    next_mx: bool = False  # no definite answer: another MX host may do better


@dataclass(eq=False)
class _Conn:
    smtp: SMTP
    remote: str
    generation: int
    expiry: asyncio.TimerHandle | None = None
    clean: bool = True  # no transaction left open: the next one needs no RSET


@dataclass(eq=False)
class _Pool:
    sem: asyncio.Semaphore
    idle: list[_Conn] = field(default_factory=list)
    users: int = 0  # senders holding or waiting for the semaphore


def _errno_text(exc: BaseException) -> str:
    """The most specific human reason inside an aiosmtplib/OS exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            detail = getattr(seen, "verify_message", None) or seen.reason
            return str(detail) if detail else str(seen)
        if isinstance(seen, OSError) and isinstance(seen.errno, int) and seen.errno > 0:
            return os.strerror(seen.errno)
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        if isinstance(seen, TimeoutError | asyncio.TimeoutError):
            return "timed out"
        seen = seen.__cause__
    return str(exc) or type(exc).__name__


def _tls_cause(exc: BaseException) -> ssl.SSLError | ssl.CertificateError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_COMMAND_INJECTION = re.compile(rb"[\x00-\x1f\x7f]")  # as aiosmtplib refuses in commands
_MAX_REPLY = 8192 * 4  # aiosmtplib's bound on one reply


class _Replies(asyncio.Protocol):
    """Reads the replies to pipelined commands (RFC 2920) on a pooled connection.

    aiosmtplib's protocol reads one reply per command sent and would lose the rest of a
    batch that arrives in one segment, so while a pipelined transaction runs this
    protocol takes the connection's transport over (`set_protocol`) and `restore()`
    hands it back. A lost connection is passed on to aiosmtplib's protocol too, so the
    SMTP object knows it is closed. Replies are parsed as aiosmtplib parses them: the
    code of the last line, the texts after the codes joined with newlines."""

    def __init__(self, inner: Any, transport: asyncio.WriteTransport) -> None:
        self._inner = inner
        self._transport = transport
        self._buf = bytearray()
        self._ready: deque[tuple[int, str]] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    # -- asyncio.Protocol -----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._error is None:
            reply = self._parse()
            if reply is None:
                break
            self._ready.append(reply)
        if len(self._buf) > _MAX_REPLY and self._error is None:
            self._error = SMTPServerDisconnected("reply too long")
        self._wake()

    def eof_received(self) -> bool:
        self._error = self._error or SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._error = self._error or SMTPServerDisconnected("Connection lost")
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- for the transaction ----------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> tuple[int, str] | None:
        texts: list[bytes] = []
        offset = 0
        while True:
            end = self._buf.find(b"\n", offset)
            if end < 0:
                return None
            line = bytes(self._buf[offset:end + 1])
            offset = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                self._error = SMTPServerDisconnected(
                    f"malformed reply line {line[:80].decode('utf-8', 'replace')!r}")
                return None
            texts.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buf[:offset]
                return code, b"\n".join(texts).decode("utf-8", "surrogateescape")

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def next(self, timeout: float) -> tuple[int, str]:
        """The next reply, in the order the commands went out."""
        while not self._ready:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self._waiter = None
        return self._ready.popleft()

    async def finish(self, pending: int, timeout: float, data_started: int | None = None) -> bool:
        """Read the replies still owed (`pending`, the last one to DATA); if DATA got 354
        although no recipient was accepted, end the empty message. True when the
        connection is in a known state and may be reused (after RSET)."""
        for n in range(pending):
            code, _ = await self.next(timeout)
            if n == pending - 1:
                data_started = code
            elif code == 421:
                return False
        if data_started == 354:
            self.write(b".\r\n")
            code, _ = await self.next(timeout)
            data_started = code
        return data_started != 421

    def restore(self) -> bool:
        """Hand the transport back to aiosmtplib; False if the connection must not be reused
        (lost, or bytes nobody asked for)."""
        clean = self._error is None and not self._buf and not self._ready
        if not self._transport.is_closing():
            self._transport.set_protocol(self._inner)
        return clean


class Transport:
    """SMTP client with a per-destination connection pool; one message per `send()`."""

    #: At most this many addresses are tried for one `send_mx()` (Postfix: smtp_mx_address_limit).
    mx_address_limit = 10

    def __init__(self, helo: str, *, connect_timeout: float, command_timeout: float,
                 idle_timeout: float = 10, per_destination: int = 10) -> None:
        if per_destination < 1:
            raise ValueError("per_destination must be at least 1")
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self.per_destination = per_destination
        self.connections_opened = 0
        self.connections_reused = 0
        self.transactions_pipelined = 0
        self._pools: dict[Destination, _Pool] = {}
        self._tls_contexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0

    # -- public API -------------------------------------------------------------------
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
            return [RcptResult(rcpt=r, code=exc.code, status=exc.status, text=_clean(exc.text))
                    for r in rcpts]
        last: _Outcome | None = None
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
        self._generation += 1
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
        """Pooled connections waiting for a message (for tests and metrics)."""
        return sum(len(p.idle) for p in self._pools.values())

    # -- one message --------------------------------------------------------------------
    async def _send_guarded(self, dest: Destination, mail_from: str, rcpts: list[str],
                            data: bytes) -> _Outcome:
        if not rcpts:
            return _Outcome([])
        try:
            return await self._send(dest, mail_from, rcpts, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the scheduler down with it
            _log.exception("transport failed unexpectedly for %s", dest.where)
            return _Failure(451, "4.3.0", f"internal error delivering to {dest.where}: "
                            f"{type(exc).__name__}: {exc}").outcome(rcpts)

    async def _send(self, dest: Destination, mail_from: str, rcpts: list[str],
                    data: bytes) -> _Outcome:
        key = replace(dest, address=None)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(asyncio.Semaphore(self.per_destination))
        pool.users += 1
        try:
            async with pool.sem:
                return await self._session(key, pool, dest, mail_from, rcpts, data)
        finally:
            pool.users -= 1
            self._forget_if_unused(key, pool)

    async def _session(self, key: Destination, pool: _Pool, dest: Destination,
                       mail_from: str, rcpts: list[str], data: bytes) -> _Outcome:
        conn = self._take_idle(pool)
        if conn is not None:
            try:
                return await self._transaction(key, pool, conn, mail_from, rcpts, data,
                                               reused=True)
            except _Stale:
                _log.debug("pooled connection to %s was dead; opening a new one", conn.remote)
        try:
            conn = await self._open(dest)
        except _TLSFailure as exc:
            if dest.tls != "opportunistic":
                return exc.outcome(rcpts)
            _log.info("TLS failed with %s, retrying in plaintext: %s", dest.where, exc.text)
            try:
                conn = await self._open(dest, starttls=False)
            except _Failure as exc2:
                return exc2.outcome(rcpts)
        except _Failure as exc:
            return exc.outcome(rcpts)
        try:
            return await self._transaction(key, pool, conn, mail_from, rcpts, data,
                                           reused=False)
        except _Stale:  # pragma: no cover - only raised for reused connections
            raise AssertionError("fresh connection reported stale") from None

    async def _transaction(self, key: Destination, pool: _Pool, conn: _Conn, mail_from: str,
                           rcpts: list[str], data: bytes, *, reused: bool) -> _Outcome:
        """MAIL, RCPT..., DATA on an open connection; pool the connection when it is clean."""
        smtp = conn.smtp
        remote = conn.remote
        results: dict[int, RcptResult] = {}
        accepted: list[int] = []
        stage = "RSET"
        answered = False  # some recipient got a definite reply
        keep = False
        next_mx = False
        was_clean, conn.clean = conn.clean, False
        unproven = reused and was_clean  # counted as reused once MAIL FROM gets an answer
        try:
            if reused and not was_clean:
                try:
                    await smtp.rset()
                except SMTPResponseException:
                    raise _Stale() from None
                self.connections_reused += 1
            try:
                options, encoding = self._mail_options(smtp, remote, mail_from, rcpts, data)
            except _Failure as exc:
                keep = conn.clean = True
                self.connections_reused += unproven
                return exc.outcome(rcpts)
            replies = self._pipeline(smtp, mail_from, rcpts, data, options, encoding)
            if replies is not None:
                self.transactions_pipelined += 1
                # MAIL, every RCPT and DATA went out in one write (RFC 2920); their replies
                # are read in order below, exactly as the sequential branch would see them
                try:
                    stage = "MAIL FROM"
                    code, message = await replies.next(self.command_timeout)
                    if code != 250:
                        if reused and code == 421:
                            raise _Stale()
                        self.connections_reused += unproven
                        refused = parse_reply(code, message)
                        try:  # the refusal is the answer; the rest only decides reuse
                            keep = code != 421 and await replies.finish(
                                len(rcpts) + 1, self.command_timeout)
                        except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
                            keep = False
                        return _Outcome([RcptResult(r, *refused, remote) for r in rcpts],
                                        next_mx=refused[0] // 100 == 4)
                    self.connections_reused += unproven
                    stage = "RCPT TO"
                    for i, rcpt in enumerate(rcpts):
                        code, message = await replies.next(self.command_timeout)
                        if code == 421:  # the server is closing the session
                            if reused and not answered:
                                raise _Stale()
                            for j in range(len(rcpts)):
                                if j not in results or j in accepted:
                                    results[j] = RcptResult.from_reply(rcpts[j], code, message,
                                                                       remote)
                            accepted.clear()
                            return self._outcome(rcpts, results)
                        if code in (250, 251):
                            accepted.append(i)
                        else:
                            results[i] = RcptResult.from_reply(rcpt, code, message, remote)
                        answered = True
                    stage = "DATA"
                    code, message = await replies.next(self.command_timeout)
                    if not accepted:
                        keep = await replies.finish(0, self.command_timeout, data_started=code)
                        return self._outcome(rcpts, results)
                    if code == 354:
                        replies.write(dot_stuff(data))
                        code, message = await replies.next(self.command_timeout)
                    keep = code != 421
                    conn.clean = code == 250
                    for i in accepted:
                        results[i] = RcptResult.from_reply(rcpts[i], code, message, remote)
                    return self._outcome(rcpts, results)
                finally:
                    if not replies.restore():
                        keep = False
            stage = "MAIL FROM"
            try:
                await smtp.mail(mail_from, options=options, encoding=encoding)
            except SMTPResponseException as exc:
                if reused and exc.code == 421:
                    raise _Stale() from None
                self.connections_reused += unproven
                keep = exc.code != 421
                conn.clean = True  # a refused MAIL FROM opens no transaction
                code, status, text = parse_reply(exc.code, exc.message)
                return _Outcome([RcptResult(r, code, status, text, remote) for r in rcpts],
                                next_mx=code // 100 == 4)
            except ValueError as exc:  # unusable sender address (aiosmtplib refuses to send it)
                keep = True
                self.connections_reused += unproven
                return _Failure(553, "5.1.7", f"bad sender address {mail_from!r}: {exc}",
                                remote=remote).outcome(rcpts)
            self.connections_reused += unproven
            stage = "RCPT TO"
            for i, rcpt in enumerate(rcpts):
                try:
                    await smtp.rcpt(rcpt, encoding=encoding)
                except SMTPResponseException as exc:
                    if exc.code == 421:  # the server is closing the session
                        if reused and not answered:
                            raise _Stale() from None
                        for j in range(len(rcpts)):
                            if j not in results or j in accepted:
                                results[j] = RcptResult.from_reply(rcpts[j], exc.code,
                                                                   exc.message, remote)
                        accepted.clear()
                        return self._outcome(rcpts, results)
                    results[i] = RcptResult.from_reply(rcpt, exc.code, exc.message, remote)
                except ValueError as exc:
                    results[i] = RcptResult(rcpt, 553, "5.1.3",
                                            _clean(f"bad recipient address {rcpt!r}: {exc}"),
                                            None)
                    continue
                else:
                    accepted.append(i)
                answered = True
            if not accepted:
                keep = True
                return self._outcome(rcpts, results)
            stage = "DATA"
            try:
                resp = await self._data(smtp, data)
                code, message = resp.code, resp.message
                keep = conn.clean = True
            except SMTPResponseException as exc:
                code, message = exc.code, exc.message
                keep = exc.code != 421
            for i in accepted:
                results[i] = RcptResult.from_reply(rcpts[i], code, message, remote)
            return self._outcome(rcpts, results)
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            keep = False
            if reused and not answered and stage != "DATA":
                raise _Stale() from None
            why = "timed out" if isinstance(exc, TimeoutError) else "lost connection"
            failure = _Failure(451, "4.4.2", f"{why} with {remote} while sending {stage}"
                               f" ({_errno_text(exc)})", remote=remote)
            for i, rcpt in enumerate(rcpts):
                if i not in results or i in accepted:
                    results[i] = failure.result(rcpt)
            next_mx = not answered
            return self._outcome(rcpts, results, next_mx=next_mx)
        finally:
            if keep and smtp.is_connected:
                self._release(key, pool, conn)
            else:
                self._discard(conn)

    @staticmethod
    def _pipeline(smtp: SMTP, mail_from: str, rcpts: list[str], data: bytes,
                  options: list[str], encoding: str) -> _Replies | None:
        """Send MAIL, RCPT... and DATA in one write when the server offers PIPELINING and the
        message needs nothing the sequential branch handles (bare CR or LF, an address
        aiosmtplib would refuse); the reader of their replies, or None."""
        protocol = smtp.protocol
        transport = protocol.transport if protocol is not None else None
        if (protocol is None or not isinstance(transport, asyncio.WriteTransport)
                or transport.is_closing() or not smtp.supports_extension("pipelining")):
            return None
        if has_bare_newline(data):
            return None
        try:
            lines = [b" ".join([b"MAIL", b"FROM:" + quote_address(mail_from).encode(encoding),
                                *(o.encode("ascii") for o in options)])]
            lines += [b"RCPT TO:" + quote_address(r).encode(encoding) for r in rcpts]
        except (ValueError, UnicodeError):
            return None
        if any(_COMMAND_INJECTION.search(line) for line in lines):
            return None
        replies = _Replies(protocol, transport)
        replies.write(b"".join(line + b"\r\n" for line in lines) + b"DATA\r\n")
        return replies

    async def _data(self, smtp: SMTP, data: bytes) -> SMTPResponse:
        """DATA, then the message: the reply to it, or SMTPDataError as `SMTP.data()` raises.

        aiosmtplib's `data()` runs two regular expressions over every message (line ends,
        dot-stuffing) that cost more than the rest of the transaction together. A message
        with CRLF line ends only (everything the relay spools) needs neither: it is
        dot-stuffed with one replace() and written as it is. Anything else goes through
        `data()`, which turns bare CR and LF into CRLF."""
        protocol = smtp.protocol
        if protocol is None or has_bare_newline(data):
            return await smtp.data(data, timeout=self.command_timeout)
        payload = dot_stuff(data)
        start = await smtp.execute_command(b"DATA", timeout=self.command_timeout)
        if start.code != 354:
            raise SMTPDataError(start.code, start.message)
        try:
            protocol.write(payload)
            response = await protocol.read_response(timeout=self.command_timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError):
            smtp.close()
            raise
        if response.code != 250:
            raise SMTPDataError(response.code, response.message)
        return response

    @staticmethod
    def _outcome(rcpts: list[str], results: dict[int, RcptResult], *,
                 next_mx: bool = False) -> _Outcome:
        return _Outcome([results[i] for i in range(len(rcpts))], next_mx=next_mx)

    @staticmethod
    def _mail_options(smtp: SMTP, remote: str, mail_from: str, rcpts: list[str],
                      data: bytes) -> tuple[list[str], str]:
        """MAIL FROM parameters the message needs and the server offers; the address encoding."""
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if not data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        utf8_envelope = not (mail_from.isascii() and all(r.isascii() for r in rcpts))
        if utf8_envelope or not header_block(data).isascii():
            if smtp.supports_extension("smtputf8"):
                options.append("SMTPUTF8")
                return options, "utf-8"
            if utf8_envelope:
                raise _Failure(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by "
                               f"host {remote}", remote=remote)
        return options, "ascii"

    # -- connections ----------------------------------------------------------------------
    async def _open(self, dest: Destination, *, starttls: bool = True) -> _Conn:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as `dest` asks."""
        where = dest.where
        wants_tls = dest.tls != "none" and (starttls or dest.tls == "implicit")
        ctx = await self._tls_context(dest) if wants_tls else None
        smtp = await self._connect(dest, ctx)
        self.connections_opened += 1
        remote = self._remote(smtp, dest)
        try:
            await self._ehlo(smtp, remote)
            if dest.tls in ("starttls", "opportunistic") and starttls:
                assert ctx is not None
                await self._starttls(smtp, dest, remote, ctx)
            if dest.username is not None:
                await self._login(smtp, dest, remote)
        except _Failure:
            await self._quit(smtp)
            raise
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            smtp.close()
            why = "timed out" if isinstance(exc, TimeoutError) else "lost connection"
            raise _Failure(451, "4.4.2", f"{why} with {remote} during the session set-up "
                           f"({_errno_text(exc)})", next_mx=True) from None
        except BaseException:
            smtp.close()
            raise
        _log.debug("connected to %s (%s)", remote, where)
        return _Conn(smtp, remote, self._generation)

    async def _connect(self, dest: Destination, ctx: ssl.SSLContext | None) -> SMTP:
        where = dest.where
        implicit = dest.tls == "implicit"
        smtp: SMTP
        if implicit and dest.address and dest.address != dest.host:
            # aiosmtplib takes the TLS server name from `hostname`; connect the socket
            # ourselves so that SNI and the certificate check use the name, not the address.
            sock = await self._tcp_connect(dest)
            smtp = SMTP(hostname=dest.host, sock=sock, local_hostname=self.helo,
                        timeout=self.command_timeout, use_tls=True, start_tls=False,
                        tls_context=ctx)
        else:
            smtp = SMTP(hostname=dest.address or dest.host, port=dest.port,
                        local_hostname=self.helo, timeout=self.command_timeout,
                        use_tls=implicit, start_tls=False, tls_context=ctx)
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except SMTPConnectResponseError as exc:
            code, status, text = parse_reply(exc.code, exc.message)
            if code // 100 != 4:  # a 5xx greeting: try elsewhere / later (Postfix default)
                code, status = 451, "4" + status[1:]
            raise _Failure(code, status, f"host {where} refused to talk to me: "
                           f"{exc.code} {text}", next_mx=True) from None
        except SMTPConnectTimeoutError:
            raise _Failure(451, "4.4.1", f"connect to {where}: timed out",
                           next_mx=True) from None
        except (SMTPException, OSError) as exc:
            if implicit and _tls_cause(exc) is not None:
                raise _TLSFailure(451, "4.7.5", f"TLS with {where} failed: {_errno_text(exc)}",
                                  next_mx=True) from None
            raise _Failure(451, "4.4.1", f"connect to {where}: {_errno_text(exc)}",
                           next_mx=True) from None
        return smtp

    async def _tcp_connect(self, dest: Destination) -> socket.socket:
        assert dest.address is not None
        try:
            family = (socket.AF_INET6 if ipaddress.ip_address(dest.address).version == 6
                      else socket.AF_INET)
        except ValueError:
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (dest.address, dest.port)),
                self.connect_timeout)
        except TimeoutError:
            sock.close()
            raise _Failure(451, "4.4.1", f"connect to {dest.where}: timed out",
                           next_mx=True) from None
        except OSError as exc:
            sock.close()
            raise _Failure(451, "4.4.1", f"connect to {dest.where}: {_errno_text(exc)}",
                           next_mx=True) from None
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _remote(smtp: SMTP, dest: Destination) -> str:
        try:
            peer = smtp.get_transport_info("peername")
        except SMTPException:
            peer = None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{dest.host}[{peer[0]}]:{peer[1]}"
        return dest.where

    async def _ehlo(self, smtp: SMTP, remote: str) -> None:
        try:
            await smtp.ehlo()
            return
        except SMTPHeloError as exc:
            if not smtp.is_connected:
                raise self._helo_failure(remote, "EHLO", exc) from None
        try:
            await smtp.helo()
        except SMTPHeloError as exc:
            raise self._helo_failure(remote, "HELO", exc) from None

    @staticmethod
    def _helo_failure(remote: str, verb: str, exc: SMTPResponseException) -> _Failure:
        code, status, text = parse_reply(exc.code, exc.message)
        return _Failure(code, status, f"host {remote} refused {verb}: {exc.code} {text}",
                        remote=remote, next_mx=code // 100 == 4)

    async def _starttls(self, smtp: SMTP, dest: Destination, remote: str,
                        ctx: ssl.SSLContext) -> None:
        required = dest.tls == "starttls" and dest.tls_required
        if not smtp.supports_extension("starttls"):
            if required:
                raise _Failure(451, "4.7.4", f"TLS is required, but was not offered by host "
                               f"{remote}", next_mx=True)
            return
        try:
            await smtp.starttls(server_hostname=dest.host, tls_context=ctx,
                                timeout=self.command_timeout)
        except SMTPResponseException as exc:  # e.g. 454 TLS not available
            if required or not smtp.is_connected:
                _, _, text = parse_reply(exc.code, exc.message)
                raise _TLSFailure(451, "4.7.5", f"host {remote} refused STARTTLS: "
                                  f"{exc.code} {text}", next_mx=True) from None
            return  # STARTTLS is optional here: carry on in plaintext
        except (ssl.SSLError, ssl.CertificateError, SMTPServerDisconnected, SMTPTimeoutError,
                OSError) as exc:
            smtp.close()
            raise _TLSFailure(451, "4.7.5", f"TLS handshake with {remote} failed: "
                              f"{_errno_text(exc)}", next_mx=True) from None
        await self._ehlo(smtp, remote)  # RFC 3207: forget what was said before TLS

    async def _login(self, smtp: SMTP, dest: Destination, remote: str) -> None:
        user = dest.username or ""
        if not smtp.supports_extension("auth"):
            raise _Failure(454, "4.7.0", f"host {remote} offers no AUTH (to log in as {user})",
                           remote=remote)
        try:
            await smtp.login(user, dest.password or "")
        except SMTPResponseException as exc:
            _, _, text = parse_reply(exc.code, exc.message)
            status = "4.7.8" if isinstance(exc, SMTPAuthenticationError) else "4.7.0"
            raise _Failure(454, status, f"authentication as {user} failed at {remote}: "
                           f"{exc.code} {text}", remote=remote) from None
        except SMTPServerDisconnected:
            raise
        except SMTPException as exc:  # no common mechanism
            raise _Failure(454, "4.7.0", f"cannot log in as {user} at {remote}: {exc}",
                           remote=remote) from None

    async def _tls_context(self, dest: Destination) -> ssl.SSLContext:
        verify = dest.verify and dest.tls != "opportunistic"
        key = (dest.ca_file if verify else None, verify)
        ctx = self._tls_contexts.get(key)
        if ctx is None:
            try:
                ctx = await asyncio.to_thread(_make_client_context, key[0], verify)
            except (OSError, ssl.SSLError) as exc:
                raise _Failure(451, "4.7.5", f"cannot set up TLS for {dest.where}: "
                               f"{_errno_text(exc)} ({dest.ca_file})") from None
            self._tls_contexts[key] = ctx
        return ctx

    # -- the pool ---------------------------------------------------------------------------
    def _take_idle(self, pool: _Pool) -> _Conn | None:
        while pool.idle:
            conn = pool.idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if conn.smtp.is_connected:
                return conn
            self._discard(conn)
        return None

    def _release(self, key: Destination, pool: _Pool, conn: _Conn) -> None:
        if conn.generation != self._generation or self.idle_timeout <= 0:
            self._quit_later(conn)
            return
        loop = asyncio.get_running_loop()
        conn.expiry = loop.call_later(self.idle_timeout, self._expire, key, pool, conn)
        pool.idle.append(conn)

    def _expire(self, key: Destination, pool: _Pool, conn: _Conn) -> None:
        conn.expiry = None
        if conn in pool.idle:
            pool.idle.remove(conn)
            self._quit_later(conn)
        self._forget_if_unused(key, pool)

    def _forget_if_unused(self, key: Destination, pool: _Pool) -> None:
        if pool.users == 0 and not pool.idle and self._pools.get(key) is pool:
            del self._pools[key]

    @staticmethod
    def _discard(conn: _Conn) -> None:
        conn.smtp.close()

    def _quit_later(self, conn: _Conn) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(conn.smtp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quit(self, smtp: SMTP) -> None:
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=min(5.0, self.command_timeout))
        except (SMTPException, OSError, TimeoutError):
            pass
        finally:
            smtp.close()


def dot_stuff(data: bytes) -> bytes:
    """A CRLF-only message as DATA sends it (RFC 5321 4.5.2): a dot doubled at every line
    start, CRLF at the end, then the terminating `.<CRLF>`."""
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def _make_client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """A client context: verified against `ca_file` (or the system store), or not at all."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=ca_file)
