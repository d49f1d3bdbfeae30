"""Pull what the CRM store shows (addresses, subject, date, snippet) out of raw message bytes."""

from __future__ import annotations

import email
import email.header
import email.policy
import html
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage

from gateway.pipeline.headers import addresses, get_header, parse_date, split_message

_TAG_RE = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.S | re.I)
_WS_RE = re.compile(r"\s+")
SNIPPET_MAX_PARSE = 1024 * 1024


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


def snippet_of(data: bytes, limit: int = 200) -> str:
    if len(data) > SNIPPET_MAX_PARSE:
        return ""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        text = part.get_content()
    except (LookupError, UnicodeDecodeError, AssertionError, KeyError):
        return ""
    if not isinstance(text, str):
        return ""
    if part.get_content_subtype() == "html":
        text = html.unescape(_TAG_RE.sub(" ", text))
    return _WS_RE.sub(" ", text).strip()[:limit]


def summarize(data: bytes) -> Summary:
    header, _ = split_message(data)
    from_list = addresses(header, "From")
    return Summary(
        message_id=(get_header(header, "Message-ID") or "").strip(),
        from_addr=from_list[0] if from_list else "",
        to_addrs=addresses(header, "To"),
        cc_addrs=addresses(header, "Cc"),
        subject=_decode_subject(get_header(header, "Subject")),
        date=parse_date(get_header(header, "Date")),
        snippet=snippet_of(data),
    )
