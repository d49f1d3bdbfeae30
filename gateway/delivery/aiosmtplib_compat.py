"""The one place that reaches into aiosmtplib's internals; the rest of delivery uses its
public API (`SMTP.connect/ehlo/starttls/login/mail/rcpt/data/rset/quit`, the exceptions).

What is reached into, and why:

- `SMTP.protocol` (aiosmtplib's `SMTPProtocol`) and its `transport`: the asyncio
  transport under an open connection.
- `asyncio.Transport.set_protocol` on that transport (`TakenTransport`): aiosmtplib reads
  one reply per command it sent and drops what arrives without a command waiting, so
  while the replies to a pipelined batch (RFC 2920) are read the bytes go to our own
  receiver instead. `connection_lost`, `pause_writing` and `resume_writing` are passed
  on to aiosmtplib's protocol meanwhile, so the `SMTP` object still knows when the
  connection is gone; `restore()` hands the transport back.
- `SMTPProtocol.write` and `SMTPProtocol.read_response` (`write_and_read`): the DATA
  fast path writes an already dot-stuffed message as it is, skipping the two regular
  expressions `SMTP.data()` runs over every message.
- `aiosmtplib.email.quote_address`: pipelined MAIL and RCPT lines quote addresses
  exactly as `SMTP.mail()`/`SMTP.rcpt()` would.
- `aiosmtplib.protocol.MAX_RESPONSE_LENGTH` and `COMMAND_INJECTION_REGEX`: our reply
  reader and command check keep aiosmtplib's limits (copied here as constants, which
  the unit test compares with the library's).

`REQUIRED` lists every such name; `tests/unit/test_aiosmtplib_compat.py` checks each one
(and runs the takeover against a loopback server), so a release that renames or drops
one fails that test by name instead of breaking delivery at run time.
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from aiosmtplib import SMTP, SMTPResponse, SMTPServerDisconnected
from aiosmtplib.email import quote_address

__all__ = [
    "COMMAND_INJECTION",
    "MAX_RESPONSE_LENGTH",
    "REQUIRED",
    "TESTED_BELOW",
    "TESTED_FROM",
    "TESTED_VERSIONS",
    "Receiver",
    "TakenTransport",
    "can_write_raw",
    "quote_address",
    "take_over",
    "write_and_read",
]

#: The aiosmtplib releases this module was tested against (pyproject pins the same range):
#: at least TESTED_FROM, below TESTED_BELOW. 5.1.2 is the first with both limits below.
TESTED_FROM = (5, 1, 2)
TESTED_BELOW = (5, 2)
TESTED_VERSIONS = ">=5.1.2,<5.2"

#: (module, class or None, attribute) for every internal name used here.
REQUIRED: tuple[tuple[str, str | None, str], ...] = (
    ("aiosmtplib.smtp", "SMTP", "protocol"),  # an instance attribute, set in __init__
    ("aiosmtplib.protocol", "SMTPProtocol", "transport"),  # likewise
    ("aiosmtplib.protocol", "SMTPProtocol", "write"),
    ("aiosmtplib.protocol", "SMTPProtocol", "read_response"),
    ("aiosmtplib.protocol", "SMTPProtocol", "connection_lost"),
    ("aiosmtplib.protocol", "SMTPProtocol", "pause_writing"),
    ("aiosmtplib.protocol", "SMTPProtocol", "resume_writing"),
    ("aiosmtplib.email", None, "quote_address"),
    ("aiosmtplib.protocol", None, "MAX_RESPONSE_LENGTH"),
    ("aiosmtplib.protocol", None, "COMMAND_INJECTION_REGEX"),
)

#: Bytes aiosmtplib refuses in a command (its COMMAND_INJECTION_REGEX).
COMMAND_INJECTION = re.compile(rb"[\x00-\x1f\x7f]")
#: aiosmtplib's bound on one reply (its MAX_RESPONSE_LENGTH).
MAX_RESPONSE_LENGTH = 8192 * 4


class Receiver(Protocol):
    """What gets a taken-over connection's events (the pipelined reply reader)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> None: ...

    def connection_lost(self) -> None: ...


class TakenTransport(asyncio.Protocol):
    """An aiosmtplib connection's transport, its incoming bytes routed to a `Receiver`
    until `restore()`; flow control and the connection's loss still reach aiosmtplib."""

    def __init__(self, inner: asyncio.BaseProtocol, transport: asyncio.WriteTransport,
                 receiver: Receiver) -> None:
        self._inner = inner
        self._transport = transport
        self._receiver = receiver
        transport.set_protocol(self)

    # -- asyncio.Protocol -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._receiver.data_received(data)

    def eof_received(self) -> bool:
        self._receiver.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._receiver.connection_lost()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- for the receiver's owner ---------------------------------------------------
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    def restore(self) -> None:
        """Hand the transport back to aiosmtplib (unless it is closing anyway)."""
        if not self._transport.is_closing():
            self._transport.set_protocol(self._inner)


def take_over(smtp: SMTP, receiver: Receiver) -> TakenTransport | None:
    """Route an open connection's incoming bytes to `receiver`; None (nothing changed)
    when the connection is closed or its transport cannot be written to."""
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if (protocol is None or not isinstance(transport, asyncio.WriteTransport)
            or transport.is_closing()):
        return None
    return TakenTransport(protocol, transport, receiver)


def can_write_raw(smtp: SMTP) -> bool:
    """Whether `write_and_read` can be used (the connection has a protocol)."""
    return smtp.protocol is not None


async def write_and_read(smtp: SMTP, payload: bytes, timeout: float) -> SMTPResponse:
    """Write `payload` as it is and read the one reply to it, as aiosmtplib reads replies."""
    protocol = smtp.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Server not connected")
    protocol.write(payload)
    return await protocol.read_response(timeout=timeout)
