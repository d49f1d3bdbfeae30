"""DSN building (RFC 3464 structure, CRLF, line lengths) and bounce recognition."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import Message
from typing import Any

import pytest

from gateway.delivery.dsn import build_dsn, is_bounce
from gateway.delivery.transport import RcptResult

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <q1@example.com>\r\n"
    b"\r\n"
    b"Hi both,\r\nthe numbers are attached.\r\n"
)
ARRIVAL = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 3, 6, 9, 31, tzinfo=UTC)

BOB = RcptResult(rcpt="bob@example.net", code=550, status="5.1.1", text="no such user",
                 remote="mx.example.net[192.0.2.25]:25")
CAROL = RcptResult(rcpt="carol@example.org", code=451, status="4.4.1",
                   text="connect to mx.example.org[192.0.2.26]:25: Connection refused",
                   remote=None)


def dsn(*failed: RcptResult, **kw: Any) -> bytes:
    args: dict[str, Any] = {
        "reporting_mta": "gw.example.com", "original": ORIGINAL,
        "envelope_from": "alice@example.com", "failed": list(failed or (BOB, CAROL)),
        "arrival": ARRIVAL, "queue_id": "Q0123ABC", "now": NOW,
    }
    args.update(kw)
    return build_dsn(**args)


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def parts(msg: Message) -> list[Message]:
    """The sub-messages of a multipart (or message/*) part."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def body(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def status_blocks(msg: Message) -> list[Message]:
    part = parts(msg)[1]
    assert part.get_content_type() == "message/delivery-status"
    return parts(part)


def test_structure_and_headers() -> None:
    msg = parse(dsn())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.com>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@gw.example.com>")
    assert email.utils.parsedate_to_datetime(msg["Date"]) == NOW
    assert msg["MIME-Version"] == "1.0"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_human_part_names_each_recipient_and_reply() -> None:
    text = body(parts(parse(dsn()))[0]).decode()
    assert "<bob@example.net>: host mx.example.net[192.0.2.25]:25 said: 550 5.1.1 no such " \
           "user" in " ".join(text.split())
    assert "carol@example.org" in text and "Connection refused" in text
    assert "gw.example.com" in text


def test_delivery_status_fields() -> None:
    per_message, bob, carol = status_blocks(parse(dsn()))
    assert per_message["Reporting-MTA"] == "dns; gw.example.com"
    assert per_message["X-Mailgw-Queue-ID"] == "Q0123ABC"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL

    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"

    # expired (temporary) recipient: 4.4.7, failed, last reply kept, no Remote-MTA
    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None
    assert " ".join(carol["Diagnostic-Code"].split()) == (
        "X-Mailgw; 451 4.4.1 connect to mx.example.org[192.0.2.26]:25: Connection refused")


def test_headers_part_is_the_original_header_block() -> None:
    raw = dsn()
    third = parts(parse(raw))[2]
    assert body(third) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"the numbers are attached" not in raw


def test_full_includes_the_whole_original() -> None:
    msg = parse(dsn(include="full"))
    third = parts(msg)[2]
    assert third.get_content_type() == "message/rfc822"
    [inner] = parts(third)
    assert inner["Message-ID"] == "<q1@example.com>"
    assert b"the numbers are attached" in body(inner)


def test_delay_warning() -> None:
    msg = parse(dsn(CAROL, final=False))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, carol = status_blocks(msg)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"


def test_delay_warning_for_an_account_that_needs_reconnecting() -> None:
    held = RcptResult(rcpt="bob@example.net", code=454, status="4.7.8",
                      text="account rep-mailbox needs reconnecting: host smtp.example.com"
                           "[192.0.2.9]:587 refused AUTH XOAUTH2", remote=None,
                      credentials="refused")
    note = ("Your message is held because the mailbox account it is sent through needs "
            "reconnecting.\n  Once the account is reconnected, delivery resumes by itself. " * 2)
    raw = dsn(held, final=False, note=note)
    msg = parse(raw)
    [_, block] = status_blocks(msg)
    assert (block["Action"], block["Status"]) == ("delayed", "4.7.8")
    assert block["Diagnostic-Code"].startswith("X-Mailgw; 454 4.7.8 account rep-mailbox needs")
    text = body(parts(msg)[0]).decode()
    paragraphs = text.split("\r\n\r\n")
    assert paragraphs[1].startswith("This is a warning only")
    # the note is one paragraph, after the introduction, its whitespace folded anew
    assert " ".join(paragraphs[2].split()) == " ".join(note.split())
    assert all(len(line) <= 72 for line in paragraphs[2].split("\r\n"))
    assert "For further assistance" in paragraphs[3]
    assert b"held because" not in dsn(held, final=False)  # no note, no paragraph


@pytest.mark.parametrize("original", [ORIGINAL, ORIGINAL.replace(b"\r\n", b"\n")])
def test_crlf_everywhere_and_short_lines(original: bytes) -> None:
    long_reply = RcptResult(rcpt="bob@example.net", code=550, status="5.7.1",
                            text="policy " * 300 + "x" * 1200, remote="mx.example.net[192.0.2.25]:25")
    raw = dsn(long_reply, original=original)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) < 998
    [_, block] = status_blocks(parse(raw))
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 policy policy")


def test_non_ascii_recipient_uses_global_delivery_status() -> None:
    jose = RcptResult(rcpt="jos\u00e9@example.net", code=550, status="5.1.1",
                      text="no such user", remote="mx.example.net[192.0.2.25]:25")
    raw = dsn(jose)
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert list(msg.iter_parts())[1].get_content_type() == "message/global-delivery-status"
    assert "utf-8; jos\u00e9@example.net".encode() in raw
    assert max(len(line) for line in raw.split(b"\r\n")) < 998


def test_each_dsn_has_a_fresh_message_id() -> None:
    assert parse(dsn())["Message-ID"] != parse(dsn())["Message-ID"]


# -- is_bounce ----------------------------------------------------------------------------


def test_a_dsn_is_a_bounce() -> None:
    assert is_bounce("alice@example.com", dsn())


@pytest.mark.parametrize("sender", ["", "<>", " "])
def test_null_sender_is_a_bounce(sender: str) -> None:
    assert is_bounce(sender, ORIGINAL)


@pytest.mark.parametrize(("header", "expected"), [
    (b"Auto-Submitted: auto-replied\r\n", True),
    (b"Auto-Submitted: auto-generated; owner-email=x@y\r\n", True),
    (b"Auto-Submitted: No\r\n", False),
    (b"Content-Type: multipart/report; report-type=\"delivery-status\"; boundary=b\r\n", True),
    (b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n",
     False),
    (b"", False),
])
def test_is_bounce_headers(header: bytes, expected: bool) -> None:
    data = header + ORIGINAL
    assert is_bounce("alice@example.com", data) is expected


def test_body_text_does_not_make_a_bounce() -> None:
    data = ORIGINAL + b"Auto-Submitted: auto-replied\r\n"
    assert not is_bounce("alice@example.com", data)
