"""gateway.smtp.aiosmtpd_compat: aiosmtpd's private internals still exist and behave as relied on.

Each check names the private attribute that changed, so an aiosmtpd upgrade that breaks
the adapter fails here first. The session checks run a real aiosmtpd server on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from gateway.smtp.aiosmtpd_compat import (
    PathReadingSMTP,
    call_handler_hook,
    decodes_data,
    has_handler_hook,
    reset_after_data,
    session_streams,
    tls_active,
)
from gateway.smtp.protocol import GatewaySMTP

DEADLINE = 10.0


def _where(name: str) -> str:
    return f"aiosmtpd {aiosmtpd.__version__}: SMTP.{name} changed; gateway/smtp/aiosmtpd_compat.py " \
           f"relies on it"


class DataHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any, *args: Any) -> str:
        self.calls.append((server, session, envelope, *args))
        return "250 from the hook"


class NoHooks:
    pass


@pytest.mark.parametrize("name", ["_call_handler_hook", "_set_post_data_state", "_getaddr",
                                  "_cb_client_connected", "smtp_DATA", "check_helo_needed",
                                  "check_auth_needed"])
def test_methods_exist(name: str) -> None:
    assert callable(getattr(SMTP, name, None)), _where(name)


async def test_handle_hooks_are_found_by_verb() -> None:
    server = SMTP(DataHandler())
    assert isinstance(getattr(server, "_handle_hooks", None), dict), _where("_handle_hooks")
    assert has_handler_hook(server, "DATA"), _where("_handle_hooks")
    assert not has_handler_hook(SMTP(NoHooks()), "DATA"), _where("_handle_hooks")


async def test_call_handler_hook_passes_server_session_envelope() -> None:
    handler = DataHandler()
    server = SMTP(handler)
    server.session = Session(asyncio.get_running_loop())
    server.envelope = Envelope()
    assert await call_handler_hook(server, "DATA", "x") == "250 from the hook", \
        _where("_call_handler_hook")
    assert handler.calls == [(server, server.session, server.envelope, "x")], \
        _where("_call_handler_hook")
    assert await call_handler_hook(server, "NOOP") is MISSING, _where("_call_handler_hook")


async def test_reset_after_data_gives_a_fresh_envelope() -> None:
    server = SMTP(NoHooks())
    old = server.envelope = Envelope()
    old.mail_from = "a@b.example"
    reset_after_data(server)
    assert isinstance(server.envelope, Envelope) and server.envelope is not old, \
        _where("_set_post_data_state")
    assert server.envelope.mail_from is None, _where("_set_post_data_state")


async def test_decode_data_is_the_constructor_argument() -> None:
    assert hasattr(SMTP(NoHooks()), "_decode_data"), _where("_decode_data")
    assert decodes_data(SMTP(NoHooks(), decode_data=True)), _where("_decode_data")
    assert not decodes_data(SMTP(NoHooks(), decode_data=False)), _where("_decode_data")


async def test_tls_protocol_starts_as_none() -> None:
    server = SMTP(NoHooks())
    assert hasattr(server, "_tls_protocol") and server._tls_protocol is None, _where("_tls_protocol")


async def test_gateway_attributes_do_not_shadow_aiosmtpd_ones() -> None:
    """GatewaySMTP's own private names must stay its own."""
    ours = {"_active", "_max_connections", "_session_deadline", "_deadline_handle", "_in_ehlo",
            "_expire"}
    theirs = set(dir(SMTP)) | set(vars(SMTP(NoHooks())))
    assert not ours & theirs, _where(", ".join(sorted(ours & theirs)))


class Recorder(PathReadingSMTP):
    """A plain aiosmtpd server that records what the adapter sees during a session."""

    seen: list[object]

    def read_path(self, arg: str) -> tuple[str | None, str | None]:
        self.seen.append(("path", arg))
        return super().read_path(arg)


class SessionHandler:
    def __init__(self, seen: list[object]) -> None:
        self.seen = seen

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reader, writer = session_streams(server)
        self.seen.append(("streams", isinstance(reader, asyncio.StreamReader),
                          isinstance(writer, asyncio.StreamWriter)))
        self.seen.append(("tls", tls_active(server)))
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def _reply(reader: asyncio.StreamReader) -> str:
    """One whole (possibly multi-line) SMTP reply."""
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), DEADLINE)).decode()
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "".join(lines)


async def test_a_session_goes_through_the_adapter() -> None:
    seen: list[object] = []

    def factory() -> Recorder:
        server = Recorder(SessionHandler(seen))
        server.seen = seen
        return server

    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE)
        assert (await _reply(reader)).startswith("220")
        replies = []
        for command in ("EHLO client.example", "MAIL FROM:<a@b.example> BODY=8BITMIME",
                        "RCPT TO:<c@d.example>", "QUIT"):
            writer.write(command.encode() + b"\r\n")
            replies.append(await _reply(reader))
        writer.close()
        await writer.wait_closed()
    finally:
        listener.close()
        await listener.wait_closed()
    assert [r[:3] for r in replies] == ["250", "250", "250", "221"], replies
    assert ("path", "<a@b.example> BODY=8BITMIME") in seen, _where("_getaddr (MAIL)")
    assert ("path", "<c@d.example>") in seen, _where("_getaddr (RCPT)")
    assert ("streams", True, True) in seen, _where("_reader / _writer")
    assert ("tls", False) in seen, _where("_tls_protocol")


def test_gateway_smtp_reads_paths_through_the_adapter() -> None:
    assert issubclass(GatewaySMTP, PathReadingSMTP)
    assert GatewaySMTP._getaddr is PathReadingSMTP._getaddr
