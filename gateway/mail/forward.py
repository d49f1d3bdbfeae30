"""Find the original message inside a message a rep forwarded to the CRM.

`unwrap_forward(raw, parsed)` returns a `Forwarded` (the original, parsed, with its
bytes, the forwarder, the forwarder's note and the style) or None for a message that
is not a forward. It looks, in this order:

1. for an inline forward block at the top of the text body (else of the HTML body's
   text), right below the forwarder's note, in the styles mail clients write:

   - gmail: ``---------- Forwarded message ---------`` then From/Date/Subject/To/Cc;
   - apple: ``Begin forwarded message:`` (also ``> ``-quoted, and localised) then
     From/Subject/Date/To/Cc/Reply-To/Message-Id;
   - outlook: a ``____`` rule, ``-----Original Message-----`` or nothing, then
     From/Sent/To/Cc/Subject (localised labels: Von/Gesendet/An/Betreff,
     De/Envoyé/À/Objet, ...);
   - thunderbird: ``-------- Forwarded Message --------`` then Subject/Date/From/To;

2. else for an attached message/rfc822 (the first one outside any bounce report),
   when the forwarder's own text is just a note.

It is conservative about replies: a subject whose first prefix is a reply prefix
(Re:, AW:, SV:...) is never a forward; a reply attribution ("On ... wrote:",
"Am ... schrieb ...:") above the first block means quoted history, not a forward;
and an Outlook header block, which Outlook writes for replies and forwards alike,
counts only under a forward prefix (FW:, WG:, TR:...) or, without any prefix, when
the message is not itself a reply (no In-Reply-To). Nested forwards: only the
outermost block is unwrapped; the inner ones stay in the original's body.
"""

from __future__ import annotations

import email.policy
import hashlib
import re
from dataclasses import dataclass, replace
from datetime import datetime
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Literal

from gateway.mail.dates import parse_human_date, parse_rfc_date
from gateway.mail.parse import (
    ParsedMessage,
    attached_messages,
    header_value,
    normalize_subject,
    parse_message,
    subject_kind,
)
from gateway.mail.text import collapse_ws, html_to_text

Style = Literal["attachment", "gmail", "outlook", "apple", "thunderbird"]

_MESSAGE_TYPES = ("message/rfc822", "message/global")

FIELD_LIMIT = 4000
"""Characters kept of one field line in a forward block (bounds the address scan)."""

NOTE_LIMIT = 2000
"""A message with an attached message and no forward prefix is a forward only if the
forwarder wrote at most this many characters (whitespace collapsed) around it."""


@dataclass(frozen=True)
class Forwarded:
    """The original message a rep forwarded, and who forwarded it how."""

    original: ParsedMessage
    raw: bytes
    """For an attached message its exact bytes; for an inline block a reconstructed
    RFC 5322 message (headers from the block, text body, HTML body when isolated)."""
    forwarded_by: str
    """The forwarder's address (the outer message's From)."""
    note: str
    """The forwarder's own text above the block (the whole text for an attachment)."""
    style: Style


def unwrap_forward(raw: bytes, parsed: ParsedMessage) -> Forwarded | None:
    """The original inside a forwarded message, or None; never raises."""
    try:
        return _unwrap(bytes(raw), parsed)
    except Exception:  # a forward we cannot read is stored as the message it is
        return None


# --- markers and labels -------------------------------------------------------------

