"""Write delivery status notifications (RFC 3464 bounces), and recognise them.

`build_dsn()` returns the bytes of a `multipart/report; report-type=delivery-status`
message, CRLF line endings throughout and every line we write under 998 octets::

    multipart/report
    ├── text/plain                  what happened, per recipient, for a person
    ├── message/delivery-status     Reporting-MTA, Arrival-Date; per recipient
    │                               Final-Recipient, Action, Status, Remote-MTA,
    │                               Diagnostic-Code (RFC 3464 section 2)
    └── text/rfc822-headers         the original header block (include='headers')
        or message/rfc822           the whole original (include='full')

Recipients whose result is temporary (4xx) are reported, when `final`, with
Status 4.4.7 (delivery time expired) and Action: failed, the last reply kept as
the Diagnostic-Code; with `final=False` the report is a delay warning (Action:
delayed; the scheduler sends one when an account's credentials hold a message up,
with a `note` that says so). Non-ASCII addresses or headers (SMTPUTF8 mail) switch
the parts to their RFC 6533 `message/global-*` forms.

`is_bounce()` tells the scheduler that a message is itself a bounce or an
automatic reply, so that no DSN is ever sent about a DSN.
"""

from __future__ import annotations

import email.utils
import quopri
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Literal

from gateway.delivery.transport import RcptResult
from gateway.mail.headers import header_block

__all__ = ["build_dsn", "is_bounce"]

_CRLF = b"\r\n"
_MAX_LINE = 998
_REMOTE = re.compile(r"^(?P<host>[^\[\]]*?)(?:\[(?P<ip>[^\]]*)\])?(?::(?P<port>\d+))?$")


