"""gateway.mail.forward: the original message out of attached and inline forwards of each
client style, and no false forwards out of replies, plain BCC copies or bounces."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail.forward import Forwarded, unwrap_forward
from gateway.mail.parse import parse_message

DATA = Path(__file__).resolve().parents[1] / "data" / "mail"
ORIG_TEXT = (
    "Hi Rep,\n\nCould you send us pricing for 40 seats? We would like to start in January.\n\nThanks,\nJane"
)


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def unwrap(raw: bytes) -> Forwarded | None:
    return unwrap_forward(raw, parse_message(raw))


def must_unwrap(name: str) -> Forwarded:
    fwd = unwrap(load(name))
    assert fwd is not None, name
    return fwd


# --- inline styles ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "style", "note", "date", "cc"),
    [
        # Gmail prints no zone: the forwarder's Date header (-0800) is the hint.
        ("gmail_forward_text.eml", "gmail", "Please add this to the ACME account.",
         datetime(2026, 11, 16, 18, 0, tzinfo=UTC),
         ["buyer@customer.example", "procurement@customer.example"]),
        ("gmail_forward_html.eml", "gmail", "Please add this to the ACME account.",
         datetime(2026, 11, 16, 18, 0, tzinfo=UTC), ["buyer@customer.example"]),
        ("outlook_forward_original_message.eml", "outlook", "FYI - please log against ACME.\n\nRep",
         datetime(2026, 11, 16, 10, 0, tzinfo=UTC), []),
        ("outlook_owa_forward_html.eml", "outlook", "Please log this one.",
         datetime(2026, 11, 16, 18, 0, tzinfo=UTC), ["buyer@customer.example"]),
        ("apple_forward_text.eml", "apple", "Logging this for the ACME deal.",
         datetime(2026, 11, 16, 9, 0, tzinfo=UTC), []),
        ("apple_forward_html.eml", "apple", "Logging this for the ACME deal.",
         datetime(2026, 11, 16, 9, 0, tzinfo=UTC), []),
        ("thunderbird_forward.eml", "thunderbird", "Please log.",
         datetime(2026, 11, 16, 9, 0, tzinfo=UTC), []),
    ],
)
def test_inline_forward_yields_the_customers_message(
    name: str, style: str, note: str, date: datetime, cc: list[str]
) -> None:
    fwd = must_unwrap(name)
    o = fwd.original
    assert fwd.style == style
    assert fwd.forwarded_by == "rep@example.com"
    assert fwd.note == note
    assert o.from_addr == "jane@customer.example"
    assert o.from_name == "Jane Customer"
    assert o.to_addrs == ["rep@example.com"]
    assert o.cc_addrs == cc
    assert o.subject == "Pricing for 40 seats"  # the original's, without the Fwd: of the forward
    assert o.date == date
    assert o.text_body.strip() == ORIG_TEXT
    assert o.snippet.startswith("Hi Rep, Could you send us pricing for 40 seats?")
    # The reconstructed raw message is a real RFC 5322 message that parses to the same.
    again = parse_message(fwd.raw)
    assert (again.from_addr, again.subject, again.date, again.text_body) == (
        o.from_addr, o.subject, o.date, o.text_body,
    )
    assert b"\nX-Mailgw-Unwrapped: " + style.encode() + b"; forwarded-by=<rep@example.com>\r\n" in fwd.raw


@pytest.mark.parametrize(
    "name", ["gmail_forward_html.eml", "outlook_owa_forward_html.eml", "apple_forward_html.eml"]
)
def test_the_quoted_html_is_isolated(name: str) -> None:
    html = must_unwrap(name).original.html_body
    assert html.startswith('<div dir="ltr">Hi Rep,')
    assert "Could you send us pricing for 40 seats?" in html
    assert html.rstrip().endswith("<div>Jane</div></div>")
    for leftover in ("Forwarded message", "Begin forwarded", "From:", "Please log", "ACME"):
        assert leftover not in html


def test_text_only_forwards_have_no_html() -> None:
    for name in ("gmail_forward_text.eml", "apple_forward_text.eml", "outlook_forward_original_message.eml"):
        assert must_unwrap(name).original.html_body == ""


def test_outlook_mailto_form_and_names_without_addresses() -> None:
    o = must_unwrap("outlook_forward_original_message.eml").original
    # "From: Jane Customer [mailto:jane@customer.example]", "Cc: Buyer, Bob" (no address)
    assert (o.from_addr, o.from_name) == ("jane@customer.example", "Jane Customer")
    assert o.cc_addrs == []


def test_outlook_desktop_german_labels_windows_1252() -> None:
    fwd = must_unwrap("outlook_desktop_forward_de.eml")
    o = fwd.original
    assert fwd.style == "outlook"
    assert fwd.forwarded_by == "anna.schmidt@example.com"
    assert fwd.note == "Bitte im CRM erfassen.\n\nGruß\nAnna"
    assert (o.from_addr, o.from_name) == ("jm@kunde.example", "Jürgen Müller")
    assert o.to_addrs == ["anna.schmidt@example.com"]
    assert o.cc_addrs == ["einkauf@kunde.example"]
    assert o.subject == "Angebot über 40 Lizenzen"
    assert o.date == datetime(2026, 11, 16, 9, 0, tzinfo=UTC)  # "Montag, 16. November 2026 10:00" at +0100
    assert o.text_body.startswith("Hallo Herr Schmidt,\n\nbitte senden Sie uns ein Angebot über 40 Lizenzen.")
    assert "bitte senden Sie uns ein Angebot über 40 Lizenzen." in o.html_body
    assert "Betreff" not in o.html_body and "Bitte im CRM" not in o.html_body


def test_apple_block_gives_message_id_and_reply_to() -> None:
    o = must_unwrap("apple_forward_text.eml").original
    assert o.message_id == "<F00D-1234@customer.example>"
    assert o.reply_to == ["jane+reply@customer.example"]
    assert must_unwrap("apple_forward_html.eml").original.message_id == "<F00D-1234@customer.example>"


def test_nested_forward_unwraps_the_outermost() -> None:
    fwd = must_unwrap("gmail_nested_forward.eml")
    o = fwd.original
    assert fwd.note == "For the record."
    assert (o.from_addr, o.subject) == ("jones@example.com", "Fwd: Pricing for 40 seats")
    assert o.date == datetime(2026, 11, 17, 0, 12, tzinfo=UTC)
    assert o.text_body.startswith("Can you take this one?\n\n---------- Forwarded message ---------")
    # ... and unwrapping the original again reaches the customer.
    inner = unwrap_forward(fwd.raw, o)
    assert inner is not None
    assert inner.original.from_addr == "jane@customer.example"
    assert inner.forwarded_by == "jones@example.com"


def test_unwrapping_is_deterministic() -> None:
    raw = load("gmail_forward_html.eml")
    a, b = unwrap(raw), unwrap(raw)
    assert a is not None and b is not None
    assert a.raw == b.raw
    assert a.original.dedupe_hash == b.original.dedupe_hash


# --- attached message ---------------------------------------------------------------


def test_outlook_forward_as_attachment_returns_the_exact_bytes() -> None:
    raw = load("outlook_forward_as_attachment.eml")
    fwd = unwrap(raw)
    assert fwd is not None
    assert fwd.style == "attachment"
    assert fwd.note == "Customer request, see attached."
    start = raw.index(b"Received: from mail.customer.example")
    assert fwd.raw == raw[start : raw.index(b"\r\n--_004_DB9PR06MB0001_--", start)]
    o = fwd.original
    assert o.message_id == "<CAJane0001@mail.customer.example>"
    assert (o.from_addr, o.subject, o.date) == (
        "jane@customer.example", "Pricing for 40 seats", datetime(2026, 11, 16, 9, 0, tzinfo=UTC),
    )
    assert o.text_body.strip() == ORIG_TEXT


def _attach(note: str, subject: str, extra: str = "") -> bytes:
    inner = (
        "From: Jane Customer <jane@customer.example>\r\nTo: rep@example.com\r\n"
        "Subject: Pricing for 40 seats\r\nMessage-ID: <att@customer.example>\r\n\r\nHello\r\n"
    )
    return (
        f"From: rep@example.com\r\nTo: crm@gw.example.com\r\nSubject: {subject}\r\n"
        'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        f"--m\r\nContent-Type: text/plain\r\n\r\n{note}\r\n"
        f"{extra}"
        f"--m\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--m--\r\n"
    ).encode()


def test_attached_message_rules() -> None:
    # A short note around one attached message is a forward, whatever the subject.
    assert unwrap(_attach("see attached", "customer mail")) is not None
    # The same subject as the attached message is a forward even with a long note.
    assert unwrap(_attach("word " * 1000, "Pricing for 40 seats")) is not None
    # A forward prefix is a forward.
    assert unwrap(_attach("word " * 1000, "FW: something else")) is not None
    # A long mail that happens to carry a message and other files is not.
    pdf = "--m\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n"
    assert unwrap(_attach("word " * 1000, "Quarterly review", pdf)) is None
    assert unwrap(_attach("see attached", "Quarterly review", pdf)) is None
    # A reply that attaches a message is a reply.
    assert unwrap(_attach("see attached", "Re: Pricing for 40 seats")) is None


# --- not forwards -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "reply_quoted_history.eml",  # Re:, "On ... wrote:", a forward block inside the quote
        "reply_outlook.eml",  # RE:, Outlook's header block above the quoted message
        "bcc_plain.eml",  # a BCC copy whose text has "From: ..." and "Date: ..." lines
        "bounce_report.eml",  # message/rfc822 inside multipart/report
        "attachments_inline_rfc822.eml",  # carries a message among other files
        "mixed_alternative_qp_base64.eml",
        "latin1_windows1252.eml",
        "shift_jis.eml",
        "utf8_headers_no_message_id.eml",
        "malformed.eml",
    ],
)
def test_not_a_forward(name: str) -> None:
    assert unwrap(load(name)) is None


def _text_message(subject: str, body: str, extra_headers: str = "") -> bytes:
    head = f"From: Rep <rep@example.com>\r\nTo: crm@gw.example.com\r\nSubject: {subject}\r\n{extra_headers}"
    return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body.replace("\n", "\r\n")).encode()


GMAIL_BLOCK = (
    "---------- Forwarded message ---------\n"
    "From: Jane Customer <jane@customer.example>\n"
    "Date: Mon, Nov 16, 2026 at 10:00 AM\n"
    "Subject: Pricing\n"
    "To: <rep@example.com>\n\n\nHello\n"
)
OUTLOOK_BLOCK = (
    "From: Jane Customer <jane@customer.example>\n"
    "Sent: Monday, November 16, 2026 10:00 AM\n"
    "To: Rep <rep@example.com>\n"
    "Subject: Pricing\n\nHello\n"
)


def test_a_reply_attribution_above_a_forward_block_means_quoted_history() -> None:
    attribution = "On Mon, Nov 16, 2026 at 10:00 AM Jane <jane@customer.example> wrote:"
    body = f"Sounds good.\n\n{attribution}\n\n{GMAIL_BLOCK}"
    assert unwrap(_text_message("Pricing", body)) is None
    german = "Passt.\n\nAm 16.11.2026 um 10:00 schrieb Jane <jane@customer.example>:\n" + GMAIL_BLOCK
    assert unwrap(_text_message("Pricing", german)) is None


def test_a_note_that_says_wrote_is_still_a_note() -> None:
    fwd = unwrap(_text_message("Fwd: Pricing", "Look at what the customer wrote:\n\n" + GMAIL_BLOCK))
    assert fwd is not None
    assert fwd.note == "Look at what the customer wrote:"


def test_outlook_block_needs_a_forward_signal() -> None:
    body = "See below.\n\n" + OUTLOOK_BLOCK
    assert unwrap(_text_message("FW: Pricing", body)) is not None
    assert unwrap(_text_message("WG: Pricing", body)) is not None
    # No prefix: a forward unless the message is itself a reply.
    assert unwrap(_text_message("Pricing", body)) is not None
    assert unwrap(_text_message("Pricing", body, "In-Reply-To: <parent@customer.example>\r\n")) is None
    assert unwrap(_text_message("AW: Pricing", body)) is None


def test_gmail_forward_survives_an_in_reply_to_header() -> None:
    # Gmail sets In-Reply-To/References on forwards; the marker is unambiguous.
    raw = _text_message("Fwd: Pricing", GMAIL_BLOCK, "In-Reply-To: <orig@customer.example>\r\n")
    fwd = unwrap(raw)
    assert fwd is not None
    assert fwd.note == ""


def test_html_only_forward() -> None:
    html = load("gmail_forward_html.eml").split(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")[1]
    html = html.split(b"\r\n--000000000000b2c4d5062a9f1e3a--")[0]
    raw = (
        b"From: Rep <rep@example.com>\r\nTo: crm@gw.example.com\r\nSubject: Fwd: Pricing for 40 seats\r\n"
        b"Date: Mon, 16 Nov 2026 10:05:12 -0800\r\n"
        b"Content-Type: text/html; charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + html
    )
    fwd = unwrap(raw)
    assert fwd is not None
    assert fwd.style == "gmail"
    assert fwd.note == "Please add this to the ACME account."
    assert fwd.original.from_addr == "jane@customer.example"
    assert fwd.original.date == datetime(2026, 11, 16, 18, 0, tzinfo=UTC)
    assert re.sub(r"\s+", " ", fwd.original.text_body).strip() == re.sub(r"\s+", " ", ORIG_TEXT)
    assert fwd.original.html_body.startswith('<div dir="ltr">Hi Rep,')


def test_localized_apple_and_outlook_blocks() -> None:
    apple_fr = (
        "Pour info.\n\n> Début du message réexpédié :\n>\n> De: Jean Client <jean@client.example>\n"
        "> Objet: Devis\n> Date: 16 novembre 2026 à 10:00:00 UTC+1\n"
        "> À: Rep <rep@example.com>\n>\n> Bonjour\n"
    )
    fwd = unwrap(_text_message("TR: Devis", apple_fr))
    assert fwd is not None and fwd.style == "apple"
    assert (fwd.original.from_addr, fwd.original.subject) == ("jean@client.example", "Devis")
    assert fwd.original.date == datetime(2026, 11, 16, 9, 0, tzinfo=UTC)
    assert fwd.original.text_body.strip() == "Bonjour"
    outlook_fr = (
        "Voir ci-dessous.\n\n________________________________\nDe : Jean Client <jean@client.example>\n"
        "Envoyé : lundi 16 novembre 2026 10:00\nÀ : Rep <rep@example.com>\nObjet : Devis\n\nBonjour\n"
    )
    fwd = unwrap(_text_message("TR: Devis", outlook_fr, "Date: Mon, 16 Nov 2026 10:30:00 +0100\r\n"))
    assert fwd is not None and fwd.style == "outlook"
    assert (fwd.original.from_addr, fwd.original.to_addrs) == ("jean@client.example", ["rep@example.com"])
    assert fwd.original.date == datetime(2026, 11, 16, 9, 0, tzinfo=UTC)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(DATA.glob("*.eml"))),
    st.integers(0, 1 << 16),
    st.binary(max_size=30),
    st.integers(0, 3000),
)
def test_unwrap_never_raises_on_mutated_forwards(path: Path, pos: int, chunk: bytes, cut: int) -> None:
    raw = path.read_bytes()
    at = pos % (len(raw) + 1)
    mutated = (raw[:at] + chunk + raw[at:])[: len(raw) + len(chunk) - cut]
    result = unwrap(mutated)
    assert result is None or isinstance(result, Forwarded)
