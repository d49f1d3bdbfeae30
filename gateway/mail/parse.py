"""Raw message bytes -> ParsedMessage: the one parser shared by ingest and IMAP sync.

Pure functions, no I/O. `parse_message` never raises on any input: malformed MIME,
unknown or lying charsets, missing headers, 8-bit garbage and huge headers all end up
as entries in `ParsedMessage.defects`, with whatever could be read filled in.

How the work is capped (so one hostile message cannot stall a worker):

- header fields are read by the byte-level scanner of `gateway.mail.headers`, each
  value capped at `HEADER_VALUE_LIMIT` characters and the whole block at
  `HEADER_BLOCK_LIMIT` bytes;
- the MIME structure comes from the stdlib `email` feed parser (compat32 rules, with
  header values handed back raw so that we decode them ourselves); the exact bytes of an
  attached message are cut out with the MIME walker of `gateway.mail.mime`;
- a text/plain or text/html part larger than `text_limit` encoded bytes is not decoded
  for text (a defect says so); attachments are only measured (decoded size, sha256),
  and `attachment_data` walks a message again for the bytes of one of them;
- at most `MAX_PARTS` parts and `MAX_DEPTH` levels of nesting are walked; a message
  larger than `PARSE_LIMIT` bytes gets its headers read and its body skipped.

`dedupe_hash` (see `dedupe_hash_of`) identifies "the same message" seen on two paths
when it has no Message-ID.
"""

from __future__ import annotations

import email
import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.policy import Compat32
from email.utils import getaddresses
from typing import Literal

from gateway.mail.calendar import attendees as calendar_attendees
from gateway.mail.dates import parse_rfc_date
from gateway.mail.headers import body_start, fields, header_end, split_entity
from gateway.mail.mime import boundary_bytes, cut_multipart
from gateway.mail.text import (
    collapse_ws,
    decode_bytes,
    decode_words,
    header_str,
    html_to_text,
    normalize_newlines,
    sniff_decode,
)

TEXT_LIMIT = 2 * 1024 * 1024
"""Encoded size above which a text/plain or text/html part is not decoded for text."""
PARSE_LIMIT = 64 * 1024 * 1024
"""Messages larger than this get their headers parsed and their body skipped."""
HEADER_BLOCK_LIMIT = 1024 * 1024
HEADER_VALUE_LIMIT = 64 * 1024
MAX_PARTS = 1000
MAX_DEPTH = 40
MAX_DEFECTS = 50
MAX_CALENDARS = 10
MAX_CAL_BYTES = 1024 * 1024
"""text/calendar parts read for attendees (each capped by `gateway.mail.calendar`)."""
SNIPPET_MAX = 200

HEADER_FIELDS: tuple[str, ...] = (
    "FROM", "TO", "CC", "BCC", "REPLY-TO", "DATE", "SUBJECT", "MESSAGE-ID", "IN-REPLY-TO",
    "REFERENCES", "LIST-UNSUBSCRIBE", "AUTO-SUBMITTED", "PRECEDENCE", "X-MAILGW-TEMPLATE",
    "X-MAILGW-CAMPAIGN", "LIST-ID", "X-AUTOREPLY", "X-AUTORESPOND", "RETURN-PATH", "CONTENT-TYPE",
)
"""What an IMAP tailer asks for in `BODY.PEEK[HEADER.FIELDS (...)]` to feed `parse_headers`."""


@dataclass(frozen=True)
class Attachment:
    """One attachment (a leaf that is not body text, or an attached message/rfc822)."""

    filename: str
    """Decoded (RFC 2231 / RFC 2047), directory part removed; for an attached message
    without a name, its subject + ".eml"; "" if none."""
    content_type: str
    """Lower-case type/subtype."""
    size: int
    """Decoded bytes (for message/rfc822: the attached message's bytes). Parts not sent
    in base64 (or `binary`) are measured in canonical form, CRLF line endings, so that
    a copy stored with LF endings measures the same."""
    sha256: str
    """Hex digest of the bytes measured for `size`."""
    content_id: str | None
    """Content-ID without angle brackets (what `cid:` URLs name), or None."""
    inline: bool
    """Content-Disposition inline, or no disposition but a Content-ID (embedded image)."""


@dataclass(frozen=True)
class ExtraHeaders:
    """The few extra header fields the CRM looks at, raw (unfolded, stripped) or None."""

    list_unsubscribe: str | None = None
    auto_submitted: str | None = None
    precedence: str | None = None
    x_mailgw_template: str | None = None
    x_mailgw_campaign: str | None = None
    # what tells automatic mail from a person's (gateway.mail.autoreply)
    list_id: str | None = None
    x_autoreply: str | None = None
    x_autorespond: str | None = None
    return_path: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class HeaderInfo:
    """What the header block alone says; enough for IMAP header-first decisions."""

    message_id: str
    in_reply_to: str | None
    references: list[str]
    from_addr: str
    from_name: str
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    reply_to: list[str]
    subject: str
    date: datetime | None
    headers: ExtraHeaders
    display_names: dict[str, str]
    defects: list[str]