def build_dsn(*, reporting_mta: str, original: bytes, envelope_from: str,
              failed: Sequence[RcptResult], arrival: datetime, queue_id: str,
              final: bool = True, include: Literal["headers", "full"] = "headers",
              now: datetime | None = None, note: str | None = None) -> bytes:
    """The DSN for `failed` recipients of `original`, addressed to `envelope_from`;
    `note`, a paragraph for the person, says why (it follows the introduction)."""
    now = now or datetime.now(UTC)
    original_header = _normalize(header_block(original))
    utf8 = (not envelope_from.isascii() or any(not r.rcpt.isascii() for r in failed)
            or not original_header.isascii())
    boundary = f"=_mailgw_{secrets.token_hex(12)}"

    text = _human_text(reporting_mta, failed, final, note)
    text_bytes, text_headers = _text_part(text)

    status = _status_fields(reporting_mta, queue_id, arrival, failed, final, now)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"

    if include == "full":
        body = _normalize(original)
        third_type = "message/global" if not original_header.isascii() else "message/rfc822"
        third = body
        third_desc = "Undelivered Message" if final else "Delayed Message"
    else:
        third_type = "message/global-headers" if not original_header.isascii() \
            else "text/rfc822-headers"
        third = b"".join(_clip(line) + _CRLF for line in original_header.split(_CRLF) if line)
        third_desc = "Undelivered Message Headers" if final else "Delayed Message Headers"
    eight_bit = not (text_bytes.isascii() and status.isascii() and third.isascii())

    subject = ("Undelivered Mail Returned to Sender" if final
               else "Delayed Mail (still being retried)")
    head = [
        f"Date: {email.utils.format_datetime(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: {envelope_from}",
        f"Subject: {subject}",
        f"Message-ID: {email.utils.make_msgid('dsn', domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if eight_bit:
        head.append("Content-Transfer-Encoding: 8bit")
    out: list[bytes] = [_lines(head), _CRLF,
                        b"This is a MIME-encapsulated message.\r\n", _CRLF]

    def part(headers: Iterable[str], content: bytes) -> None:
        out.append(f"--{boundary}\r\n".encode())
        out.append(_lines(headers))
        out.append(_CRLF)
        out.append(content if content.endswith(_CRLF) else content + _CRLF)
        out.append(_CRLF)

    part(["Content-Description: Notification", *text_headers], text_bytes)
    part(["Content-Description: Delivery report", f"Content-Type: {status_type}",
          *(["Content-Transfer-Encoding: 8bit"] if not status.isascii() else [])], status)
    part([f"Content-Description: {third_desc}", f"Content-Type: {third_type}",
          *(["Content-Transfer-Encoding: 8bit"] if not third.isascii() else [])], third)
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def is_bounce(envelope_from: str, data: bytes) -> bool:
    """True for a null sender, a delivery-status report, or Auto-Submitted other than `no`."""
    if envelope_from.strip() in ("", "<>"):
        return True
    msg = BytesHeaderParser().parsebytes(header_block(data) + b"\r\n\r\n")
    auto = msg.get("Auto-Submitted")
    if auto is not None and str(auto).split(";")[0].strip().lower() not in ("", "no"):
        return True
    if msg.get_content_type() == "multipart/report":
        report_type = msg.get_param("report-type")
        if isinstance(report_type, str) and report_type.strip().lower() == "delivery-status":
            return True
    return False


# -- parts ------------------------------------------------------------------------------


def _human_text(reporting_mta: str, failed: Sequence[RcptResult], final: bool,
                note: str | None = None) -> str:
    if final:
        intro = ("I'm sorry to have to inform you that your message could not be delivered "
                 "to one or more recipients. Its headers are attached below.")
    else:
        intro = ("This is a warning only: your message has not yet been delivered to one or "
                 "more recipients. Delivery will be retried; you do not need to send it again.")
    paras = [f"This is the mail system at host {reporting_mta}.", intro,
             *([" ".join(note.split())] if note else []),
             "For further assistance, please contact your postmaster."]
    lines: list[str] = []
    for p in paras:
        lines.extend(textwrap.wrap(p, 72))
        lines.append("")
    lines.append("                   The mail system")
    lines.append("")
    for r in failed:
        host = _remote_host(r.remote)
        what = r.reply
        if r.temporary and final and r.status != "4.4.7":
            what = f"delivery time expired; last reply: {r.reply}"
        if host:
            what = f"host {r.remote} said: {what}"
        lines.extend(textwrap.wrap(f"<{r.rcpt}>: {what}", 72, subsequent_indent="    ",
                                   break_long_words=True, break_on_hyphens=False))
        lines.append("")
    return "\n".join(lines)


def _text_part(text: str) -> tuple[bytes, list[str]]:
    if text.isascii():
        body = text.replace("\n", "\r\n").encode("ascii")
        return body, ["Content-Type: text/plain; charset=us-ascii"]
    qp = quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n")
    return (qp.replace(b"\n", b"\r\n"),
            ["Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: quoted-printable"])


def _status_fields(reporting_mta: str, queue_id: str, arrival: datetime,
                   failed: Sequence[RcptResult], final: bool, now: datetime) -> bytes:
    blocks: list[list[str]] = [[
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailgw-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(_aware(arrival))}",
    ]]
    for r in failed:
        addr_type = "rfc822" if r.rcpt.isascii() else "utf-8"
        if r.temporary:
            action, status = ("failed", "4.4.7") if final else ("delayed", r.status)
        elif r.ok:
            action, status = "delivered", r.status
        else:
            action, status = "failed", r.status
        fields = [f"Final-Recipient: {addr_type}; {r.rcpt}", f"Action: {action}",
                  f"Status: {status}"]
        host = _remote_host(r.remote)
        if host:
            fields.append(f"Remote-MTA: dns; {host}")
        kind = "smtp" if host else "X-Mailgw"
        fields.append(_fold(f"Diagnostic-Code: {kind}; {r.reply}"))
        fields.append(f"Last-Attempt-Date: {email.utils.format_datetime(now)}")
        blocks.append(fields)
    return _CRLF.join(_lines(b) for b in blocks)


# -- helpers ----------------------------------------------------------------------------


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _remote_host(remote: str | None) -> str | None:
    if not remote:
        return None
    m = _REMOTE.match(remote)
    host = m.group("host") if m else remote
    return host or (m.group("ip") if m else None) or None


def _normalize(data: bytes) -> bytes:
    """Any of CRLF, LF or lone CR -> CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _clip(line: bytes) -> bytes:
    return line if len(line) <= _MAX_LINE - 2 else line[:_MAX_LINE - 2]


def _fold(field: str, width: int = 76) -> str:
    """Fold a long structured field at spaces (continuation lines start with a space)."""
    field = field if len(field) <= _MAX_LINE - 8 else field[:_MAX_LINE - 11] + "..."
    if len(field) <= width:
        return field
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


def _lines(lines: Iterable[str]) -> bytes:
    return b"".join(line.encode("utf-8") + _CRLF for line in lines)
