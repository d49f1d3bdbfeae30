"""Read delivery reports, read receipts and feedback reports: who, what happened, about which message.

:func:`parse_report` turns the bytes of one report into a :class:`Report`, or None when
the message is no report it can read. Pure: no I/O, never raises on any input. What it
reads:

- **RFC 3464 delivery status notifications** (``multipart/report;
  report-type=delivery-status``, or any message with a ``message/delivery-status``
  part): the per-message fields (``Reporting-MTA``, ``Original-Envelope-Id``,
  ``Arrival-Date``, the gateway's own ``X-Mailgw-Queue-ID``) and one
  :class:`ReportItem` per per-recipient block (``Final-Recipient``,
  ``Original-Recipient``, ``Action``, ``Status``, ``Remote-MTA``, ``Diagnostic-Code``).
  Postfix, Exim, Sendmail, Gmail (``mailer-daemon@googlemail.com``), Microsoft 365 /
  Exchange Online and the gateway itself send this shape.
- **Non-standard notices** (plain text, from ``MAILER-DAEMON`` / ``postmaster`` or with
  ``X-Failed-Recipients``): Yahoo's "Sorry, we were unable to deliver your message to
  the following address" with ``<address>:`` and the server's reply on the next line,
  qmail's, Gmail's older "Delivery to the following recipient failed permanently",
  Exim's "The following address(es) failed", Exchange's older "Your message did not
  reach some or all of the intended recipients" / "couldn't be delivered". The
  recipient comes from ``X-Failed-Recipients`` or the text, the status from the first
  enhanced status code (RFC 3463) in the reply, ``delayed`` from the usual delay
  wording ("has been delayed", "will retry", "Delivery Status Notification (Delay)").
- **RFC 8098 read receipts** (``report-type=disposition-notification``): the
  ``Final-Recipient`` and ``Disposition`` (``displayed``, ``deleted``, ...) of the
  ``message/disposition-notification`` part, and its ``Original-Message-ID``.
- **RFC 5965 feedback reports** (``report-type=feedback-report``, ARF): the
  ``Feedback-Type`` (``abuse``, ``fraud``, ...) and ``Original-Rcpt-To``; where a
  provider redacts the recipient, the ``To`` of the returned message.

Which message a report is about: :attr:`Report.original_message_id` (the returned
headers' ``Message-ID``, or the receipt's ``Original-Message-ID``), :attr:`Report.queue_ids`
(the gateway's queue ids: ``X-Mailgw-Queue-ID`` and the ``id`` of the gateway's own
``Received`` trace line in the returned headers, which says ``(mailgw)``), and
:attr:`Report.envelope_id` (``Original-Envelope-Id``). A report whose returned
message is missing matches by these alone; the matching itself is the store's
(:mod:`gateway.crm.bounces`).
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal

from gateway.mail.parse import PARSE_LIMIT, message_id_key
from gateway.mail.text import decode_bytes, decode_words, html_to_text

ReportType = Literal["delivery", "read_receipt", "feedback"]
#: Actions of RFC 3464 §2.3.3, lower case; anything else reads as ``failed``.
ACTIONS: tuple[str, ...] = ("failed", "delayed", "delivered", "relayed", "expanded")
MAX_ITEMS = 100
TEXT_SCAN = 64 * 1024
MAX_COPY_MARKERS = 5
"""Copy markers ("--- returned message") tried for the returned message's headers."""
DIAGNOSTIC_MAX = 500

