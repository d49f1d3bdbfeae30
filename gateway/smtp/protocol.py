"""aiosmtpd's SMTP protocol, hardened for the gateway's edge.

`GatewaySMTP` adds what aiosmtpd leaves out: RFC 2034 enhanced status codes on every
reply (advertised as ENHANCEDSTATUSCODES), a connection limit per listener, a hard
session deadline against slow clients, and async AUTH that verifies passwords off
the event loop with a per-IP failure limit.

It also reads the DATA payload in bulk (`read_data`): aiosmtpd reads it one line at a
time, which costs more CPU than everything else in a submission. The result is the
same, byte for byte and reply for reply: only `<CRLF>.<CRLF>` ends the data, dots are
unstuffed at line starts, and the size limit (552) and line limit (500) are decided as
aiosmtpd decides them (`tests/unit/test_protocol.py` compares the two).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict, deque
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from aiosmtpd.smtp import log as aiosmtpd_log

from gateway.mail.addrspec import smtp_path
from gateway.smtp.aiosmtpd_compat import (
    PathReadingSMTP,
    call_handler_hook,
    decodes_data,
    has_handler_hook,
    reset_after_data,
    session_streams,
)

# `<local@domain>` with a dot-atom local part and a plain domain, then parameters: the
# address smtp_path() would return unchanged (checked by tests/unit/test_protocol.py)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH_RE = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+|$)")
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


DATA_OK, DATA_TOO_LONG, DATA_TOO_MUCH = "ok", "too long", "too much"


def _lines_within(raw: bytes, most: int) -> bool:
    """True if no CRLF-delimited line of `raw` has more than `most` octets of text
    (= max(map(len, raw.split(CRLF))) <= most, without splitting: one rfind per `most`)."""
    pos = 0
    n = len(raw)
    while n - pos > most:
        eol = raw.rfind(b"\r\n", pos, pos + most + 2)
        if eol < 0:
            return False
        pos = eol + 2
    return True


def data_verdict(raw: bytes, size_limit: int | None, line_limit: int) -> str:
    """What aiosmtpd's line loop would decide about DATA bytes `raw` (dot-stuffed, without
    the final `.<CRLF>`): DATA_OK, or the first limit it hits.

    A line whose text is longer than `line_limit` overruns aiosmtpd's stream reader and is
    too long before its bytes count; a line of `line_limit - 1` or `line_limit` octets
    plus CRLF counts against the size limit first and is too long after."""
    if (not size_limit or len(raw) <= size_limit) and _lines_within(raw, line_limit - 2):
        return DATA_OK
    total = 0
    pos = 0
    while pos < len(raw):
        eol = raw.find(b"\r\n", pos)
        end = len(raw) if eol < 0 else eol + 2
        if (end if eol < 0 else eol) - pos > line_limit:
            return DATA_TOO_LONG
        total += end - pos
        if size_limit and total > size_limit:
            return DATA_TOO_MUCH
        if end - pos > line_limit:
            return DATA_TOO_LONG
        pos = end
    return DATA_OK


async def read_data(reader: asyncio.StreamReader, size_limit: int | None,
                    line_limit: int) -> tuple[str, bytes]:
    """Read a DATA payload up to the line that is a lone dot; (verdict, unstuffed content).

    Only public StreamReader calls, so bytes after the end of data (pipelined commands)
    stay in `reader`. Like aiosmtpd, content is kept only while it is within `size_limit`;
    past it only the line under way is kept, until its length decides the verdict (see
    `data_verdict`). The content is empty unless the verdict is DATA_OK.
    """
    held: list[bytes] = []
    held_len = 0
    verdict = DATA_OK
    pending: bytes | None = None  # over the size limit: the line under way
    tail = b"\r\n"  # the last two octets read: the DATA command's CRLF at first
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)  # holds no ".\r\n"
            end = False
        else:
            before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk)[-5:-3]
            end = before == b"\r\n"  # ".\r\n" at a line start: the end of data
        piece = chunk[:-3] if end else chunk
        if verdict == DATA_OK:
            if pending is None:
                held.append(piece)
                held_len += len(piece)
                if size_limit and held_len > size_limit:
                    joined = b"".join(held)
                    held.clear()
                    cut = joined.rfind(b"\r\n") + 2 if b"\r\n" in joined else 0
                    verdict = data_verdict(joined[:cut], size_limit, line_limit)
                    if verdict == DATA_OK:  # the limit is crossed inside the last line
                        pending = joined[cut:]
            else:
                pending += piece
            if pending is not None:
                eol = pending.find(b"\r\n")
                if eol > line_limit or (eol < 0 and len(pending) > line_limit):
                    verdict = DATA_TOO_LONG
                elif eol >= 0:
                    verdict = DATA_TOO_MUCH
                if verdict != DATA_OK:
                    pending = None
        if end:
            break
        tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
    if verdict != DATA_OK:
        return verdict, b""
    raw = b"".join(held)
    held.clear()
    verdict = data_verdict(raw, size_limit, line_limit)
    if verdict != DATA_OK:
        return verdict, b""
    if b"\r\n." in raw or raw.startswith(b"."):  # RFC 5321 4.5.2 transparency
        raw = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    return DATA_OK, raw


class Limiter(Protocol):
    """What the submission handler asks about failed AUTH attempts per client IP."""

    async def is_blocked(self, ip: str) -> bool: ...
    async def record_failure(self, ip: str) -> None: ...
    async def record_success(self, ip: str) -> None: ...


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

    # the interface the submission handler awaits (the store-backed limiter's, too)
    async def is_blocked(self, ip: str) -> bool:
        return self.blocked(ip)

    async def record_failure(self, ip: str) -> None:
        self.failed(ip)

    async def record_success(self, ip: str) -> None:
        self.succeeded(ip)


class GatewaySMTP(PathReadingSMTP):
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

    def read_path(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path reading (the address in MAIL FROM / RCPT TO and what follows it),
        without the `typing.Protocol` class it builds on every call (two thirds of its
        cost), and with a shortcut for the common `<local@domain>` form."""
        if not arg:
            return "", ""
        m = _SIMPLE_PATH_RE.match(arg)
        if m is not None and not arg.startswith("(", m.end()):
            addr, rest = m.group(1), arg[m.end():]
        else:
            path = smtp_path(arg)
            if path is None:
                return None, None
            addr, rest = path
        localpart, _, _ = addr.rpartition("@")
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA with the payload read in bulk by `read_data`."""
        if decodes_data(self) or not has_handler_hook(self, "DATA"):
            await super().smtp_DATA(arg)  # what read_data does not model: aiosmtpd's own
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader, writer = session_streams(self)
        try:
            verdict, content = await read_data(reader, self.data_size_limit,
                                               self.line_length_limit)
        except asyncio.CancelledError:
            aiosmtpd_log.info("Connection lost during DATA")
            writer.close()
            raise
        except asyncio.IncompleteReadError:  # EOF inside DATA: nobody to answer
            writer.close()
            return
        if verdict == DATA_TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            reset_after_data(self)
            return
        if verdict == DATA_TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            reset_after_data(self)
            return
        self.envelope.content = content  # decode_data=False: bytes, as aiosmtpd keeps them
        self.envelope.original_content = content
        status = await call_handler_hook(self, "DATA")
        reset_after_data(self)
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False


__all__ = ["AuthLimiter", "AuthResult", "GatewaySMTP", "Limiter", "LoginPassword", "add_enhanced_code"]
