"""aiosmtpd's SMTP protocol, hardened for the gateway's edge.

`GatewaySMTP` adds what aiosmtpd leaves out: RFC 2034 enhanced status codes on every
reply (advertised as ENHANCEDSTATUSCODES), a connection limit per listener, a hard
session deadline against slow clients, and async AUTH that verifies passwords off
the event loop with a per-IP failure limit.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict, deque
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_REPLY_RE = re.compile(r"^(\d{3})([ -])(.*)$", re.S)

# Default enhanced status per reply code (RFC 3463), used when a reply has none.
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "251": "2.1.5", "252": "2.0.0",
    "421": "4.7.0", "450": "4.2.0", "451": "4.3.0", "452": "4.5.3", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0",
    "551": "5.1.6", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}
_NO_ENHANCED = {"220", "334", "354"}


def add_enhanced_code(reply: str) -> str:
    """'503 Error: need MAIL command' -> '503 5.5.1 Error: need MAIL command'."""
    m = _REPLY_RE.match(reply)
    if not m:
        return reply
    code, sep, rest = m.groups()
    if code in _NO_ENHANCED or _ENHANCED_RE.match(rest):
        return reply
    enh = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    if code == "500" and "too long" in rest.lower():
        enh = "5.5.6" if "line" in rest.lower() else enh
    return f"{code}{sep}{enh} {rest}"


class AuthLimiter:
    """Counts failed AUTH attempts per client IP in a sliding window."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._fails: dict[str, deque[float]] = defaultdict(deque)

    def _trim(self, ip: str, now: float) -> deque[float]:
        q = self._fails[ip]
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def blocked(self, ip: str) -> bool:
        q = self._trim(ip, time.monotonic())
        if not q:
            self._fails.pop(ip, None)
            return False
        return len(q) >= self.max_failures

    def failed(self, ip: str) -> None:
        now = time.monotonic()
        self._trim(ip, now).append(now)
        if len(self._fails) > 100000:  # bound memory under a distributed attack
            self._fails.clear()

    def succeeded(self, ip: str) -> None:
        self._fails.pop(ip, None)


class GatewaySMTP(SMTP):
    """aiosmtpd SMTP with enhanced status codes, connection and session limits."""

    def __init__(self, handler: Any, *, active: set[GatewaySMTP], max_connections: int,
                 session_deadline: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._active = active
        self._max_connections = max_connections
        self._session_deadline = session_deadline
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._in_ehlo = False
        self.over_limit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self not in self._active:  # a second call comes after STARTTLS
            if len(self._active) >= self._max_connections:
                self.over_limit = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
            self._active.add(self)
            self._deadline_handle = self.loop.call_later(self._session_deadline, self._expire)
        super().connection_made(transport)

    def _expire(self) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"421 4.4.2 Session time limit exceeded\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.over_limit:
            return
        self._active.discard(self)
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        super().connection_lost(exc)

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._in_ehlo:
            status = add_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False


__all__ = ["AuthLimiter", "AuthResult", "GatewaySMTP", "LoginPassword", "add_enhanced_code"]