_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE = re.compile(r"(?<!\d)([45]\d\d)(?:[ :-]|$)")
_ADDR = r"[^\s<>@\"(),;:]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
_ADDR_RE = re.compile(_ADDR)
#: `_ADDR` only where a run of local-part characters starts: a search with it never
#: re-scans a long run without an "@" from each of its characters (see `_addresses_in`).
_ADDR_AT_RUN_RE = re.compile(r"(?<![^\s<>@\"(),;:])" + _ADDR)
_SYSTEM_LOCALS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon")
#: plain-text phrasings that put the failed recipient after them (first match wins)
_RECIPIENT_PHRASES = [
    re.compile(p, re.IGNORECASE | re.DOTALL) for p in (
        r"delivery to the following recipients? (?:failed|has been delayed)[^\n]*\n\s*(" + _ADDR + ")",
        r"the following address(?:\(es\)|es)? failed:\s*\n\s*<?(" + _ADDR + ")",
        r"your message (?:wasn't|was not|could not be|couldn't be) delivered to <?(" + _ADDR + ")",
        r"your message to <?(" + _ADDR + r")>? (?:couldn't|could not|can't|cannot) be delivered",
        # the address after any prefix ending in a non-address character ("Name"<a@b>,
        # 'a@b', x:a@b); tried only there, so the scan of a long line stays linear
        r"the following recipient\(s\) (?:could not|cannot) be reached:\s*\n\s*"
        r"(?:\S*?[<>@\"(),;:'])??(" + _ADDR + ")",
        r"unable to deliver your message to the following address(?:es)?\.?\s*\n\s*<(" + _ADDR + ")>",
        r"delivery has failed to these recipients or groups:\s*\n\s*<?(" + _ADDR + ")",
        r"\n\s*<(" + _ADDR + r")>:\s*\n",
    )]
_DELAY_WORDS = re.compile(
    r"has been delayed|delivery (?:is )?delayed|will (?:continue to )?retry|still trying|"
    r"delivery incomplete|not yet been delivered|temporar(?:y|ily) (?:failure|problem|unavailable)|"
    r"\(delay\)|warning: message .{0,80} delayed", re.IGNORECASE)
_FAIL_WORDS = re.compile(
    r"failed permanently|permanent (?:error|failure|fatal)|could not be delivered|couldn't be delivered|"
    r"wasn't delivered|was not delivered|undeliverable|unable to deliver|delivery (?:has )?failed|"
    r"did not reach|returned mail|failure notice|delivery status notification \(failure\)|"
    r"user unknown|no such user|does not exist|mailbox unavailable|address rejected",
    re.IGNORECASE)
#: text that says the address is bad when the server gave no enhanced status (Yahoo's
#: "dd This user doesn't have a yahoo.com account", qmail's "no mailbox here by that name")
_HARD_WORDS = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address)|"
    r"(?:user|mailbox|address|account|recipient)(?: [\w.]+)? (?:does not|doesn't) exist|"
    r"doesn't have a [\w.-]+ account|not a valid (?:recipient|mailbox|user)|invalid (?:recipient|mailbox)|"
    r"no mailbox here|recipient (?:address )?rejected|mailbox (?:not found|unavailable)|"
    r"account (?:has been )?disabled|host (?:or domain name )?not found|domain not found",
    re.IGNORECASE)
#: where a plain-text notice starts its copy of the returned message
_COPY_MARKERS = re.compile(
    r"^(?:-{2,} ?(?:below this line is a copy of the message|original message|"
    r"this is a copy of the message[^\n]*|the header of the original message is following|"
    r"original message header[s]?|message header follows|returned message)[^\n]*|"
    r"original message headers:[ \t]*)$",
    re.IGNORECASE | re.MULTILINE)
