"""Pull what the CRM store shows (addresses, subject, date, snippet) out of raw message bytes.

The snippet is the start of the message's display body: the first text/plain part (else
text/html, tags stripped) found the way `EmailMessage.get_body(("plain", "html"))` finds
it, decoded per its Content-Transfer-Encoding and charset, whitespace collapsed.

A full `email` parse costs milliseconds per message (it builds a header object for every
field of every part), and this runs once per accepted message. So `snippet_of` first
walks the MIME structure over the bytes itself (`_fast_snippet`), which covers the
shapes mail clients send: CRLF lines, plain `Content-Type` parameters, 7bit, 8bit,
quoted-printable and base64. Whatever it is not sure about (RFC 2231 parameters,
comments, nested parts reusing an outer boundary, stray or missing delimiters, bad
base64, uuencode, `multipart/related` with `start`, ...) falls back to the `email`
parse, so the result is the same either way; `tests/unit/test_summary.py` checks
that the two agree.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.header
import email.policy
import html
import itertools
import quopri
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import getaddresses

from gateway.pipeline.headers import parse_date, split_message

_TAG_RE = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.S | re.I)
_BLOCK_OPEN_RE = re.compile(r"<(script|style)\b", re.I)
SNIPPET_MAX_PARSE = 1024 * 1024
_MAX_DEPTH = 8

_TOKEN = rb"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
_CTYPE_RE = re.compile(rb"(" + _TOKEN + rb")/(" + _TOKEN + rb")[ \t]*")
_PARAM_RE = re.compile(rb";[ \t]*(?:(" + _TOKEN + rb")[ \t]*=[ \t]*(?:\"([^\"\\\r\n]*)\"|"
                       rb"(" + _TOKEN + rb"))[ \t]*)?")
_FIELD_LINE_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")  # as gateway.pipeline.headers reads fields
_MIME_LINE_RE = re.compile(rb"([!-9;-~]+):")  # as the email parser reads a part's fields
_MIME_FIELDS = frozenset((b"content-type", b"content-transfer-encoding", b"content-disposition"))


class _Unsure(Exception):
    """The fast path met something it does not model exactly; use the `email` parse."""


@dataclass
class Summary:
    message_id: str
    from_addr: str
    to_addrs: list[str]
    cc_addrs: list[str]
    subject: str
    date: datetime | None
    snippet: str


def _decode_subject(raw: str | None) -> str:
    if not raw:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeDecodeError):
        return raw


# -- header block -----------------------------------------------------------------------


def header_fields(header: bytes) -> dict[bytes, list[bytes]]:
    """Lower-case field name -> the raw values (after the colon, still folded), in order.

    Lines that are not fields are skipped, as `gateway.pipeline.headers.get_header` does.
    """
    out: dict[bytes, list[bytes]] = {}
    last: list[bytes] | None = None
    for line in header.splitlines():
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if last is not None:
                last[-1] += b"\r\n" + line
            continue
        m = _FIELD_LINE_RE.match(line)
        if m is None:
            last = None
            continue
        last = out.setdefault(m.group(1).lower(), [])
        last.append(line[m.end():])
    return out


def _value(raw: bytes) -> str:
    """A field value as `get_header` returns it: unfolded, stripped, UTF-8 decoded leniently."""
    return re.sub(rb"\r?\n[ \t]", b" ", raw).strip().decode("utf-8", "replace")


# -- the fast MIME walk -----------------------------------------------------------------


def _strict_fields(header: bytes) -> dict[bytes, bytes]:
    """Lower-case name -> unfolded value of the MIME fields of a part's header block.

    Raises _Unsure on anything the `email` parser might read differently."""
    out: dict[bytes, bytes] = {}
    name: bytes | None = None
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if name is None:
                raise _Unsure("continuation line first")
            if name in _MIME_FIELDS:
                if out[name].count(b'"') % 2:
                    raise _Unsure("quoted string folded")
                out[name] += b" " + line.strip()
            continue
        m = _MIME_LINE_RE.match(line)
        if m is None:
            raise _Unsure("not a header line")
        name = m.group(1).lower()
        if name in _MIME_FIELDS:
            if name in out:
                raise _Unsure("repeated MIME field")
            out[name] = line[m.end():].strip()
    for value in out.values():
        if not value.isascii() or b"(" in value or b"\\" in value:
            raise _Unsure("comment, escape or 8-bit in a MIME field")
    return out


def _content_type(value: bytes | None, default: tuple[bytes, bytes]
                  ) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    if value is None:
        return default[0], default[1], {}
    m = _CTYPE_RE.match(value)
    if m is None:
        raise _Unsure("unusual Content-Type")
    params: dict[bytes, bytes] = {}
    pos = m.end()
    while pos < len(value):
        p = _PARAM_RE.match(value, pos)
        if p is None or p.end() == pos:
            raise _Unsure("unusual Content-Type parameters")
        if p.group(1) is not None:
            key = p.group(1).lower()
            if b"*" in key or key in params:
                raise _Unsure("RFC 2231 or repeated parameter")
            params[key] = p.group(2) if p.group(2) is not None else p.group(3)
        pos = p.end()
    return m.group(1).lower(), m.group(2).lower(), params


@dataclass
class _Part:
    subtype: bytes
    charset: bytes | None
    cte: bytes
    payload: bytes


def _find_text(body_fields: dict[bytes, bytes], body: bytes, default: tuple[bytes, bytes],
               boundaries: tuple[bytes, ...], depth: int) -> list[tuple[int, _Part]]:
    """Candidates (priority, part) in depth-first order, like `EmailMessage._find_body`."""
    if depth > _MAX_DEPTH:
        raise _Unsure("too deep")
    disp = body_fields.get(b"content-disposition")
    if disp is not None:
        token = disp.split(b";", 1)[0].strip().lower()
        if not re.fullmatch(_TOKEN, token):
            raise _Unsure("unusual Content-Disposition")
        if token == b"attachment":
            return []
    maintype, subtype, params = _content_type(body_fields.get(b"content-type"), default)
    cte = body_fields.get(b"content-transfer-encoding", b"").lower()
    if maintype == b"text":
        if subtype == b"plain":
            return [(0, _Part(subtype, params.get(b"charset"), cte, body))]
        if subtype == b"html":
            return [(1, _Part(subtype, params.get(b"charset"), cte, body))]
        return []
    if maintype != b"multipart":
        return []
    boundary = params.get(b"boundary", b"").rstrip()
    if not boundary or cte not in (b"", b"7bit", b"8bit", b"binary"):
        raise _Unsure("multipart without boundary or with an encoding")
    parts = _split_multipart(body, boundary, boundaries)
    child_default = (b"message", b"rfc822") if subtype == b"digest" else (b"text", b"plain")
    if subtype == b"related":
        if b"start" in params:
            raise _Unsure("multipart/related with start")
        parts = parts[:1]
    out: list[tuple[int, _Part]] = []
    for raw in parts:
        header, sep, part_body = raw.partition(b"\r\n\r\n")
        if raw.startswith(b"\r\n"):
            header, part_body = b"", raw[2:]
        elif not sep:
            raise _Unsure("part without header/body separator")
        fields = _strict_fields(header + b"\r\n") if header else {}
        found = _find_text(fields, part_body, child_default, (*boundaries, boundary), depth + 1)
        out.extend(found)
        if any(prio == 0 for prio, _ in found):
            break
    return out


def _delimiters(body: bytes, boundary: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, closing) of each delimiter line `--boundary[--][ \t]*` (end: past its
    CRLF, or the end of the body)."""
    dash = b"--" + boundary
    out: list[tuple[int, int, bool]] = []
    if body.startswith(dash):
        pos = 0
    else:
        pos = body.find(b"\r\n" + dash)
        pos = pos + 2 if pos >= 0 else -1
    while pos >= 0:
        i = pos + len(dash)
        closing = body.startswith(b"--", i)
        if closing:
            i += 2
        eol = body.find(b"\r\n", i)
        rest = body[i:] if eol < 0 else body[i:eol]
        if not rest.strip(b" \t"):
            out.append((pos, len(body) if eol < 0 else eol + 2, closing))
        nxt = body.find(b"\r\n" + dash, i)
        pos = nxt + 2 if nxt >= 0 else -1
    return out


