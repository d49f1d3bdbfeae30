"""Pipelined transactions (RFC 2920): MAIL, every RCPT and DATA in one write, and the
reader of their replies; also the DATA payload of a CRLF-only message (`dot_stuff`).

aiosmtplib reads one reply per command sent and would lose the rest of a batch that
arrives in one segment, so while a pipelined transaction runs, `Replies` receives the
connection's bytes (through `aiosmtplib_compat.take_over`) and `restore()` hands them
back. Replies are parsed as aiosmtplib parses them: the code of the last line, the
texts after the codes joined with newlines.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib import SMTP, SMTPReadTimeoutError, SMTPServerDisconnected

from gateway.delivery import aiosmtplib_compat as compat
from gateway.mail.wire import has_bare_newline


def dot_stuff(data: bytes) -> bytes:
    """A CRLF-only message as DATA sends it (RFC 5321 4.5.2): a dot doubled at every line
    start, CRLF at the end, then the terminating `.<CRLF>`."""
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def start(smtp: SMTP, mail_from: str, rcpts: list[str], data: bytes, options: list[str],
          encoding: str) -> Replies | None:
    """Send MAIL, RCPT... and DATA in one write when the server offers PIPELINING and the
    message needs nothing the sequential branch handles (bare CR or LF, an address
    aiosmtplib would refuse); the reader of their replies, or None (nothing was sent)."""
    if not smtp.is_connected or not smtp.supports_extension("pipelining"):
        return None
    if has_bare_newline(data):
        return None
    try:
        lines = [b" ".join([b"MAIL", b"FROM:" + compat.quote_address(mail_from).encode(encoding),
                            *(o.encode("ascii") for o in options)])]
        lines += [b"RCPT TO:" + compat.quote_address(r).encode(encoding) for r in rcpts]
    except (ValueError, UnicodeError):
        return None
    if any(compat.COMMAND_INJECTION.search(line) for line in lines):
        return None
    replies = Replies()
    if not replies.attach(smtp):
        return None
    replies.write(b"".join(line + b"\r\n" for line in lines) + b"DATA\r\n")
    return replies


class Replies:
    """The replies to pipelined commands on one connection, in the order they were sent."""

    def __init__(self) -> None:
        self._taken: compat.TakenTransport | None = None
        self._buf = bytearray()
        self._ready: deque[tuple[int, str]] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def attach(self, smtp: SMTP) -> bool:
        """Take the connection's incoming bytes over; False when it cannot be done."""
        self._taken = compat.take_over(smtp, self)
        return self._taken is not None

    # -- compat.Receiver --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._error is None:
            reply = self._parse()
            if reply is None:
                break
            self._ready.append(reply)
        if len(self._buf) > compat.MAX_RESPONSE_LENGTH and self._error is None:
            self._error = SMTPServerDisconnected("reply too long")
        self._wake()

    def eof_received(self) -> None:
        self._error = self._error or SMTPServerDisconnected("Unexpected EOF received")
        self._wake()

    def connection_lost(self) -> None:
        self._error = self._error or SMTPServerDisconnected("Connection lost")
        self._wake()

    # -- for the transaction ------------------------------------------------------------
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
        if self._taken is None:
            raise SMTPServerDisconnected("Connection lost")
        self._taken.write(data)

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
        """Hand the connection back to aiosmtplib; False if it must not be reused (lost,
        or bytes nobody asked for)."""
        clean = self._error is None and not self._buf and not self._ready
        if self._taken is not None:
            self._taken.restore()
        return clean
