"""Property-based tests of the stages (hypothesis).

Messages are generated from building blocks whose meaning the generator knows on its
own (which links a browser would see and should be tracked, and the URL each means),
wrapped in random MIME structures, charsets and transfer encodings. Properties:

(a) nothing to change -> the output *is* the input (tracking off and no signature;
    or click tracking on with no trackable link and opens off);
(b) in the decoded HTML body, removing the pixel and the honeypot and putting back
    the original ``href`` text of each rewritten link gives the decoded input exactly;
    every other part decodes to exactly what it was;
(c) every line of a changed message is at most 998 octets and there is no bare CR/LF;
(d) every rewritten token verifies, names this copy, and carries the URL the author
    meant, numbered 1..n in document order;
(e) the stdlib parses every output and decodes each text part in its declared charset;
plus: any bytes at all go through without an exception, and the MIME tree gives back
any input byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.pipeline.links import honeypot_markup
from gateway.pipeline.mime import MimeTree
from gateway.pipeline.pixel import pixel_markup
from gateway.pipeline.signature import carries
from gateway.pipeline.stages import CopyContext, StageSettings, transform
from gateway.tracking.tokens import TokenSigner
from tests.support.mime_checks import decoded_texts, long_lines

SIGNER = TokenSigner([b"property-key-0123456789"])
BASE = "https://t.example.test"
COPY = "01JNKZ6W3Q9R8S7T6V5X4Y3Z2A"
UNSUB = "https://news.example.test/unsub?u=1&l=2"
SKIP_GLOB = "*.skip.example.test/*"
MARK = "\x00"              # stands for a rewritten href value in the comparisons
TOKEN = r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"
PIXEL_RE = re.compile(re.escape(pixel_markup(f"{BASE}/o/@")).replace("@", TOKEN))
HONEYPOT_RE = re.compile(re.escape(honeypot_markup(f"{BASE}/c/@")).replace("@", TOKEN))
CLICK_RE = re.compile(re.escape(BASE) + "/c/(" + TOKEN + ")")
GOLDEN = sorted((Path(__file__).resolve().parent.parent / "data" / "stages").glob("*.eml"))

# characters each charset can carry, besides printable ASCII
EXTRA = {
    "us-ascii": "",
    "utf-8": "äöüß€✓日本語—😀",
    "windows-1252": "äöüß€“”\u2013",
    "iso-8859-1": "äöüßéÿ",
    "shift_jis": "日本語のテキスト",
    "iso-2022-jp": "日本語のテキスト",
}
SAFE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "<&")


@dataclass
class Doc:
    """An HTML document as segments: (text, original href value if tracked, meant URL)."""

    charset: str
    framed: bool
    segments: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def html(self) -> str:
        return "".join(s for s, _, _ in self.segments)

    def marked(self) -> str:
        """The document with every tracked href value replaced by MARK."""
        return "".join(MARK if raw is not None else s for s, raw, _ in self.segments)

    @property
    def urls(self) -> list[str]:
        return [u for _, raw, u in self.segments if raw is not None and u is not None]


def _escape_amp(draw: st.DrawFn, url: str) -> str:
    escapes = st.sampled_from(["&amp;", "&#38;", "&#x26;", "&AMP;"])
    return "".join(draw(escapes) if c == "&" else c for c in url)


@st.composite
def trackable_url(draw: st.DrawFn, charset: str) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTPS"]))
    host = draw(st.sampled_from(["shop.example.test", "a.example.test", "Mixed.Example.Test"]))
    path = draw(st.text(alphabet="abcXYZ019-._~/%" + EXTRA[charset][:3], max_size=20))
    query = draw(st.lists(st.tuples(st.text("kq", min_size=1, max_size=3), st.text("v1=?/", max_size=4)),
                          max_size=3))
    url = f"{scheme}://{host}/{path}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query)
    return url


@st.composite
def link(draw: st.DrawFn, charset: str) -> tuple[list[tuple[str, str | None, str | None]], bool]:
    """Segments of one <a>/<area> (the href value its own segment) and whether it is tracked."""
    kind = draw(st.sampled_from(["track", "track", "track", "mailto", "tel", "anchor", "js", "relative",
                                 "ftp", "skip", "unsub", "tracked", "empty"]))
    fixed = {
        "mailto": "mailto:bob@example.test?subject=a&b",
        "tel": "tel:+49301234",
        "anchor": "#section-2",
        "js": "javascript:void(0)",
        "relative": "/path/x?y=1",
        "ftp": "ftp://files.example.test/f",
        "skip": "https://www.skip.example.test/terms?a=1",
        "unsub": UNSUB,
        "tracked": f"{BASE}/c/already_tracked",     # under base_url: left alone
        "empty": "",
    }
    url = fixed[kind] if kind in fixed else draw(trackable_url(charset))
    raw = _escape_amp(draw, url)
    notrack = kind == "track" and draw(st.booleans()) and draw(st.booleans())
    quote = draw(st.sampled_from(['"', "'", ""])) if raw else '"'
    if quote and raw and draw(st.booleans()):
        raw = " " + raw + "\t"                  # browsers strip this; so does the rewriter
    tag = draw(st.sampled_from(["a", "A", "area"]))
    before = draw(st.sampled_from(["", ' class="btn"', " target=_blank", " title='a>b'"]))
    after = draw(st.sampled_from(["", ' style="color:red"', " rel=noopener"]))
    if notrack:
        after += draw(st.sampled_from([" data-notrack", ' data-notrack="1"', " DATA-NOTRACK"]))
    href_name = draw(st.sampled_from(["href", "HREF", "Href"]))
    open_tag = f"<{tag}{before} {href_name}={quote}"
    label = draw(st.text(SAFE_ASCII, max_size=8))
    close = f"{quote}{after}>" + ("" if tag == "area" else f"link {label}</{tag}>")
    tracked = kind == "track" and not notrack
    segs: list[tuple[str, str | None, str | None]] = [
        (open_tag, None, None),
        (raw, raw if tracked else None, url if tracked else None),
        (close, None, None)]
    if draw(st.integers(0, 5)) == 0:            # inside an Outlook conditional comment
        segs = [("<!--[if mso]>", None, None), *segs, ("<![endif]-->", None, None)]
    return segs, tracked


HIDDEN = [  # markup whose links no mail client sees as links
    '<!-- <a href="https://comment.example.test/">c</a> </body> -->',
    "<script>document.write('<a href=\"https://script.example.test/\">s</a></body>')</script>",
    '<style>/* <a href="https://style.example.test/"> */ p { color: red }</style>',
    '<link rel="stylesheet" href="https://css.example.test/x.css">',
    '<img src="https://img.example.test/i.png" alt="<a href=x>">',
    "<textarea><a href=\"https://ta.example.test/\"></textarea>",
    '<![CDATA[ <a href="https://cdata.example.test/"> ]]>',
    '<!--[if !mso]><!--><span>for the others</span><!--<![endif]-->',
]


@st.composite
def documents(draw: st.DrawFn, charset: str | None = None) -> Doc:
    cs = charset or draw(st.sampled_from(sorted(EXTRA)))
    doc = Doc(cs, draw(st.booleans()))
    if doc.framed:
        head = draw(st.sampled_from(["<!DOCTYPE html>\r\n<html><head><title>T &amp; C</title></head>",
                                     "<html>", ""]))
        doc.segments.append((head + draw(st.sampled_from(["<body>", '<BODY class="m">'])), None, None))
    alphabet = SAFE_ASCII + EXTRA[cs]
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 6))
        if choice <= 1:
            doc.segments.append((draw(st.text(alphabet, max_size=60)), None, None))
        elif choice == 2:
            small = st.sampled_from(["\r\n", " < ", " &amp; ", " & ", "<p>", "</p>", "<br>"])
            doc.segments.append((draw(small), None, None))
        elif choice == 3:
            doc.segments.append((draw(st.sampled_from(HIDDEN)), None, None))
        else:
            segs, _ = draw(link(cs))
            doc.segments.extend(segs)
    if doc.framed:
        doc.segments.append((draw(st.sampled_from(["</body></html>", "</BODY>\r\n</html>\r\n", "</body>"])),
                             None, None))
    elif draw(st.booleans()):
        doc.segments.append(("\r\n", None, None))
    return doc


def _encode(text: str, charset: str, cte: str | None) -> tuple[str, bytes]:
    data = text.encode(charset)
    if cte == "base64":
        enc = base64.b64encode(data)
        body = b"\r\n".join(enc[i:i + 76] for i in range(0, len(enc), 76))
    elif cte == "quoted-printable":
        body = b"\r\n".join(binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=\r\n")
                            for line in data.split(b"\r\n"))
    else:
        body = data
    field = f"Content-Transfer-Encoding: {cte}\r\n" if cte else ""
    return field, body


@st.composite
def messages(draw: st.DrawFn, doc_strategy: st.SearchStrategy[Doc] | None = None) -> tuple[bytes, Doc]:
    doc = draw(doc_strategy or documents())
    cs = doc.charset
    ascii_only = cs in ("us-ascii", "iso-2022-jp")
    cte = draw(st.sampled_from(["7bit", None, "quoted-printable", "base64"] if ascii_only
                               else ["8bit", "quoted-printable", "base64"]))
    label = draw(st.sampled_from([cs, cs.upper(), f'"{cs}"']))
    field, body = _encode(doc.html(), cs, cte)
    html_part = f"Content-Type: text/html; charset={label}\r\n{field}\r\n".encode() + body
    plain = b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello https://shop.example.test/plain\r\n"
    structure = draw(st.sampled_from(["single", "alternative", "mixed", "related"]))
    attached_html = (b'<html><body><a href="https://att.example.test/?a=1&amp;b=2">a</a></body></html>')
    if structure == "single":
        body_bytes = html_part
    elif structure == "alternative":
        body_bytes = (b"Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\n" + plain
                      + b"\r\n--alt\r\n" + html_part + b"\r\n--alt--\r\n")
    elif structure == "related":
        body_bytes = (b"Content-Type: multipart/related; boundary=rel\r\n\r\n--rel\r\n" + html_part
                      + b"\r\n--rel\r\nContent-Type: image/png\r\nContent-ID: <i@x>\r\n"
                        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--rel--\r\n")
    else:
        body_bytes = (b"Content-Type: multipart/mixed; boundary=\"mix\"\r\n\r\n--mix\r\n"
                      b"Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\n" + plain
                      + b"\r\n--alt\r\n" + html_part + b"\r\n--alt--\r\n\r\n--mix\r\n"
                        b"Content-Type: text/html; charset=utf-8\r\nContent-Disposition: attachment; "
                        b"filename=a.html\r\n\r\n" + attached_html + b"\r\n--mix\r\n"
                        b"Content-Type: message/rfc822\r\n\r\n"
                        b"Subject: inner\r\nContent-Type: text/html\r\n\r\n"
                      + attached_html + b"\r\n--mix--\r\n")
    header = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
              b"List-Unsubscribe: <mailto:u@example.test>, <" + UNSUB.encode() + b">\r\n")
    return header + body_bytes, doc


def context(opens: bool = True, clicks: bool = True, **kw: Any) -> CopyContext:
    s = StageSettings(track_opens=opens, track_clicks=clicks, skip_links=(SKIP_GLOB,), **kw)
    return CopyContext("b@example.test", COPY, s, BASE, SIGNER)


def first_html(data: bytes) -> tuple[int, str]:
    texts = decoded_texts(data)
    idx = next(i for i, (ct, _) in enumerate(texts) if ct == "text/html")
    return idx, texts[idx][1]


#: MAILGW_HYPOTHESIS_EXAMPLES=5000 for a deeper search than the suite's default.
EXAMPLES = int(os.environ.get("MAILGW_HYPOTHESIS_EXAMPLES", "150"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(messages(), st.booleans())
def test_a_nothing_to_change_gives_the_input_object(msg: tuple[bytes, Doc], clicks: bool) -> None:
    raw, doc = msg
    assert transform(raw, context(opens=False, clicks=False)).data is raw
    if clicks and not doc.urls:
        out = transform(raw, context(opens=False, clicks=True))
        assert out.data is raw and not out.changed


@PROPS
@given(messages(), st.booleans(), st.booleans())
def test_b_c_d_e_only_hrefs_and_pixel_change(msg: tuple[bytes, Doc], opens: bool, clicks: bool) -> None:
    raw, doc = msg
    out = transform(raw, context(opens=opens, clicks=clicks))
    changed = (opens or (clicks and bool(doc.urls)))
    assert (out.data is not raw) == changed
    # (e) parses, every text part decodes in its declared charset
    before, after = decoded_texts(raw), decoded_texts(out.data)
    idx, html_out = first_html(out.data)
    assert [t for i, t in enumerate(after) if i != idx] == [t for i, t in enumerate(before) if i != idx]
    assert before[idx][1] == doc.html()
    # (c)
    if changed:
        assert long_lines(out.data) == []
        assert b"\n" not in out.data.replace(b"\r\n", b"") and b"\r" not in out.data.replace(b"\r\n", b"")
    # (d) tokens in document order
    honeypots = HONEYPOT_RE.findall(html_out)
    without_hp = HONEYPOT_RE.sub("", html_out)
    tokens = CLICK_RE.findall(without_hp)
    expected_urls = doc.urls if clicks else []
    assert len(tokens) == len(expected_urls)
    for n, (tok, url) in enumerate(zip(tokens, expected_urls, strict=True), start=1):
        data = SIGNER.verify(tok)
        assert data is not None and (data.kind, data.copy_id, data.link, data.url) == ("click", COPY, n, url)
    assert out.report.links == dict(enumerate(expected_urls, start=1))
    assert len(honeypots) == (1 if expected_urls else 0)
    # (b) take out pixel and honeypot, mark the rewritten hrefs: the rest is the input
    pixels = PIXEL_RE.findall(without_hp)
    assert len(pixels) == (1 if opens else 0)
    marked_out = CLICK_RE.sub(MARK, PIXEL_RE.sub("", without_hp)) if clicks else PIXEL_RE.sub("", without_hp)
    marked_in = doc.marked() if clicks else doc.html()
    assert marked_out == marked_in
    # where the pixel and the honeypot went
    if opens:
        at = without_hp.index(pixels[0])
        rest = without_hp[at + len(pixels[0]):]
        if doc.framed:
            assert rest.lower().startswith("</body>")
        else:
            assert rest.strip("\t\n\f\r ") == ""
    if honeypots:
        at = html_out.index(honeypots[0])
        if doc.framed:
            assert re.search(r"<body( class=\"m\")?>$", html_out[:at], re.I)
        else:
            assert re.match(r"<(a|A|area)[ >]", html_out[at + len(honeypots[0]):])


@PROPS
@given(messages(), st.text(SAFE_ASCII + "äö€✓\n", max_size=80), st.text(SAFE_ASCII + "\n", max_size=40))
def test_signature_is_added_once_and_keeps_the_rest(msg: tuple[bytes, Doc], sig: str, disc: str) -> None:
    raw, doc = msg
    sig, disc = "Sig: " + sig, "Legal: " + disc     # neither carries the other
    ctx = context(opens=False, clicks=False, signature_text=sig, disclaimer_text=disc)
    once = transform(raw, ctx)
    twice = transform(once.data, ctx)
    assert twice.data is once.data          # a copy that carries them gets nothing more
    _, html_out = first_html(once.data)
    expected = doc.html()
    for block in (ctx.settings.signature, ctx.settings.disclaimer):
        if block.empty or carries(expected, True, block):
            continue
        div = f"<div {block.marker}>" + "\r\n".join(block.html_variant().split("\n")) + "</div>"
        div = div.encode(doc.charset, "xmlcharrefreplace").decode(doc.charset)  # e.g. ä in ISO-2022-JP
        assert html_out.count(div) == 1
        html_out = html_out.replace(div, "")
    assert html_out == expected             # nothing else in the HTML changed
    if once.changed:
        assert long_lines(once.data) == []


@settings(max_examples=2 * EXAMPLES, deadline=None)
@given(st.sampled_from(GOLDEN), st.data())
def test_mangled_messages_never_raise(path: Path, data: st.DataObject) -> None:
    raw = path.read_bytes()
    ops = data.draw(st.lists(st.tuples(st.integers(0, len(raw)), st.integers(0, 64),
                                       st.binary(max_size=16) | st.sampled_from(
                                           [b"\r\n", b"--", b"\r\n--=_alt_1\r\n", b"=", b"<", b"</body>",
                                            b"Content-Type: text/html; charset=utf-8\r\n\r\n"])),
                             max_size=4))
    for pos, cut, ins in ops:
        raw = raw[:pos] + ins + raw[pos + cut:]
    tree = MimeTree(raw)
    assert tree.serialize() is raw
    out = transform(raw, context(signature_text="Sig", disclaimer_html="<p>D</p>"))
    assert isinstance(out.data, bytes)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(raw: bytes) -> None:
    assert MimeTree(raw).serialize() is raw
    transform(raw, context(signature_text="Sig"))
    transform(b"Content-Type: text/html\r\n\r\n" + raw, context())


@settings(max_examples=EXAMPLES, deadline=None)
@given(messages())
def test_re_encoding_the_same_text_changes_no_decoded_content(msg: tuple[bytes, Doc]) -> None:
    raw, _ = msg
    tree = MimeTree(raw)
    for part in tree.body_parts():
        part.replace_text(part.decoded())
    out = tree.serialize()
    assert decoded_texts(out) == decoded_texts(raw)
    assert long_lines(out) == []