def _split_multipart(body: bytes, boundary: bytes, outer: tuple[bytes, ...]) -> list[bytes]:
    """The body parts between the delimiter lines of `boundary` (RFC 2046)."""
    marks = _delimiters(body, boundary)
    if len(marks) < 2 or marks[0][2] or not marks[-1][2] or any(m[2] for m in marks[:-1]):
        raise _Unsure("missing, repeated or early closing delimiter")
    parts: list[bytes] = []
    for (_, start, _c), (nxt, _e, _c2) in itertools.pairwise(marks):
        end = nxt - 2  # the CRLF before a delimiter belongs to the delimiter
        if end < start:
            raise _Unsure("consecutive delimiters")
        parts.append(body[start:end])
    for ob in outer:
        if any(b"\r\n--" + ob in p or p.startswith(b"--" + ob) for p in parts):
            raise _Unsure("an outer boundary inside a part")
    return parts


def _decode(part: _Part) -> str:
    cte = part.cte
    payload = part.payload
    if cte in (b"", b"7bit", b"8bit", b"binary"):
        raw = payload
    elif cte == b"quoted-printable":
        raw = quopri.decodestring(payload)
    elif cte == b"base64":
        joined = b"".join(payload.splitlines())
        pad = len(joined) % 4
        try:
            raw = base64.b64decode(joined + (b"==="[:4 - pad] if pad else b""), validate=True)
        except binascii.Error:
            raise _Unsure("bad base64") from None
    else:
        raise _Unsure("other transfer encoding")
    charset = (part.charset or b"ASCII").decode("ascii")
    return raw.decode(charset, "replace")  # LookupError: unknown charset, as get_content()