@dataclass(frozen=True)
class ParsedMessage:
    """Everything the store needs from one message. Addresses are addr-specs in their
    original case, in header order, without duplicates (compared case-insensitively).
    Frozen, but holds lists: compare it, do not hash it."""

    message_id: str
    """As in the header: first `<...>` token, brackets kept, whitespace removed; "" if none."""
    in_reply_to: str | None
    """First `<...>` token of In-Reply-To, or None."""
    references: list[str]
    """Every `<...>` token of References, in order, without duplicates."""
    from_addr: str
    """The first From address (Sender's when From has none); "" if none."""
    from_name: str
    """Its decoded display name, "" if none."""
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    reply_to: list[str]
    subject: str
    """RFC 2047 decoded, unfolded, stripped."""
    date: datetime | None
    """Aware, converted to UTC (UTC assumed when the header names no zone); None if absent or unreadable."""
    text_body: str
    """All inline text/plain parts of this message (not of attached messages), decoded,
    joined by a newline, LF line endings; "" if none or too large."""
    html_body: str
    """The same for text/html."""
    snippet: str
    """<= 200 characters, whitespace collapsed: from the text body, else from the HTML."""
    attachments: list[Attachment]
    size: int
    """len(raw)."""
    headers: ExtraHeaders
    dedupe_hash: str
    """Hex sha256, see `dedupe_hash_of`."""
    display_names: dict[str, str] = field(default_factory=dict)
    """Lower-cased address -> decoded display name, for From/To/Cc/Bcc/Reply-To (and the
    CN of an attendee, where the header fields give the address no name)."""
    defects: list[str] = field(default_factory=list)
    attendees: list[str] = field(default_factory=list)
    """ATTENDEE and ORGANIZER addresses of the text/calendar parts of this message (not
    of attached messages), see `gateway.mail.calendar`; without duplicates."""


# --- the header block ---------------------------------------------------------------

_LINE_END_RE = re.compile(rb"\r?\n")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")


def _fields(block: bytes, defects: list[str]) -> dict[str, list[bytes]]:
    """Header name (lower-case) -> raw values (unfolded bytes, stripped), in order.

    Reads the entries of `gateway.mail.headers.fields`; an mbox "From " separator line
    first (with anything folded onto it) is skipped, and so are continuation lines
    before the first field; every other entry without a name counts as one malformed
    line (a lone CR that ends a cut-off block does not)."""
    if len(block) > HEADER_BLOCK_LIMIT:
        defects.append(f"header block of {len(block)} bytes truncated to {HEADER_BLOCK_LIMIT}")
        block = block[:HEADER_BLOCK_LIMIT]
    out: dict[str, list[bytes]] = {}
    entries = fields(block)
    if block.startswith(b"From "):
        entries = entries[1:]  # an mbox "From " separator line
    bad = 0
    for entry in entries:
        if entry.name is None:
            if entry.raw[:1] not in (b" ", b"\t") and entry.raw != b"\r":
                bad += 1
            continue
        assert entry.key is not None
        name = entry.key.decode("ascii")
        # every LF goes, with one CR before it (folding whitespace stays)
        value = entry.value.replace(b"\r\n", b"").replace(b"\n", b"").strip()
        if len(value) > HEADER_VALUE_LIMIT:
            defects.append(f"{name} header of {len(value)} bytes truncated")
            value = value[:HEADER_VALUE_LIMIT]
        out.setdefault(name, []).append(value)
    if bad:
        defects.append(f"{bad} malformed header line(s) ignored")
    return out


def _clean_head(head: bytes) -> bytes:
    """The header block as the stdlib parser should see it: entries that are not fields
    (no colon, 8-bit or spaces in the name) dropped with their continuation lines, and
    "Name : value" rewritten "Name: value". `_fields` reads the same entries, so the
    MIME walk and the header info agree; where the stdlib would take a bad line for the
    start of the body, we skip the line instead. An mbox "From " line first is kept (the
    stdlib knows it), without anything folded onto it. Returns `head` itself when
    nothing changes."""
    out: list[bytes] = []
    changed = False
    last_dropped = False
    for index, entry in enumerate(fields(head)):
        raw = entry.raw
        last_dropped = False
        if index == 0 and raw.startswith(b"From "):
            nl = raw.find(b"\n")
            line = raw if nl < 0 else raw[: nl + 1]
            last_dropped = line != raw
            out.append(line)
        elif entry.name is not None:
            colon = raw.find(b":")
            if colon != len(entry.name):
                raw = entry.name + raw[colon:]
                changed = True
            out.append(raw)
        elif raw == b"\r":
            out.append(raw)
        else:
            last_dropped = True
        changed = changed or last_dropped
    if not changed:
        return head
    clean = b"".join(out)
    if last_dropped and not head.endswith(b"\n") and clean.endswith(b"\n"):
        # A dropped last line without a line ending takes the LF before it along, as
        # this function has always done (the stdlib reads the block the same either way).
        clean = clean[:-1]
    return clean


