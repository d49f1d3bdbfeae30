"""The byte-preserving MIME tree: structure, body-part selection, re-encoding rules."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline import mime
from gateway.pipeline.mime import MimeError, MimeTree


def crlf(s: str) -> bytes:
    return s.replace("\n", "\r\n").encode("utf-8")


def stdlib_text(data: bytes, ctype: str, index: int = 0) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    parts = [p for p in msg.walk() if p.get_content_type() == ctype]
    payload = parts[index].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(parts[index].get_content_charset() or "us-ascii")


NESTED = crlf("""From: a@x.test
Content-Type: multipart/mixed; boundary="M"

preamble
--M \t
Content-Type: multipart/related; boundary="R"; start="<root@x>"

--R
Content-Type: image/png
Content-ID: <img@x>

PNG
--R
Content-Type: multipart/alternative; boundary=A
Content-ID: <root@x>

--A
Content-Type: text/plain

plain
--A
Content-Type: text/html; charset=utf-8

<p>html</p>
--A--
--R--
--M
Content-Type: text/plain; charset=utf-8

inline footer
--M
Content-Type: text/plain; name=notes.txt

named, so an attachment
--M
Content-Type: text/html
Content-Disposition: attachment

<p>attached</p>
--M
Content-Type: message/rfc822

Content-Type: text/html

