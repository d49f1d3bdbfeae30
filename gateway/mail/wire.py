"""Checks of message bytes against the SMTP wire format (RFC 5321): lines end in CRLF only."""

from __future__ import annotations


def has_bare_newline(data: bytes) -> bool:
    """True if `data` holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf
