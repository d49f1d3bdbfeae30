"""Turn the bytes and markup found in mail into plain Unicode text, never raising.

Three jobs, shared by the parser and the forward unwrapper:

- `decode_bytes`: bytes in a declared (often wrong or unknown) charset -> str, with a
  fallback chain (declared -> UTF-8 -> Windows-1252 -> Latin-1) that always succeeds;
- `decode_words`: RFC 2047 encoded-words in a header value -> str, lenient about what
  real mailers send (encoded-words inside quotes, glued to text, a character split
  across two words);
- `html_to_text`: HTML -> text with one line per block (`<br>`, `</div>`, `</p>`...),
  script/style/head/comments dropped and entities unescaped, in linear time on any
  input (no regular expression here can backtrack quadratically).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import re

# Charset labels mail really carries, mapped to the Python codec that decodes what the
# sender meant. Supersets are deliberate (WHATWG Encoding Standard does the same):
# "iso-8859-1" mail is in practice Windows-1252, "shift_jis" mail is cp932, "gb2312" is GBK.
_ALIASES: dict[str, str] = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "us-ascii": "ascii",
    "ansi_x3.4-1968": "ascii",
    "ascii": "ascii",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
}
# Labels that say "I do not know": sniff instead.
_UNKNOWN = frozenset({"", "unknown", "unknown-8bit", "x-unknown", "default", "x-user-defined", "8bit"})
# Python codecs that are text encodings in name only or that must never see mail bytes.
_REFUSED = frozenset({"undefined", "unicode_escape", "raw_unicode_escape", "idna", "punycode", "mbcs", "oem"})


def normalize_charset(label: str | None) -> str | None:
    """A Python codec name for a MIME charset label, or None when unknown or unusable."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    name = name.split("*", 1)[0]  # RFC 2231 language suffix: utf-8*en
    if name in _UNKNOWN:
        return None
    name = _ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if info.name.replace("-", "_") in _REFUSED or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def sniff_decode(data: bytes) -> str:
    """Bytes of unknown charset: UTF-8 if valid, else Windows-1252, else Latin-1 (total)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_bytes(data: bytes, charset: str | None, defects: list[str] | None = None) -> str:
    """Decode `data` declared as `charset`; never raises. Problems are appended to `defects`."""
    codec = normalize_charset(charset)
    if codec is None:
        if charset and charset.strip().strip("\"'").lower() not in _UNKNOWN and defects is not None:
            defects.append(f"unknown charset {charset.strip()[:40]!r}")
        return sniff_decode(data)
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, UnicodeError, LookupError, ValueError):
        pass
    if codec == "ascii":
        # 8-bit bytes labelled us-ascii: the usual lie, not worth a defect.
        return sniff_decode(data)
    if defects is not None:
        defects.append(f"invalid {codec} bytes, undecodable characters replaced")
    try:
        return data.decode(codec, "replace")
    except (UnicodeError, LookupError, ValueError):
        return sniff_decode(data)


def header_str(value: bytes) -> str:
    """A raw header value (bytes, RFC 6532 UTF-8 allowed) -> str."""
    if value.isascii():
        return value.decode("ascii")
    return sniff_decode(value)


_EW_RE = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([qQbB])\?([^?\s]*)\?=")
_QP_RE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _ew_bytes(kind: str, payload: str) -> bytes:
    data = payload.encode("ascii", "replace")
    if kind in "bB":
        data = data.rstrip(b"=")
        data += b"=" * (-len(data) % 4)
        try:
            return base64.b64decode(data)
        except (binascii.Error, ValueError):
            try:
                return base64.b64decode(data[: len(data) // 4 * 4] or b"")
            except (binascii.Error, ValueError):
                return b""
    data = data.replace(b"_", b" ")
    return _QP_RE.sub(lambda m: bytes([int(m.group(1), 16)]), data)


def decode_words(value: str, defects: list[str] | None = None) -> str:
    """Decode RFC 2047 encoded-words anywhere in `value`; the rest is left as is.

    Whitespace between two adjacent encoded-words is dropped (RFC 2047 section 6.2);
    consecutive words in the same charset are joined as bytes before decoding, so a
    multi-byte character split across two words survives.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    pending: bytes = b""
    pending_cs: str | None = None

    def flush() -> None:
        nonlocal pending, pending_cs
        if pending or pending_cs is not None:
            out.append(decode_bytes(pending, pending_cs, defects))
        pending, pending_cs = b"", None

    for m in _EW_RE.finditer(value):
        between = value[pos : m.start()]
        if between and (between.strip() or pending_cs is None):
            flush()
            out.append(between)
        charset = m.group(1)
        data = _ew_bytes(m.group(2), m.group(3))
        if pending_cs is not None and pending_cs.lower() != charset.lower():
            flush()
        pending += data
        pending_cs = charset
        pos = m.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


_WS_RE = re.compile(r"\s+")


def collapse_ws(text: str) -> str:
    """All runs of whitespace (NBSP included) -> one space, stripped."""
    return " ".join(text.split())  # str.split() knows Unicode whitespace; 10x faster than a regex


# --- HTML -> text -------------------------------------------------------------------

# `<[^<>]*>`: a tag cannot contain '<', so a scan never runs past the next '<' and the
# whole pass is linear even on "<<<<<..." without any '>'.
_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)?[^<>]*>|<!--|<!\[CDATA\[|<![^<>]*>|<\?[^<>]*>")
_DROP_CONTENT = frozenset({"script", "style", "head", "title", "template", "xml"})
_BLOCK = frozenset(
    {
        "p", "div", "tr", "li", "ul", "ol", "table", "tbody", "thead", "tfoot", "blockquote",
        "h1", "h2", "h3", "h4", "h5", "h6", "hr", "pre", "section", "article", "header",
        "footer", "dl", "dt", "dd", "address", "center", "form", "fieldset", "body", "html",
        "o:p",
    }
)
_CELL = frozenset({"td", "th"})


def html_to_text(markup: str) -> str:
    """Visible text of an HTML document: one line per block, inline tags removed.

    `<br>` always ends a line; block elements end a line unless one just ended (so
    `<div>a<br></div><div>b</div>` is "a\\nb", not "a\\n\\nb"). Text runs are
    whitespace-collapsed as a browser would; entities are unescaped.
    """
    out: list[str] = []
    at_line_start = True
    pos = 0
    n = len(markup)
    lower: str | None = None
    while pos < n:
        m = _TAG_RE.search(markup, pos)
        end_text = m.start() if m else n
        if end_text > pos:
            chunk = _WS_RE.sub(" ", html.unescape(markup[pos:end_text]).replace("\xa0", " "))
            if at_line_start:
                chunk = chunk.lstrip(" ")
            if chunk:
                out.append(chunk)
                at_line_start = False
        if m is None:
            break
        token = m.group(0)
        pos = m.end()
        if token == "<!--":
            close = markup.find("-->", pos)
            pos = n if close < 0 else close + 3
            continue
        if token == "<![CDATA[":
            close = markup.find("]]>", pos)
            pos = n if close < 0 else close + 3
            continue
        name = (m.group(2) or "").lower()
        closing = m.group(1) == "/"
        if not name:
            continue
        if name in _DROP_CONTENT and not closing and not token.endswith("/>"):
            if lower is None:
                lower = markup.lower()
            close = lower.find("</" + name, pos)
            if close < 0:
                pos = n
            else:
                gt = markup.find(">", close)
                pos = n if gt < 0 else gt + 1
            continue
        if name == "br":
            if out and out[-1].endswith(" "):
                out[-1] = out[-1].rstrip(" ")
            out.append("\n")
            at_line_start = True
        elif name in _BLOCK:
            if not at_line_start:
                if out and out[-1].endswith(" "):
                    out[-1] = out[-1].rstrip(" ")
                out.append("\n")
                at_line_start = True
        elif name in _CELL and closing and not at_line_start:
            out.append(" ")
    return "".join(out).strip("\n ")


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR -> LF."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")
