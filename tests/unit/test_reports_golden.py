"""Golden DSNs, notices, receipts and feedback reports (tests/data/reports): what each reads as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail.reports import parse_report

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"
CASES = sorted(p.stem for p in DATA.glob("*.eml"))


def test_every_golden_file_has_its_expectation() -> None:
    assert len(CASES) >= 12
    for name in CASES:
        assert (DATA / f"{name}.json").is_file(), name


@pytest.mark.parametrize("name", CASES)
def test_golden_report(name: str) -> None:
    want = json.loads((DATA / f"{name}.json").read_text())
    report = parse_report((DATA / f"{name}.eml").read_bytes())
    if want["type"] is None:
        assert report is None
        return
    assert report is not None
    assert report.type == want["type"]
    assert report.format == want["format"]
    assert report.original_message_id == want["original_message_id"]
    assert list(report.queue_ids) == want["queue_ids"]
    got = [{"recipient": i.recipient, "action": i.action, "status": i.status, "hard": i.hard}
           for i in report.items]
    assert got == want["items"]
    if "disposition" in want:
        assert report.disposition == want["disposition"]
    if "feedback_type" in want:
        assert report.feedback_type == want["feedback_type"]
    if report.type == "delivery" and report.items[0].action == "failed":
        assert report.items[0].diagnostic, "a bounce carries the server's words"


def test_crlf_line_endings_read_the_same() -> None:
    for name in CASES:
        raw = (DATA / f"{name}.eml").read_bytes()
        lf, crlf = parse_report(raw), parse_report(raw.replace(b"\n", b"\r\n"))
        assert (lf is None) == (crlf is None), name
        if lf is not None and crlf is not None:
            assert lf.items == crlf.items and lf.original_message_id == crlf.original_message_id, name


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_any_bytes_never_raise(data: bytes) -> None:
    parse_report(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CASES), st.integers(min_value=0), st.binary(max_size=40))
def test_damaged_reports_never_raise(name: str, at: int, junk: bytes) -> None:
    raw = (DATA / f"{name}.eml").read_bytes()
    cut = at % (len(raw) + 1)
    report = parse_report(raw[:cut] + junk + raw[cut + len(junk):])
    if report is not None:
        for item in report.items:
            assert "@" in item.recipient and item.action