_QUOTE_RE = re.compile(r"^[ \t]*((?:>[ \t]?)*)")
_GMAIL_RE = re.compile(r"^-{5,}\s*Forwarded message\s*-{3,}\s*$")
_THUNDERBIRD_RE = re.compile(
    r"^-{3,}\s*(?:Forwarded Message|Weitergeleitete Nachricht|Message transféré|Mensaje reenviado"
    r"|Messaggio inoltrato|Doorgestuurd bericht|Videresendt meddelelse|Vidarebefordrat meddelande"
    r"|Mensagem encaminhada|Mensagem reencaminhada|Przekazana wiadomość|Treść przekazanej wiadomości"
    r"|Перенаправленное сообщение|Пересылаемое сообщение)\s*-{3,}\s*$",
    re.I,
)
_APPLE_RE = re.compile(
    r"^(?:Begin forwarded message|Anfang der weitergeleiteten Nachricht|Début du message réexpédié"
    r"|Début du message transféré|Inicio del mensaje reenviado|Inizio messaggio inoltrato"
    r"|Begin doorgestuurd bericht|Start på videresendt besked|Videresendt melding|Vidarebefordrat mejl"
    r"|Início da mensagem reencaminhada|Início da mensagem encaminhada|Välitetty viesti alkaa"
    r"|Początek przekazywanej wiadomości|Начало переадресованного сообщения)\s*:\s*$",
    re.I,
)
_OUTLOOK_RULE_RE = re.compile(
    r"^(?:_{20,}|-{3,}\s*(?:Original Message|Ursprüngliche Nachricht|Message d'origine|Mensaje original"
    r"|Messaggio originale|Oorspronkelijk bericht|Original meddelelse|Opprinnelig melding"
    r"|Ursprungligt meddelande|Mensagem original|Alkuperäinen viesti|Wiadomość oryginalna)\s*-{3,})\s*$",
    re.I,
)
_ATTRIBUTION_RE = re.compile(
    r"(?:\b(?:wrote|a écrit|escribió|ha scritto|escreveu|kirjoitti|napisał(?:\(a\))?|написал(?:\(\u0430\))?)"
    r"|写道|寫道|のメッセージ)\s*[:\uff1a]\s*$"
    r"|^(?:Am|Op|Den|På|D\.)\s.*\b(?:schrieb|schreef|skrev)\b.*[:\uff1a]\s*$",
    re.I,
)

_LABELS: dict[str, str] = {}
for _key, _words in {
    "from": "from|von|de|da|van|fra|från|od|от|lähettäjä|feladó|expéditeur|absender|发件人|寄件者|差出人",
    "to": "to|an|à|a|para|aan|til|till|do|кому|vastaanottaja|címzett|destinataire|pour|收件人|宛先",
    "cc": "cc|kopie|copie|copie à|kopia|копия|抄送|副本",
    "date": "date|sent|datum|gesendet|envoyé|enviado|enviada|fecha|data|inviato|verzonden|dato|sendt"
    "|skickat|lähetetty|wysłano|отправлено|发送时间|日期|送信日時|日時",
    "subject": "subject|betreff|objet|sujet|asunto|oggetto|onderwerp|assunto|emne|ämne|temat|тема|aihe"
    "|tárgy|主题|主旨|件名",
    "reply-to": "reply-to|antwort an|répondre à|responder a",
    "message-id": "message-id",
}.items():
    for _word in _words.split("|"):
        _LABELS[_word] = _key
_LABEL_RE = re.compile(
    r"^[*\s]*("
    + "|".join(sorted(map(re.escape, _LABELS), key=len, reverse=True))
    + r")[*\s]*[:\uff1a][*\s]*(.*)$",
    re.I,
)


@dataclass
class _Block:
    style: Style
    note: str
    fields: dict[str, str]
    body: str


_REPLY = "reply"


def _dequote(line: str, depth: int | None = None) -> tuple[str, int]:
    """(line without its leading `>` quote marks — at most `depth` of them —, how many)."""
    m = _QUOTE_RE.match(line)
    marks = m.group(1) if m else ""
    count = marks.count(">")
    if depth is None or count <= depth:
        return line[m.end() if m else 0 :], count
    # Remove only `depth` levels.
    pos = 0
    for _ in range(depth):
        pos = line.index(">", pos) + 1
        if pos < len(line) and line[pos] in " \t":
            pos += 1
    return line[pos:], depth


def _is_attribution(lines: list[str], i: int) -> bool:
    line = _dequote(lines[i])[0].strip()
    if not line:
        return False
    candidates = [line]
    if i + 1 < len(lines):
        nxt = _dequote(lines[i + 1])[0].strip()
        if nxt and len(nxt) < 100:
            candidates.append(line + " " + nxt)
    return any(
        len(c) < 400 and _ATTRIBUTION_RE.search(c) and re.search(r"[\d@]", c) for c in candidates
    )


