"""Small pieces every SMTP handler of the gateway shares: the client's IP, the EHLO reply, bare CR/LF."""

from __future__ import annotations

from typing import Any

from gateway.mail.wire import has_bare_newline

__all__ = ["BARE_NEWLINE_REPLY", "ehlo_reply", "has_bare_newline", "peer_ip"]

BARE_NEWLINE_REPLY = "550 5.5.2 Message contains bare CR or LF (RFC 5321 2.3.8); not accepted"


def peer_ip(session: Any) -> str:
    """The client's IP address as text ("unknown" when aiosmtpd has none)."""
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def ehlo_reply(session: Any, hostname: str, responses: list[str]) -> list[str]:
    """aiosmtpd's EHLO lines without HELP, plus ENHANCEDSTATUSCODES; remembers the client's name."""
    session.host_name = hostname
    lines = [r[4:] for r in responses if r[4:] != "HELP"]
    lines.append("ENHANCEDSTATUSCODES")
    return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
