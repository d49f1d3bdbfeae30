"""gateway.mail.parse: bytes -> ParsedMessage on real-client fixtures, hostile input and
the dedupe hash's stability across delivery paths."""

# Real mail text is full of en dashes and fullwidth colons.
# ruff: noqa: RUF001

from __future__ import annotations

import base64
import hashlib
import quopri
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mail.dates import parse_human_date, parse_rfc_date
from gateway.mail.parse import (
    HEADER_VALUE_LIMIT,
    Attachment,
    ParsedMessage,
    message_id_key,
    normalize_subject,
    parse_headers,
    parse_message,
)
from gateway.mail.text import decode_bytes, decode_words, html_to_text

DATA = Path(__file__).resolve().parents[1] / "data" / "mail"
FIXTURES = sorted(DATA.glob("*.eml"))


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --- real-client fixtures -----------------------------------------------------------


def test_multipart_mixed_with_alternative_qp_base64_and_rfc2047() -> None:
    m = parse_message(load("mixed_alternative_qp_base64.eml"))
    assert m.message_id == "<20261116100000.4711@kunde.example>"
    assert m.in_reply_to == "<CAB1234@mail.example.com>"
    assert m.references == ["<CAA0001@mail.example.com>", "<CAB1234@mail.example.com>"]
    assert m.from_addr == "Juergen.Mueller@Kunde.example"  # original case kept
    assert m.from_name == "Jürgen Müller"
    assert m.to_addrs == ["anna.schmidt@example.com", "sales@example.com"]
    assert m.cc_addrs == ["bjoern@kunde.example"]
    assert m.reply_to == ["angebote@kunde.example"]
    assert m.bcc_addrs == []
    assert m.display_names["anna.schmidt@example.com"] == "Schmidt, Anna"
    assert m.display_names["bjoern@kunde.example"] == "Björn"
    # Two encoded-words folded over two lines: the whitespace between them disappears.
    assert m.subject == "Angebot für 40 Lizenzen – dringend"
    assert m.date == datetime(2026, 11, 16, 9, 0, tzinfo=UTC)
    assert m.text_body.startswith("Hallo Frau Schmidt,\n\nanbei unser Angebot für 40 Lizenzen – gültig")
    assert "12.400 € netto" in m.text_body
    assert "\r" not in m.text_body
    assert "12.400&nbsp;&euro; netto" in m.html_body  # the HTML as sent, decoded from base64
    assert m.snippet.startswith("Hallo Frau Schmidt, anbei unser Angebot")
    assert len(m.snippet) <= 200
    assert m.attachments == [
        Attachment(
            filename="Angebot Müller 2026.pdf",  # RFC 2231 filename* wins over the 2047 name=
            content_type="application/pdf",
            size=2095,
            sha256="48ab061f99476aefc73c6fad350caee7b64ca2ba73f4ebca07de7e3adcb04c34",
            content_id=None,
            inline=False,
        )
    ]
    assert m.headers.list_unsubscribe == (
        "<mailto:unsubscribe@kunde.example?subject=unsubscribe>, <https://kunde.example/unsubscribe/abc>"
    )
    assert m.headers.precedence == "bulk"
    assert m.headers.auto_submitted == "no"
    assert m.headers.x_mailgw_template == "angebot-v2"
    assert m.size == len(load("mixed_alternative_qp_base64.eml"))
    assert m.defects == []


def test_iso_8859_1_label_is_read_as_windows_1252() -> None:
    m = parse_message(load("latin1_windows1252.eml"))
    assert m.subject == "Preisänderung für München"
    assert "der Preis beträgt € 1.200 – inklusive „Premium-Support“." in m.text_body
    assert "Grüße aus München" in m.text_body
    assert "€ 1.200 – inklusive „Premium-Support“" in m.html_body  # windows-1252, 8bit
    assert m.from_name == "Kunde GmbH"
    assert m.defects == []