def _first(fields: dict[str, list[bytes]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    return header_str(values[0]).strip()


def _all(fields: dict[str, list[bytes]], name: str) -> list[str]:
    return [header_str(v) for v in fields.get(name, ())]


_ANGLE_RE = re.compile(r"<([^<>]*)>")
_WSP_RE = re.compile(r"\s+")


def _msg_ids(value: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for m in _ANGLE_RE.finditer(value):
        mid = "<" + _WSP_RE.sub("", m.group(1)) + ">"
        if len(mid) > 2 and mid not in seen:
            seen.add(mid)
            out.append(mid)
    return out


def _message_id(value: str | None) -> str:
    if not value:
        return ""
    ids = _msg_ids(value)
    if ids:
        return ids[0][:998]
    token = value.split()
    return token[0][:998] if token else ""


def message_id_key(mid: str | None) -> str:
    """A Message-ID normalised for lookups: first `<...>` token (or the whole value),
    brackets and whitespace removed, domain part lower-cased, local part kept as is."""
    if not mid:
        return ""
    m = _ANGLE_RE.search(mid)
    value = _WSP_RE.sub("", m.group(1) if m else mid).strip("<>")
    local, at, domain = value.rpartition("@")
    if not at:
        return value
    return f"{local}@{domain.lower()}"


# Only where a run of address characters starts: a findall from every character of a
# long run without "@" would scan the rest of the run each time (quadratic).
_ADDR_RE = re.compile(r"(?<![^\s<>(),;:\"\[\]])[^\s<>(),;:\"\[\]]+@[^\s<>(),;:\"\[\]]+")


def _addresses(
    values: Iterable[str], names: dict[str, str], defects: list[str], label: str
) -> list[str]:
    values = [_FOLD_RE.sub("", v) for v in values]
    if not values:
        return []
    try:
        pairs = getaddresses(values)
    except Exception:  # the stdlib address parser has raised on hostile input before
        defects.append(f"unparseable {label} header")
        pairs = [("", a) for v in values for a in _ADDR_RE.findall(v)]
    out: list[str] = []
    seen: set[str] = set()
    dropped = 0
    for name, addr in pairs:
        addr = addr.strip().strip("<>")
        local, _, domain = addr.rpartition("@")
        if not local or not domain or any(c.isspace() for c in addr) or len(addr) > 320:
            if addr or name:
                dropped += 1
            continue
        key = addr.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(addr)
        if name:
            decoded = collapse_ws(decode_words(name, defects))
            if decoded and decoded.lower() != key:
                names.setdefault(key, decoded)
    if dropped:
        defects.append(f"{dropped} invalid address(es) in {label}")
    return out


def _header_info(fields: dict[str, list[bytes]], defects: list[str]) -> HeaderInfo:
    names: dict[str, str] = {}
    froms = _addresses(_all(fields, "from"), names, defects, "From")
    if not froms and "sender" in fields:
        froms = _addresses(_all(fields, "sender"), names, defects, "Sender")
    subject_raw = _first(fields, "subject")
    subject = collapse_ws(decode_words(_FOLD_RE.sub("", subject_raw), defects)) if subject_raw else ""
    date_raw = _first(fields, "date")
    date = None
    if date_raw:
        date, _ = parse_rfc_date(_FOLD_RE.sub("", date_raw))
        if date is None:
            defects.append(f"unreadable Date {date_raw[:60]!r}")
    irt = _first(fields, "in-reply-to")
    irt_ids = _msg_ids(irt) if irt else []
    refs: list[str] = []
    for value in _all(fields, "references"):
        refs.extend(r for r in _msg_ids(value) if r not in refs)
    from_addr = froms[0] if froms else ""

    def extra(name: str) -> str | None:
        value = _first(fields, name)
        return None if value is None else _FOLD_RE.sub("", value)

    return HeaderInfo(
        message_id=_message_id(_first(fields, "message-id")),
        in_reply_to=irt_ids[0] if irt_ids else None,
        references=refs,
        from_addr=from_addr,
        from_name=names.get(from_addr.lower(), ""),
        to_addrs=_addresses(_all(fields, "to"), names, defects, "To"),
        cc_addrs=_addresses(_all(fields, "cc"), names, defects, "Cc"),
        bcc_addrs=_addresses(_all(fields, "bcc"), names, defects, "Bcc"),
        reply_to=_addresses(_all(fields, "reply-to"), names, defects, "Reply-To"),
        subject=subject,
        date=date,
        headers=ExtraHeaders(
            list_unsubscribe=extra("list-unsubscribe"),
            auto_submitted=extra("auto-submitted"),
            precedence=extra("precedence"),
            x_mailgw_template=extra("x-mailgw-template"),
            x_mailgw_campaign=extra("x-mailgw-campaign"),
            list_id=extra("list-id"),
            x_autoreply=extra("x-autoreply"),
            x_autorespond=extra("x-autorespond"),
            return_path=extra("return-path"),
            content_type=extra("content-type"),
        ),
        display_names=names,
        defects=defects,
    )


def parse_headers(header_block: bytes) -> HeaderInfo:
    """Read a header block (e.g. an IMAP `BODY.PEEK[HEADER.FIELDS (...)]` answer; see
    `HEADER_FIELDS`). Reads up to the first blank line; never raises."""
    defects: list[str] = []
    try:
        data = bytes(header_block)
        return _header_info(_fields(data[: header_end(data)], defects), defects)
    except Exception as exc:  # last resort: the contract is "never raises"
        defects.append(f"header parse failed: {type(exc).__name__}")
        return _header_info({}, defects)


# --- subjects -----------------------------------------------------------------------

_REPLY_WORDS = ("re", "aw", "antw", "antwort", "sv", "r", "rif", "réf", "ref", "回复", "回覆", "答复")
_FORWARD_WORDS = ("fwd", "fw", "wg", "tr", "rv", "enc", "转发", "轉寄", "转寄")
_OTHER_WORDS = ("vs", "odp")  # VS: Finnish reply but Danish forward; Odp: Polish reply
_PREFIX_RE = re.compile(
    r"^\s*("
    + "|".join(sorted(_REPLY_WORDS + _FORWARD_WORDS + _OTHER_WORDS, key=len, reverse=True))
    + r")\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]\s*",
    re.I,
)
_LIST_TAG_RE = re.compile(r"^\s*\[[^\[\]]{0,100}\]\s*")


def normalize_subject(subject: str | None) -> str:
    """The subject without any leading run of reply/forward prefixes (Re, Fwd, FW, AW,
    WG, SV, VS, Antw, R, RIF, Réf, TR, 回复, 转发..., with `[n]`/`(n)` counters and `:`
    or the fullwidth colon U+FF1A) and leading list tags like `[sales]`, whitespace
    collapsed. Case is kept: compare with `.casefold()`."""
    if not subject:
        return ""
    s = subject
    while True:
        m = _PREFIX_RE.match(s) or _LIST_TAG_RE.match(s)
        if m is None or m.end() == 0:
            break
        s = s[m.end() :]
    return collapse_ws(s)


def subject_kind(subject: str | None) -> Literal["reply", "forward"] | None:
    """Whether the first reply/forward prefix (after list tags) says reply or forward."""
    s = subject or ""
    while True:
        tag = _LIST_TAG_RE.match(s)
        if tag is None or tag.end() == 0:
            break
        s = s[tag.end() :]
    m = _PREFIX_RE.match(s)
    if m is None:
        return None
    word = m.group(1).lower()
    if word in _REPLY_WORDS:
        return "reply"
    if word in _FORWARD_WORDS:
        return "forward"
    return None


# --- dedupe -------------------------------------------------------------------------


def dedupe_hash_of(
    from_addr: str,
    to_addrs: Iterable[str],
    cc_addrs: Iterable[str],
    subject: str,
    date: datetime | None,
    body_text: str,
) -> str:
    """sha256 over what survives every path a message takes, for when it has no Message-ID.

    Inputs: From lower-cased; To + Cc lower-cased, de-duplicated and sorted; the subject
    through `normalize_subject` and casefolded; the Date in UTC to the minute; the text
    body (the HTML-derived text when there is no text part), NFC-normalised and with all
    whitespace runs collapsed to one space.

    Stable against: added or removed trace and transport headers (Received,
    DKIM-Signature, ARC-*, X-*, Return-Path, Delivered-To), a Bcc header present on
    one copy only, header folding and RFC 2047 encoding choices, recipient order and
    case, list tags and Re/Fwd prefixes added by a list or gateway, the Date written in
    another zone or with seconds, CRLF vs LF, quoted-printable vs base64 vs 8bit of the
    same text, the charset the same text is encoded in, format=flowed re-wrapping at
    spaces, and MIME boundaries/structure around the same body text.
    Not stable against: a changed body (link rewriting, tracking pixels are HTML-only
    and do not matter when there is a text part; footers added by a list do), a Date
    added on one path only, or a server that regenerates the text part (Exchange).
    """
    rcpts = sorted({a.lower() for a in (*to_addrs, *cc_addrs)})
    minute = date.strftime("%Y-%m-%dT%H:%MZ") if date is not None else ""
    body = collapse_ws(unicodedata.normalize("NFC", body_text))
    material = "\x00".join(
        ("mailgw-dedupe-v1", from_addr.lower(), ",".join(rcpts), normalize_subject(subject).casefold(),
         minute, body)
    )
    return hashlib.sha256(material.encode("utf-8", "replace")).hexdigest()


# --- MIME ---------------------------------------------------------------------------


class _RawHeaders(Compat32):
    """compat32 that hands header values back as raw strings (never `Header` objects);
    we decode 8-bit and RFC 2047 ourselves."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawHeaders()


def _unsurrogate(value: str) -> str:
    """Header text from the bytes parser (8-bit as surrogates) -> proper Unicode."""
    if value.isascii():
        return value
    try:
        return sniff_decode(value.encode("ascii", "surrogateescape"))
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _part_header(part: Message, name: str) -> str | None:
    value = part.get(name)
    if value is None:
        return None
    return _unsurrogate(_FOLD_RE.sub("", str(value))).strip()


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _charset(part: Message) -> str | None:
    try:
        cs = part.get_content_charset()
    except Exception:
        return None
    return _unsurrogate(cs) if cs else None


def _disposition(part: Message) -> str | None:
    try:
        disp = part.get_content_disposition()
    except Exception:
        return None
    return disp.strip().lower() if disp else None


def _filename(part: Message, defects: list[str]) -> str:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        return ""
    name = decode_words(_unsurrogate(name), defects)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in name if c.isprintable()).strip()[:255]


def _payload_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("ascii", "surrogateescape")
    return b""


def _encoded_len(part: Message) -> int:
    payload = part.get_payload()
    return len(payload) if isinstance(payload, str) else 0


def _boundary_of(header: bytes) -> bytes | None:
    """The boundary of the entity whose header block this is, as the stdlib reads it."""
    try:
        boundary = email.message_from_bytes(_clean_head(header), policy=_POLICY).get_boundary()
    except Exception:
        return None
    return boundary_bytes(boundary) if boundary else None


class _Entities:
    """The exact bytes of a message's MIME entities by path, each multipart cut once.

    `entity(path)` is `gateway.mail.mime.entity_at(raw, path, ...)`, but the parts of
    every multipart on the way are kept: walking a message of N sibling parts cuts
    their parent once instead of N times (which made a message of thousands of
    attached messages take minutes). The work is linear in the size of the message
    times its nesting depth (capped at `MAX_DEPTH`)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parts: dict[tuple[int, ...], list[bytes] | None] = {}

    def _parts_of(self, path: tuple[int, ...]) -> list[bytes] | None:
        if path in self._parts:
            return self._parts[path]
        entity = self.entity(path)
        parts: list[bytes] | None = None
        if entity is not None:
            header, _, body = split_entity(entity)
            boundary = _boundary_of(header)
            if boundary is not None:
                parts = cut_multipart(body, boundary)[0]
        self._parts[path] = parts
        return parts

    def entity(self, path: tuple[int, ...]) -> bytes | None:
        """The exact bytes (headers and body) of the MIME entity at `path` (child indexes
        from the top-level multipart down), or None when the bytes cannot be followed."""
        if not path:
            return self.raw
        parts = self._parts_of(path[:-1])
        if parts is None or path[-1] >= len(parts):
            return None
        return parts[path[-1]]


def _decode_transfer(data: bytes, cte: str | None) -> bytes:
    """Undo a Content-Transfer-Encoding (base64, quoted-printable) on exact part bytes."""
    kind = (cte or "").strip().lower()
    if kind not in ("base64", "quoted-printable"):
        return data
    msg = Message(policy=_POLICY)
    msg["Content-Transfer-Encoding"] = kind
    msg.set_payload(data.decode("ascii", "surrogateescape"))
    try:
        out = msg.get_payload(decode=True)
    except Exception:
        return data
    return out if isinstance(out, bytes) else data


def _attached_message_bytes(
    entities: _Entities, part: Message, path: tuple[int, ...]
) -> tuple[bytes, bool]:
    """(the bytes of the message attached as `part`, exact?) — exact when they could be
    cut out of the raw message, else the stdlib's re-serialisation of the parsed part."""
    entity = entities.entity(path)
    payload = part.get_payload()
    if entity is not None:
        cte = (_part_header(part, "Content-Transfer-Encoding") or "").lower()
        inner = _decode_transfer(entity[body_start(entity) :], cte)
        if cte in ("base64", "quoted-printable"):
            return inner, True  # the stdlib parsed the encoded text as a message: trust the bytes
        if not (isinstance(payload, list) and payload and isinstance(payload[0], Message)):
            return inner, True
        # Cross-check the cut against the stdlib's parse before calling it exact.
        want = payload[0].get("Message-ID"), payload[0].get("Subject")
        got = email.message_from_bytes(inner[: header_end(inner)], policy=_POLICY)
        if (got.get("Message-ID"), got.get("Subject")) == want:
            return inner, True
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        try:
            return payload[0].as_bytes(), False
        except Exception:
            return b"", False
    return _payload_bytes(part), False


_MESSAGE_TYPES = ("message/rfc822", "message/global")


@dataclass
class _Walk:
    entities: _Entities
    text_limit: int
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    parts: int = 0
    attendees: list[tuple[str, str]] = field(default_factory=list)
    calendars: int = 0
    #: `attachment_data`: the index of the attachment whose bytes to keep, and its bytes
    #: and charset once found (the walk stops there)
    keep: int | None = None
    kept: tuple[bytes, str | None] | None = None


def _canonical(part: Message, data: bytes) -> bytes:
    cte = (_part_header(part, "Content-Transfer-Encoding") or "").lower()
    if cte in ("base64", "binary"):
        return data
    return _LINE_END_RE.sub(b"\r\n", data)


def _attachment(walk: _Walk, part: Message, ctype: str, data: bytes, filename: str) -> None:
    data = _canonical(part, data)
    if walk.keep == len(walk.attachments):
        walk.kept = (data, _charset(part))
    disp = _disposition(part)
    cid = _part_header(part, "Content-ID")
    cid = cid.strip().strip("<>").strip() if cid else None
    walk.attachments.append(
        Attachment(
            filename=filename,
            content_type=ctype,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            content_id=cid or None,
            inline=disp == "inline" or (disp is None and bool(cid)),
        )
    )


def _walk_part(walk: _Walk, part: Message, path: tuple[int, ...], depth: int) -> None:
    if walk.kept is not None:
        return   # attachment_data has its part: nothing after it matters
    walk.parts += 1
    if walk.parts > MAX_PARTS:
        if walk.parts == MAX_PARTS + 1:
            walk.defects.append(f"more than {MAX_PARTS} MIME parts; the rest ignored")
        return
    for defect in getattr(part, "defects", ()):
        walk.defects.append(type(defect).__name__)
    ctype = _content_type(part)
    if ctype.startswith("message/"):
        data, exact = _attached_message_bytes(walk.entities, part, path)
        if not exact:
            walk.defects.append(f"{ctype} part measured on its re-serialisation, not its exact bytes")
        filename = _filename(part, walk.defects)
        if ctype not in _MESSAGE_TYPES:
            _attachment(walk, part, ctype, data, filename)
            return
        if not filename:
            inner = part.get_payload()
            subject = ""
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                subject = collapse_ws(decode_words(_part_header(inner[0], "Subject") or "", walk.defects))
            safe = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", subject).strip()[:120]
            filename = (safe or "message") + ".eml"
        _attachment(walk, part, ctype, data, filename)
        return
    payload = part.get_payload()
    if isinstance(payload, list):
        if depth >= MAX_DEPTH:
            walk.defects.append(f"MIME nesting deeper than {MAX_DEPTH}; inner parts ignored")
            return
        for index, sub in enumerate(payload):
            if isinstance(sub, Message):
                _walk_part(walk, sub, (*path, index), depth + 1)
        return
    if ctype.startswith("multipart/"):
        ctype = "text/plain"  # a multipart without a usable boundary: its body is text
    filename = _filename(part, walk.defects)
    disp = _disposition(part)
    if ctype in ("text/plain", "text/html") and disp != "attachment" and not filename:
        size = _encoded_len(part)
        if size > walk.text_limit:
            walk.defects.append(f"{ctype} part of {size} bytes not decoded (limit {walk.text_limit})")
            return
        text = normalize_newlines(decode_bytes(_payload_bytes(part), _charset(part), walk.defects))
        if text:
            (walk.texts if ctype == "text/plain" else walk.htmls).append(text)
        return
    data = _payload_bytes(part)
    if ctype in _CALENDAR_TYPES:
        _calendar(walk, part, data)
    _attachment(walk, part, ctype, data, filename)


_CALENDAR_TYPES = ("text/calendar", "application/ics")


def _calendar(walk: _Walk, part: Message, data: bytes) -> None:
    """A meeting invitation's attendees (the part stays an attachment too)."""
    walk.calendars += 1
    if walk.calendars > MAX_CALENDARS:
        return
    text = decode_bytes(data[:MAX_CAL_BYTES], _charset(part), walk.defects)
    walk.attendees.extend(calendar_attendees(text))


def _snippet(text: str) -> str:
    # Collapse only a prefix, growing it while it holds fewer than 200 visible characters.
    size = SNIPPET_MAX * 4
    while True:
        snippet = collapse_ws(text[:size])
        if len(snippet) > SNIPPET_MAX or size >= len(text):
            return snippet[:SNIPPET_MAX].rstrip()
        size *= 8


def _dedupe_defects(defects: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for d in defects:
        seen.setdefault(d, None)
    out = list(seen)
    if len(out) > MAX_DEFECTS:
        out = [*out[: MAX_DEFECTS - 1], f"... {len(out) - MAX_DEFECTS + 1} more defects"]
    return out


def _cleaned(raw: bytes) -> bytes:
    end = header_end(raw)
    head = raw[:end]
    clean = _clean_head(head)
    return raw if clean is head else clean + raw[end:]


_BOUNDARY_PARAM_RE = re.compile(rb"boundary\s*=", re.I)


def _head_kind(header: bytes) -> tuple[str, bytes | None, str]:
    """(content type, boundary, transfer encoding) of an entity's header block."""
    try:
        msg = email.message_from_bytes(_clean_head(header), policy=_POLICY)
        boundary = msg.get_boundary()
        cte = str(msg.get("Content-Transfer-Encoding", "")).strip().lower()
        return msg.get_content_type(), boundary_bytes(boundary) if boundary else None, cte
    except Exception:
        return "text/plain", None, ""


def _shallow(entity: bytes, depth: int = 0) -> tuple[bytes, bool]:
    """(`entity` with the bodies nothing walks emptied, whether any was): those of the
    multiparts at `MAX_DEPTH` or deeper, and of messages attached at that depth.

    The stdlib parser checks every line against every enclosing boundary, so a message
    nested a thousand multiparts deep cost seconds per 100 KB (quadratic). Headers stay,
    and so does every byte above `MAX_DEPTH`: the walk sees the same tree, and exact bytes
    are still cut from the original. At most `MAX_DEPTH` passes over the message."""
    header, blank, body = split_entity(entity)
    if not body:
        return entity, False
    ctype, boundary, cte = _head_kind(header)
    if ctype in _MESSAGE_TYPES and cte not in ("base64", "quoted-printable"):
        if depth >= MAX_DEPTH:
            inner_head, inner_blank, inner_body = split_entity(body)
            return header + blank + inner_head + inner_blank, bool(inner_body)
        inner, cut = _shallow(body, depth + 1)
        return (header + blank + inner, True) if cut else (entity, False)
    if boundary is None or not ctype.startswith("multipart/"):
        return entity, False
    if depth >= MAX_DEPTH:
        return header + blank, True
    parts, gaps = cut_multipart(body, boundary)
    out: list[bytes] = []
    cut_any = False
    for gap, part in zip(gaps, parts, strict=False):
        inner, cut = _shallow(part, depth + 1)
        cut_any = cut_any or cut
        out += (gap, inner)
    if not cut_any:
        return entity, False
    return header + blank + b"".join(out) + gaps[-1], True


def _tree(data: bytes, defects: list[str] | None = None) -> Message:
    """The stdlib's MIME tree of a whole message (cleaned header block; nesting past
    `MAX_DEPTH` emptied first when the message declares that many boundaries)."""
    clean = _cleaned(data)
    # every match holds "boundary": a message with few of them (nearly all) skips the
    # case-insensitive scan, which costs more than the rest of this function
    few = clean.lower().count(b"boundary") <= MAX_DEPTH
    for declared, _ in enumerate(() if few else _BOUNDARY_PARAM_RE.finditer(clean), 1):
        if declared > MAX_DEPTH:
            clean, cut = _shallow(clean)
            if cut and defects is not None:
                defects.append(f"MIME nesting deeper than {MAX_DEPTH}; inner parts ignored")
            break
    return email.message_from_bytes(clean, policy=_POLICY)


def parse_message(raw: bytes, *, text_limit: int = TEXT_LIMIT) -> ParsedMessage:
    """Parse a whole message. Never raises; every problem is listed in `defects`."""
    data = bytes(raw)
    defects: list[str] = []
    try:
        info = _header_info(_fields(data[: header_end(data)], defects), defects)
    except Exception as exc:  # pragma: no cover - the header scanner is total; belt and braces
        defects.append(f"header parse failed: {type(exc).__name__}")
        info = _header_info({}, defects)
    walk = _Walk(entities=_Entities(data), text_limit=text_limit, defects=defects)
    if len(data) > PARSE_LIMIT:
        defects.append(f"message of {len(data)} bytes: body not parsed (limit {PARSE_LIMIT})")
    else:
        try:
            tree = _tree(data, defects)
            _walk_part(walk, tree, (), 0)
        except Exception as exc:  # RecursionError on absurd nesting, anything else in the stdlib
            defects.append(f"MIME parse failed: {type(exc).__name__}")
    return _assemble(info, walk, len(data))


def _assemble(info: HeaderInfo, walk: _Walk, size: int) -> ParsedMessage:
    text_body = "\n".join(walk.texts)
    html_body = "\n".join(walk.htmls)
    body_text = text_body
    if not text_body.strip() and html_body:
        body_text = html_to_text(html_body)
    names = dict(info.display_names)
    attendees: dict[str, str] = {}
    for address, name in walk.attendees:
        key = address.lower()
        attendees.setdefault(key, address)
        if name and name.lower() != key:
            names.setdefault(key, name)
    return ParsedMessage(
        message_id=info.message_id,
        in_reply_to=info.in_reply_to,
        references=info.references,
        from_addr=info.from_addr,
        from_name=info.from_name,
        to_addrs=info.to_addrs,
        cc_addrs=info.cc_addrs,
        bcc_addrs=info.bcc_addrs,
        reply_to=info.reply_to,
        subject=info.subject,
        date=info.date,
        text_body=text_body,
        html_body=html_body,
        snippet=_snippet(body_text),
        attachments=walk.attachments,
        size=size,
        headers=info.headers,
        dedupe_hash=dedupe_hash_of(
            info.from_addr, info.to_addrs, info.cc_addrs, info.subject, info.date, body_text
        ),
        display_names=names,
        defects=_dedupe_defects(walk.defects),
        attendees=list(attendees.values()),
    )


@dataclass(frozen=True)
class AttachmentData:
    """One attachment of a message with its content (see :func:`attachment_data`)."""

    attachment: Attachment
    data: bytes
    """The bytes `attachment.size` and `attachment.sha256` measure: the part decoded from
    its transfer encoding (text not sent in base64 with CRLF line endings; an attached
    message's exact bytes)."""
    charset: str | None
    """The part's charset parameter, if any."""


def attachment_data(raw: bytes, index: int) -> AttachmentData | None:
    """Attachment number `index` (0-based) of `raw`, in the order
    `parse_message(raw).attachments` lists them, with its decoded bytes; None when `raw`
    has no such attachment. The same walk and caps as `parse_message` (`MAX_PARTS`,
    `MAX_DEPTH`, `PARSE_LIMIT`), stopped at the part wanted; never raises."""
    if index < 0 or len(raw) > PARSE_LIMIT:
        return None
    data = bytes(raw)
    walk = _Walk(entities=_Entities(data), text_limit=TEXT_LIMIT, keep=index)
    try:
        _walk_part(walk, _tree(data), (), 0)
    except Exception:
        return None
    if walk.kept is None or len(walk.attachments) <= index:
        return None
    return AttachmentData(walk.attachments[index], *walk.kept)


def attached_messages(raw: bytes, *, limit: int | None = None) -> list[bytes]:
    """The bytes of every message/rfc822 (or message/global) part of `raw` that is not
    inside another attached message nor inside a multipart/report (a bounce), in the
    order `ParsedMessage.attachments` lists them; exact bytes where they can be cut out.

    Capped like `parse_message`: at most `MAX_PARTS` parts are looked at (so at most
    that many messages come back) and `MAX_DEPTH` levels; with `limit`, the walk stops
    after that many messages. Linear in the size of `raw`."""
    if len(raw) > PARSE_LIMIT or (limit is not None and limit <= 0):
        return []
    try:
        tree = _tree(raw)
    except Exception:
        return []
    entities = _Entities(raw)
    out: list[bytes] = []
    seen = 0
    wanted = MAX_PARTS if limit is None else min(limit, MAX_PARTS)

    def visit(part: Message, path: tuple[int, ...], depth: int) -> bool:
        """False once the walk must stop (a cap reached)."""
        nonlocal seen
        seen += 1
        if seen > MAX_PARTS:
            return False
        ctype = _content_type(part)
        if ctype in _MESSAGE_TYPES:
            out.append(_attached_message_bytes(entities, part, path)[0])
            return len(out) < wanted
        if ctype == "multipart/report" or depth >= MAX_DEPTH:
            return True
        payload = part.get_payload()
        if isinstance(payload, list) and not ctype.startswith("message/"):
            for index, sub in enumerate(payload):
                if isinstance(sub, Message) and not visit(sub, (*path, index), depth + 1):
                    return False
        return True

    try:
        visit(tree, (), 0)
    except Exception:
        return out
    return out


def header_value(raw: bytes, name: str) -> str | None:
    """The first `name` field of `raw`'s header block, unfolded and stripped (not
    RFC 2047 decoded), or None."""
    try:
        return _first(_fields(raw[: header_end(raw)], []), name.lower())
    except Exception:
        return None
