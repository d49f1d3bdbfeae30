"""`gateway.mail.parse.attachment_data` (one attachment's decoded bytes, addressed like the
message JSON's list) and the API's headers for it (`gateway.api.http.attachment_headers`):
properties over generated messages and hostile bytes, the walker's caps."""

from __future__ import annotations

import base64
import hashlib
import quopri
import re
import time
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.api.http import attachment_headers
from gateway.crm.originals import find_attachment
from gateway.mail.parse import MAX_PARTS, Attachment, AttachmentData, attachment_data, parse_message

FIXTURES = sorted((Path(__file__).parent.parent / "data" / "mail").glob("*.eml"))
_PRINTABLE = st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"])
_NAMES = st.text(_PRINTABLE, min_size=1, max_size=40)


def test_every_fixture_attachment_is_the_part_listed() -> None:
    seen = 0
    for path in FIXTURES:
        raw = path.read_bytes()
        listed = parse_message(raw).attachments
        for n, a in enumerate(listed):
            got = attachment_data(raw, n)
            assert got is not None and got.attachment == a, (path.name, n)
            assert hashlib.sha256(got.data).hexdigest() == a.sha256 and len(got.data) == a.size
            seen += 1
        assert attachment_data(raw, len(listed)) is None and attachment_data(raw, -1) is None
    assert seen >= 6


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, str, str]]]:
    """A multipart message with a text body and 1-5 attachments of random bytes, names and
    transfer encodings, and what each attachment holds (its bytes, type, name)."""
    m = EmailMessage()
    m["From"] = "carol@acme.test"
    m["To"] = "alice@example.com"
    m["Subject"] = "files"
    m.set_content("see attached\n")
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        data = draw(st.binary(max_size=300))
        kind = draw(st.sampled_from(["application/octet-stream", "image/png", "text/plain"]))
        name = draw(_NAMES)
        maintype, subtype = kind.split("/")
        if kind == "text/plain":
            text = draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"],
                                              include_characters="\n\t"), max_size=200))
            data = text.replace("\r", "").replace("\n", "\r\n").encode()
            cte = draw(st.sampled_from(["base64", "quoted-printable"]))
            m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name, cte=cte)
        else:
            m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        parts.append((data, kind, name))
    m.set_boundary("==b==")   # never in base64 or quoted-printable text; not drawn at random
    return bytes(m).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), parts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_attachments_come_back_byte_for_byte(
        case: tuple[bytes, list[tuple[bytes, str, str]]]) -> None:
    raw, parts = case
    listed = parse_message(raw).attachments
    assert len(listed) == len(parts)
    for n, (data, kind, _) in enumerate(parts):
        got = attachment_data(raw, n)
        assert got is not None and got.attachment == listed[n]
        assert got.data == data and got.attachment.content_type == kind
        assert find_attachment(raw, n, listed[n].sha256) == got


_INTERESTING = st.sampled_from(
    [b"\r\n", b"\n", b"--", b"=?utf-8?b?", b"Content-Type: multipart/mixed; boundary=x\r\n",
     b"Content-Transfer-Encoding: base64\r\n", b"Content-Disposition: attachment\r\n",
     b"message/rfc822", b"\r\n--x\r\n", b"\r\n--x--\r\n", b"filename*=utf-8''%FF%0D%0A", b"\x00"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_INTERESTING, st.binary(min_size=1, max_size=30)), max_size=40),
       st.integers(-1, 6))
def test_hostile_bytes_never_raise_and_agree_with_the_list(chunks: list[bytes], n: int) -> None:
    raw = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" + b"".join(chunks)
    listed = parse_message(raw).attachments
    got = attachment_data(raw, n)
    if 0 <= n < len(listed):
        assert got is not None and got.attachment == listed[n]
        assert hashlib.sha256(got.data).hexdigest() == listed[n].sha256
        headers = attachment_headers(got)
        assert all("\r" not in v and "\n" not in v for v in headers.values())
    else:
        assert got is None