def test_iso_2022_jp_headers_and_shift_jis_body_with_cp932_characters() -> None:
    m = parse_message(load("shift_jis.eml"))
    assert m.subject == "見積書の送付について"
    assert m.from_name == "高橋 一郎"
    assert m.display_names["yamada@example.com"] == "山田 太郎"
    assert "① 見積書を添付いたします。" in m.text_body  # ① and 髙 exist in cp932 only
    assert m.text_body.rstrip().endswith("髙橋")
    assert m.date == datetime(2026, 11, 18, 0, 30, tzinfo=UTC)
    assert m.defects == []


def test_raw_utf8_headers_lf_endings_and_no_message_id() -> None:
    m = parse_message(load("utf8_headers_no_message_id.eml"))
    assert m.message_id == ""
    assert m.from_addr == "zoe@kund.example"
    assert m.from_name == "Zoë Ångström"
    assert m.display_names["oystein@example.com"] == "Øystein"
    assert m.subject == "Møte på torsdag – agenda"
    assert m.text_body == "Hei Øystein,\n\nKan vi møtes på torsdag kl. 14? Agendaen følger.\n\nZoë\n"
    assert m.snippet == "Hei Øystein, Kan vi møtes på torsdag kl. 14? Agendaen følger. Zoë"
    assert re.fullmatch(r"[0-9a-f]{64}", m.dedupe_hash)


def test_attachments_inline_image_attached_message_and_calendar() -> None:
    raw = load("attachments_inline_rfc822.eml")
    m = parse_message(raw)
    assert m.text_body == ""
    assert "<script>" in m.html_body
    assert m.snippet == "See the chart: Thanks & regards"  # from the HTML, script dropped
    image, message, calendar = m.attachments
    assert (image.filename, image.content_type, image.content_id, image.inline) == (
        "chart.png", "image/png", "chart001@example.com", True,
    )
    encoded = re.search(rb"base64\r\n\r\n(.+?)\r\n--rel--", raw, re.S)
    assert encoded is not None
    png = base64.b64decode(encoded.group(1))
    assert (image.size, image.sha256) == (len(png), hashlib.sha256(png).hexdigest())
    # The attached message is measured on its exact bytes in the raw message.
    start = raw.index(b"From: Old Customer")
    inner = raw[start : raw.index(b"\r\n--outer", start)]  # the fixture is CRLF already
    assert (message.content_type, message.filename, message.inline) == (
        "message/rfc822", "Our contract from 2025.eml", False,
    )
    assert (message.size, message.sha256) == (len(inner), hashlib.sha256(inner).hexdigest())
    assert calendar.content_type == "text/calendar"
    assert calendar.filename == ""


def test_bounce_report_parts_are_attachments() -> None:
    m = parse_message(load("bounce_report.eml"))
    assert [a.content_type for a in m.attachments] == ["message/delivery-status", "message/rfc822"]
    assert m.attachments[1].filename == "Hello.eml"
    assert m.headers.auto_submitted == "auto-replied"
    assert m.text_body.startswith("This is the mail system.")


def test_malformed_message_is_read_as_far_as_possible() -> None:
    m = parse_message(load("malformed.eml"))
    assert m.from_addr == "valid@example.com"  # "broken@@example..com" is not an address
    assert m.to_addrs == ["someone@example.com"]
    assert m.subject.startswith("Café and ")  # unknown charset label: sniffed
    assert m.date is None
    assert m.message_id == "no-brackets-here@example.com"
    assert m.text_body == "Hello world!"  # sloppy base64 padding still decodes
    assert "café" in m.html_body
    assert len(m.attachments) == 1
    joined = " | ".join(m.defects)
    for expected in (
        "malformed header line",
        "invalid address(es) in From",
        "unknown charset 'x-klingon'",
        "unreadable Date",
        "CloseBoundaryNotFoundDefect",
    ):
        assert expected in joined


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_fixture_parses_the_same_with_lf_and_crlf(path: Path) -> None:
    raw = path.read_bytes()
    lf = raw.replace(b"\r\n", b"\n")
    crlf = lf.replace(b"\n", b"\r\n")
    a, b = parse_message(lf), parse_message(crlf)
    assert (a.text_body, a.html_body, a.subject, a.to_addrs, a.date) == (
        b.text_body, b.html_body, b.subject, b.to_addrs, b.date,
    )
    assert a.attachments == b.attachments
    assert a.dedupe_hash == b.dedupe_hash