def _header_block(lines: list[str], start: int, depth: int) -> tuple[dict[str, str], int]:
    """Parse `Label: value` lines from `start` (after up to 3 blank lines); (fields, end)."""
    j = start
    n = len(lines)
    skipped = 0
    while j < n and not _dequote(lines[j], depth)[0].strip() and skipped < 3:
        j += 1
        skipped += 1
    fields: dict[str, str] = {}
    last: str | None = None
    while j < n:
        text = _dequote(lines[j], depth)[0].strip()
        if not text:
            break
        m = _LABEL_RE.match(text)
        key = _LABELS.get(m.group(1).lower()) if m else None
        if m is not None and key is not None and key not in fields:
            fields[key] = m.group(2).strip()[:FIELD_LIMIT]
            last = key
        elif last in ("to", "cc") and "@" in text and len(fields[last]) < FIELD_LIMIT:
            fields[last] = (fields[last] + " " + text)[:FIELD_LIMIT]  # a wrapped address list
        else:
            break
        j += 1
    return fields, j


def _body_after(lines: list[str], end: int, depth: int) -> str:
    body = [_dequote(line, depth)[0] for line in lines[end:]]
    first = next((k for k, line in enumerate(body) if line.strip()), len(body))
    last = next((k for k in range(len(body) - 1, first - 1, -1) if body[k].strip()), first - 1)
    return "\n".join(body[first : last + 1])


