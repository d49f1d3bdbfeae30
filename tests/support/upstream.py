"""An aiosmtpd SMTP server on 127.0.0.1 that records what it receives, for delivery tests.

    async with Upstream(rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}) as up:
        ... deliver to ("127.0.0.1", up.port) ...
        [msg] = await up.wait_for(1)
        assert msg.rcpt_tos == ("good@example.test",)

The server runs in the test's own event loop (not aiosmtpd's threaded `Controller`,
which needs a fixed port and makes waiting cross threads): it binds port 0 unless
given a port (then `port` is that one; needed when several upstreams on different
loopback addresses, 127.0.0.2 and 127.0.0.3, must share one port for MX tests),
and `wait_for()` waits on a condition instead of sleeping.
Because it shares the loop, a test must not block the loop (time.sleep, a
synchronous subprocess.run) while the server is expected to answer.

Behaviours, all optional and combinable:

- `mail_reply` / `rcpt_reply` / `data_reply`: always answer MAIL, RCPT or DATA so,
  e.g. `"451 4.3.0 try later"`; `rcpt_replies` answers per recipient address.
- `tempfail_first=N`: answer `tempfail_reply` (451) to the first N DATA commands,
  then accept.
- `starttls=ctx`: offer STARTTLS with that server context; `require_starttls` refuses
  mail before it. `implicit_tls=ctx`: TLS from the first byte (port 465 style).
- `auth=(user, password)`: offer AUTH PLAIN/LOGIN (also without TLS) and require it.
- `oauth=check`: offer AUTH XOAUTH2 and OAUTHBEARER (`oauth_mechanisms` to narrow it;
  also without TLS) and require AUTH; `check(token, mailbox)` says whether the bearer
  token opens the mailbox, e.g. `TokenServer.token_allows`. A refused token gets the
  error challenge first (`334 <base64 JSON>`, as Gmail and RFC 7628 do; the client's
  dummy answer is read) and then `535 5.7.8`; `oauth_error_challenge=False` answers
  535 at once. Every try is in `auth_attempts` (mechanism, login, token, accepted), and
  `Received.mechanism` says how the session that sent a message logged in.
- `hide={"8BITMIME", "SMTPUTF8", "SIZE", ...}`: leave EHLO keywords out.
- `rset_reply`: answer RSET so (e.g. "421 4.4.2 idle too long"; a client closes on 421).
- `data_delay`: seconds to hold every DATA before answering (to make sessions overlap).
- `pipelining`: advertise PIPELINING (RFC 2920; aiosmtpd reads commands in order anyway),
  default `Upstream.PIPELINING` (False), so a test module can run all its cases both ways.

Counters: `connections` (accepted so far), `active` (open now), `max_active` (the
most open at once), `auth_failures`; `password_attempts` lists every PLAIN/LOGIN
try as (connection number, mechanism). `drop_connections()` closes every open
connection from the server side (to test a client's handling of dead pooled ones).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import ssl
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["AuthAttempt", "Received", "Upstream", "parse_oauthbearer", "parse_xoauth2"]

OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


@dataclass(frozen=True)
class Received:
    """One message as the server got it (after DATA's dot-unstuffing)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    session: int  # 1 for the first connection the server accepted, 2 for the next, ...
    tls: bool
    login: str | None
    mechanism: str | None = None  # the SASL mechanism the session logged in with


@dataclass(frozen=True)
class AuthAttempt:
    """One OAuth AUTH command as the server judged it."""

    mechanism: str
    login: str
    token: str
    accepted: bool


def parse_xoauth2(raw: bytes) -> tuple[str, str]:
    """`user=U ^A auth=Bearer T ^A ^A` -> (U, T); ValueError when it is not that."""
    text = raw.decode("utf-8")
    if not text.endswith("\x01\x01"):
        raise ValueError("XOAUTH2 response does not end with ^A^A")
    fields = text[:-2].split("\x01")
    if len(fields) != 2 or not fields[0].startswith("user=") \
            or not fields[1].startswith("auth=Bearer "):
        raise ValueError("XOAUTH2 response is not user=...^Aauth=Bearer ...")
    return fields[0][len("user="):], fields[1][len("auth=Bearer "):]


def parse_oauthbearer(raw: bytes) -> tuple[str, str]:
    """RFC 7628: `n,a=U, ^A key=value ^A ... ^A ^A` -> (U, the bearer token)."""
    text = raw.decode("utf-8")
    if not text.endswith("\x01\x01"):
        raise ValueError("OAUTHBEARER response does not end with ^A^A")
    gs2, _, rest = text[:-2].partition("\x01")
    parts = gs2.split(",")
    if len(parts) != 3 or parts[0] not in ("n", "y") or not parts[1].startswith("a=") \
            or parts[2]:
        raise ValueError("OAUTHBEARER GS2 header is not n,a=user,")
    user = re.sub("=(2C|3D)", lambda m: "," if m.group(1) == "2C" else "=", parts[1][2:])
    pairs = dict(kv.partition("=")[::2] for kv in rest.split("\x01"))
    auth = pairs.get("auth", "")
    if not auth.startswith("Bearer "):
        raise ValueError("OAUTHBEARER response has no auth=Bearer ...")
    return user, auth[len("Bearer "):]


_PARSERS = {"XOAUTH2": parse_xoauth2, "OAUTHBEARER": parse_oauthbearer}


class _Server(SMTP):
    """aiosmtpd's SMTP, counting connections for its Upstream."""

    def __init__(self, upstream: Upstream, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self.upstream = upstream
        self.number = 0
        self.mechanism: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        super().connection_made(transport)
        if not starttls:
            self.number = self.upstream._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.upstream._closed(self)


class Upstream:
    """A recording SMTP server on loopback; see the module docstring for the options."""

    PIPELINING = False

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 hostname: str = "upstream.test",
                 mail_reply: str | None = None, rcpt_reply: str | None = None,
                 rcpt_replies: Mapping[str, str] | None = None, data_reply: str | None = None,
                 tempfail_first: int = 0,
                 tempfail_reply: str = "451 4.3.0 temporary failure, try again later",
                 starttls: ssl.SSLContext | None = None, require_starttls: bool = False,
                 implicit_tls: ssl.SSLContext | None = None,
                 auth: tuple[str, str] | None = None,
                 oauth: Callable[[str, str], bool] | None = None,
                 oauth_mechanisms: Iterable[str] = OAUTH_MECHANISMS,
                 oauth_error_challenge: bool = True, hide: Iterable[str] = (),
                 rset_reply: str | None = None, data_delay: float = 0.0,
                 data_size_limit: int = 33554432, pipelining: bool | None = None) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_reply = data_reply
        self.tempfail_first = tempfail_first
        self.tempfail_reply = tempfail_reply
        self.starttls = starttls
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.oauth = oauth
        self.oauth_mechanisms = {m.upper() for m in oauth_mechanisms}
        self.oauth_error_challenge = oauth_error_challenge
        self.auth_attempts: list[AuthAttempt] = []
        self.hide = {h.upper() for h in hide}
        self.rset_reply = rset_reply
        self.data_delay = data_delay
        self.data_size_limit = data_size_limit
        self.pipelining = self.PIPELINING if pipelining is None else pipelining

        self.messages: list[Received] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.data_commands = 0
        self.auth_failures = 0
        self.password_attempts: list[tuple[int, str]] = []
        self._servers: set[_Server] = set()
        self._server: asyncio.AbstractServer | None = None
        self._waiters: list[asyncio.Future[None]] = []

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=self.host, port=self.port,
                                                ssl=self.implicit_tls)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_connections()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def drop_connections(self) -> None:
        """Close every open connection from the server side, without a 421."""
        for server in list(self._servers):
            if server.transport is not None:
                server.transport.close()

    # -- waiting ----------------------------------------------------------------------------
    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until at least `count` messages arrived; return them all."""
        await self.wait_until(lambda: len(self.messages) >= count, timeout,
                              f"{count} message(s)")
        return list(self.messages)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0,
                         what: str = "the condition") -> None:
        """Wait until `predicate()` is true (checked whenever the server's state changes)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.remove(waiter)
        except TimeoutError:
            raise TimeoutError(
                f"waited {timeout}s for {what}; upstream has {len(self.messages)} message(s), "
                f"{self.active} open connection(s)") from None

    def _poke(self) -> None:
        """Something changed: let every waiter re-check its condition."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- server side ------------------------------------------------------------------------
    def _factory(self) -> _Server:
        kwargs: dict[str, Any] = {
            "hostname": self.hostname,  # never socket.getfqdn(): no DNS in tests
            "ident": "mailgw-test-upstream",
            "enable_SMTPUTF8": "SMTPUTF8" not in self.hide,
            "data_size_limit": self.data_size_limit,
            "loop": asyncio.get_running_loop(),
        }
        if self.starttls is not None:
            kwargs.update(tls_context=self.starttls, require_starttls=self.require_starttls)
        if self.auth is not None or self.oauth is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=False)
        if self.auth is None and self.oauth is None:
            excluded = list(OAUTH_MECHANISMS)  # aiosmtpd's own PLAIN/LOGIN stay, as ever
        else:
            offered = self.oauth_mechanisms if self.oauth is not None else set()
            if self.auth is not None:
                offered = offered | {"PLAIN", "LOGIN"}
            excluded = [m for m in ("PLAIN", "LOGIN", *OAUTH_MECHANISMS) if m not in offered]
        kwargs["auth_exclude_mechanism"] = excluded
        with warnings.catch_warnings():
            # AUTH without TLS is what these tests want; aiosmtpd warns about it
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return _Server(self, **kwargs)

    def _opened(self, server: _Server) -> int:
        self._servers.add(server)
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._poke()
        return self.connections

    def _closed(self, server: _Server) -> None:
        if server in self._servers:
            self._servers.discard(server)
            self.active -= 1
            self._poke()

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        assert self.auth is not None
        self.password_attempts.append(
            (server.number if isinstance(server, _Server) else 0, mechanism))
        if isinstance(auth_data, LoginPassword):
            user, password = self.auth
            if (auth_data.login.decode("utf-8", "replace") == user
                    and auth_data.password.decode("utf-8", "replace") == password):
                if isinstance(server, _Server):
                    server.mechanism = mechanism
                return AuthResult(success=True, auth_data=user)
        self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._oauth(server, "XOAUTH2", args)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._oauth(server, "OAUTHBEARER", args)

    async def _oauth(self, server: SMTP, mechanism: str, args: list[str]) -> AuthResult:
        """aiosmtpd calls this for `AUTH <mechanism> [initial response]`."""
        if len(args) > 1:
            try:
                raw: bytes = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):  # aborted; aiosmtpd has answered
                return AuthResult(success=False, handled=True)
            raw = answer
        try:
            login, token = _PARSERS[mechanism](raw)
        except (ValueError, UnicodeDecodeError) as exc:
            await server.push(f"501 5.5.2 malformed {mechanism} response: {exc}")
            return AuthResult(success=False, handled=True)
        assert self.oauth is not None
        accepted = self.oauth(token, login)
        self.auth_attempts.append(AuthAttempt(mechanism, login, token, accepted))
        self._poke()
        if accepted:
            if isinstance(server, _Server):
                server.mechanism = mechanism
            return AuthResult(success=True, auth_data=login)
        self.auth_failures += 1
        if self.oauth_error_challenge:
            error = {"status": "invalid_token" if mechanism == "OAUTHBEARER" else "401",
                     "schemes": "bearer", "scope": "https://mail.example.test/"}
            answer = await server.challenge_auth(json.dumps(error))
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in self.hide]
        if self.pipelining and "PIPELINING" not in self.hide:
            kept.insert(1, "250-PIPELINING")
        # the last line of a multi-line reply must read "250 ", the others "250-"
        return [("250-" if i < len(kept) - 1 else "250 ") + r[4:] for i, r in enumerate(kept)]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address.lower(), self.rcpt_reply)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.rset_reply is not None:
            return self.rset_reply
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_commands <= self.tempfail_first:
            return self.tempfail_reply
        if self.data_reply is not None and not self.data_reply.startswith("2"):
            return self.data_reply
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.messages.append(Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=content,
            mail_options=tuple(envelope.mail_options),
            session=server.number if isinstance(server, _Server) else 0,
            tls=session.ssl is not None or self.implicit_tls is not None,
            login=session.auth_data if session.authenticated else None,
            mechanism=server.mechanism if isinstance(server, _Server) else None,
        ))
        self._poke()
        return self.data_reply or f"250 2.0.0 OK queued as {len(self.messages)}"