def test_text_parts_beyond_the_limit_are_not_decoded_but_attachments_are_measured() -> None:
    m = parse_message(load("mixed_alternative_qp_base64.eml"), text_limit=100)
    assert m.text_body == ""
    assert m.html_body == ""
    assert any("text/plain part of" in d and "not decoded" in d for d in m.defects)
    assert m.attachments[0].size == 2095


# --- parse_headers ------------------------------------------------------------------


def test_parse_headers_reads_an_imap_header_fields_answer() -> None:
    block = (
        b"From: =?utf-8?q?J=C3=B6rg?= <J.Org@Example.COM>\r\n"
        b"To: a@example.com,\r\n b@example.com\r\n"
        b"Cc: c@example.com\r\n"
        b"Subject: Re: [sales] =?utf-8?b?UHJlaXM=?=\r\n"
        b"Date: Mon, 16 Nov 2026 10:00:00 -0500\r\n"
        b"Message-ID: <abc@Example.COM>\r\n"
        b"In-Reply-To: <parent@example.com> (the parent)\r\n"
        b"References: <root@example.com> <parent@example.com>\r\n"
        b"Auto-Submitted: auto-generated\r\n"
        b"\r\n"
    )
    h = parse_headers(block)
    assert h.from_addr == "J.Org@Example.COM"
    assert h.from_name == "Jörg"
    assert h.to_addrs == ["a@example.com", "b@example.com"]
    assert h.cc_addrs == ["c@example.com"]
    assert h.subject == "Re: [sales] Preis"
    assert h.date == datetime(2026, 11, 16, 15, 0, tzinfo=UTC)
    assert h.message_id == "<abc@Example.COM>"
    assert h.in_reply_to == "<parent@example.com>"
    assert h.references == ["<root@example.com>", "<parent@example.com>"]
    assert h.headers.auto_submitted == "auto-generated"
    assert h.defects == []


def test_parse_headers_agrees_with_parse_message() -> None:
    raw = load("mixed_alternative_qp_base64.eml")
    h = parse_headers(raw[: raw.index(b"\r\n\r\n") + 4])
    m = parse_message(raw)
    for name in ("message_id", "in_reply_to", "references", "from_addr", "from_name", "to_addrs",
                 "cc_addrs", "reply_to", "subject", "date", "headers"):
        assert getattr(h, name) == getattr(m, name), name


def test_parse_headers_on_garbage() -> None:
    h = parse_headers(b"\xff\xfe\x00garbage\r\n: no name\r\nX: \xc3(\r\n")
    assert h.from_addr == ""
    assert h.message_id == ""
    assert h.date is None
    assert any("malformed header line" in d for d in h.defects)


# --- subjects, ids ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Pricing", "Pricing"),
        ("RE: FW: Fwd: pricing  for   40", "pricing for 40"),
        ("AW: WG: Angebot", "Angebot"),
        ("SV: VS: Antw: Tilbud", "Tilbud"),
        ("R: RIF: Offerta", "Offerta"),
        ("Réf. : x", "Réf. : x"),  # "Réf." with a dot is not a prefix
        ("Réf : Devis", "Devis"),
        ("TR: Devis", "Devis"),
        ("回复：报价", "报价"),
        ("转发: 报价", "报价"),
        ("Re[2]: Re(3): Hello", "Hello"),
        ("Fwd:Re:Hello", "Hello"),
        ("[sales] Re: [sales] Hello", "Hello"),
        ("Re: Hello [sales]", "Hello [sales]"),  # list tags only when leading
        ("Rendezvous: tomorrow", "Rendezvous: tomorrow"),
        ("Return policy", "Return policy"),
        ("Re:", ""),
        ("", ""),
        ("  Hello\t\n world ", "Hello world"),
    ],
)
def test_normalize_subject(subject: str, expected: str) -> None:
    assert normalize_subject(subject) == expected


