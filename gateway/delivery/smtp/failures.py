"""How an SMTP session step ends when it does not end with a reply per recipient:
`Failure` (one answer for every recipient still without one), `Stale` (a pooled
connection was dead), `Outcome` (the results, and whether another MX may do better),
and the human reason inside an exception chain."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.delivery.transport import CredentialTrouble, RcptResult, reply_line


class Failure(Exception):
    """A failure that applies to every recipient still without an answer."""

    def __init__(self, code: int, status: str, text: str, *, remote: str | None = None,
                 next_mx: bool = False, credentials: CredentialTrouble | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = reply_line(text)
        self.remote = remote
        self.next_mx = next_mx
        self.credentials = credentials

    def result(self, rcpt: str) -> RcptResult:
        return RcptResult(rcpt=rcpt, code=self.code, status=self.status, text=self.text,
                          remote=self.remote, credentials=self.credentials)

    def outcome(self, rcpts: Sequence[str]) -> Outcome:
        return Outcome([self.result(r) for r in rcpts], next_mx=self.next_mx)


class TLSFailure(Failure):
    """The TLS handshake failed (opportunistic TLS then retries in plaintext)."""


class Stale(Exception):
    """A pooled connection turned out dead before the transaction got anywhere."""


@dataclass
class Outcome:
    results: list[RcptResult]
    next_mx: bool = False  # no definite answer: another MX host may do better


def errno_text(exc: BaseException) -> str:
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


def tls_cause(exc: BaseException) -> ssl.SSLError | ssl.CertificateError | None:
    """The TLS error somewhere in an exception chain, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
