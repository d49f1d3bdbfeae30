"""Fuzz targets for the remaining small parsers of outside bytes (issue 12, "Rule"): what a
tracking request's client writes (User-Agent, Referer, X-Forwarded-For, headers), what an
upstream server answers, the envelope addresses and header values a client sends.

Every generated input gets a time budget (hypothesis `deadline`, as in
tests/unit/test_mail_hostile.py: far above what one takes, far below a blow-up), nothing
raises but the documented error, and a targeted 1 MB hostile input of each stays within
`BUDGET` (the HTTP and SMTP servers cap these fields far lower: the budget is for the
parser alone)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.delivery.transport import parse_reply
from gateway.http.tracking import client_ip
from gateway.mail.addresses import domain_of, relay_trick
from gateway.mail.controls import ControlHeaderError, parse_send_at
from gateway.mail.wire import has_bare_newline
from gateway.tracking.classify import Observation, classify, match_signature, parse_ip

BUDGET = 2.0
"""Seconds for one 1 MB hostile input: linear code needs a few milliseconds."""

FUZZ = settings(max_examples=300, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow])

MB = 1_000_000
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


def short(value: object) -> str:
    """A test id for a huge parameter: its first characters and its length."""
    text = str(value)
    return f"{text[:12]!r}x{len(text)}"


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


# --- tracking requests: anyone can send them ---------------------------------------------

_UA_PIECES = st.sampled_from(["Mozilla/5.0 ", "(", ")", ";", " ", "GoogleImageProxy", "bot",
                              "Outlook", "a" * 9, "/", ".", "\x00", "é", "YahooMailProxy",
                              "Microsoft Office", "curl/8", "Thunderbird", "-"])
_IP_PIECES = st.sampled_from(["1", "10", ".", ":", "::", "[", "]", "ffff", "::ffff:", "0",
                              "255", " ", ",", "%", "eth0", "x", "80"])
_HEADER_NAMES = st.sampled_from(["purpose", "sec-purpose", "x-purpose", "x-moz", "accept",
                                 "sec-fetch-dest", "via"])


@FUZZ
@given(kind=st.sampled_from(["open", "click", "honeypot"]),
       ua=st.one_of(st.lists(_UA_PIECES, max_size=30).map("".join), st.text(max_size=200)),
       referer=st.one_of(st.text(max_size=120), st.sampled_from(
           ["http://[::1", "https://mail.google.com/", "http://a b/", "//x", "http://[x]/"])),
       ip=st.one_of(st.none(), st.lists(_IP_PIECES, max_size=12).map("".join)),
       method=st.sampled_from(["GET", "HEAD", "POST", "get", ""]),
       headers=st.dictionaries(_HEADER_NAMES, st.text(max_size=40), max_size=3))
def test_a_tracking_request_is_classified_without_raising(
        kind: Any, ua: str, referer: str, ip: str | None, method: str,
        headers: dict[str, str]) -> None:
    obs = Observation(kind=kind, copy_id="01HZZZZZZZZZZZZZZZZZZZZZZZ", link=0, at=1.0,
                      method=method, ip=ip, user_agent=ua, referer=referer, headers=headers)
    match_signature(obs)
    verdict = classify(obs, None)
    assert isinstance(verdict.machine, bool)


@FUZZ
@given(peer=st.one_of(st.none(), st.lists(_IP_PIECES, max_size=12).map("".join)),
       forwarded=st.lists(st.lists(_IP_PIECES, max_size=16).map("".join), max_size=3))
def test_client_ip_reads_any_peer_and_forwarded_for(peer: str | None,
                                                    forwarded: list[str]) -> None:
    got = client_ip(peer, forwarded, TRUSTED)
    assert got is None or got == peer or parse_ip(got) is not None
    for value in [peer, *forwarded]:
        addr = parse_ip(value)
        assert addr is None or isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)


@pytest.mark.parametrize("ua", ["(" * MB, "Mozilla/5.0 " * (MB // 12), "a" * MB,
                                "bot" + " " * MB + "x", "é" * MB], ids=short)
def test_a_megabyte_user_agent_is_classified_within_budget(ua: str) -> None:
    obs = Observation(kind="open", copy_id="01HZZZZZZZZZZZZZZZZZZZZZZZ", link=0, at=1.0,
                      ip="203.0.113.9", user_agent=ua, referer="http://" + "a." * (MB // 2))
    _, took = timed(classify, obs, None)
    assert took < BUDGET


@pytest.mark.parametrize("hops", [",".join(["10.0.0.1"] * (MB // 9)), ":" * MB, "[" * MB,
                                  "1." * (MB // 2), " , " * (MB // 3)], ids=short)
def test_a_megabyte_forwarded_for_is_read_within_budget(hops: str) -> None:
    got, took = timed(client_ip, "10.0.0.2", [hops], TRUSTED)
    assert took < BUDGET and (got is None or parse_ip(got) is not None)


# --- an upstream server's reply --------------------------------------------------------------

_REPLY_PIECES = st.sampled_from(["5.7.8", "4.4.2", "2.0.0", " ", "\r\n", "\n", "\r", "x",
                                 "550-", "250 ", "5.", "9.9.9", "é", "\x00", "1234.5.6"])


@FUZZ
@given(code=st.integers(-10, 1000), message=st.one_of(
    st.lists(_REPLY_PIECES, max_size=40).map("".join), st.text(max_size=300)))
def test_any_upstream_reply_reads_as_code_status_and_one_line(code: int, message: str) -> None:
    got, status, line = parse_reply(code, message)
    assert 200 <= got < 300 or 400 <= got < 600
    assert status[0] == str(got)[0] and status.count(".") == 2
    assert "\n" not in line and "\r" not in line


@pytest.mark.parametrize("message", ["5.7.8 " * (MB // 6), "\r\n" * (MB // 2), "x" * MB,
                                     "5." * (MB // 2), "550-5.7.1 no\r\n" * (MB // 14)], ids=short)
def test_a_megabyte_upstream_reply_is_read_within_budget(message: str) -> None:
    _, took = timed(parse_reply, 550, message)
    assert took < BUDGET


# --- envelope addresses, wire format, the Send-At control header -----------------------------

_ADDR_PIECES = st.sampled_from(["a", "@", ".", "-", "[", "]", '"', "\\", "%", "!", ":", "é",
                                "xn--", "example", "..", " ", "\x00"])


@FUZZ
@given(address=st.one_of(st.lists(_ADDR_PIECES, max_size=40).map("".join), st.text(max_size=300)))
def test_relay_trick_reads_any_address(address: str) -> None:
    why = relay_trick(address)
    assert why is None or isinstance(why, str)
    assert isinstance(domain_of(address), str)


@pytest.mark.parametrize("address", ["a" * MB + "@x.example", "a@" + "a." * (MB // 2) + "example",
                                     "a@" + "a-" * (MB // 2), "a@" + "é" * MB, "." * MB,
                                     "a@" + ("a" * 61 + ".") * (MB // 62)], ids=short)
def test_a_megabyte_address_is_judged_within_budget(address: str) -> None:
    why, took = timed(relay_trick, address)
    assert why is not None and took < BUDGET


@FUZZ
@given(data=st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"\r\r\n", b"\n\r"]),
                     max_size=60).map(b"".join))
def test_has_bare_newline_is_any_line_end_but_crlf(data: bytes) -> None:
    assert has_bare_newline(data) == (b"\r" in data.replace(b"\r\n", b"")
                                      or b"\n" in data.replace(b"\r\n", b""))


_DATE_PIECES = st.sampled_from(["2026", "-", "03", "T", "12", ":", "00", "Z", "+01:00", " ",
                                "Sun,", "1", "Mar", "+0100", "GMT", "9999", "99", ".", "é"])


@FUZZ
@given(value=st.one_of(st.lists(_DATE_PIECES, max_size=20).map("".join), st.text(max_size=100)))
def test_send_at_reads_any_value_or_says_why_not(value: str) -> None:
    try:
        at = parse_send_at(value, NOW)
    except ControlHeaderError:
        return
    assert at is None or (at.tzinfo is not None and at > NOW)


@pytest.mark.parametrize("value", ["2026" + "0" * MB, "Sun, " + " " * MB + "1 Mar 2026",
                                   "1 " * (MB // 2), ":" * MB, "2026-03-01T12:00:00" + "+" * MB], ids=short)
def test_a_megabyte_send_at_is_refused_within_budget(value: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ControlHeaderError):
        parse_send_at(value, NOW)
    assert time.perf_counter() - start < BUDGET