@pytest.mark.parametrize(
    ("mid", "key"),
    [
        ("<Abc.DEF@Example.COM>", "Abc.DEF@example.com"),
        ("  <abc@example.com>  ", "abc@example.com"),
        ("<abc@\r\n example.com>", "abc@example.com"),
        ("abc@Example.com", "abc@example.com"),
        ("<a@b> <c@d>", "a@b"),
        ("", ""),
        ("<no-at-sign>", "no-at-sign"),
    ],
)
def test_message_id_key(mid: str, key: str) -> None:
    assert message_id_key(mid) == key


# --- dedupe hash --------------------------------------------------------------------

TRACE = (
    b"Return-Path: <zoe@kund.example>\r\n"
    b"Delivered-To: oystein@example.com\r\n"
    b"Received: from mx.kund.example (mx.kund.example [192.0.2.1])\r\n"
    b"\tby imap.example.com with ESMTPS; Thu, 19 Nov 2026 14:03:30 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=kund.example; s=s1;\r\n"
    b"\th=from:to:subject:date; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b"\tb=dGVzdA==\r\n"
    b"ARC-Seal: i=1; a=rsa-sha256; t=1; cv=none; d=example.com; s=arc; b=eA==\r\n"
    b"X-Spam-Status: No, score=-0.1\r\n"
    b"X-Mailgw-Queue-Id: 01JABC\r\n"
)


