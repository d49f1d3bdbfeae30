"""An in-memory `Transport` for tests: records every send and answers each recipient
from a script of replies (`250 2.0.0 ok` when nothing is scripted)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.delivery.mx import MXResolver
from gateway.delivery.transport import Destination, RcptResult, TLSMode


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


class MemoryTransport:
    """Answers `send`/`send_mx` from `script()`; `sends` lists every call in order."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 default: str = "250 2.0.0 ok") -> None:
        self.clock = clock
        self.default = default
        self.sends: list[Sent] = []
        self.closed = False
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
        self.sends.append(Sent(mail_from, tuple(rcpts), data, self.clock(), dest=dest))
        return [self._answer(r, dest.where) for r in rcpts]

    async def send_mx(self, resolver: MXResolver, domain: str, mail_from: str,
                      rcpts: list[str], data: bytes, *, port: int, tls: TLSMode,
                      ca_file: str | None) -> list[RcptResult]:
        self.sends.append(Sent(mail_from, tuple(rcpts), data, self.clock(), domain=domain))
        return [self._answer(r, f"mx.{domain}:{port}") for r in rcpts]

    async def close(self) -> None:
        self.closed = True