def _fast_snippet(data: bytes) -> tuple[str, bytes] | None:
    """(text, subtype) of the display body, or None when there is none; _Unsure to fall back."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        raise _Unsure("bare CR or LF")
    if data.startswith(b"\r\n"):
        header, body = b"", data[2:]
    else:
        header, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise _Unsure("no body")
        header += b"\r\n"
    fields = _strict_fields(header)
    found = _find_text(fields, body, (b"text", b"plain"), (), 0)
    if not found:
        return None
    part = min(found, key=lambda c: c[0])[1]
    return _decode(part), part.subtype


def _slow_snippet(data: bytes) -> tuple[str, bytes] | None:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return None
    text = part.get_content()
    if not isinstance(text, str):
        return None
    return text, part.get_content_subtype().encode()


def _render(text: str, html_part: bool) -> str:
    if html_part:
        text = html.unescape(_TAG_RE.sub(" ", text))
    return " ".join(text.split())  # = re.sub(r"\s+", " ", text).strip(), several times faster


def _html_prefix(text: str, n: int) -> str | None:
    """text[:about n] that renders as the start of the whole text does, or None.

    The cut is moved past the end of a tag it falls into, and refused when a <script>
    or <style> block opened before it closes only after it."""
    if text.rfind("<", 0, n) > text.rfind(">", 0, n):
        n = text.find(">", n)
        if n < 0:
            return None
        n += 1
    chunk = text[:n]
    opens = list(_BLOCK_OPEN_RE.finditer(chunk))
    last = opens[-1] if opens else None
    if last is not None and re.compile(r"</" + last.group(1) + r"\s*>", re.I).search(
            chunk, last.end()) is None:
        return None
    return chunk


def _finish(text: str, subtype: bytes, limit: int) -> str:
    """Render (tags stripped for HTML, whitespace collapsed) and cut to `limit` characters.

    Only as much of the text is rendered as the first `limit` characters need: a prefix
    whose rendering is well longer than `limit` starts with the same characters as the
    whole text's (what a cut changes is its last tag, entity or whitespace run)."""
    html_part = subtype == b"html"
    n = 4 * limit + 512
    while n < len(text):
        chunk = _html_prefix(text, n) if html_part else text[:n]
        if chunk is not None:
            out = _render(chunk, html_part)
            if len(out) >= limit + 64:
                return out[:limit]
        n *= 4
    return _render(text, html_part)[:limit]


def snippet_of(data: bytes, limit: int = 200, *, fast: bool = True) -> str:
    """The first `limit` characters of the display body ('' for none); `fast=False` forces
    the `email` parse (the reference the fast path is tested against)."""
    if len(data) > SNIPPET_MAX_PARSE:
        return ""
    try:
        found = _fast_snippet(data) if fast else _slow_snippet(data)
    except _Unsure:
        try:
            found = _slow_snippet(data)
        except (LookupError, UnicodeDecodeError, AssertionError, KeyError):
            return ""
    except (LookupError, UnicodeDecodeError, AssertionError, KeyError):
        return ""
    if found is None:
        return ""
    return _finish(found[0], found[1], limit)


def summarize(data: bytes) -> Summary:
    header, _ = split_message(data)
    fields = header_fields(header)

    def first(name: bytes) -> str | None:
        raws = fields.get(name)
        return _value(raws[0]) if raws else None

    def addrs(name: bytes) -> list[str]:
        return [a for _, a in getaddresses([_value(r) for r in fields.get(name, [])]) if a]

    from_list = addrs(b"from")
    return Summary(
        message_id=(first(b"message-id") or "").strip(),
        from_addr=from_list[0] if from_list else "",
        to_addrs=addrs(b"to"),
        cc_addrs=addrs(b"cc"),
        subject=_decode_subject(first(b"subject")),
        date=parse_date(first(b"date")),
        snippet=snippet_of(data),
    )
