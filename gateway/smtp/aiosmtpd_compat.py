"""The one place the gateway reaches into aiosmtpd's private internals (tested with aiosmtpd 1.4).

`gateway.smtp.protocol.GatewaySMTP` reads the DATA payload and the MAIL FROM / RCPT TO
paths itself, and the submission handler asks whether the session runs over TLS. aiosmtpd
has no public API for these, so they are taken from its private state here, and only here:

==========================  =====================================================
``SMTP._handle_hooks``      the handler's ``handle_<VERB>`` hooks, by verb
``SMTP._call_handler_hook`` calls one hook as aiosmtpd does (server, session, envelope, ...)
``SMTP._set_post_data_state`` a fresh envelope after DATA, as aiosmtpd resets it
``SMTP._decode_data``       the ``decode_data`` argument (DATA content as str)
``SMTP._reader/_writer``    the session's stream reader and writer
``SMTP._tls_protocol``      the SSL protocol after STARTTLS (None before)
``SMTP._getaddr``           what ``smtp_MAIL`` / ``smtp_RCPT`` call to read a path
==========================  =====================================================

pyproject.toml holds aiosmtpd to the minor release these were tested with;
``tests/unit/test_aiosmtpd_compat.py`` checks each one on the installed aiosmtpd and names
the one that changed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP

__all__ = [
    "PathReadingSMTP",
    "call_handler_hook",
    "decodes_data",
    "has_handler_hook",
    "reset_after_data",
    "session_streams",
    "tls_active",
]


def has_handler_hook(server: Any, verb: str) -> bool:
    """Does the server's handler define ``handle_<verb>``?"""
    return verb in server._handle_hooks


async def call_handler_hook(server: Any, verb: str, *args: Any) -> Any:
    """The handler's ``handle_<verb>(server, session, envelope, *args)``; aiosmtpd's
    ``MISSING`` when the handler has none."""
    return await server._call_handler_hook(verb, *args)


def reset_after_data(server: Any) -> None:
    """Start a new envelope, as aiosmtpd does after DATA (accepted or refused)."""
    server._set_post_data_state()


def decodes_data(server: Any) -> bool:
    """Was the server made with ``decode_data=True`` (DATA content handed over as str)?"""
    return bool(server._decode_data)


def session_streams(server: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The connected session's stream reader and writer."""
    return server._reader, server._writer


def tls_active(server: Any) -> bool:
    """Does the session run over TLS (STARTTLS done, or a TLS listener)?"""
    return server._tls_protocol is not None or \
        server.transport.get_extra_info("sslcontext") is not None


class PathReadingSMTP(SMTP):
    """aiosmtpd's SMTP whose MAIL FROM / RCPT TO path reading is the public `read_path`."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.read_path(arg)

    def read_path(self, arg: str) -> tuple[str | None, str | None]:
        """(address, the text after it) of a MAIL FROM / RCPT TO argument; (None, None)
        when it cannot be read; ``("", "")`` for an empty one. aiosmtpd's own by default."""
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result
