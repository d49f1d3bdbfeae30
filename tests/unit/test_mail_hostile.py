"""Hostile mail input: the MIME parser, `attached_messages`, forward unwrapping, forward
trimming and the delivery report reader stay linear in their input (issue 12 items 1-2).

Each case was quadratic before: the sizes are chosen so that the old code took tens of
seconds or more while the linear code takes well under a second, and the budgets sit far
between the two. Where the work can be counted (how many times a multipart body is cut)
the count is asserted instead of a time. The fuzz tests give every generated input a
time budget (hypothesis `deadline`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail import forward as forward_mod
from gateway.mail import mime as mime_mod
from gateway.mail import parse as parse_mod
from gateway.mail import reports as reports_mod
from gateway.mail.forward import unwrap_forward
from gateway.mail.parse import MAX_DEPTH, MAX_PARTS, attached_messages, parse_message
from gateway.mail.reports import parse_report

BUDGET = 5.0
"""Seconds for one hostile input: ten times what the linear code needs on a slow CI
machine, a tenth or less of what the quadratic code took."""

FUZZ = settings(max_examples=60, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def many_attached(n: int) -> bytes:
    """A forward made of `n` attached messages (each a few dozen bytes)."""
    parts = b"".join(
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: a%d@x.example\r\nSubject: s%d\r\n\r\nbody\r\n" % (i, i) for i in range(n))
    return (b"From: rep@example.com\r\nSubject: Fwd: many\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n")


# --- item 1: MIME parsing ----------------------------------------------------------


def test_thousands_of_attached_messages_parse_and_unwrap_in_linear_time() -> None:
    # 10,000 parts, 838 KB: 215 s to unwrap before (every attached message re-cut the
    # whole body from the top), under a second now.
    raw = many_attached(10_000)
    parsed, t_parse = timed(parse_message, raw)
    fwd, t_unwrap = timed(unwrap_forward, raw, parsed)
    assert t_parse + t_unwrap < BUDGET
    assert len(parsed.attachments) == MAX_PARTS - 1     # the top-level multipart is part 1
    assert f"more than {MAX_PARTS} MIME parts; the rest ignored" in parsed.defects
    assert fwd is not None and fwd.style == "attachment"
    assert fwd.raw == b"From: a0@x.example\r\nSubject: s0\r\n\r\nbody"


def test_each_multipart_is_cut_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = mime_mod.cut_multipart

    def counting(body: bytes, boundary: bytes) -> tuple[list[bytes], list[bytes]]:
        calls.append(len(body))
        return real(body, boundary)

    monkeypatch.setattr(parse_mod, "cut_multipart", counting)
    raw = many_attached(500)
    assert len(parse_message(raw).attachments) == 500
    assert len(calls) == 1                  # was 500: once per attached message
    calls.clear()
    assert len(attached_messages(raw)) == 500
    assert len(calls) == 1


def test_attached_messages_is_capped_and_stops_at_its_limit() -> None:
    raw = many_attached(3 * MAX_PARTS)
    every = attached_messages(raw)
    assert len(every) == MAX_PARTS - 1      # the same cap as ParsedMessage.attachments
    assert every[:2] == [b"From: a0@x.example\r\nSubject: s0\r\n\r\nbody",
                         b"From: a1@x.example\r\nSubject: s1\r\n\r\nbody"]
    assert attached_messages(raw, limit=1) == every[:1]
    assert attached_messages(raw, limit=0) == []


def test_nested_attached_messages_keep_their_exact_bytes() -> None:
    inner = b"From: c@x.example\r\nSubject: deep\r\nMessage-ID: <d@x>\r\n\r\ndeep body"
    mid = (b"Content-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\n"
           b"note\r\n--i\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--i--\r\n")
    raw = (b"From: r@example.com\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n"
           b"--o\r\nContent-Type: text/plain\r\n\r\nhi\r\n--o\r\n" + mid + b"\r\n--o--\r\n")
    assert attached_messages(raw) == [inner]
    parsed = parse_message(raw)
    assert [a.content_type for a in parsed.attachments] == ["message/rfc822"]
    assert not any("re-serialisation" in d for d in parsed.defects)


def nested(depth: int, lines: int) -> bytes:
    """Multiparts nested `depth` deep around a text part of `lines` lines, each level
    holding an attached message around the next one."""
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
        b"Content-Type: message/rfc822\r\n\r\nSubject: level %d\r\n" % (i, i, i) for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return (b"From: a@b.example\r\nSubject: deep\r\n" + head +
            b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * lines + tail)


def test_deep_nesting_is_cut_before_the_stdlib_parser_sees_it() -> None:
    # 900 levels around 20,000 lines (221 KB): the stdlib parser checks each line against
    # every enclosing boundary; 2 s at 300 levels before, RecursionError deeper.
    raw = nested(900, 20_000)
    parsed, took = timed(parse_message, raw)
    assert took < BUDGET
    assert f"MIME nesting deeper than {MAX_DEPTH}; inner parts ignored" in parsed.defects
    assert [a.filename for a in parsed.attachments] == ["level 0.eml"]
    assert parsed.attachments[0].size == len(raw.split(b"\r\n\r\n", 2)[2].rsplit(b"\r\n--b0--", 1)[0])
    fwd, took = timed(unwrap_forward, raw, parsed)
    assert took < BUDGET and fwd is None           # level 0 has no sender: not an original
    assert len(attached_messages(raw)) == 1


def test_shallow_messages_are_parsed_as_before() -> None:
    raw = nested(10, 5)
    parsed = parse_message(raw)
    assert not any("nesting" in d for d in parsed.defects)
    assert parse_mod._shallow(raw) == (raw, False)
    deep = nested(MAX_DEPTH + 5, 5)
    cut, changed = parse_mod._shallow(deep)
    assert changed and len(cut) < len(deep)
    assert cut.count(b"Subject: level") == MAX_DEPTH // 2   # two levels each; kept to MAX_DEPTH


_MIME_PIECES = st.sampled_from([
    b"--b\r\n", b"--b--\r\n", b"\r\n", b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=c\r\n\r\n",
    b"--c\r\n", b"Content-Transfer-Encoding: base64\r\n", b"From: a@x.example\r\nSubject: s\r\n\r\n",
    b"Subject: Fwd: x\r\n", b"body\r\n", b"</div>", b"<div>",
    b"-----Original Message-----\r\n",
    b"From: x@y.example\r\nSent: Monday\r\nTo: z@y.example\r\nSubject: s\r\n",
])


@FUZZ
@given(st.lists(_MIME_PIECES, max_size=400), st.integers(1, 30))
def test_fuzz_parse_and_unwrap_mime_structures(pieces: list[bytes], repeat: int) -> None:
    raw = (b"From: r@example.com\r\nSubject: Fwd: f\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           + b"".join(pieces) * repeat)
    parsed = parse_message(raw)
    unwrap_forward(raw, parsed)
    assert len(attached_messages(raw)) <= MAX_PARTS


# --- item 2: forward trimming and the other regular expressions --------------------


def test_trailing_close_tags_are_trimmed_in_linear_time() -> None:
    # 1 MB: over 20 s before (one regex pass over the fragment per trailing tag).
    frag = "x" + "</div>" * 175_000
    out, took = timed(forward_mod._trim_unbalanced, frag)
    assert out == "x" and took < BUDGET
    out, took = timed(forward_mod._trim_unbalanced, "</div> <br>" * 95_000 + "y" + "</div >\n" * 1000)
    assert out == "y" and took < BUDGET


def test_trimming_keeps_balanced_divs_and_other_tails() -> None:
    trim = forward_mod._trim_unbalanced
    assert trim("  </div></td><br> <div>a</div></div>\n</div>  ") == "<div>a</div>"
    assert trim("<div>a</div></span>") == "<div>a</div></span>"   # only </div> is counted
    assert trim("<div>a</div>") == "<div>a</div>"
    assert trim("a</div>b</div>") == "a</div>b"                   # only trailing ones go
    assert trim("") == ""


def test_an_outlook_forward_with_a_megabyte_of_close_tags_unwraps_fast() -> None:
    html = ('<html><body><p>fyi</p><div id="divRplyFwdMsg"><b>From:</b> Jane &lt;jane@c.example&gt;'
            "<br><b>Sent:</b> Monday, March 2, 2026 9:00 AM<br><b>Subject:</b> Quote</div>"
            "<p>the quote</p>" + "</div>" * 150_000 + "</body></html>")
    raw = (b"From: rep@example.com\r\nTo: crm@gw.example.com\r\nSubject: FW: Quote\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode())
    parsed = parse_message(raw)
    fwd, took = timed(unwrap_forward, raw, parsed)
    assert took < BUDGET
    assert fwd is not None and fwd.style == "outlook" and fwd.original.from_addr == "jane@c.example"


@pytest.mark.parametrize("value", [
    "a" * 200_000,                                  # a run without "@"
    "a@" * 100_000,                                 # a run of local parts without domains
    ("x" * 50 + ",") * 4000,
], ids=["no-at", "at-runs", "commas"])
def test_address_scans_are_linear(value: str) -> None:
    # Each took from 20 s (64 KB) to hours (200 KB) before.
    _, took = timed(reports_mod._addresses_in, value)
    assert took < BUDGET
    _, took = timed(parse_mod._ADDR_RE.findall, value)
    assert took < BUDGET
    _, took = timed(forward_mod._human_addresses, value[: forward_mod.FIELD_LIMIT * 50])
    assert took < BUDGET


def test_address_scan_finds_what_findall_found() -> None:
    for text in ["a@b.example, c@d.example", "x a@b_y@c.example z", "<a@b.example>:",
                 "a@@b.example", "a@b@c.example", "-@x, (y@z.example)",
                 "mailer-daemon@h.example;u@v.example"]:
        assert reports_mod._addresses_in(text) == reports_mod._ADDR_RE.findall(text), text
    assert reports_mod._addresses_in("a@b.example c@d.example", 1) == ["a@b.example"]


def test_a_bounce_with_huge_headers_and_text_is_read_fast() -> None:
    run = b"a" * 60_000
    raw = (b"From: MAILER-DAEMON@mx.example\r\nX-Failed-Recipients: " + run + b"\r\nTo: " + run +
           b"\r\nSubject: Undeliverable\r\nContent-Type: text/plain\r\n\r\n"
           b"The following recipient(s) cannot be reached:\r\n" + run + b"\r\n"
           b"Your message was not delivered to " + run + b"\r\n\r\n<" + run + b">\r\n")
    _, took = timed(parse_report, raw)
    assert took < BUDGET
    good = raw.replace(b"X-Failed-Recipients: " + run, b"X-Failed-Recipients: bob@c.example")
    report = parse_report(good)
    assert report is not None and [i.recipient for i in report.items] == ["bob@c.example"]


def test_a_notice_with_thousands_of_copy_markers_is_read_fast() -> None:
    # 90 KB of "--- returned message" lines: 10 s before (each marker re-read the text).
    raw = (b"From: MAILER-DAEMON@mx.example\r\nSubject: Undeliverable\r\n"
           b"X-Failed-Recipients: bob@c.example\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
           + b"--- returned message\r\nX: y\r\n\r\n" * 30_000
           + b"--- returned message\r\nMessage-ID: <late@x>\r\n")
    report, took = timed(parse_report, raw)
    assert took < BUDGET
    assert report is not None and [i.recipient for i in report.items] == ["bob@c.example"]
    first = raw.replace(b"X: y", b"Message-ID: <orig@x>", 1)
    report = parse_report(first)
    assert report is not None and report.original_message_id == "<orig@x>"


def test_status_fields_with_a_flood_of_continuation_lines_are_read_fast() -> None:
    text = "Final-Recipient: rfc822; a@b.example\nDiagnostic-Code: smtp; 550\n" + " more\n" * 200_000
    blocks, took = timed(reports_mod._text_blocks, text)
    assert took < BUDGET
    assert blocks[0]["final-recipient"] == "rfc822; a@b.example"
    assert blocks[0]["diagnostic-code"].startswith("smtp; 550 more more")
    assert reports_mod._text_blocks("A: 1\n 2\nA: 3\n 4\n") == [{"a": "1 2 4"}]  # as before


_HTML_PIECES = st.sampled_from([
    "</div>", "<div>", "</div >", " ", "\n", "<br>", "<br/>", "x", "</span>", "<", ">", "<div id=x>",
    "</td>", "@", "a", ",",
])


@FUZZ
@given(st.lists(_HTML_PIECES, max_size=300), st.integers(1, 200))
def test_fuzz_forward_trimming(pieces: list[str], repeat: int) -> None:
    frag = "".join(pieces) * repeat
    out = forward_mod._trim_unbalanced(frag)
    assert len(out) <= len(frag)
    forward_mod._human_addresses(frag[: forward_mod.FIELD_LIMIT])


@FUZZ
@given(st.lists(_HTML_PIECES, max_size=300), st.integers(1, 200))
def test_fuzz_report_reader(pieces: list[str], repeat: int) -> None:
    text = "".join(pieces) * repeat
    raw = (b"From: MAILER-DAEMON@mx.example\r\nX-Failed-Recipients: " + text.encode()[:5000] +
           b"\r\nSubject: Undeliverable\r\nContent-Type: text/plain\r\n\r\n"
           b"Delivery has failed to these recipients or groups:\r\n" + text.encode())
    parse_report(raw)
    reports_mod._addresses_in(text)
