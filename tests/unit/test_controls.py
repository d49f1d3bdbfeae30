"""gateway.mail.controls: reading and removing the CRM's X-Mailgw-* control headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail.controls import (
    MAX_VALUE,
    NO_CONTROLS,
    ControlHeaderError,
    Controls,
    has_controls,
    lenient_controls,
    parse_controls,
    strip_controls,
)
from gateway.mail.headers import fields, split_entity

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def head(*lines: str) -> bytes:
    return "".join(f"{x}\r\n" for x in lines).encode()


def test_absent_means_defaults() -> None:
    assert parse_controls(head("From: a@x.test", "Subject: hi"), NOW) == NO_CONTROLS
    assert not NO_CONTROLS.any


def test_all_four_read_any_case_trimmed_and_unfolded() -> None:
    c = parse_controls(head("x-mailgw-template:   spring offer  ",
                            "X-MAILGW-CAMPAIGN: q4",
                            "\tlaunch",
                            "X-Mailgw-No-Track: YES",
                            "X-Mailgw-Send-At: Tue, 01 Dec 2026 11:00:00 +0100"), NOW)
    assert c == Controls(template="spring offer", campaign="q4 launch", no_track=True,
                         send_at=datetime(2026, 12, 1, 10, 0, tzinfo=UTC))
    assert c.any


@pytest.mark.parametrize(("value", "flag"), [("yes", True), ("True", True), ("1", True),
                                              ("no", False), ("FALSE", False), ("0", False)])
def test_no_track_values(value: str, flag: bool) -> None:
    assert parse_controls(head(f"X-Mailgw-No-Track: {value}"), NOW).no_track is flag


@pytest.mark.parametrize("value", ["2026-12-01T10:00:00+00:00", "2026-12-01T10:00:00Z",
                                   "2026-12-01T11:00+01:00", "Tue, 1 Dec 2026 10:00:00 GMT",
                                   "1 Dec 2026 05:00:00 -0500"])
def test_send_at_formats(value: str) -> None:
    got = parse_controls(head(f"X-Mailgw-Send-At: {value}"), NOW).send_at
    assert got == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert got is not None and got.tzinfo is UTC


@pytest.mark.parametrize("value", ["2026-12-01T09:00:00Z", "2020-01-01T00:00:00Z",
                                   "Mon, 30 Nov 2026 09:00:00 +0000"])
def test_send_at_now_or_past_sends_at_once(value: str) -> None:
    assert parse_controls(head(f"X-Mailgw-Send-At: {value}"), NOW).send_at is None


def test_send_at_bound() -> None:
    ok = (NOW + timedelta(days=30)).isoformat()
    assert parse_controls(head(f"X-Mailgw-Send-At: {ok}"), NOW).send_at == NOW + timedelta(days=30)
    late = (NOW + timedelta(days=30, seconds=1)).isoformat()
    with pytest.raises(ControlHeaderError, match="30 days"):
        parse_controls(head(f"X-Mailgw-Send-At: {late}"), NOW)


@pytest.mark.parametrize(("line", "name", "why"), [
    ("X-Mailgw-Send-At: tomorrow", "X-Mailgw-Send-At", "date"),
    ("X-Mailgw-Send-At: 2026-12-02T10:00:00", "X-Mailgw-Send-At", "time zone"),
    ("X-Mailgw-Send-At: Wed, 02 Dec 2026 10:00:00 -0000", "X-Mailgw-Send-At", "time zone"),
    ("X-Mailgw-Send-At: ", "X-Mailgw-Send-At", "date"),
    ("X-Mailgw-No-Track: maybe", "X-Mailgw-No-Track", "yes, true, 1"),
    ("X-Mailgw-No-Track:", "X-Mailgw-No-Track", "yes, true, 1"),
    ("X-Mailgw-Template: " + "t" * (MAX_VALUE + 1), "X-Mailgw-Template", "longer"),
    ("X-Mailgw-Campaign: a\x01b", "X-Mailgw-Campaign", "printable"),
    ("X-Mailgw-Campaign: a\tb", "X-Mailgw-Campaign", "printable"),
])
def test_invalid_values(line: str, name: str, why: str) -> None:
    with pytest.raises(ControlHeaderError) as err:
        parse_controls(head("From: a@x.test", line), NOW)
    assert err.value.header == name
    assert err.value.code == 554 and err.value.status == "5.6.0"
    assert name in err.value.text and why in err.value.text
    assert err.value.smtp_reply().startswith(f"554 5.6.0 {name}:")


def test_invalid_utf8() -> None:
    with pytest.raises(ControlHeaderError, match="UTF-8"):
        parse_controls(b"X-Mailgw-Template: \xff\xfe\r\n", NOW)


def test_utf8_value_accepted() -> None:
    c = parse_controls("X-Mailgw-Template: Frühling\r\n".encode(), NOW)
    assert c.template == "Frühling"


def test_duplicate_refused() -> None:
    with pytest.raises(ControlHeaderError, match="more than once") as err:
        parse_controls(head("X-Mailgw-Campaign: a", "Subject: x", "x-mailgw-campaign: a"), NOW)
    assert err.value.header == "X-Mailgw-Campaign"


def test_empty_template_is_absent() -> None:
    assert parse_controls(head("X-Mailgw-Template:   "), NOW).template is None


def test_other_x_mailgw_fields_untouched() -> None:
    msg = head("X-Mailgw-Other: keep", "X-Mailgw-Template: t", "Subject: s") + b"\r\nbody\r\n"
    assert strip_controls(msg) == head("X-Mailgw-Other: keep", "Subject: s") + b"\r\nbody\r\n"
    assert parse_controls(head("X-Mailgw-Other: anything"), NOW) == NO_CONTROLS


def test_strip_folded_and_keeps_body() -> None:
    msg = (b"From: a@x.test\r\nX-MAILGW-Campaign: q4\r\n\tlaunch\r\n  more\r\nSubject: s\r\n"
           b"\r\nX-Mailgw-Template: in the body stays\r\n")
    assert strip_controls(msg) == (b"From: a@x.test\r\nSubject: s\r\n\r\n"
                                   b"X-Mailgw-Template: in the body stays\r\n")
    assert has_controls(msg)
    assert not has_controls(strip_controls(msg))


def test_strip_without_controls_is_identity() -> None:
    msg = head("From: a@x.test", "Subject: x-mailgw-template") + b"\r\nbody"
    assert strip_controls(msg) is msg


def test_lenient_never_raises() -> None:
    c = lenient_controls(head("X-Mailgw-Template: \x01bad", "X-Mailgw-Template: good",
                              "X-Mailgw-Campaign: c", "X-Mailgw-Send-At: junk",
                              "X-Mailgw-No-Track: maybe"))
    assert c == Controls(template="good", campaign="c")


# -- properties ----------------------------------------------------------------------

_names = st.sampled_from(["X-Mailgw-Template", "x-mailgw-campaign", "X-MAILGW-NO-TRACK",
                          "X-Mailgw-Send-At", "X-Mailgw-Other", "Subject", "From",
                          "X-Mailgw-Templates", "Received"])
_value_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
_field = st.tuples(_names, _value_bytes,
                   st.lists(_value_bytes, max_size=2)).map(
    lambda t: t[0].encode() + b":" + t[1] + b"".join(b"\r\n\t" + c for c in t[2]) + b"\r\n")
_message = st.tuples(st.lists(_field, max_size=8), st.sampled_from([b"\r\n", b""]),
                     st.binary(max_size=60)).map(
    lambda t: b"".join(t[0]) + t[1] + (t[2] if t[1] else b""))

CONTROL_KEYS = {b"x-mailgw-template", b"x-mailgw-campaign", b"x-mailgw-no-track",
                b"x-mailgw-send-at"}


@settings(max_examples=400, deadline=None)
@given(_message)
def test_strip_removes_exactly_the_control_fields(msg: bytes) -> None:
    out = strip_controls(msg)
    header, blank, body = split_entity(msg)
    _, out_blank, out_body = split_entity(out)
    assert (out_blank, out_body) == (blank, body) or not header
    kept = [f.raw for f in fields(header) if f.key not in CONTROL_KEYS]
    assert out == b"".join(kept) + blank + body
    assert not any(f.key in CONTROL_KEYS for f in fields(split_entity(out)[0]))
    assert strip_controls(out) == out


@settings(max_examples=400, deadline=None)
@given(_message)
def test_parse_raises_only_the_defined_error(msg: bytes) -> None:
    header = split_entity(msg)[0]
    try:
        c = parse_controls(header, NOW)
    except ControlHeaderError as exc:
        assert exc.code == 554 and exc.status == "5.6.0"
    else:
        for v in (c.template, c.campaign):
            assert v is None or (0 < len(v) <= MAX_VALUE and v.isprintable() and v == v.strip())
        assert c.send_at is None or NOW < c.send_at <= NOW + timedelta(days=30)
    lenient_controls(header)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_send_at_any_text(value: str) -> None:
    line = "X-Mailgw-Send-At: " + value.replace("\r", " ").replace("\n", " ")
    try:
        parse_controls(line.encode("utf-8", "surrogatepass") + b"\r\n", NOW)
    except ControlHeaderError:
        pass


def test_ingest_and_imap_copies_read_template_and_campaign() -> None:
    """The rep's Sent copy (IMAP) or a Bcc to ingest may still carry the headers."""
    from gateway.mail.parse import HEADER_FIELDS, parse_message
    from gateway.records import NewMessage, SourceRef

    raw = head("From: a@x.test", "To: b@y.test", "Subject: s", "Message-ID: <m@x.test>",
               "X-Mailgw-Template: offer", "X-Mailgw-Campaign: q4") + b"\r\nbody\r\n"
    p = parse_message(raw)
    assert (p.headers.x_mailgw_template, p.headers.x_mailgw_campaign) == ("offer", "q4")
    m = NewMessage.from_parsed(p, raw, direction="outbound",
                               sources=[SourceRef("imap", "acct/Sent/1/1", NOW)])
    assert (m.template, m.campaign) == ("offer", "q4")
    assert "X-MAILGW-CAMPAIGN" in HEADER_FIELDS      # asked for in header-first IMAP fetches