def _variant(raw: bytes, *, head_edit: bytes = b"", cte: str | None = None) -> bytes:
    head, _, body = raw.replace(b"\n", b"\r\n").partition(b"\r\n\r\n")
    if cte == "base64":
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
        head = head.replace(b"Transfer-Encoding: 8bit", b"Transfer-Encoding: base64")
    elif cte == "quoted-printable":
        body = quopri.encodestring(body.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
        head = head.replace(b"Transfer-Encoding: 8bit", b"Transfer-Encoding: quoted-printable")
    return head_edit + head + b"\r\n\r\n" + body


def test_dedupe_hash_is_the_same_on_every_delivery_path() -> None:
    smtp = load("utf8_headers_no_message_id.eml")  # LF, 8bit, as the rep's client wrote it
    base = parse_message(smtp).dedupe_hash
    imap_copy = _variant(smtp, head_edit=TRACE)
    assert parse_message(imap_copy).dedupe_hash == base
    assert parse_message(_variant(smtp, cte="base64")).dedupe_hash == base
    assert parse_message(_variant(smtp, head_edit=TRACE, cte="quoted-printable")).dedupe_hash == base
    # The same Date in another zone, a Bcc only on the sender's copy, recipients re-cased.
    other = (
        smtp.replace(b"Thu, 19 Nov 2026 14:03:27 +0000", b"Thu, 19 Nov 2026 15:03:59 +0100")
        .replace(b"To: \xc3\x98ystein <oystein@example.com>", b"To: OYSTEIN@Example.com\nBcc: b@example.com")
        .replace(b"Subject: ", b"Subject: [EXT] ")
    )
    assert parse_message(other).dedupe_hash == base
    # Another charset for the same text.
    latin = _variant(smtp).replace(b"charset=utf-8", b"charset=iso-8859-1")
    head, _, body = latin.partition(b"\r\n\r\n")
    latin = head + b"\r\n\r\n" + body.decode("utf-8").encode("latin-1")
    assert parse_message(latin).dedupe_hash == base


def test_dedupe_hash_changes_with_the_message() -> None:
    smtp = load("utf8_headers_no_message_id.eml")
    base = parse_message(smtp).dedupe_hash
    assert parse_message(smtp.replace(b"kl. 14?", b"kl. 15?")).dedupe_hash != base
    assert parse_message(smtp.replace(b"14:03:27", b"14:04:27")).dedupe_hash != base
    assert parse_message(smtp.replace(b"oystein@example.com", b"other@example.com")).dedupe_hash != base
    assert parse_message(smtp.replace(b"agenda", b"referat")).dedupe_hash != base


def test_dedupe_hash_uses_html_text_without_a_text_part() -> None:
    a = (
        b"From: a@x.example\r\nTo: b@y.example\r\nSubject: S\r\nContent-Type: text/html\r\n\r\n"
        b"<p>Hello <b>you</b></p>\r\n"
    )
    b = a.replace(b"<p>Hello <b>you</b></p>", b"<div>Hello\r\n you</div>")
    c = a.replace(b"<p>Hello <b>you</b></p>", b"<p>Bye</p>")
    assert parse_message(a).dedupe_hash == parse_message(b).dedupe_hash != parse_message(c).dedupe_hash


# --- hostile input ------------------------------------------------------------------


def test_huge_headers_are_capped() -> None:
    many = b", ".join(b"user%d@example.com" % i for i in range(20000))
    raw = b"From: a@example.com\r\nTo: " + many + b"\r\nSubject: " + b"x" * 3_000_000 + b"\r\n\r\nbody\r\n"
    m = parse_message(raw)
    assert m.from_addr == "a@example.com"
    assert len(m.subject) <= HEADER_VALUE_LIMIT
    assert 0 < len(m.to_addrs) < 20000
    assert any("truncated" in d for d in m.defects)


def test_absurd_nesting_does_not_raise() -> None:
    depth = 3000
    level = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
    head = b"".join(level % (i, i) for i in range(depth))
    raw = b"From: a@example.com\r\n" + head + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    m = parse_message(raw)
    assert isinstance(m, ParsedMessage)
    assert m.from_addr == "a@example.com"
    assert m.defects


def test_not_bytes_but_bytes_like() -> None:
    raw = load("bcc_plain.eml")
    assert parse_message(bytearray(raw)).dedupe_hash == parse_message(memoryview(raw)).dedupe_hash  # type: ignore[arg-type]  # other buffers on purpose


def _mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, pos, chunk in ops:
        if not out:
            out.extend(chunk)
            continue
        at = pos % len(out)
        if kind == 0:
            out[at : at + len(chunk)] = chunk  # overwrite
        elif kind == 1:
            out[at:at] = chunk  # insert
        elif kind == 2:
            del out[at : at + 1 + len(chunk) * 7]  # delete a run
        else:
            out[at:] = out[at:][: len(chunk) * 13]  # truncate
    return bytes(out)


_INTERESTING = st.sampled_from(
    [b"\r\n", b"\n", b"\r\n\r\n", b"--", b"=?", b"?=", b"=?utf-8?b?", b"=?x?q?=FF", b"<", b">", b"@",
     b"Content-Type: multipart/mixed; boundary=x\r\n", b"Content-Transfer-Encoding: base64\r\n",
     b"charset=\"utf-7\"", b"charset=\"unicode_escape\"", b"charset=\"base64\"", b"\x00", b"\xff\xfe",
     b"message/rfc822", b"\r\n--x\r\n", b"\r\n--x--\r\n", b"filename*=utf-8''%FF%FE", b"=\r\n", b"\t"]
)
_CHUNK = st.one_of(_INTERESTING, st.binary(min_size=1, max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_parse_message_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    m = parse_message(raw)
    assert m.size == len(raw)
    assert len(m.snippet) <= 200
    assert re.fullmatch(r"[0-9a-f]{64}", m.dedupe_hash)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(FIXTURES),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), _CHUNK), min_size=1, max_size=6),
)
def test_parse_message_never_raises_on_mutated_fixtures(
    path: Path, ops: list[tuple[int, int, bytes]]
) -> None:
    raw = _mutate(path.read_bytes(), ops)
    m = parse_message(raw)
    assert m.size == len(raw)
    assert all(a.size >= 0 and len(a.sha256) == 64 for a in m.attachments)
    parse_headers(raw)