_MAILGW_RECEIVED = re.compile(r"\(mailgw\)\s+with\s+\S+\s+id\s+([A-Za-z0-9._-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ReportItem:
    """What a report says about one recipient."""

    recipient: str                  # lower-cased address (Final-Recipient)
    action: str                     # failed | delayed | delivered | relayed | expanded
    status: str | None = None       # enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None   # the remote server's words
    remote_mta: str | None = None
    original_recipient: str | None = None
    hard: bool = False              # a permanent failure that says the address is bad


@dataclass(frozen=True)
class Report:
    """One delivery report, read receipt or feedback report."""

    type: ReportType
    format: str                     # rfc3464 | notice | rfc8098 | rfc5965
    items: tuple[ReportItem, ...] = ()
    original_message_id: str | None = None   # with its <>, as written
    queue_ids: tuple[str, ...] = ()          # the gateway's queue ids it names
    envelope_id: str | None = None
    reporting_mta: str | None = None
    returned_to: tuple[str, ...] = ()        # To/Cc of the returned headers (lower case)
    disposition: str | None = None           # read receipts: displayed, deleted, ...
    feedback_type: str | None = None         # feedback reports: abuse, fraud, ...
    notes: tuple[str, ...] = field(default=())

    @property
    def message_id_key(self) -> str:
        """The store's key for the original Message-ID ("" without one)."""
        return message_id_key(self.original_message_id) if self.original_message_id else ""


# -- VERP ---------------------------------------------------------------------------------


def verp_address(return_path: str, queue_id: str) -> str:
    """The envelope sender of one spool copy: ``<local>+<queue id>@<domain>`` for the
    configured ``delivery.return_path`` ``<local>@<domain>``."""
    local, _, domain = return_path.rpartition("@")
    return f"{local}+{queue_id}@{domain}"


def verp_queue_id(envelope_to: str | None, return_path: str | None) -> str | None:
    """The queue id in a VERP bounce address :func:`verp_address` made (local part and
    domain compared case-insensitively), else None."""
    if not envelope_to or not return_path or "@" not in return_path:
        return None
    local, _, domain = return_path.strip().lower().rpartition("@")
    got_local, at, got_domain = envelope_to.strip().strip("<>").rpartition("@")
    if not at or got_domain.lower() != domain:
        return None
    base, plus, tag = got_local.partition("+")
    if not plus or base.lower() != local or not tag or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", tag):
        return None
    return tag


# -- entry point -------------------------------------------------------------------------


def parse_report(raw: bytes) -> Report | None:
    """The report `raw` is, or None (no report, or nothing in it can be read)."""
    if not raw or len(raw) > PARSE_LIMIT:
        return None
    try:
        msg = email.message_from_bytes(raw)
        return _parse(msg)
    except Exception:     # a parser of outside bytes: anything unreadable is "no report"
        return None


def _parse(msg: Message) -> Report | None:
    parts = list(_walk(msg))
    types = {p.get_content_type() for p in parts}
    rtype = (msg.get_param("report-type", header="content-type") or "")
    rtype = rtype.lower() if isinstance(rtype, str) else ""
    if rtype == "feedback-report" or "message/feedback-report" in types:
        return _feedback(msg, parts)
    if rtype == "disposition-notification" or "message/disposition-notification" in types:
        return _receipt(msg, parts)
    if rtype == "delivery-status" or "message/delivery-status" in types \
            or "message/global-delivery-status" in types:
        report = _dsn(msg, parts)
        if report is not None and report.items:
            return report
    return _notice(msg, parts)


def _walk(msg: Message, depth: int = 0) -> list[Message]:
    """The parts of `msg` (itself first), not descending into attached messages."""
    out = [msg]
    if depth > 8:
        return out
    payload = msg.get_payload()
    if msg.get_content_maintype() == "multipart" and isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                out += _walk(sub, depth + 1)
    return out


# -- field blocks (message/delivery-status and friends) ----------------------------------


def _blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a message/*-status part: [{lower name: value}, ...]."""
    payload = part.get_payload()
    if isinstance(payload, list):   # the stdlib parsed the blocks as header-only messages
        blocks = []
        for sub in payload:
            if isinstance(sub, Message):
                blocks.append({k.lower(): _clean(str(v)) for k, v in sub.items()})
        if any(blocks):
            return [b for b in blocks if b]
        payload = ""
    text = _text_of(part) if not isinstance(payload, str) else payload
    if part.get("content-transfer-encoding", "").lower() in ("base64", "quoted-printable"):
        text = _text_of(part)
    return _text_blocks(text)


def _text_blocks(text: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text.strip()):
        # a field's value and its continuation lines, joined once at the end (adding each
        # line to a growing string was quadratic in a flood of continuation lines)
        block: dict[str, list[str]] = {}
        name = None
        for line in chunk.splitlines():
            if line[:1] in (" ", "\t") and name is not None:
                block[name].append(line.strip())
                continue
            key, sep, value = line.partition(":")
            if not sep or not key.strip() or " " in key.strip():
                name = None
                continue
            name = key.strip().lower()
            block.setdefault(name, [value.strip()])
        if block:
            out.append({k: _clean(" ".join(v)) for k, v in block.items()})
    return out


def _clean(value: str) -> str:
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _typed(value: str | None) -> str:
    """The value after an RFC 3464 type prefix (``rfc822; a@b`` -> ``a@b``)."""
    if not value:
        return ""
    kind, sep, rest = value.partition(";")
    return (rest if sep and " " not in kind.strip() else value).strip()


def _addresses_in(text: str, limit: int | None = None) -> list[str]:
    """What `_ADDR_RE.findall(text)` finds (the first `limit` of them), in linear time.

    A plain search restarts at every character of a long run without an "@" and scans
    the run again each time. A run that fails from its first character fails from any
    later one (the local part cannot hold an "@"), so a match is only tried where a run
    starts, or right where the previous match ended (findall would try there too)."""
    out: list[str] = []
    pos = 0
    while limit is None or len(out) < limit:
        m = _ADDR_RE.match(text, pos) if out else None
        if m is None:
            m = _ADDR_AT_RUN_RE.search(text, pos)
        if m is None:
            break
        out.append(m.group(0))
        pos = m.end()
    return out


def _address(value: str | None) -> str:
    text = _typed(value).strip().strip("<>").strip()
    found = _addresses_in(text, 1)
    return found[0].lower() if found else ""


def _status_of(*texts: str | None) -> str | None:
    for t in texts:
        if t:
            m = _STATUS.search(t)
            if m:
                return ".".join(m.groups())
    return None


def _hard(action: str, status: str | None, diagnostic: str | None) -> bool:
    if action != "failed":
        return False
    if status is not None:
        return status.startswith("5.")
    return bool(diagnostic and _HARD_WORDS.search(diagnostic))


# -- returned headers ---------------------------------------------------------------------


@dataclass
class _Returned:
    message_id: str | None = None
    queue_ids: list[str] = field(default_factory=list)
    to: list[str] = field(default_factory=list)


def _returned(parts: list[Message], text: str) -> _Returned:
    """The headers of the returned message: an attached message/rfc822, a
    text/rfc822-headers part, or a copy in the notice's text."""
    out = _Returned()
    for p in parts:
        ctype = p.get_content_type()
        header: Message | None = None
        if ctype in ("message/rfc822", "message/global"):
            payload = p.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                header = payload[0]
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers",
                       "text/rfc822-header", "message/global-headers"):
            header = email.message_from_string(_text_of(p).lstrip())
        if header is not None:
            _read_header(out, header)
            if out.message_id or out.queue_ids:
                return out
    for tried, m in enumerate(_COPY_MARKERS.finditer(text)):
        if tried >= MAX_COPY_MARKERS:
            break
        # only the copy's header block: reading the rest of the text again for every
        # marker was quadratic (thousands of marker lines took seconds)
        copy = text[m.end():m.end() + TEXT_SCAN].lstrip("\r\n")
        blank = re.search(r"\r?\n[ \t]*\r?\n", copy)
        header = email.message_from_string(copy[:blank.start() + 1] if blank else copy)
        _read_header(out, header)
        if out.message_id or out.queue_ids:
            return out
    found = re.search(r"^\s*Message-ID:\s*(<[^>\s]+>)", text, re.IGNORECASE | re.MULTILINE)
    if found and out.message_id is None:
        out.message_id = found.group(1)
    return out


def _read_header(out: _Returned, header: Message) -> None:
    mid = header.get("message-id")
    if mid and out.message_id is None:
        m = re.search(r"<[^<>\s]+>", str(mid))
        out.message_id = m.group(0) if m else _clean(str(mid)) or None
    for q in header.get_all("x-mailgw-queue-id") or []:
        out.queue_ids.append(_clean(str(q)))
    for rcv in header.get_all("received") or []:
        m = _MAILGW_RECEIVED.search(_clean(str(rcv)))
        if m:
            out.queue_ids.append(m.group(1))
    for name in ("to", "cc"):
        for v in header.get_all(name) or []:
            out.to += [a.lower() for a in _addresses_in(decode_words(str(v)))]


# -- RFC 3464 -------------------------------------------------------------------------------


def _dsn(msg: Message, parts: list[Message]) -> Report | None:
    status_part = next((p for p in parts if p.get_content_type() in
                        ("message/delivery-status", "message/global-delivery-status")), None)
    if status_part is None:
        return None
    blocks = _blocks(status_part)
    if not blocks:
        return None
    per_msg = blocks[0] if not _is_rcpt_block(blocks[0]) else {}
    items: list[ReportItem] = []
    for b in blocks:
        if not _is_rcpt_block(b):
            continue
        rcpt = _address(b.get("final-recipient")) or _address(b.get("original-recipient"))
        if not rcpt:
            continue
        action = (b.get("action") or "failed").split()[0].lower() if b.get("action") else "failed"
        if action not in ACTIONS:
            action = "failed"
        diagnostic = _typed(b.get("diagnostic-code")) or None
        status = _status_of(b.get("status")) or _status_of(diagnostic)
        items.append(ReportItem(
            recipient=rcpt, action=action, status=status,
            diagnostic=diagnostic[:DIAGNOSTIC_MAX] if diagnostic else None,
            remote_mta=_typed(b.get("remote-mta")) or None,
            original_recipient=_address(b.get("original-recipient")) or None,
            hard=_hard(action, status, diagnostic)))
        if len(items) >= MAX_ITEMS:
            break
    ret = _returned(parts, _body_text(parts))
    queue_ids = [*([_clean(per_msg["x-mailgw-queue-id"])] if per_msg.get("x-mailgw-queue-id") else []),
                 *ret.queue_ids]
    return Report(type="delivery", format="rfc3464", items=tuple(items),
                  original_message_id=ret.message_id, queue_ids=tuple(dict.fromkeys(queue_ids)),
                  envelope_id=per_msg.get("original-envelope-id") or None,
                  reporting_mta=_typed(per_msg.get("reporting-mta")) or None,
                  returned_to=tuple(dict.fromkeys(ret.to)))


def _is_rcpt_block(b: dict[str, str]) -> bool:
    return "final-recipient" in b or "original-recipient" in b or "action" in b


# -- non-standard notices --------------------------------------------------------------------


def _notice(msg: Message, parts: list[Message]) -> Report | None:
    sender = _address(msg.get("from", ""))
    failed_hdr = [a.lower() for v in msg.get_all("x-failed-recipients") or []
                  for a in _addresses_in(str(v))]
    subject = decode_words(_clean(str(msg.get("subject", ""))))
    system = sender.split("@", 1)[0] in _SYSTEM_LOCALS
    if not failed_hdr and not system:
        return None
    text = _body_text(parts)
    head = text[:TEXT_SCAN]
    copy_at = _COPY_MARKERS.search(head)
    explanation = head[:copy_at.start()] if copy_at else head
    recipients = failed_hdr
    if not recipients:
        for phrase in _RECIPIENT_PHRASES:
            m = phrase.search(explanation)
            if m:
                recipients = [m.group(1).lower()]
                break
    if not recipients:
        return None
    delayed = bool(_DELAY_WORDS.search(subject) or _DELAY_WORDS.search(explanation)) \
        and not _FAIL_WORDS.search(subject)
    if not delayed and not (_FAIL_WORDS.search(subject) or _FAIL_WORDS.search(explanation)
                            or failed_hdr):
        return None
    action = "delayed" if delayed else "failed"
    items = []
    for rcpt in dict.fromkeys(recipients):
        diagnostic = _diagnostic_near(explanation, rcpt)
        status = _status_of(diagnostic)
        if status is None and diagnostic:
            code = _SMTP_CODE.search(diagnostic)
            if code and action == "failed" and code.group(1).startswith("4"):
                action = "delayed"
        items.append(ReportItem(recipient=rcpt, action=action, status=status,
                                diagnostic=diagnostic, hard=_hard(action, status, diagnostic)))
        if len(items) >= MAX_ITEMS:
            break
    ret = _returned(parts, text)
    return Report(type="delivery", format="notice", items=tuple(items),
                  original_message_id=ret.message_id, queue_ids=tuple(dict.fromkeys(ret.queue_ids)),
                  reporting_mta=sender.split("@", 1)[1] if "@" in sender else None,
                  returned_to=tuple(dict.fromkeys(ret.to)))


def _diagnostic_near(text: str, rcpt: str) -> str | None:
    """The server's words about `rcpt` in a notice: the lines after the address that
    carry an SMTP reply code or an enhanced status, else the first such line anywhere."""
    at = text.lower().find(rcpt)
    windows = [text[at + len(rcpt):at + len(rcpt) + 2000]] if at >= 0 else []
    windows.append(text)
    for window in windows:
        lines = [ln.strip().strip(">#").strip() for ln in window.splitlines()]
        for line in lines:
            if line and (_STATUS.search(line) or _SMTP_CODE.match(line)):
                return _clean(line)[:DIAGNOSTIC_MAX]
        for line in lines:
            if line and _HARD_WORDS.search(line):
                return _clean(line)[:DIAGNOSTIC_MAX]
    return None


# -- RFC 8098 / RFC 5965 ----------------------------------------------------------------------


def _receipt(msg: Message, parts: list[Message]) -> Report | None:
    part = next((p for p in parts if p.get_content_type() in
                 ("message/disposition-notification", "message/global-disposition-notification")),
                None)
    if part is None:
        return None
    fields: dict[str, str] = {}
    for b in _blocks(part):
        for k, v in b.items():
            fields.setdefault(k, v)
    rcpt = _address(fields.get("final-recipient")) or _address(fields.get("original-recipient")) \
        or _address(msg.get("from", ""))
    if not rcpt:
        return None
    disposition = fields.get("disposition", "")
    kind = disposition.split(";", 1)[-1].split("/", 1)[0].strip().lower() if disposition else ""
    ret = _returned(parts, "")
    mid = fields.get("original-message-id")
    if mid:
        m = re.search(r"<[^<>\s]+>", mid)
        mid = m.group(0) if m else mid
    return Report(type="read_receipt", format="rfc8098",
                  items=(ReportItem(recipient=rcpt, action="delivered"),),
                  original_message_id=mid or ret.message_id, queue_ids=tuple(ret.queue_ids),
                  reporting_mta=_typed(fields.get("reporting-ua")) or None,
                  returned_to=tuple(ret.to), disposition=kind or None)


def _feedback(msg: Message, parts: list[Message]) -> Report | None:
    part = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields: dict[str, str] = {}
    if part is not None:
        for b in _blocks(part):
            for k, v in b.items():
                fields.setdefault(k, v)
    ret = _returned(parts, _body_text(parts))
    rcpts = [a for v in (fields.get("original-rcpt-to"), fields.get("removal-recipient"))
             if v and (a := _address(v))]
    if not rcpts:
        rcpts = [a for a in ret.to if "redacted" not in a]
    if not rcpts:
        return None
    ftype = (fields.get("feedback-type") or "abuse").split()[0].lower()
    return Report(type="feedback", format="rfc5965",
                  items=tuple(ReportItem(recipient=r, action="delivered") for r in dict.fromkeys(rcpts)),
                  original_message_id=ret.message_id, queue_ids=tuple(dict.fromkeys(ret.queue_ids)),
                  envelope_id=fields.get("original-envelope-id") or None,
                  reporting_mta=_typed(fields.get("reporting-mta")) or fields.get("user-agent") or None,
                  returned_to=tuple(ret.to), feedback_type=ftype)


# -- text -------------------------------------------------------------------------------------


def _text_of(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    return decode_bytes(data[:TEXT_SCAN * 4], part.get_content_charset())


def _body_text(parts: list[Message]) -> str:
    """The human-readable text of a report: its text/plain parts (text/html as text
    where there is no plain one), not those of the returned message."""
    plain = [p for p in parts if p.get_content_type() == "text/plain"]
    if plain:
        return "\n".join(_text_of(p) for p in plain)[:TEXT_SCAN * 2]
    html = [p for p in parts if p.get_content_type() == "text/html"]
    return "\n".join(html_to_text(_text_of(p)) for p in html)[:TEXT_SCAN * 2]
