"""The store summary: the fast MIME walk gives the snippet the `email` parse gives."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.pipeline import summary
from gateway.pipeline.summary import snippet_of, summarize

LONG_TEXT = " ".join(f"word{i}\t\r\n" if i % 7 == 0 else f"w{i}" for i in range(600))
STYLE = "<style>" + "p { color: red } " * 200 + "</style>"


def crlf(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def both(data: bytes) -> tuple[str, str]:
    return snippet_of(data), snippet_of(data, fast=False)


def fast_path_used(data: bytes) -> bool:
    try:
        summary._fast_snippet(data)
    except summary._Unsure:
        return False
    return True


def base(**headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "A <a@example.com>"
    m["To"] = "b@example.net"
    m["Subject"] = "hello"
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    return m


def alternative(plain: str, html: str, cte: str | None = None, charset: str = "utf-8") -> bytes:
    m = base()
    m.set_content(plain, charset=charset, cte=cte)
    m.add_alternative(html, subtype="html", charset=charset, cte=cte)
    return crlf(m)


CASES: dict[str, bytes] = {
    "plain": b"From: a@example.com\r\nSubject: x\r\n\r\nHello   there,\r\n\r\nsecond line\r\n",
    "no content-type, crlf only body": b"Subject: x\r\n\r\n\r\n\r\n",
    "alternative 7bit": alternative("Hi Bob,\nthe plan", "<p>Hi <b>Bob</b></p>"),
    "alternative qp": alternative("Gr\u00fc\u00dfe aus K\u00f6ln " * 40, "<p>Gr\u00fc\u00dfe</p>",
                                  "quoted-printable"),
    "alternative base64": alternative("\u65e5\u672c\u8a9e " * 50, "<p>x</p>", "base64"),
    "alternative 8bit latin1": alternative("caf\u00e9 cr\u00e8me " * 30, "<p>caf\u00e9</p>",
                                           "8bit", "iso-8859-1"),
    "long plain": alternative(LONG_TEXT, "<p>x</p>"),
    "html only with style": crlf((lambda m: (m.set_content(
        f"<html><head>{STYLE}</head><body><p>Dear &amp; dear &lt;customer&gt;"
        + "<br>" * 300 + "</p><script>var a = 1;</script> end</body></html>",
        subtype="html"), m)[1])(base())),
    "html with long text": crlf((lambda m: (m.set_content(
        "<div>" + "".join(f"<span>t{i} &amp; more</span> " for i in range(400)) + "</div>",
        subtype="html"), m)[1])(base())),
    "html tag crossing the cut": crlf((lambda m: (m.set_content(
        "x" * 1300 + "<a href='" + "y" * 600 + "'>link</a> " + "z " * 400,
        subtype="html"), m)[1])(base())),
    "html lonely lt": crlf((lambda m: (m.set_content(
        "a < b " * 300 + "and then > c " + "more " * 300, subtype="html"), m)[1])(base())),
    "style crossing the cut": crlf((lambda m: (m.set_content(
        "intro " * 200 + STYLE + "after " * 300, subtype="html"), m)[1])(base())),
    "mixed with attachment first": crlf((lambda m: (
        m.set_content("body text"),
        m.add_attachment(b"attached text", maintype="text", subtype="plain", filename="a.txt"),
        m)[2])(base())),
    "only attachments": crlf((lambda m: (
        m.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="a.pdf"),
        m)[1])(base())),
    "related with inline image": crlf((lambda m: (
        m.set_content("<p>see <img src='cid:x'></p>", subtype="html"),
        m.add_related(b"GIF89a", maintype="image", subtype="gif", cid="<x>"),
        m)[2])(base())),
    "alternative inside mixed": crlf((lambda m: (
        m.set_content("plain part"), m.add_alternative("<p>html part</p>", subtype="html"),
        m.add_attachment(b"data", maintype="application", subtype="octet-stream"),
        m)[3])(base())),
    "html before plain in mixed": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\npreamble\r\n"
        b"--BB\r\nContent-Type: text/html\r\n\r\n<p>first html</p>\r\n"
        b"--BB\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nlater plain\r\n"
        b"--BB--\r\nepilogue\r\n"),
    "unquoted boundary with =": (
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n"
        b"\tboundary=----=_NextPart_000_0001\r\n\r\n"
        b"------=_NextPart_000_0001\r\nContent-Type: text/plain; charset=\"windows-1252\"\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nSmart =93quotes=94 and =\r\n"
        b"soft break\r\n------=_NextPart_000_0001--\r\n"),
    "uppercase type and cte": (
        b"Subject: x\r\nContent-Type: TEXT/PLAIN; CHARSET=UTF-8\r\nContent-Transfer-Encoding: "
        b"BASE64\r\n\r\nSGVsbG8gd29ybGQ=\r\n"),
    "base64 missing padding": (
        b"Subject: x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"SGVsbG8gd29ybGQ\r\n"),
    "bad base64": (
        b"Subject: x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"SGVsb!G8gd29y*bGQ\r\n"),
    "unknown charset": b"Subject: x\r\nContent-Type: text/plain; charset=x-nonsense\r\n\r\nhi\r\n",
    "rfc2231 charset": (b"Subject: x\r\nContent-Type: text/plain; charset*=utf-8''utf-8\r\n\r\n"
                        b"hi \xc3\xa9\r\n"),
    "comment in content-type": (b"Subject: x\r\nContent-Type: text/html (yes); charset=utf-8"
                                b"\r\n\r\n<b>bold</b>\r\n"),
    "spaces around slash": b"Subject: x\r\nContent-Type: text / html\r\n\r\n<b>bold</b>\r\n",
    "text/calendar only": b"Subject: x\r\nContent-Type: text/calendar\r\n\r\nBEGIN:VCALENDAR\r\n",
    "missing close delimiter": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nunterminated\r\n"),
    "no start delimiter": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\njust text\r\n"),
    "no boundary": b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\n--b\r\nhi\r\n--b--\r\n",
    "nested reuses boundary": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
        b"Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\ninner\r\n--b--\r\n--b--\r\n"),
    "related with start": (
        b"Subject: x\r\nContent-Type: multipart/related; boundary=\"r\"; start=\"<two>\"\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\nContent-ID: <one>\r\n\r\nnot me\r\n"
        b"--r\r\nContent-Type: text/html\r\nContent-ID: <two>\r\n\r\n<p>me</p>\r\n--r--\r\n"),
    "digest": (
        b"Subject: x\r\nContent-Type: multipart/digest; boundary=\"d\"\r\n\r\n--d\r\n\r\n"
        b"Subject: inner\r\n\r\ninner body\r\n--d\r\nContent-Type: text/plain\r\n\r\n"
        b"digest text\r\n--d--\r\n"),
    "part without headers": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\r\n"
        b"default text/plain\r\n--b--\r\n"),
    "space before colon": (b"Subject: x\r\nContent-Type : text/html\r\n\r\n<b>x</b>\r\n"),
    "folded quoted boundary": (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=\"a\r\n b\"\r\n\r\n--a b\r\n"
        b"Content-Type: text/plain\r\n\r\nfolded\r\n--a b--\r\n"),
    "bare LF": b"Subject: x\nContent-Type: text/plain\n\nunix lines\n",
    "8-bit header": (b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                     b"caf\xc3\xa9\r\n"),
    "header only": b"Subject: x\r\nFrom: a@example.com\r\n",
    "empty": b"",
    "attachment disposition on top": (
        b"Subject: x\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nfile\r\n"),
    "weird disposition": b"Subject: x\r\nContent-Disposition: ;\r\n\r\nfile\r\n",
    "quoted-printable html entity cut": crlf((lambda m: (m.set_content(
        "<p>" + "caf\u00e9 &eacute; &amp; " * 200 + "</p>", subtype="html",
        cte="quoted-printable"), m)[1])(base())),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_snippet_matches_email_parse(name: str) -> None:
    fast, slow = both(CASES[name])
    assert fast == slow


def test_common_shapes_take_the_fast_path() -> None:
    for name in ("plain", "alternative 7bit", "alternative qp", "alternative base64",
                 "alternative 8bit latin1", "html only with style", "mixed with attachment first",
                 "related with inline image", "alternative inside mixed",
                 "html before plain in mixed", "digest", "part without headers"):
        assert fast_path_used(CASES[name]), name
    for name in ("rfc2231 charset", "comment in content-type", "nested reuses boundary",
                 "related with start", "bare LF", "bad base64", "missing close delimiter",
                 "unquoted boundary with ="):
        assert not fast_path_used(CASES[name]), name


def test_snippet_content() -> None:
    assert snippet_of(CASES["plain"]) == "Hello there, second line"
    assert snippet_of(CASES["alternative 7bit"]) == "Hi Bob, the plan"
    assert snippet_of(CASES["html before plain in mixed"]) == "later plain"
    # the email package reads an unquoted boundary only up to the "=" (a token ends
    # there), finds no such delimiter and no body; the fast path falls back to agree
    assert snippet_of(CASES["unquoted boundary with ="]) == ""
    assert snippet_of(CASES["html only with style"]).startswith("Dear & dear <customer>")
    assert snippet_of(CASES["only attachments"]) == ""
    assert snippet_of(CASES["unknown charset"]) == ""
    long = snippet_of(CASES["long plain"])
    assert len(long) == 200 and "\t" not in long and "  " not in long


def test_summarize_headers() -> None:
    data = (b"From: \"Ann\" <ann@example.com>\r\nTo: b@example.net,\r\n c@example.net\r\n"
            b"Cc: <d@example.org>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
            b"Date: Sun, 22 Nov 2026 10:00:00 +0100\r\nMessage-ID:  <m@x>\r\n\r\nhello\r\n")
    s = summarize(data)
    assert (s.from_addr, s.to_addrs, s.cc_addrs) == ("ann@example.com",
                                                      ["b@example.net", "c@example.net"],
                                                      ["d@example.org"])
    assert (s.subject, s.message_id, s.snippet) == ("caf\u00e9", "<m@x>", "hello")
    assert s.date is not None and s.date.isoformat() == "2026-11-22T10:00:00+01:00"


# -- generated MIME trees -----------------------------------------------------------------

_TEXT = st.text(alphabet=st.sampled_from(list("abc xyz\u00e9\u00fc\u65e5 \t\n<>&;=.-\"'")) ,
                max_size=400)
_CHARSET = st.sampled_from(["utf-8", "iso-8859-1", "us-ascii", "windows-1252"])
_CTE = st.sampled_from([None, "quoted-printable", "base64", "8bit", "7bit"])


@st.composite
def leaf(draw: st.DrawFn) -> EmailMessage:
    kind = draw(st.sampled_from(["plain", "html", "calendar", "attachment", "binary"]))
    m = EmailMessage()
    if kind in ("plain", "html", "calendar"):
        text = draw(_TEXT)
        if kind == "html":
            text = f"<p>{text}</p>" + draw(st.sampled_from(["", STYLE, "<script>x</script>"]))
        charset = draw(_CHARSET)
        try:
            text.encode(charset)
        except UnicodeEncodeError:
            charset = "utf-8"
        cte = draw(_CTE)
        if cte == "7bit" and not text.isascii():
            cte = None
        if cte == "8bit" or cte is None:
            # set_content refuses lines over 998 octets with 8bit/7bit
            text = text.replace("\n", " ")[:900]
        m.set_content(text, subtype=kind, charset=charset, cte=cte)
    elif kind == "attachment":
        m.set_content(draw(_TEXT).encode(), maintype="text", subtype="plain",
                      disposition="attachment", filename="x.txt")
    else:
        m.set_content(b"\x00\x01binary", maintype="application", subtype="octet-stream")
    return m


def tree(depth: int) -> st.SearchStrategy[EmailMessage]:
    if depth == 0:
        return leaf()

    @st.composite
    def multipart(draw: st.DrawFn) -> EmailMessage:
        sub = draw(st.sampled_from(["mixed", "alternative", "related"]))
        parts = draw(st.lists(st.one_of(leaf(), tree(depth - 1)), min_size=1, max_size=3))
        m = EmailMessage()
        m.make_mixed() if sub == "mixed" else (m.make_alternative() if sub == "alternative"
                                                  else m.make_related())
        for p in parts:
            m.attach(p)
        return m

    return st.one_of(leaf(), multipart())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree(2))
def test_generated_messages_agree(msg: EmailMessage) -> None:
    msg["Subject"] = "generated"
    data = crlf(msg)
    assert both(data)[0] == both(data)[1]
