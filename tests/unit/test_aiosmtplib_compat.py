"""aiosmtplib's internals that gateway.delivery.aiosmtplib_compat relies on are still there
and still behave: each failure names the attribute or the behaviour that changed."""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtplib import SMTP
from aiosmtplib.protocol import SMTPProtocol

from gateway.delivery import aiosmtplib_compat as compat

VERSION = aiosmtplib.__version__
WHERE = "gateway/delivery/aiosmtplib_compat.py"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_installed_version_is_in_the_tested_range() -> None:
    v = _version_tuple(VERSION)
    assert compat.TESTED_FROM <= v < compat.TESTED_BELOW, (
        f"aiosmtplib {VERSION} is outside the range {WHERE} was tested against "
        f"({compat.TESTED_VERSIONS}): run this test module and tests/integration/"
        f"test_transport.py against it, then widen TESTED_* and the pin in pyproject.toml")


async def test_every_internal_name_is_there() -> None:
    instances: dict[str, object] = {"SMTP": SMTP(), "SMTPProtocol": SMTPProtocol()}
    missing: list[str] = []
    for module_name, cls_name, attr in compat.REQUIRED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"module {module_name}")
            continue
        owner: object = module
        name = module_name
        if cls_name is not None:
            owner = getattr(module, cls_name, None)
            name = f"{module_name}.{cls_name}"
            if owner is None:
                missing.append(name)
                continue
            if not hasattr(owner, attr):  # an instance attribute set in __init__
                owner = instances[cls_name]
        if not hasattr(owner, attr):
            missing.append(f"{name}.{attr}")
    assert not missing, (f"aiosmtplib {VERSION} no longer has {', '.join(missing)}; "
                         f"{WHERE} relies on it")


def test_copied_limits_match_the_library() -> None:
    from aiosmtplib import protocol
    assert protocol.MAX_RESPONSE_LENGTH == compat.MAX_RESPONSE_LENGTH, (
        f"aiosmtplib {VERSION} changed MAX_RESPONSE_LENGTH to {protocol.MAX_RESPONSE_LENGTH}; "
        f"update {WHERE}")
    assert protocol.COMMAND_INJECTION_REGEX.pattern == compat.COMMAND_INJECTION.pattern, (
        f"aiosmtplib {VERSION} changed COMMAND_INJECTION_REGEX to "
        f"{protocol.COMMAND_INJECTION_REGEX.pattern!r}; update {WHERE}")


def test_quote_address_quotes_as_mail_and_rcpt_do() -> None:
    assert compat.quote_address("a@example.test") == "<a@example.test>"
    assert compat.quote_address("<a@example.test>") == "<a@example.test>"
    assert compat.quote_address("") == "<>"


# -- the takeover against a loopback server ------------------------------------------------


@dataclass
class Server:
    """A scripted SMTP server: EHLO offers PIPELINING, NOOP is 250, every reply to one read
    goes out in one write; `HANGUP` closes the connection without a reply."""

    host: str = "127.0.0.1"
    port: int = 0
    commands: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 compat.test ESMTP\r\n")
        buf = b""
        try:
            while chunk := await reader.read(4096):
                buf += chunk
                out = b""
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    self.commands.append(line)
                    verb = line.split(b" ", 1)[0].upper()
                    if verb == b"EHLO":
                        out += b"250-compat.test\r\n250 PIPELINING\r\n"
                    elif verb == b"QUIT":
                        writer.write(out + b"221 bye\r\n")
                        return
                    elif verb == b"HANGUP":
                        return
                    else:
                        out += b"250 2.0.0 ok " + line + b"\r\n"
                writer.write(out)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    listener = await asyncio.start_server(srv.handle, srv.host, 0)
    srv.port = int(listener.sockets[0].getsockname()[1])
    async with listener:
        yield srv


class Recorder:
    """A compat.Receiver that keeps what it was told."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost = False
        self.changed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> None:
        self.eof = True
        self.changed.set()

    def connection_lost(self) -> None:
        self.lost = True
        self.changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Until `predicate()` holds; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def connected(server: Server) -> SMTP:
    smtp = SMTP(hostname=server.host, port=server.port, timeout=5, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def test_takeover_gets_every_reply_and_hands_the_connection_back(server: Server) -> None:
    smtp = await connected(server)
    rec = Recorder()
    taken = compat.take_over(smtp, rec)
    assert taken is not None, f"take_over found no writable transport under SMTP.protocol ({WHERE})"
    taken.write(b"NOOP one\r\nNOOP two\r\nNOOP three\r\n")
    await rec.wait(lambda: rec.data.count(b"\r\n") >= 3)
    assert rec.data == (b"250 2.0.0 ok NOOP one\r\n250 2.0.0 ok NOOP two\r\n"
                        b"250 2.0.0 ok NOOP three\r\n")
    taken.restore()
    # aiosmtplib reads replies again, in step with its commands
    code, message = await smtp.noop()
    assert (code, message) == (250, "2.0.0 ok NOOP"), f"aiosmtplib {VERSION} after restore()"
    response = await compat.write_and_read(smtp, b"NOOP raw\r\n", timeout=5)
    assert (response.code, response.message) == (250, "2.0.0 ok NOOP raw")
    await smtp.quit()


async def test_a_lost_connection_reaches_the_receiver_and_aiosmtplib(server: Server) -> None:
    smtp = await connected(server)
    rec = Recorder()
    taken = compat.take_over(smtp, rec)
    assert taken is not None
    taken.write(b"HANGUP\r\n")
    await rec.wait(lambda: rec.lost)
    assert not smtp.is_connected, (f"aiosmtplib {VERSION} did not see the connection close "
                                   f"while it was taken over ({WHERE} passes connection_lost on)")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        taken.write(b"NOOP\r\n")
    taken.restore()  # a closed transport is left alone


async def test_nothing_is_taken_from_a_closed_connection(server: Server) -> None:
    smtp = await connected(server)
    smtp.close()
    assert compat.take_over(smtp, Recorder()) is None
    assert not compat.can_write_raw(smtp)