# --- helpers ------------------------------------------------------------------------


def test_decode_words_joins_a_character_split_across_two_words() -> None:
    euro = "€".encode()
    first = base64.b64encode(b"Price " + euro[:1]).decode()
    second = base64.b64encode(euro[1:] + b" 10").decode()
    assert decode_words(f"=?utf-8?b?{first}?= =?utf-8?b?{second}?=") == "Price € 10"
    assert decode_words("a =?utf-8?q?b?= c") == "a b c"
    assert decode_words("=?utf-8?q?a?=glued") == "aglued"
    assert decode_words("=?UTF-8*en?Q?Hello_World?=") == "Hello World"
    defects: list[str] = []
    assert decode_words("=?nope?q?caf=E9?=", defects) == "café"
    assert defects == ["unknown charset 'nope'"]


def test_decode_bytes_refuses_non_text_codecs() -> None:
    assert decode_bytes(b"aGVsbG8=", "base64") == "aGVsbG8="
    assert decode_bytes(b"\\u0041", "unicode_escape") == "\\u0041"
    assert decode_bytes(b"caf\xe9", "us-ascii") == "café"
    defects: list[str] = []
    assert decode_bytes(b"caf\xe9", "utf-8", defects) == "caf\ufffd"
    assert defects


def test_html_to_text() -> None:
    html = (
        "<html><head><title>T</title><style>p{x:y}</style></head><body>"
        "<!-- hidden --><script>var a = '<p>';</script>"
        "<div>one<br></div><div>two &amp; <b>three</b></div><p>four&nbsp;five</p>"
        "<table><tr><td>a</td><td>b</td></tr></table></body></html>"
    )
    assert html_to_text(html) == "one\ntwo & three\nfour five\na b"
    assert html_to_text("<" * 100_000 + "x") == "<" * 100_000 + "x"
    assert html_to_text("<script>" + "x" * 1000) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mon, Nov 16, 2026 at 10:00 AM", datetime(2026, 11, 16, 18, 0, tzinfo=UTC)),  # hint -08:00
        ("Monday, November 16, 2026 10:00 PM", datetime(2026, 11, 17, 6, 0, tzinfo=UTC)),
        ("November 16, 2026 at 10:00:00 AM GMT+1", datetime(2026, 11, 16, 9, 0, tzinfo=UTC)),
        ("25 October 2021 at 11:17:21 EEST", datetime(2021, 10, 25, 8, 17, 21, tzinfo=UTC)),
        ("Montag, 16. November 2026 10:00", datetime(2026, 11, 16, 18, 0, tzinfo=UTC)),
        ("mar. 17 nov. 2026 à 14:05", datetime(2026, 11, 17, 22, 5, tzinfo=UTC)),
        ("16.11.2026 10:00", datetime(2026, 11, 16, 18, 0, tzinfo=UTC)),
        ("11/16/2026 10:00 AM", datetime(2026, 11, 16, 18, 0, tzinfo=UTC)),
        ("Mon, 16 Nov 2026 10:00:00 +0100", datetime(2026, 11, 16, 9, 0, tzinfo=UTC)),
        ("tomorrow", None),
        ("", None),
    ],
)
def test_parse_human_date(text: str, expected: datetime | None) -> None:
    assert parse_human_date(text, default_offset=-480) == expected


def test_parse_rfc_date() -> None:
    assert parse_rfc_date("Mon, 16 Nov 2026 10:00:00 -0000") == (datetime(2026, 11, 16, 10, 0, tzinfo=UTC), 0)
    assert parse_rfc_date("16 Nov 2026 10:00 EST") == (datetime(2026, 11, 16, 15, 0, tzinfo=UTC), -300)
    assert parse_rfc_date("Mon, 16 Nov 99999 10:00:00 +0000") == (None, None)
    assert parse_rfc_date(None) == (None, None)
