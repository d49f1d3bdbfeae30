"""gateway.mail.addrspec: the stdlib's private email._header_value_parser still reads paths as relied on.

Each check names the private function or attribute that changed, so a Python upgrade that
breaks the adapter fails here first, not in an SMTP session.
"""

from __future__ import annotations

import email._header_value_parser as hvp
from email.errors import HeaderParseError

import pytest

from gateway.mail.addrspec import addr_spec, angle_addr, smtp_path


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
