"""Turn one accepted SMTP transaction into a durable queue entry (the relay's `cleanup`).

The SMTP handler calls `Relay.accept()` after DATA; it returns the queue id only
once the message is fsynced into the spool, and raises a MailError (with its
reply code) otherwise. Here the message gets its trace header (`Received:`), a
`Message-ID:` and `Date:` when the client left them out (RFC 6409 §8), and loses its
`Bcc:` field. The body is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

from gateway.errors import PermanentFailure
from gateway.pipeline.headers import get_header, make_message_id, split_message, strip_fields
from gateway.spool import Envelope, Recipient, Spool, new_queue_id


@dataclass
class Submission:
    """What the SMTP edge learned about one transaction."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    client_ip: str | None = None
    client_helo: str | None = None
    user: str | None = None          # SMTP AUTH login, None for a trusted network
    account: str | None = None
    tls: bool = False
    esmtp: bool = True
    extra: dict[str, str] = field(default_factory=dict)


def received_header(sub: Submission, hostname: str, qid: str, now: float) -> bytes:
    proto = "ESMTP" if sub.esmtp else "SMTP"
    if sub.esmtp and sub.tls:
        proto += "S"
    if sub.esmtp and sub.user:
        proto += "A"
    helo = (sub.client_helo or "unknown").replace("\r", "").replace("\n", "")[:200]
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    line = (f"Received: from {helo} ([{sub.client_ip or 'unknown'}])\r\n"
            f"\tby {hostname} (mailgw) with {proto} id {qid}")
    if len(sub.rcpts) == 1:
        line += f"\r\n\tfor <{sub.rcpts[0]}>"
    line += f"; {date}\r\n"
    return line.encode("utf-8", "replace")


def prepare(sub: Submission, hostname: str, qid: str, now: float,
            trace: bool = True) -> tuple[bytes, str]:
    """Trace header on top (unless `trace` is false), Message-ID/Date added if missing, Bcc
    removed; body untouched. Returns the bytes and the Message-ID."""
    header, body = split_message(sub.data)
    has_separator = len(header) + 2 + len(body) == len(sub.data)
    if not header:
        raise PermanentFailure("Message has no header", code=550, status="5.6.0")
    added = received_header(sub, hostname, qid, now) if trace else b""
    message_id = get_header(header, "Message-ID")
    if not message_id:
        message_id = make_message_id(hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    if get_header(header, "Date") is None:
        date = format_datetime(datetime.fromtimestamp(now, UTC))
        added += f"Date: {date}\r\n".encode()
    if b"bcc" in header.lower():
        header = strip_fields(header, {"Bcc", "Resent-Bcc"})
    if has_separator:
        return added + header + b"\r\n" + body, message_id.strip()
    return added + header, message_id.strip()


class Relay:
    """Accepts submissions into the spool and tells the scheduler about them."""

    def __init__(self, spool: Spool, hostname: str,
                 on_queued: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.hostname = hostname
        self.on_queued = on_queued
        self.accepted = 0

    async def accept(self, sub: Submission) -> str:
        now = time.time()
        qid = new_queue_id(now)
        data, message_id = prepare(sub, self.hostname, qid, now)
        env = Envelope(
            id=qid,
            mail_from=sub.mail_from,
            recipients=[Recipient(addr=r) for r in sub.rcpts],
            received_at=now,
            user=sub.user,
            account=sub.account,
            client_ip=sub.client_ip,
            client_helo=sub.client_helo,
            message_id=message_id,
        )
        await self.spool.put(env, data)  # raises SpoolError -> 451 4.3.0
        self.accepted += 1
        if self.on_queued is not None:
            self.on_queued(qid)
        return qid
