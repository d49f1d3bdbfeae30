"""gateway.mail.addrspec: the stdlib's private email._header_value_parser still reads paths as relied on.

Each check names the private function or attribute that changed, so a Python upgrade that
breaks the adapter fails here first, not in an SMTP session.
"""

from __future__ import annotations

import email._header_value_parser as hvp
import time
from datetime import timedelta
from email.errors import HeaderParseError

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail.addrspec import MAX_TEXT, addr_spec, angle_addr, smtp_path

BUDGET = 2.0
"""Seconds for one hostile input of up to 1 MB (refused by length in microseconds; the
stdlib's parser alone takes minutes on the quadratic ones)."""

FUZZ = settings(max_examples=400, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", ["get_angle_addr", "get_addr_spec"])
def test_private_parser_functions_exist(name: str) -> None:
    assert callable(getattr(hvp, name, None)), (
        f"email._header_value_parser.{name} is gone: gateway/mail/addrspec.py relies on it")


@pytest.mark.parametrize(("name", "text", "addr", "rest"), [
    ("get_angle_addr", "<a@b.example> SIZE=10", "a@b.example", "SIZE=10"),
    ("get_angle_addr", "<>", "<>", ""),
    ("get_angle_addr", "<@hop:a@x.example>", "a@x.example", ""),
    ("get_angle_addr", '<"q u"@x.example>', '"q u"@x.example', ""),
    ("get_addr_spec", "a@b.example BODY=8BITMIME", "a@b.example", "BODY=8BITMIME"),
])
def test_private_parser_functions_return_token_and_rest(name: str, text: str, addr: str,
                                                        rest: str) -> None:
    result = getattr(hvp, name)(text)
    assert isinstance(result, tuple) and len(result) == 2, (
        f"email._header_value_parser.{name} no longer returns (token, rest)")
    token, after = result
    assert getattr(token, "addr_spec", None) == addr, (
        f"email._header_value_parser.{name}({text!r}).addr_spec changed")
    assert after == rest, f"email._header_value_parser.{name}({text!r}) rest changed"


@pytest.mark.parametrize(("name", "text"), [("get_angle_addr", "x@"), ("get_addr_spec", "<")])
def test_private_parser_functions_raise_header_parse_error(name: str, text: str) -> None:
    with pytest.raises(HeaderParseError):
        getattr(hvp, name)(text)


def test_angle_addr() -> None:
    assert angle_addr("<a@b.example> SIZE=10") == ("a@b.example", "SIZE=10")
    assert angle_addr("<>") == ("<>", "")
    assert angle_addr("x@") is None


def test_addr_spec() -> None:
    assert addr_spec("a@b.example") == ("a@b.example", "")
    assert addr_spec("<") is None


def test_smtp_path_picks_the_form_by_its_first_character() -> None:
    assert smtp_path("  <a@b.example> X") == ("a@b.example", "X")
    assert smtp_path("a@b.example X") == ("a@b.example", "X")
    assert smtp_path("<a@b.example") == ("a@b.example", "")  # the stdlib forgives the '>'
    assert smtp_path("@") is None


# --- hostile input: outside senders write MAIL FROM / RCPT TO --------------------------

_PIECES = st.sampled_from([*'ab.@<>- \t"()[]\\,:;', "xy", "<a@b.c>", " SIZE=10", "@r,@s:",
                           "(c)", '"q"', "\x00", "é", "\r\n"])


#: what the stdlib's parser raises besides HeaderParseError (aiosmtpd passes it on and
#: answers ``500 Error: (IndexError) ...``), refused like any bad path here: the empty
#: text, an address literal cut by a line break, comments nested deeper than the recursion
#: limit
STDLIB_ERRORS = (IndexError, AttributeError, RecursionError)


def reference(text: str) -> object:
    """What the stdlib itself makes of `text` (as aiosmtpd calls it), an exception by type."""
    try:
        fn = hvp.get_angle_addr if text.lstrip().startswith("<") else hvp.get_addr_spec
        token, rest = fn(text)
        return token.addr_spec, rest
    except (HeaderParseError, *STDLIB_ERRORS):
        return None


def outcome(text: str) -> object:
    try:
        return smtp_path(text)
    except Exception as exc:
        return type(exc)


@FUZZ
@given(text=st.one_of(st.lists(_PIECES, max_size=40).map("".join), st.text(max_size=200)))
def test_smtp_path_is_the_stdlib_reading_and_returns_only_none_or_a_pair(text: str) -> None:
    got = outcome(text)
    assert got == reference(text)
    assert got is None or (
        isinstance(got, tuple) and all(isinstance(x, str) for x in got)), got


@pytest.mark.parametrize(("text", "error"), [("", IndexError),
                                             ('\r\né@[a\r\n"-a\t \r\n ', AttributeError),
                                             ("<" + "(" * 2000, RecursionError)])
def test_what_the_stdlib_raises_on_is_refused(text: str, error: type[Exception]) -> None:
    fn = hvp.get_angle_addr if text.lstrip().startswith("<") else hvp.get_addr_spec
    with pytest.raises(error):
        token, _ = fn(text)
        assert token.addr_spec
    assert outcome(text) is None


@pytest.mark.parametrize("piece", ['"', '"a"', "(a)", "(", ")", "\\", ".", "a.", "@", "<", "[",
                                   "@r,", " ", "a"])
@pytest.mark.parametrize("before", ["", "<", "<a@"])
def test_one_megabyte_of_hostile_path_is_refused_within_budget(piece: str, before: str) -> None:
    text = before + piece * (1_000_000 // len(piece))
    start = time.perf_counter()
    assert smtp_path(text) is None and angle_addr(text) is None and addr_spec(text) is None
    assert time.perf_counter() - start < BUDGET


@pytest.mark.parametrize("piece", ['"', '"a"', "(a)", "\\", "a."])
def test_the_longest_path_read_costs_little(piece: str) -> None:
    # the quadratic runs of the stdlib parser at MAX_TEXT: what an SMTP line could ever carry
    text = "<" + piece * ((MAX_TEXT - 1) // len(piece))
    assert len(text) <= MAX_TEXT
    start = time.perf_counter()
    outcome(text)
    assert time.perf_counter() - start < BUDGET / 4