def _scan(text: str, allow_outlook: bool) -> _Block | str | None:
    """The first forward block in `text`, `_REPLY` if quoted reply history comes first,
    or None if there is neither."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped, depth = _dequote(line)
        stripped = stripped.strip()
        if not stripped:
            continue
        style: Style | None = None
        start = i + 1
        if _GMAIL_RE.match(stripped):
            style = "gmail"
        elif _THUNDERBIRD_RE.match(stripped):
            style = "thunderbird"
        elif _APPLE_RE.match(stripped):
            style = "apple"
        elif _OUTLOOK_RULE_RE.match(stripped):
            style = "outlook"
        else:
            label = _LABEL_RE.match(stripped)
            if label is not None and _LABELS.get(label.group(1).lower()) == "from":
                style = "outlook"  # a bare Outlook header block, no rule above it
                start = i
        if style is None:
            if _is_attribution(lines, i):
                return _REPLY
            continue
        fields, end = _header_block(lines, start, depth)
        if not _valid_block(fields, bare=start == i):
            continue  # a line that merely starts with "From:", a rule in a signature...
        if style == "outlook" and not allow_outlook:
            return _REPLY  # Outlook writes the same block above quoted replies
        note = "\n".join(lines[:i]).strip()
        return _Block(style, note, fields, _body_after(lines, end, depth))
    return None


def _valid_block(fields: dict[str, str], *, bare: bool) -> bool:
    if "from" not in fields or not fields["from"]:
        return False
    if bare:
        # A bare Outlook block: From first, then a date and a subject or recipient.
        return "date" in fields and ("subject" in fields or "to" in fields) and len(fields) >= 3
    return len(fields) >= 2


# --- addresses in blocks ------------------------------------------------------------

# A bare address is only tried where a run of address characters starts: tried from
# every character of a long run without "@", the scan would be quadratic.
_HUMAN_ADDR_RE = re.compile(
    r"[<\[](?:mailto:)?(?P<br>[^\s<>\[\]@]+@[^\s<>\[\]]+?)[>\]]"
    r"|(?<![^\s<>\[\],;:\"'()])(?P<bare>[^\s<>\[\],;:\"'()]+@[^\s<>\[\],;:\"'()]+)"
)
_MAILTO_DUP_RE = re.compile(r"<mailto:[^<>]*>")


def _human_addresses(value: str) -> list[tuple[str, str]]:
    """(name, addr) pairs from a block line: `Name <a>`, `<a>`, `a`, `Name [mailto:a]`,
    `a<mailto:a>`, `"Doe, John" <a>; b`..."""
    value = _MAILTO_DUP_RE.sub("", value.replace("*", ""))
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    pos = 0
    for m in _HUMAN_ADDR_RE.finditer(value):
        addr = (m.group("br") or m.group("bare") or "").strip(".")
        name = value[pos : m.start()]
        pos = m.end()
        name = name.strip().strip(",;").strip().strip("\"'").strip()
        if "@" in name or name.lower() == addr.lower():
            name = ""
        key = addr.lower()
        if key in seen:
            continue
        seen.add(key)
        out.append((collapse_ws(name), addr))
    if not out:
        name = collapse_ws(value.strip().strip("\"'"))
        if name:
            out.append((name, ""))
    return out


# --- HTML isolation -----------------------------------------------------------------


def _element_end(html: str, start: int, tag: str) -> int | None:
    """Index just past the close tag matching the `<tag` opening at `start`."""
    depth = 0
    for m in re.finditer(r"<(/?)" + tag + r"\b[^<>]*>", html[start:], re.I):
        if m.group(1):
            depth -= 1
            if depth == 0:
                return start + m.end()
        elif not m.group(0).endswith("/>"):
            depth += 1
    return None


_LEADING_CLOSE_RE = re.compile(
    r"(?:\s|<br\b[^<>]*>)*</(?:div|span|font|td|tr|table|tbody|blockquote|p)\s*>", re.I
)


_LEADING_SPACE_RE = re.compile(r"(?:\s|<br\b[^<>]*>)+", re.I)
_DIV_OPEN_RE = re.compile(r"<div\b", re.I)
_DIV_CLOSE_RE = re.compile(r"</div\s*>", re.I)


def _trim_unbalanced(fragment: str) -> str:
    """`fragment` without the close tags (and blank lines) it starts with, and without
    as many trailing `</div>` as it has more closes than opens. One pass each way:
    cutting one tag at a time off a copy of the string was quadratic in the number of
    tags (a megabyte of `</div>` took minutes)."""
    frag = fragment.strip()
    pos = 0
    while (m := _LEADING_CLOSE_RE.match(frag, pos)) is not None:
        pos = m.end()
    lead = _LEADING_SPACE_RE.match(frag, pos)
    if lead is not None:
        pos = lead.end()
    opens = sum(1 for _ in _DIV_OPEN_RE.finditer(frag, pos))
    closes = sum(1 for _ in _DIV_CLOSE_RE.finditer(frag, pos))
    end = len(frag)
    while end > pos and frag[end - 1].isspace():
        end -= 1
    while closes > opens and end > pos and frag[end - 1] == ">":
        lt = frag.rfind("<", pos, end)   # "</div >" holds no other "<"
        if lt < 0 or _DIV_CLOSE_RE.fullmatch(frag, lt, end) is None:
            break
        end = lt
        while end > pos and frag[end - 1].isspace():
            end -= 1
        closes -= 1
    return frag[pos:end].strip()


def _open_tag_before(html: str, pos: int, pattern: str) -> int | None:
    starts = [m.start() for m in re.finditer(pattern, html[:pos], re.I)]
    return starts[-1] if starts else None


def _isolate_html(html: str, style: Style) -> str:
    if not html:
        return ""
    if style == "gmail":
        for m in re.finditer(r"<div\b[^<>]*class=[\"'][^\"']*\bgmail_quote\b[^<>]*>", html, re.I):
            end = _element_end(html, m.start(), "div")
            if end is None:
                return ""
            inner = html[m.end() : end]
            if "Forwarded message" not in inner[:2000]:
                return ""  # the first quote is not the forward: do not guess
            attr = re.search(r"<div\b[^<>]*class=[\"'][^\"']*\bgmail_attr\b[^<>]*>", inner, re.I)
            if attr is None:
                return ""
            attr_end = _element_end(inner, attr.start(), "div")
            if attr_end is None:
                return ""
            return _trim_unbalanced(inner[attr_end : len(inner) - len("</div>")])
        return ""
    if style == "apple":
        marker = re.search(r"(?:Begin forwarded message|Anfang der weitergeleiteten Nachricht"
                           r"|Début du message réexpédié|Début du message transféré)\s*:", html, re.I)
        if marker is None:
            return ""
        bq = _open_tag_before(html, marker.start(), r"<blockquote\b[^<>]*type=[\"']cite[\"']")
        bq_end = _element_end(html, bq, "blockquote") if bq is not None else None
        if bq is None or bq_end is None or bq_end < marker.end():
            nxt = re.compile(r"<blockquote\b[^<>]*>", re.I).search(html, marker.end(), marker.end() + 600)
            if nxt is None:
                return ""
            bq = nxt.start()
            bq_end = _element_end(html, bq, "blockquote")
            if bq_end is None:
                return ""
        labels = list(
            re.finditer(
                r"<b\b[^<>]*>\s*(?:From|Subject|Date|To|Cc|Reply-To|Message-Id|Von|Betreff|Datum|An|De|Objet|À)"
                r"\s*:",
                html[:bq_end],
                re.I,
            )
        )
        labels = [lab for lab in labels if lab.start() > max(bq, marker.start())]
        if not labels:
            return ""
        last = labels[-1].start()
        div = _open_tag_before(html, last, r"<div\b")
        if div is None or div < bq:
            return ""
        div_end = _element_end(html, div, "div")
        if div_end is None or div_end > bq_end:
            return ""
        return _trim_unbalanced(html[div_end : bq_end - len("</blockquote>")])
    if style == "outlook":
        head = re.search(r"<div\b[^<>]*id=[\"']?divRplyFwdMsg\b[^<>]*>", html, re.I)
        if head is None:
            head = re.search(r"<div\b[^<>]*style=[\"'][^\"']*border-top:\s*solid[^<>]*>", html, re.I)
        if head is None:
            return ""
        end = _element_end(html, head.start(), "div")
        if end is None:
            return ""
        body_end = re.search(r"</body\s*>", html[end:], re.I)
        stop = end + body_end.start() if body_end else len(html)
        return _trim_unbalanced(html[end:stop])
    if style == "thunderbird":
        box = re.search(r"<div\b[^<>]*class=[\"'][^\"']*moz-forward-container[^<>]*>", html, re.I)
        if box is None:
            return ""
        box_end = _element_end(html, box.start(), "div")
        table = re.compile(r"<table\b[^<>]*moz-email-headers-table[^<>]*>", re.I).search(html, box.end())
        if box_end is None or table is None or table.start() > box_end:
            return ""
        table_end = _element_end(html, table.start(), "table")
        if table_end is None:
            return ""
        return _trim_unbalanced(html[table_end : box_end - len("</div>")])
    return ""


# --- reconstruction -----------------------------------------------------------------

_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def _addr_header(pairs: list[tuple[str, str]]) -> str:
    out = []
    for name, addr in pairs:
        if not addr:
            continue
        name = _CTRL_RE.sub(" ", name)
        try:
            out.append(formataddr((name, addr), charset="utf-8"))
        except (UnicodeError, ValueError):
            out.append(f"<{addr}>")  # a non-ASCII address: RFC 6532 raw UTF-8
    return ", ".join(out)


def _text_header(name: str, value: str) -> str:
    value = _CTRL_RE.sub(" ", value).strip()
    if value.isascii():
        return f"{name}: {value}"
    return f"{name}: " + Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _reconstruct(
    fields: dict[str, str],
    subject: str,
    date: datetime | None,
    text: str,
    html: str,
    forwarded_by: str,
    style: Style,
) -> bytes:
    lines: list[str] = []
    sender = _human_addresses(fields.get("from", ""))
    if _addr_header(sender):
        lines.append("From: " + _addr_header(sender))
    for key, name in (("to", "To"), ("cc", "Cc"), ("reply-to", "Reply-To")):
        value = _addr_header(_human_addresses(fields[key])) if fields.get(key) else ""
        if value:
            lines.append(f"{name}: {value}")
    if subject:
        lines.append(_text_header("Subject", subject))
    if date is not None:
        lines.append("Date: " + format_datetime(date))
    mid = fields.get("message-id", "")
    m = re.search(r"<[^<>\s]+@[^<>\s]+>", mid)
    if m:
        lines.append("Message-ID: " + m.group(0))
    lines.append(f"X-Mailgw-Unwrapped: {style}; forwarded-by=<{_CTRL_RE.sub('', forwarded_by)}>")
    content = EmailMessage(policy=email.policy.SMTP)
    content.set_content(text or "", subtype="plain", charset="utf-8", cte="quoted-printable")
    if html:
        content.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
        # Same input, same bytes: the boundary comes from the content, not from random().
        digest = hashlib.sha256((text + "\x00" + html).encode("utf-8", "replace")).hexdigest()
        content.set_boundary("mailgw-" + digest[:32])
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return head + content.as_bytes(policy=email.policy.SMTP)


# --- the two ways in ----------------------------------------------------------------


_FWD_PREFIX_RE = re.compile(
    r"^\s*(?:fwd?|fw|wg|tr|rv|enc|转发|轉寄)\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]\s*", re.I
)


def _strip_one_forward_prefix(subject: str) -> str:
    m = _FWD_PREFIX_RE.match(subject)
    return subject[m.end() :].strip() if m else subject


def _from_block(raw: bytes, parsed: ParsedMessage, block: _Block) -> Forwarded:
    fields = block.fields
    _, hint = parse_rfc_date(header_value(raw, "Date"))
    date = parse_human_date(fields["date"], hint) if fields.get("date") else None
    subject = fields.get("subject") or _strip_one_forward_prefix(parsed.subject)
    html = _isolate_html(parsed.html_body, block.style)
    reconstructed = _reconstruct(fields, subject, date, block.body, html, parsed.from_addr, block.style)
    original = parse_message(reconstructed)
    sender = _human_addresses(fields.get("from", ""))
    if sender and sender[0][0] and not original.from_name:
        original = replace(original, from_name=sender[0][0])
    return Forwarded(
        original=original,
        raw=reconstructed,
        forwarded_by=parsed.from_addr,
        note=block.note,
        style=block.style,
    )


def _unwrap(raw: bytes, parsed: ParsedMessage) -> Forwarded | None:
    kind = subject_kind(parsed.subject)
    if kind == "reply":
        return None
    allow_outlook = kind == "forward" or (kind is None and parsed.in_reply_to is None)
    # The text part first; the HTML's text when there is none or it shows no block.
    sources: list[str] = []
    if parsed.text_body.strip():
        sources.append(parsed.text_body)
    if parsed.html_body.strip():
        sources.append(html_to_text(parsed.html_body))
    for text in sources:
        found = _scan(text, allow_outlook)
        if found == _REPLY:
            return None
        if isinstance(found, _Block):
            return _from_block(raw, parsed, found)
    return _from_attachment(raw, parsed, kind)


def _from_attachment(raw: bytes, parsed: ParsedMessage, kind: str | None) -> Forwarded | None:
    if not any(a.content_type in _MESSAGE_TYPES for a in parsed.attachments):
        return None
    note_source = parsed.text_body if parsed.text_body.strip() else html_to_text(parsed.html_body)
    note = note_source.strip()
    messages = attached_messages(raw, limit=1)  # only the first one is the original
    if not messages:
        return None
    inner = messages[0]
    original = parse_message(inner)
    if not (original.from_addr or original.message_id):
        return None
    if kind != "forward":
        # No forward prefix: the subject is the original's, or the message is a short
        # note carrying that one message and nothing else but inline images.
        same_subject = bool(original.subject) and (
            normalize_subject(original.subject).casefold() == normalize_subject(parsed.subject).casefold()
        )
        others = [a for a in parsed.attachments if not a.inline and a.content_type not in _MESSAGE_TYPES]
        only_message = not others and len(parsed.attachments) - sum(a.inline for a in parsed.attachments) == 1
        if not same_subject and not (only_message and len(collapse_ws(note)) <= NOTE_LIMIT):
            return None
    return Forwarded(
        original=original, raw=inner, forwarded_by=parsed.from_addr, note=note, style="attachment"
    )
