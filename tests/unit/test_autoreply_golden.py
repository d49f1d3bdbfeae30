"""Golden files for the inbound mail classifier: tests/data/replies/NAME.eml -> NAME.json.

Each .eml is a whole message in the shape a real sender writes it (Exchange Online
and on-premises automatic replies in several languages, Gmail's vacation responder,
Sieve and Postfixadmin vacation, a person's reply, a mailing list, a newsletter, a
null-return-path notice, an MDN, a DSN, an ARF report). It is parsed and turned into
a NewMessage exactly as the store receives it; NAME.json gives the ``kind`` and
``return_date`` (ISO date or null) that must come out.

The property tests check that :func:`gateway.mail.autoreply.classify` and
:func:`~gateway.mail.autoreply.return_date` never raise on arbitrary input and that
every date they return is a real calendar date.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail.autoreply import KINDS, classify, return_date
from gateway.mail.parse import ExtraHeaders, parse_message
from gateway.records import NewMessage, SourceRef

DATA = Path(__file__).resolve().parent.parent / "data" / "replies"
CASES = sorted(p.stem for p in DATA.glob("*.eml"))


def stored(name: str) -> NewMessage:
    raw = (DATA / f"{name}.eml").read_bytes()
    ref = SourceRef(source="imap", ref=f"golden/INBOX/1/{name}",
                    at=datetime(2026, 12, 3, tzinfo=UTC))
    return NewMessage.from_parsed(parse_message(raw), raw, direction="inbound", sources=[ref])


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 18
    assert {json.loads((DATA / f"{n}.json").read_text(encoding="utf-8"))["kind"]
            for n in CASES} == set(KINDS)


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    expected = json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
    assert set(expected) == {"kind", "return_date"}
    msg = stored(name)
    assert (msg.kind, msg.return_date) == (expected["kind"], expected["return_date"])


def test_golden_files_are_whole_messages() -> None:
    """The golden inputs parse cleanly: CRLF lines, no defects, a Message-ID, a sender
    and a date, and a text."""
    for name in CASES:
        raw = (DATA / f"{name}.eml").read_bytes()
        assert b"\n" not in raw.replace(b"\r\n", b""), name
        p = parse_message(raw)
        assert p.defects == [], name
        assert p.message_id and p.from_addr and p.date is not None, name
        assert p.text_body.strip() or p.html_body.strip(), name


@pytest.mark.parametrize(("value", "kind"), [
    ("auto-replied (vacation)", "auto_reply"),          # Pigeonhole, Cyrus sieve vacation
    ("auto-replied; owner-email=\"a@x.example\"", "auto_reply"),
    ("(sent by a robot) auto-replied", "auto_reply"),
    ("no (a person wrote this)", "message"),
    ("auto-generated (calendar)", "automatic"),
])
def test_auto_submitted_comments_and_parameters(value: str, kind: str) -> None:
    got = classify(ExtraHeaders(auto_submitted=value), subject="Re: Our offer",
                   from_addr="a@x.example")
    assert got.kind == kind


@pytest.mark.parametrize(("text", "ref", "expected"), [
    ("back on 12/07/2026", date(2026, 12, 3), "2026-12-07"),   # US: 7 December
    ("back on 12/07/2026", None, "2026-07-12"),                # no date to judge by: day first
    ("back on 07/12/2026", date(2026, 12, 3), "2026-12-07"),
    ("back on 12/14/2026", None, "2026-12-14"),
    ("bis 05.11.2026", date(2026, 12, 3), "2026-11-05"),       # both readings past: day first
    ("bis 03.12.2026", date(2026, 12, 3), "2026-12-03"),
])
def test_numeric_dates_day_or_month_first(text: str, ref: date | None, expected: str) -> None:
    assert return_date(text, ref) == expected


# -- properties ------------------------------------------------------------------------
_HEADER = st.one_of(st.none(), st.text(max_size=60))
_WORDS = st.sampled_from([
    "back", "until", "bis", "zurück", "jusqu'au", "hasta", "tot en met", "vanaf", "ab dem",
    "retour", "fino al", "até", "tillbaka", " ", "\n", "14", "31", "2.", "12/", "13/",
    "29.02.", "2026", "2027-02-29", "December", "dezembre", "février", "de", "of", ",",
    "Monday", "1st", "Automatic reply:", "Réponse automatique", "Re:", "\u00a0", "\u2019",
])
_TEXT = st.one_of(st.text(max_size=300),
                  st.lists(_WORDS, max_size=40).map(" ".join),
                  st.lists(_WORDS, max_size=40).map("".join))
_SENT = st.one_of(st.none(), st.datetimes(min_value=datetime(1971, 1, 1),
                                          max_value=datetime(9998, 1, 1)))


def _real_date(iso: str) -> None:
    assert date.fromisoformat(iso).isoformat() == iso


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, ref=st.one_of(st.none(), st.dates(max_value=date(9998, 1, 1))))
def test_return_date_never_raises_and_is_a_real_date(text: str, ref: date | None) -> None:
    found = return_date(text, ref)
    if found is not None:
        _real_date(found)


@settings(max_examples=300, deadline=None)
@given(auto=_HEADER, precedence=_HEADER, list_id=_HEADER, x_autoreply=_HEADER,
       return_path=_HEADER, content_type=_HEADER, subject=_TEXT, from_addr=st.text(max_size=40),
       text=_TEXT, sent=_SENT)
def test_classify_never_raises(auto: str | None, precedence: str | None,
                               list_id: str | None, x_autoreply: str | None,
                               return_path: str | None, content_type: str | None,
                               subject: str, from_addr: str, text: str,
                               sent: datetime | None) -> None:
    headers = ExtraHeaders(auto_submitted=auto, precedence=precedence, list_id=list_id,
                           x_autoreply=x_autoreply, return_path=return_path,
                           content_type=content_type)
    got = classify(headers, subject=subject, from_addr=from_addr, text=text, sent=sent)
    assert got.kind in KINDS
    if got.kind != "auto_reply":
        assert got.return_date is None
    elif got.return_date is not None:
        _real_date(got.return_date)