<p>inner</p>
--M--
epilogue
""")


def test_structure_and_body_parts() -> None:
    tree = MimeTree(NESTED)
    paths = [(e.path, e.content_type) for e in tree.walk()]
    assert paths == [("", "multipart/mixed"), ("1", "multipart/related"), ("1.1", "image/png"),
                     ("1.2", "multipart/alternative"), ("1.2.1", "text/plain"), ("1.2.2", "text/html"),
                     ("2", "text/plain"), ("3", "text/plain"), ("4", "text/html"), ("5", "message/rfc822")]
    body = [(e.path, e.decoded()) for e in tree.body_parts()]
    assert body == [("1.2.1", "plain"), ("1.2.2", "<p>html</p>"), ("2", "inline footer")]
    assert tree.serialize() is NESTED


def test_only_the_replaced_part_changes() -> None:
    tree = MimeTree(NESTED)
    html = tree.body_parts()[1]
    html.replace_text("<p>new</p>")
    out = tree.serialize()
    assert out == NESTED.replace(b"<p>html</p>", b"<p>new</p>")
    assert tree.notes == []


def test_related_without_start_uses_first_part_and_digest_and_signed_are_left() -> None:
    raw = crlf("Content-Type: multipart/related; boundary=R\n\n--R\nContent-Type: text/html\n\n<p>root</p>\n"
               "--R\nContent-Type: text/html\n\n<p>other</p>\n--R--\n")
    assert [e.decoded() for e in MimeTree(raw).body_parts()] == ["<p>root</p>"]
    signed = crlf("Content-Type: multipart/signed; boundary=S\n\n--S\nContent-Type: text/html\n\n<p>s</p>\n"
                  "--S\nContent-Type: application/pgp-signature\n\nsig\n--S--\n")
    assert MimeTree(signed).body_parts() == []
    digest = crlf("Content-Type: multipart/digest; boundary=D\n\n--D\n\n"
                  "Content-Type: text/html\n\n<p>d</p>\n--D--\n")
    tree = MimeTree(digest)
    assert tree.root.children[0].content_type == "message/rfc822" and tree.body_parts() == []


def test_malformed_structures_are_kept_whole() -> None:
    for raw in [crlf("Content-Type: multipart/mixed\n\nno boundary\n"),
                crlf("Content-Type: multipart/mixed; boundary=X\n\nno delimiter at all\n"),
                crlf("Content-Type: text\n\n<p>bad type</p>\n")]:
        tree = MimeTree(raw)
        assert tree.serialize() is raw
        assert tree.body_parts() == []
    for raw in [b"", b"\r\n", b"no header separator", crlf("Subject: x\n")]:
        tree = MimeTree(raw)           # default text/plain, nothing to do for HTML stages
        assert tree.serialize() is raw
        assert [p.content_type for p in tree.body_parts()] == ["text/plain"]


def test_missing_close_delimiter_runs_to_the_end() -> None:
    raw = crlf("Content-Type: multipart/alternative; boundary=B\n\n"
               "--B\nContent-Type: text/html\n\n<p>x</p>\n")
    tree = MimeTree(raw)
    (html,) = tree.body_parts()
    assert html.decoded() == "<p>x</p>\r\n"
    html.replace_text("<p>y</p>\r\n")
    assert tree.serialize() == raw.replace(b"<p>x</p>", b"<p>y</p>")


def test_base64_keeps_charset_and_encoding() -> None:
    import base64
    text = "<p>Grüße €</p>".encode("iso-8859-15")
    raw = crlf("Content-Type: text/html; charset=ISO-8859-15\nContent-Transfer-Encoding: base64\n\n") \
        + base64.b64encode(text) + b"\r\n"
    tree = MimeTree(raw)
    (part,) = tree.body_parts()
    assert part.decoded() == "<p>Grüße €</p>"
    part.replace_text("<p>Grüße € " + "x" * 200 + "</p>")
    out = tree.serialize()
    assert b"charset=ISO-8859-15\r\nContent-Transfer-Encoding: base64\r\n" in out
    assert stdlib_text(out, "text/html") == "<p>Grüße € " + "x" * 200 + "</p>"
    assert all(len(line) <= 76 for line in out.split(b"\r\n")) and out.endswith(b"\r\n")


def test_quoted_printable_round_trip_is_exact() -> None:
    text = "trailing space \r\n=equals\r\n.\r\nFrom x\r\n" + "é" * 100 + "\r\nno final newline"
    raw = crlf("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\nx")
    tree = MimeTree(raw)
    (part,) = tree.body_parts()
    part.replace_text(text)
    out = tree.serialize()
    assert stdlib_text(out, "text/plain") == text
    assert max(len(line) for line in out.split(b"\r\n")) <= 76
    assert b"\n" not in out.replace(b"\r\n", b"")


@pytest.mark.parametrize(("cte", "new", "switch"), [
    ("7bit", "ascii only", False),
    ("7bit", "ümlaut", True),                      # 7bit cannot gain 8-bit bytes
    ("8bit", "ümlaut", False),
    ("8bit", "x" * 999, True),                     # a line over 998 octets
    ("binary", "x" * 999, True),
    (None, "ümlaut", True),                        # no CTE field means 7bit
    ("8bit", "bare\nLF", True),                    # never a bare LF in the output
])
def test_identity_encodings_switch_to_qp_only_when_needed(cte: str | None, new: str, switch: bool) -> None:
    field = f"Content-Transfer-Encoding: {cte}\n" if cte else ""
    raw = crlf(f"Subject: s\nContent-Type: text/plain; charset=utf-8\n{field}\nold\n")
    tree = MimeTree(raw)
    (part,) = tree.body_parts()
    part.replace_text(new)
    out = tree.serialize()
    assert stdlib_text(out, "text/plain") == new
    if switch:
        assert out.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 1
        assert b"Content-Transfer-Encoding: " + (cte or "").encode() + b"\r\n" not in out or not cte
        assert "quoted-printable" in tree.notes[0]
    else:
        assert out == raw.replace(b"old\r\n", new.encode())
        assert tree.notes == []
    assert out.startswith(b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n")


def test_folded_cte_field_is_replaced_whole() -> None:
    raw = crlf("Content-Type: text/plain\nContent-Transfer-Encoding:\n 7bit\nX-After: 1\n\nold\n")
    tree = MimeTree(raw)
    tree.body_parts()[0].replace_text("ü")
    out = tree.serialize()
    assert out.startswith(crlf("Content-Type: text/plain; charset=utf-8\n"
                               "Content-Transfer-Encoding: quoted-printable\nX-After: 1\n\n"))


def test_unrepresentable_text() -> None:
    html = crlf("Content-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n<p>x</p>")
    tree = MimeTree(html)
    tree.body_parts()[0].replace_text("<p>€ ✓</p>")
    out = tree.serialize()
    assert out.endswith(b"<p>&#8364; &#10003;</p>") and b"charset=iso-8859-1" in out
    plain = crlf('Content-Type: text/plain; charset="iso-8859-1"; format=flowed\n'
                 "Content-Transfer-Encoding: 8bit\n\n") + b"d\xe9j\xe0"
    tree = MimeTree(plain)
    (part,) = tree.body_parts()
    assert part.decoded() == "déjà"
    part.replace_text("déjà ✓")
    out = tree.serialize()
    assert b'Content-Type: text/plain; charset=utf-8; format=flowed\r\n' in out
    assert stdlib_text(out, "text/plain") == "déjà ✓"
    assert any("utf-8" in n for n in tree.notes)


@pytest.mark.parametrize("header", [
    "Content-Type: text/html; charset=x-unknown\n",
    "Content-Type: text/html; charset=utf-16\n",
    "Content-Type: text/html; charset=utf-7\n",
    "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: x-uuencode\n",
])
def test_undecodable_parts_raise_mime_error(header: str) -> None:
    tree = MimeTree(crlf(header + "\n<p>x</p>\n"))
    with pytest.raises(MimeError):
        tree.body_parts()[0].decoded()


def test_invalid_bytes_in_declared_charset_and_unlabelled_utf8() -> None:
    bad = crlf("Content-Type: text/html; charset=utf-8\n\n") + b"<p>\xff</p>"
    with pytest.raises(MimeError):
        MimeTree(bad).body_parts()[0].decoded()
    unlabelled = crlf("Content-Type: text/html\nContent-Transfer-Encoding: 8bit\n\n<p>ü</p>")
    tree = MimeTree(unlabelled)
    part = tree.body_parts()[0]
    part.replace_text(part.decoded() + "<p>x</p>")
    assert tree.serialize() == unlabelled + b"<p>x</p>"     # same bytes, no charset added


def test_lf_only_message_stays_lf() -> None:
    raw = (b"Content-Type: multipart/alternative; boundary=B\n\n"
           b"--B\nContent-Type: text/html\n\n<p>x</p>\n--B--\n")
    tree = MimeTree(raw)
    assert tree.nl == b"\n"
    tree.body_parts()[0].replace_text("<p>y</p>\n<p>" + "z" * 1000 + "</p>")
    out = tree.serialize()
    assert b"\r" not in out and b"quoted-printable" in out


def test_deep_nesting_is_left_whole() -> None:
    raw = b""
    for depth in range(40):
        head = crlf(f"Content-Type: multipart/mixed; boundary=b{depth}\n\n--b{depth}\n")
        raw = head + raw + crlf(f"\n--b{depth}--\n")
    raw = crlf("Subject: deep\n") + raw[raw.index(b"Content-Type"):]
    tree = MimeTree(raw)
    assert tree.serialize() is raw
    assert tree.body_parts() == []


def test_serialize_twice_is_stable_and_headers_without_line_end() -> None:
    raw = crlf("Content-Type: text/plain; charset=us-ascii\n\nx")
    tree = MimeTree(raw)
    tree.body_parts()[0].replace_text("ü")
    first = tree.serialize()
    assert tree.serialize() == first and len(tree.notes) == 2
    cut = MimeTree(b"Subject: no line end")
    cut.body_parts()[0].replace_text("sig")
    assert cut.serialize() == b"Subject: no line end\r\n\r\nsig"


@given(st.lists(st.sampled_from([b"a" * 500, b"b" * 999, b"c", b"\r\n", b"\n", b"\r", b"\x0b", b"\x0c",
                                 b"\x85", b"\x1c"]), max_size=8).map(b"".join))
def test_long_line_splits_at_crlf_lf_and_cr_only(data: bytes) -> None:
    lines = re.split(rb"\r\n|\n|\r", data)
    assert mime._long_line(data) == any(len(line) > mime.MAX_LINE for line in lines)


@pytest.mark.parametrize("header", [
    b"Content-Type: text/plain; charset=\"ISO-8859-1\"; name=a.txt\r\n"
    b"Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9.txt\r\n",
    b"Content-Type: multipart/mixed; boundary=\"=_b\"; CHARSET=utf-8\r\n",
    b"Content-Type: text/html; charset*0=us-; charset*1=ascii; name=\"x y.html\"\r\n",
    b"Content-Type: text/plain\r\nContent-Disposition: inline\r\n",
    b"Subject: no content type\r\n",
])
def test_parsed_parameters_kept_per_field_read_as_the_stdlib_reads_them(header: bytes) -> None:
    """The entity's header keeps each field's parsed parameters; every read still gives
    what a fresh `email` parse gives, and a caller changing a returned list changes nothing."""
    raw = header + b"\r\nbody\r\n"
    entity = MimeTree(raw).root
    fresh = email.message_from_bytes(raw, policy=email.policy.compat32)
    for _ in range(2):
        for name in ("charset", "boundary", "name", "filename", "nothere"):
            for field in ("content-type", "content-disposition", "x-missing"):
                assert entity._msg.get_param(name, header=field) == fresh.get_param(name, header=field)
        assert entity._msg.get_filename() == fresh.get_filename()
        assert entity._msg.get_content_charset() == fresh.get_content_charset()
        assert entity._msg.get_boundary() == fresh.get_boundary()
        got = entity._msg.get_params(unquote=False)
        assert got == fresh.get_params(unquote=False)
        if got:
            got.clear()