def test_the_walk_is_capped_like_parse_message() -> None:
    body = b"".join(b"--x\r\nContent-Type: application/octet-stream\r\n\r\n%d\r\n" % i
                    for i in range(MAX_PARTS + 500))
    raw = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + body + b"--x--\r\n"
    listed = parse_message(raw).attachments
    assert len(listed) == MAX_PARTS - 1            # the multipart itself is the first part
    started = time.perf_counter()
    last = attachment_data(raw, len(listed) - 1)
    assert last is not None and last.data == b"%d" % (MAX_PARTS - 2)
    assert attachment_data(raw, len(listed)) is None
    assert time.perf_counter() - started < 5


def test_a_part_whose_digest_moved_is_found_by_its_digest() -> None:
    raw = (Path(__file__).parent.parent / "data" / "mail" / "attachments_inline_rfc822.eml").read_bytes()
    listed = parse_message(raw).attachments
    # stored by a parser that listed them in another order: the digest decides
    assert find_attachment(raw, 0, listed[2].sha256) == attachment_data(raw, 2)
    assert find_attachment(raw, 0, "0" * 64) is None


def _part(filename: str, ctype: str = "application/pdf", charset: str | None = None) -> AttachmentData:
    return AttachmentData(Attachment(filename=filename, content_type=ctype, size=0, sha256="",
                                     content_id=None, inline=False), b"", charset)


def test_headers_for_plain_and_international_names() -> None:
    h = attachment_headers(_part("offer.pdf"))
    assert h["Content-Type"] == "application/pdf"
    assert h["Content-Disposition"] == 'attachment; filename="offer.pdf"'
    h = attachment_headers(_part("Angebot Müller.pdf"))
    assert h["Content-Disposition"] == (
        "attachment; filename=\"Angebot M_ller.pdf\"; filename*=UTF-8''Angebot%20M%C3%BCller.pdf")
    assert attachment_headers(_part(""))["Content-Disposition"] == 'attachment; filename="attachment"'
    assert attachment_headers(_part("a.txt", "text/plain", "iso-8859-1"))["Content-Type"] == \
        "text/plain; charset=iso-8859-1"
    assert attachment_headers(_part("a.txt", "text/plain", 'x"; evil'))["Content-Type"] == "text/plain"
    assert attachment_headers(_part("a", 'text/html"; x=y'))["Content-Type"] == \
        "application/octet-stream"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(max_size=40), st.one_of(st.none(), st.text(max_size=20)))
def test_headers_never_carry_what_could_split_or_extend_them(name: str, ctype: str,
                                                             charset: str | None) -> None:
    h = attachment_headers(_part(name, ctype, charset))
    for value in h.values():
        assert value.isascii() and value.isprintable(), value
    cd = h["Content-Disposition"]
    m = re.fullmatch(r"attachment; filename=\"([^\"\\;%]*)\"(?:; filename\*=UTF-8''([^;\s\"]+))?", cd)
    assert m is not None, cd
    if m.group(2) is not None:
        assert unquote(m.group(2), errors="strict") == (name or "attachment")
    else:
        assert m.group(1) == (name or "attachment")
    assert re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+(; charset=[^\s;\"]+)?",
                        h["Content-Type"])


def test_transfer_encodings_are_undone() -> None:
    data = bytes(b for b in range(256) if b not in b"\r\n")   # line ends would be made CRLF
    for cte, encoded in (("base64", base64.encodebytes(data)),
                         ("quoted-printable", quopri.encodestring(data))):
        raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: "
               + cte.encode() + b"\r\nContent-Disposition: attachment; filename=b.bin\r\n\r\n"
               + encoded + b"\r\n--x--\r\n")
        got = attachment_data(raw, 0)
        assert got is not None and got.attachment.filename == "b.bin"
        assert got.data == data, cte
