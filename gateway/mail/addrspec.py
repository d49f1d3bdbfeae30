"""SMTP paths and addr-specs read exactly as the stdlib's email parser reads them.

The only module of the gateway that touches the stdlib's private
``email._header_value_parser``: aiosmtpd reads the address of ``MAIL FROM:`` and
``RCPT TO:`` with its ``get_angle_addr`` and ``get_addr_spec``, and the submission
edge must read it the same way, byte for byte (see `gateway.smtp.protocol`). When a
Python release changes either function, ``tests/unit/test_addrspec.py`` says which.

What the parser refuses (a ``HeaderParseError``) comes back as None, and so does what
else it raises on hostile input: ``IndexError`` (the empty text), ``AttributeError`` (an
address literal cut by a line break) and ``RecursionError`` (comments nested a few
hundred deep). aiosmtpd passes those on and its session answers ``500 Error:
(IndexError) ...`` with a traceback in the log; here they are a syntax error like any
other (``501 5.5.4``). The fuzz test in ``tests/unit/test_addrspec.py`` holds the readings
to the stdlib's and the errors to these.

The stdlib's parser is quadratic in runs of quoted strings and comments (40 KB of
``"a"`` take seconds): a text longer than :data:`MAX_TEXT` is refused (None) unread.
aiosmtpd never hands a longer command argument on (its command lines end at 512 octets
plus the extensions' allowances), so an SMTP session reads the same either way.
"""

from __future__ import annotations

from email import _header_value_parser as _hvp
from email.errors import HeaderParseError

__all__ = ["MAX_TEXT", "addr_spec", "angle_addr", "smtp_path"]

#: what the stdlib's parser raises on hostile input besides HeaderParseError (see above)
_HOSTILE = (HeaderParseError, IndexError, AttributeError, RecursionError)

#: characters: a longer text is not an SMTP path (RFC 5321 4.5.3.1.3: 256 octets) and is
#: refused before the parser, whose cost grows with the square of it, sees it
MAX_TEXT = 4096


def angle_addr(text: str) -> tuple[str, str] | None:
    """``'<a@b.example> SIZE=10'`` -> ``('a@b.example', 'SIZE=10')``: the address inside
    the leading angle brackets and the text after them; None when there is none.

    As the stdlib reads it: a source route is dropped (``<@r:a@x>`` -> ``a@x``), quotes
    are kept (``<"q u"@x>`` -> ``"q u"@x``) and the null path ``<>`` stays ``<>``."""
    if len(text) > MAX_TEXT:
        return None
    try:
        token, rest = _hvp.get_angle_addr(text)
        return token.addr_spec, rest    # reading addr_spec can raise too
    except _HOSTILE:
        return None


def addr_spec(text: str) -> tuple[str, str] | None:
    """``'a@b.example SIZE=10'`` -> ``('a@b.example', 'SIZE=10')``: a bare addr-spec and
    the text after it; None when `text` does not start with one."""
    if len(text) > MAX_TEXT:
        return None
    try:
        token, rest = _hvp.get_addr_spec(text)
        return token.addr_spec, rest    # reading addr_spec can raise too
    except _HOSTILE:
        return None


def smtp_path(text: str) -> tuple[str, str] | None:
    """The argument of ``MAIL FROM:`` / ``RCPT TO:`` as aiosmtpd reads it: an angle-addr
    when it starts with ``<`` (after blanks), else a bare addr-spec."""
    return angle_addr(text) if text.lstrip().startswith("<") else addr_spec(text)
