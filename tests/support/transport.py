"""An in-memory `Transport` for tests: records every send and answers each recipient
from a script of replies (`250 2.0.0 ok` when nothing is scripted).

A destination that logs in with OAuth (`Destination.token` set) has its token asked
for once per send, as a real transport does when it opens a connection; a token
getter that raises answers every recipient as `SMTPTransport` would
(`gateway.delivery.transport.token_error_reply`). `refuse_tokens` makes the "server"
refuse those tokens: a fresh one is asked for once (`rejected=`), and a second refusal
answers 454 4.7.8 with `credentials="refused"`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.delivery.mx import MXResolver
from gateway.delivery.transport import (
    CredentialTrouble,
    Destination,
    RcptResult,
    TLSMode,
    token_error_reply,
)
from gateway.errors import AccountError


@dataclass(frozen=True)
class Sent:
    """One call of `send` (`dest` set) or `send_mx` (`domain` set), and the clock's value
    when it was made."""

    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes
    at: float
    dest: Destination | None = None
    domain: str | None = None
    #: the OAuth tokens the "server" was offered, in order (empty without OAuth)
    tokens: tuple[str, ...] = ()


class MemoryTransport:
    """Answers `send`/`send_mx` from `script()`; `sends` lists every call in order."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 default: str = "250 2.0.0 ok") -> None:
        self.clock = clock
        self.default = default
        self.sends: list[Sent] = []
        self.closed = False
        self.refuse_tokens: set[str] = set()
        self._script: dict[str, list[str]] = {}

    def script(self, rcpt: str, *replies: str) -> None:
        """Answer the next attempts for `rcpt` with `replies` ("451 4.2.0 busy"), in order;
        the last one answers every attempt after them."""
        if not replies:
            raise ValueError("script at least one reply")
        self._script[rcpt] = list(replies)

    def sent_to(self, rcpt: str) -> list[Sent]:
        """The calls that carried `rcpt`."""
        return [s for s in self.sends if rcpt in s.rcpts]

    def _answer(self, rcpt: str, remote: str) -> RcptResult:
        replies = self._script.get(rcpt)
        reply = self.default
        if replies:
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return RcptResult.from_reply(rcpt, int(reply[:3]), reply[4:], remote)

    # -- the Transport protocol --------------------------------------------------------
    async def send(self, dest: Destination, mail_from: str, rcpts: list[str],
                   data: bytes) -> list[RcptResult]:
        offered: list[str] = []
        try:
            refusal = await self._login(dest, offered)
        finally:
            self.sends.append(Sent(mail_from, tuple(rcpts), data, self.clock(), dest=dest,
                                   tokens=tuple(offered)))
        if refusal is not None:
            return [RcptResult(r, *refusal[:3], dest.where, credentials=refusal[3])
                    for r in rcpts]
        return [self._answer(r, dest.where) for r in rcpts]

    async def _login(self, dest: Destination, offered: list[str]) -> tuple[
            int, str, str, CredentialTrouble | None] | None:
        if dest.token is None:
            return None
        rejected: str | None = None
        try:
            for _ in range(2):
                token = await dest.token(rejected=rejected)
                offered.append(token)
                if token not in self.refuse_tokens:
                    return None
                rejected = token
        except AccountError as exc:
            return token_error_reply(dest, exc)
        return (454, "4.7.8", f"{dest.who} needs reconnecting: token refused twice",
                "refused")

    async def send_mx(self, resolver: MXResolver, domain: str, mail_from: str,
                      rcpts: list[str], data: bytes, *, port: int, tls: TLSMode,
                      ca_file: str | None) -> list[RcptResult]:
        self.sends.append(Sent(mail_from, tuple(rcpts), data, self.clock(), domain=domain))
        return [self._answer(r, f"mx.{domain}:{port}") for r in rcpts]

    async def close(self) -> None:
        self.closed = True
