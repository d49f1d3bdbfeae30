"""The CRM's records: the values every path hands the store, and the sink protocol they go through.

The relay hands over an :class:`AcceptedMessage` (with its spool :class:`Copy` entries),
delivery and tracking report :class:`EventRecord` values through an :class:`EventSink`,
ingest and IMAP hand over :class:`NewMessage` values with the :class:`SourceRef` of the
path they came by. These are plain values: no database, no I/O. The vocabulary
(directions, event types, sources) is defined here and the tables check it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway.mail.autoreply import classify
from gateway.mail.parse import Attachment, ParsedMessage, normalize_subject, subject_kind
from gateway.mail.parse import message_id_key as parse_mid_key
from gateway.mail.reports import Report, parse_report

DIRECTIONS: tuple[str, ...] = ("inbound", "outbound")
EVENT_TYPES: tuple[str, ...] = ("queued", "sent", "deferred", "delayed", "bounced", "opened",
                                 "clicked", "replied", "auto_replied", "read_receipt", "complained")
SOURCES: tuple[str, ...] = ("relay", "imap", "ingest")
#: kinds (:data:`gateway.mail.autoreply.KINDS`) whose messages are read as reports
REPORT_KINDS: frozenset[str] = frozenset({"delivery_report", "read_receipt", "feedback_report"})


@dataclass
class AcceptedMessage:
    """A message the relay accepted, as the store records it (one per spool entry or group)."""

    queue_id: str
    message_id: str
    from_addr: str
    to_addrs: list[str]
    cc_addrs: list[str]
    subject: str
    date: datetime | None
    snippet: str
    size: int
    recipients: list[str]
    user: str | None
    account: str | None
    at: datetime
    direction: str = "outbound"
    source: str = "relay"
    #: the spool copies of this message (a per-recipient copy names its recipient);
    #: empty means the one entry ``queue_id``
    copies: list[Copy] = field(default_factory=list)
    client_ip: str | None = None
    template: str | None = None
    #: the control headers X-Mailgw-Campaign and X-Mailgw-Send-At (future only), as read
    campaign: str | None = None
    scheduled_at: datetime | None = None
    text_body: str = ""
    html_body: str = ""
    attachments: list[dict[str, Any]] = field(default_factory=list)
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    from_name: str = ""
    raw: bytes | None = None
    parsed: bool = False             # the fields below `raw` were filled from it
    display_names: dict[str, str] = field(default_factory=dict)
    attendees: list[str] = field(default_factory=list)
    #: lower-cased address -> display name from the submitted Bcc field, read before the
    #: relay removed it from `raw` (what the Bcc recipients' contacts are named after)
    bcc_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")


def fill_from_parsed(a: AcceptedMessage, p: ParsedMessage) -> None:
    """Fill what the relay did not parse (bodies, decoded subject, addresses) from `p`."""
    a.from_addr = p.from_addr or a.from_addr
    a.from_name = p.from_name
    a.to_addrs, a.cc_addrs = list(p.to_addrs), list(p.cc_addrs)
    a.subject, a.date, a.snippet = p.subject, p.date, p.snippet
    a.text_body, a.html_body = p.text_body, p.html_body
    a.attachments = [attachment_dict(x) for x in p.attachments]
    a.in_reply_to, a.references = p.in_reply_to, list(p.references)
    a.template = a.template or p.headers.x_mailgw_template
    a.campaign = a.campaign or p.headers.x_mailgw_campaign
    a.message_id = a.message_id or p.message_id
    a.display_names, a.attendees = dict(p.display_names), list(p.attendees)
    a.parsed = True


@dataclass(frozen=True)
class Copy:
    """One spool entry of a relayed message."""

    queue_id: str
    recipient: str | None = None    # set for a per-recipient (tracked) copy
    links: int = 0                  # tracked links in it (the honeypot excluded)


@dataclass
class EventRecord:
    """Something that happened to the message with this queue id, for one recipient."""

    queue_id: str
    type: str
    recipient: str
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)
    machine: bool = False
    key: str | None = None

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {EVENT_TYPES}, not {self.type!r}")


@dataclass
class SourceRef:
    """One path a message was seen on."""

    source: str                      # relay | imap | ingest
    ref: str                         # queue id, or account/folder/uidvalidity/uid
    at: datetime
    account: str | None = None
    folder: str | None = None
    uidvalidity: int | None = None
    uid: int | None = None
    recipient: str | None = None
    client_ip: str | None = None
    links: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {self.source!r}")


@dataclass
class NewMessage:
    """A message as any path hands it to the store."""

    message_id: str
    from_addr: str
    to_addrs: list[str]
    cc_addrs: list[str]
    subject: str
    date: datetime | None
    direction: str
    sources: list[SourceRef]
    dedupe_hash: str = ""             # content hash, the key when there is no Message-ID
    from_name: str = ""
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    snippet: str = ""
    text_body: str = ""
    html_body: str = ""
    attachments: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    account: str | None = None
    user: str | None = None
    template: str | None = None
    #: X-Mailgw-Campaign (README "Control headers")
    campaign: str | None = None
    #: relay only: when a scheduled send (X-Mailgw-Send-At) is to be delivered
    scheduled_at: datetime | None = None
    raw: bytes | None = None
    #: relay only: envelope recipients, each gets a ``queued`` event
    queued_recipients: list[str] = field(default_factory=list)
    #: what kind of mail this is (:data:`gateway.mail.autoreply.KINDS`): a person's
    #: ``message``, an ``auto_reply``, ``automatic``/``bulk`` mail or a report
    kind: str = "message"
    #: an auto-reply's return date (ISO), when its text gives one
    return_date: str | None = None
    #: a delivery report, read receipt or feedback report read from `raw`: the store
    #: records it as events on the message it is about, never as a conversation
    report: Report | None = None
    #: ingest only: the queue id the VERP bounce address it came to names
    #: (:func:`gateway.mail.reports.verp_queue_id`)
    bounce_queue_id: str | None = None
    #: relay only: the envelope recipients not in To or Cc (:func:`bcc_of`); stored,
    #: never put in anything delivered
    bcc_addrs: list[str] = field(default_factory=list)
    #: lower-cased address -> display name (header fields, else an attendee's CN)
    display_names: dict[str, str] = field(default_factory=dict)
    #: ATTENDEE / ORGANIZER addresses of its meeting invitations (text/calendar parts)
    attendees: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")
        if not self.sources:
            raise ValueError("a message needs at least one source")

    @classmethod
    def from_parsed(cls, p: ParsedMessage, raw: bytes | None, *, direction: str,
                    sources: list[SourceRef], account: str | None = None,
                    user: str | None = None) -> NewMessage:
        """A message parsed by :func:`gateway.mail.parse.parse_message`, as the store takes it."""
        kind = classify(p.headers, subject=p.subject, from_addr=p.from_addr, text=p.text_body,
                        sent=p.date)
        report = parse_report(raw) if raw is not None and kind.kind in REPORT_KINDS else None
        return cls(
            message_id=p.message_id, from_addr=p.from_addr, from_name=p.from_name,
            to_addrs=list(p.to_addrs), cc_addrs=list(p.cc_addrs), subject=p.subject,
            date=p.date, direction=direction, in_reply_to=p.in_reply_to,
            references=list(p.references), snippet=p.snippet, text_body=p.text_body,
            html_body=p.html_body, attachments=[attachment_dict(a) for a in p.attachments],
            size=p.size if raw is None else len(raw), dedupe_hash=p.dedupe_hash, raw=raw,
            account=account, user=user, template=p.headers.x_mailgw_template,
            campaign=p.headers.x_mailgw_campaign, sources=sources,
            kind=kind.kind, return_date=kind.return_date, report=report,
            display_names=dict(p.display_names), attendees=list(p.attendees))

    @functools.cached_property
    def raw_sha256(self) -> str | None:
        """The content address of `raw` (hashed once, however many steps need it)."""
        return None if self.raw is None else hashlib.sha256(self.raw).hexdigest()

    @property
    def dedupe_key(self) -> str:
        mid = message_id_key(self.message_id)
        if mid:
            return f"mid:{mid}"
        if self.dedupe_hash:
            return f"hash:{self.dedupe_hash}"
        return f"ref:{self.sources[0].source}:{self.sources[0].ref}"


@dataclass(frozen=True)
class Stored:
    """What became of one NewMessage: its message id and whether this call created it."""

    id: int                   # for a report: the message it is about (0: none matched)
    created: bool
    report: bool = False      # a report, recorded as events and not stored as a message


@dataclass(frozen=True)
class WebhookTarget:
    """A configured webhook, as the outbox knows it."""

    id: str                           # stable id: the URL
    events: frozenset[str]            # empty: every event

    def wants(self, event_type: str) -> bool:
        return not self.events or event_type in self.events


def clean_text(value: str | None, limit: int | None = None) -> str:
    """A string PostgreSQL and SQLite both take: no NUL, no lone surrogate, at most `limit` chars."""
    s = value or ""
    if "\x00" in s:
        s = s.replace("\x00", "")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s[:limit] if limit is not None else s


def message_id_key(mid: str | None) -> str:
    """A Message-ID for lookups (see :func:`gateway.mail.parse.message_id_key`), storable."""
    return clean_text(parse_mid_key(mid))


def subject_key(subject: str) -> tuple[str, bool]:
    """(the subject without reply/forward prefixes, case-folded; whether it had such a prefix)."""
    s = clean_text(subject)
    return normalize_subject(s).casefold()[:500], subject_kind(s) is not None


def attachment_dict(a: Attachment) -> dict[str, Any]:
    """Attachment metadata as stored and shown (never the content)."""
    return {"filename": a.filename, "content_type": a.content_type, "size": a.size,
            "sha256": a.sha256, "content_id": a.content_id, "inline": a.inline}


def bcc_of(a: AcceptedMessage) -> list[str]:
    """The envelope recipients of a relayed message that its To and Cc do not name (its
    Bcc, which the relay removed from the bytes it delivers), once each, in envelope
    order; none while its header fields are unknown (neither parsed nor given)."""
    if not (a.parsed or a.to_addrs or a.cc_addrs):
        return []
    shown = {x.strip().lower() for x in (*a.to_addrs, *a.cc_addrs)}
    out: dict[str, str] = {}
    for r in a.recipients:
        key = r.strip().lower()
        if key and key not in shown:
            out.setdefault(key, r.strip())
    return list(out.values())


def accepted_to_new(a: AcceptedMessage) -> NewMessage:
    """The relay's AcceptedMessage as the store's NewMessage (one relay source per copy)."""
    copies = a.copies or [Copy(a.queue_id)]
    return NewMessage(
        message_id=a.message_id, from_addr=a.from_addr, from_name=a.from_name,
        to_addrs=a.to_addrs, cc_addrs=a.cc_addrs, subject=a.subject, date=a.date,
        direction=a.direction, snippet=a.snippet, text_body=a.text_body, html_body=a.html_body,
        attachments=a.attachments, size=a.size, account=a.account, user=a.user,
        template=a.template, campaign=a.campaign, scheduled_at=a.scheduled_at, raw=a.raw,
        in_reply_to=a.in_reply_to, references=a.references,
        queued_recipients=a.recipients,
        bcc_addrs=bcc_of(a) if a.source == "relay" else [],
        display_names={**a.bcc_names, **a.display_names}, attendees=a.attendees,
        sources=[SourceRef(source=a.source, ref=c.queue_id, at=a.at, account=a.account,
                           recipient=c.recipient, client_ip=a.client_ip,
                           links=c.links if c.recipient else None) for c in copies])


class EventSink(Protocol):
    """Where the relay and the delivery scheduler report; the StoreWriter in production."""

    def add_accepted(self, a: AcceptedMessage) -> None: ...

    def add_event(self, e: EventRecord) -> None: ...
