"""DATA encoding: the transport's dot-stuffing equals aiosmtplib's for CRLF-only messages."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery.smtp import dot_stuff

_CRLF_ONLY = st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b" ", b"x.y"]),
                      max_size=30).map(b"".join)


def aiosmtplib_payload(message: bytes) -> bytes:
    """What aiosmtplib's execute_data_command writes after DATA."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@given(_CRLF_ONLY)
def test_dot_stuff_matches_aiosmtplib(message: bytes) -> None:
    assert dot_stuff(message) == aiosmtplib_payload(message)


def test_dot_stuff_examples() -> None:
    assert dot_stuff(b"") == b"\r\n.\r\n"
    assert dot_stuff(b".x\r\n..y\r\n.\r\nz") == b"..x\r\n...y\r\n..\r\nz\r\n.\r\n"
