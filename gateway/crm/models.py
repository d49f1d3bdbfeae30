"""The CRM store's schema as SQLAlchemy 2 declarative models (one schema for SQLite and PostgreSQL).

Tables:

``messages``
    one row per message, however many paths saw it: ``dedupe_key`` (the Message-ID, or a
    normalised header + body hash for mail without one) is unique, so the relay, the
    ingest address and IMAP sync all land on the same row.
``message_sources``
    every path a message was seen on: the relay (one row per spool copy, with the
    recipient of a per-recipient copy), the ingest listener, or an IMAP mailbox
    (account, folder, UIDVALIDITY, UID); unique per (source, ref). A relay copy's queue
    id is how delivery and tracking events find their message.
``events``
    what happened to a message for one recipient: queued, sent, deferred, delayed,
    bounced, opened, clicked, replied, auto_replied, read_receipt, complained; ``key``
    (unique when set) makes an event idempotent.
``message_addresses``
    the lower-cased From/To/Cc addresses of each message: the index for "all mail with
    this address" that JSON columns cannot give portably.
``companies``, ``contacts``
    the CRM's people, a company per e-mail domain; ``message_contacts`` and
    ``message_companies`` link messages to them. ``contact_addresses`` holds a
    contact's further addresses, ``contact_ambiguities`` the addresses `link_by: name`
    left unlinked because several contacts have their name.
``raw_messages``
    raw message bytes by SHA-256 when ``store.raw: database`` (else they live on disk,
    content-addressed, and only ``messages.raw_sha256`` is kept here).
``accounts``, ``sync_state``, ``sync_runs``
    connected mailboxes' runtime state (status, OAuth token at rest, node lease), the
    IMAP checkpoint per folder, and the history of sync runs.
``webhook_outbox``
    webhook deliveries, written in the same transaction as what they announce.
``suppressions``
    addresses later mail must not reach (hard bounces, complaints, added by hand).
``send_counters``
    messages per sender and UTC day, for the ``max_per_day`` policy.
``contact_assignments``, ``assignment_cursors``
    shared mailboxes (``shared: true``): the rep a contact's mail went to by round robin
    (sticky per account and contact), and each account's round-robin position.

The search index is not a model: migration ``0007`` (0007_search.py) makes it per backend (SQLite:
the FTS5 table ``messages_fts`` and its triggers; PostgreSQL: the generated column
``messages.search_vector`` and its GIN index), ``0010`` (0010_search_bcc.py) makes it again with
the Bcc and attendee addresses, and :mod:`gateway.crm.search` queries it.
:func:`in_models` tells Alembic's comparison to leave those objects out.

Each table is also exported as a Core :class:`sqlalchemy.Table` (``messages_table``,
``sources_table``, ... at the end of this module): the store and its siblings build their
queries on those names.

Every datetime is stored in UTC and read back timezone-aware on both backends
(:class:`UTCDateTime`). Constraints and indexes carry explicit names (the naming
convention on :data:`metadata`) so later migrations can alter them in SQLite batch mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from gateway.records import DIRECTIONS as DIRECTIONS
from gateway.records import EVENT_TYPES as EVENT_TYPES
from gateway.records import SOURCES as SOURCES

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

#: bcc: an envelope recipient of a relayed message not in its To or Cc; attendee: an
#: ATTENDEE or ORGANIZER of a text/calendar part (a meeting invitation)
ADDRESS_ROLES: tuple[str, ...] = ("from", "to", "cc", "bcc", "attendee")
CONTACT_SOURCES: tuple[str, ...] = ("import", "api", "auto")
ACCOUNT_STATUSES: tuple[str, ...] = ("active", "disabled", "needs_reconnect", "deleted")
SYNC_STATUSES: tuple[str, ...] = ("running", "ok", "error")
OUTBOX_STATUSES: tuple[str, ...] = ("pending", "delivered", "dead")
SUPPRESSION_REASONS: tuple[str, ...] = ("bounced", "complained", "manual")
SNIPPET_MAX = 200

#: 64-bit ids on PostgreSQL; SQLite needs exactly INTEGER for a rowid primary key.
BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored in UTC; naive values are taken to be UTC.

    PostgreSQL keeps it as ``timestamptz``; SQLite, which has no time zones, keeps the
    naive UTC wall time (its ISO text sorts in time order). Both read back aware, in UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class Message(Base):
    """A stored message: one row however many paths saw it (see ``messages`` above)."""

    __tablename__ = "messages"
    __table_args__ = (
        sa.CheckConstraint(_in("direction", DIRECTIONS), name="direction"),
        {"sqlite_autoincrement": True},  # ids are exposed: never reuse one after a delete
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(sa.String, unique=True)
    message_id: Mapped[str] = mapped_column(sa.String, index=True, default="")
    thread_id: Mapped[str | None] = mapped_column(sa.String, index=True)
    in_reply_to: Mapped[str | None] = mapped_column(sa.String)
    reference_ids: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    direction: Mapped[str] = mapped_column(sa.String(16))
    account: Mapped[str | None] = mapped_column(sa.String)
    user: Mapped[str | None] = mapped_column(sa.String)
    from_addr: Mapped[str] = mapped_column(sa.String, default="")
    from_name: Mapped[str] = mapped_column(sa.String, default="")
    to_addrs: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    #: relayed messages: the envelope recipients not in To or Cc (never in what is delivered)
    bcc_addrs: Mapped[list[str] | None] = mapped_column(sa.JSON, default=list)
    #: the attendees of its meeting invitations not in From/To/Cc/Bcc (role ``attendee``
    #: in ``message_addresses``), here for the search index (migration 0010)
    attendee_addrs: Mapped[list[str] | None] = mapped_column(sa.JSON, default=list)
    subject: Mapped[str] = mapped_column(sa.String, default="")
    #: the subject without reply/forward prefixes, lower-cased: the threading fallback
    subject_key: Mapped[str] = mapped_column(sa.String, index=True, default="")
    date: Mapped[datetime | None] = mapped_column()
    snippet: Mapped[str] = mapped_column(sa.String(SNIPPET_MAX), default="")
    text_body: Mapped[str] = mapped_column(sa.Text, default="")
    html_body: Mapped[str] = mapped_column(sa.Text, default="")
    attachments: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON, default=list)
    size: Mapped[int] = mapped_column(sa.Integer, default=0)
    raw_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    template: Mapped[str | None] = mapped_column(sa.String, index=True)
    #: the ``X-Mailgw-Campaign`` control header
    campaign: Mapped[str | None] = mapped_column(sa.String, index=True)
    #: ``X-Mailgw-Send-At``: when a scheduled message is due (None: sent at once)
    scheduled_at: Mapped[datetime | None] = mapped_column()
    #: shared mailboxes: the user login the message is assigned to, and the rule that chose
    #: it (contact_owner, company_owner, sticky, round_robin)
    assigned_to: Mapped[str | None] = mapped_column(sa.String, index=True)
    assigned_rule: Mapped[str | None] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class MessageSource(Base):
    """One path a message was seen on: a relay copy, the ingest listener or an IMAP mailbox."""

    __tablename__ = "message_sources"
    __table_args__ = (
        sa.CheckConstraint(_in("source", SOURCES), name="source"),
        sa.UniqueConstraint("source", "ref"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(sa.String(8))
    #: relay: the copy's queue id; ingest: the ingest queue id; imap: account/folder/uidvalidity/uid
    ref: Mapped[str] = mapped_column(sa.String)
    account: Mapped[str | None] = mapped_column(sa.String, index=True)
    folder: Mapped[str | None] = mapped_column(sa.String)
    uidvalidity: Mapped[int | None] = mapped_column(sa.BigInteger)
    uid: Mapped[int | None] = mapped_column(sa.BigInteger)
    recipient: Mapped[str | None] = mapped_column(sa.String)
    #: relay copies: the submitting client's address and the number of tracked links
    client_ip: Mapped[str | None] = mapped_column(sa.String)
    links: Mapped[int | None] = mapped_column(sa.Integer)
    at: Mapped[datetime] = mapped_column()


class Event(Base):
    """One thing that happened to a message for one recipient (queued, sent, opened, ...)."""

    __tablename__ = "events"
    __table_args__ = (
        sa.CheckConstraint(_in("type", EVENT_TYPES), name="type"),
        sa.Index("ix_events_type_at", "type", "at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(sa.String(16))
    at: Mapped[datetime] = mapped_column()
    recipient: Mapped[str] = mapped_column(sa.String, default="")
    machine: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    details: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    #: set for events that must be recorded once only (e.g. ``replied:<message pk>``)
    key: Mapped[str | None] = mapped_column(sa.String, unique=True)


class MessageAddress(Base):
    """A lower-cased From/To/Cc address of a message: the index behind the contact filter."""

    __tablename__ = "message_addresses"
    __table_args__ = (sa.CheckConstraint(_in("role", ADDRESS_ROLES), name="role"),)

    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    address: Mapped[str] = mapped_column(sa.String, primary_key=True)
    #: the address's domain: companies link by it
    domain: Mapped[str] = mapped_column(sa.String, default="", server_default="")


class Company(Base):
    """A customer company, known by its e-mail domain."""

    __tablename__ = "companies"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    domain: Mapped[str] = mapped_column(sa.String, unique=True)
    name: Mapped[str] = mapped_column(sa.String, default="")
    #: the user login who owns the company (shared mailboxes assign its mail to them)
    owner: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class Contact(Base):
    """A CRM contact, known by its (lower-cased) e-mail address."""

    __tablename__ = "contacts"
    __table_args__ = (
        sa.CheckConstraint(_in("source", CONTACT_SOURCES), name="source"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    email: Mapped[str] = mapped_column(sa.String, unique=True)
    first_name: Mapped[str] = mapped_column(sa.String, default="")
    last_name: Mapped[str] = mapped_column(sa.String, default="")
    title: Mapped[str] = mapped_column(sa.String, default="")
    phone: Mapped[str] = mapped_column(sa.String, default="")
    company_pk: Mapped[int | None] = mapped_column(
        BigID, sa.ForeignKey("companies.id", ondelete="SET NULL"), index=True)
    fields: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    source: Mapped[str] = mapped_column(sa.String(8), default="import")
    #: the user login who owns the contact (shared mailboxes assign its mail to them)
    owner: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    #: the full name normalised for `crm.link_by: name` (:func:`gateway.crm.people.name_key`);
    #: "" when the name has fewer than two words
    name_key: Mapped[str] = mapped_column(sa.String, default="", server_default="", index=True)


class ContactAddress(Base):
    """A contact's further address (the first is ``contacts.email``), e.g. linked by name."""

    __tablename__ = "contact_addresses"

    #: lower-cased; an address belongs to one contact at most
    address: Mapped[str] = mapped_column(sa.String, primary_key=True)
    contact_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    #: how it was added: ``name`` (`crm.link_by: name`)
    source: Mapped[str] = mapped_column(sa.String(8), default="name")
    created_at: Mapped[datetime] = mapped_column()


class ContactAmbiguity(Base):
    """An address left unlinked because its display name is the full name of several contacts."""

    __tablename__ = "contact_ambiguities"

    address: Mapped[str] = mapped_column(sa.String, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String, default="")
    #: the e-mail addresses of the contacts with that name, when last seen
    candidates: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    messages: Mapped[int] = mapped_column(sa.Integer, default=1)
    first_seen_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column()


class MessageContact(Base):
    """A message linked to a contact (as its sender or a recipient)."""

    __tablename__ = "message_contacts"
    __table_args__ = (
        sa.CheckConstraint(_in("role", ADDRESS_ROLES), name="role"),
        sa.Index("ix_message_contacts_contact_pk", "contact_pk", "message_pk"),
    )

    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    contact_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(8), primary_key=True)


class MessageCompany(Base):
    """A message linked to a company by an address at the company's domain."""

    __tablename__ = "message_companies"
    __table_args__ = (sa.Index("ix_message_companies_company_pk", "company_pk", "message_pk"),)

    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    company_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("companies.id", ondelete="CASCADE"), primary_key=True)


class RawMessage(Base):
    """Raw message bytes by content hash (``store.raw: database``)."""

    __tablename__ = "raw_messages"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    size: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class AccountState(Base):
    """A connected mailbox: its runtime state, and for accounts created at run time
    (``origin = 'runtime'``) also its definition and its credential (encrypted)."""

    __tablename__ = "accounts"
    __table_args__ = (sa.CheckConstraint(_in("status", ACCOUNT_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    email: Mapped[str] = mapped_column(sa.String, default="")
    status: Mapped[str] = mapped_column(sa.String(16), default="active")
    status_reason: Mapped[str | None] = mapped_column(sa.String)
    status_at: Mapped[datetime | None] = mapped_column()
    token_ciphertext: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    token_expires_at: Mapped[datetime | None] = mapped_column()
    lease_owner: Mapped[str | None] = mapped_column(sa.String)
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_sync_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    #: config (declared in gateway.yaml) or runtime (created through the API, CLI, a link)
    origin: Mapped[str] = mapped_column(sa.String(8), default="config", server_default="config")
    #: a runtime account's settings as JSON (the `accounts:` entry, no secrets)
    definition: Mapped[str | None] = mapped_column(sa.Text)
    #: a runtime account's password or refresh token, AES-256-GCM (gateway.keys.tokens)
    credential_ciphertext: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    #: the address the OAuth provider vouched for, and when (connect links, device flow)
    connected_email: Mapped[str | None] = mapped_column(sa.String)
    connected_at: Mapped[datetime | None] = mapped_column()
    #: bumped on every change of the definition or credential; nodes poll the maximum
    version: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")


class ConnectLink(Base):
    """A signed, single-use, expiring "connect your mailbox" link for one rep."""

    __tablename__ = "connect_links"
    __table_args__ = (sa.Index("ix_connect_links_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    provider: Mapped[str] = mapped_column(sa.String)
    #: the address the link is for (None: record the one the provider vouches for)
    email: Mapped[str | None] = mapped_column(sa.String)
    #: the submission user who will send as the account
    login: Mapped[str | None] = mapped_column(sa.String)
    #: the account to create, or to reconnect
    account_id: Mapped[str | None] = mapped_column(sa.String)
    settings: Mapped[str | None] = mapped_column(sa.Text)       # JSON: sync folders, direction...
    created_by: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    expires_at: Mapped[datetime] = mapped_column()
    #: the authorization in progress (PKCE verifier, nonce), encrypted, so any node takes the callback
    flow_ciphertext: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    opened_at: Mapped[datetime | None] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()
    result: Mapped[str | None] = mapped_column(sa.String(32))
    result_detail: Mapped[str | None] = mapped_column(sa.String)
    result_account: Mapped[str | None] = mapped_column(sa.String)


class SyncState(Base):
    """The IMAP checkpoint of one folder of one account."""

    __tablename__ = "sync_state"

    account: Mapped[str] = mapped_column(
        sa.String, sa.ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    folder: Mapped[str] = mapped_column(sa.String, primary_key=True)
    uidvalidity: Mapped[int | None] = mapped_column(sa.BigInteger)
    last_uid: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    highestmodseq: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: the lowest UID the newest-first initial sync has reached (None: not started)
    backfill_uid: Mapped[int | None] = mapped_column(sa.BigInteger)
    initial_done: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class SyncRun(Base):
    """One sync run of one folder: when, what kind, counts, outcome."""

    __tablename__ = "sync_runs"
    __table_args__ = (
        sa.CheckConstraint(_in("status", SYNC_STATUSES), name="status"),
        sa.Index("ix_sync_runs_account_started_at", "account", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    account: Mapped[str] = mapped_column(sa.String)
    folder: Mapped[str] = mapped_column(sa.String, default="")
    kind: Mapped[str] = mapped_column(sa.String(16))
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    status: Mapped[str] = mapped_column(sa.String(8), default="running")
    fetched: Mapped[int] = mapped_column(sa.Integer, default=0)
    stored: Mapped[int] = mapped_column(sa.Integer, default=0)
    skipped: Mapped[int] = mapped_column(sa.Integer, default=0)
    error: Mapped[str | None] = mapped_column(sa.String)


class WebhookDelivery(Base):
    """One webhook POST to make, kept until the receiver accepted it (the outbox)."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        sa.CheckConstraint(_in("status", OUTBOX_STATUSES), name="status"),
        sa.Index("ix_webhook_outbox_status_next", "status", "next_attempt_at"),
        sa.UniqueConstraint("event_id", "webhook"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(40))
    webhook: Mapped[str] = mapped_column(sa.String)
    event_type: Mapped[str] = mapped_column(sa.String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.String(12), default="pending")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column()
    delivered_at: Mapped[datetime | None] = mapped_column()


class Suppression(Base):
    """An address mail must not reach again: a hard bounce, a complaint, or added by hand."""

    __tablename__ = "suppressions"
    __table_args__ = (sa.CheckConstraint(_in("reason", SUPPRESSION_REASONS), name="reason"),)

    #: lower-cased
    address: Mapped[str] = mapped_column(sa.String, primary_key=True)
    reason: Mapped[str] = mapped_column(sa.String(16))
    #: the status and diagnostic of the bounce, the feedback type, or the operator's note
    detail: Mapped[str] = mapped_column(sa.String, default="", server_default="")
    #: the message whose bounce or complaint put the address here
    message_pk: Mapped[int | None] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="SET NULL"))
    created_by: Mapped[str | None] = mapped_column(sa.String)
    created_at: Mapped[datetime] = mapped_column()


class Node(Base):
    """A running daemon (a node of the cluster) and when it last said it was alive: the
    IMAP tailers spread the mailboxes over the nodes heard from within `sync.lease_ttl`."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(sa.String, primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.String, default="", server_default="")
    pid: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    started_at: Mapped[datetime] = mapped_column()
    heartbeat_at: Mapped[datetime] = mapped_column()


class SendCounter(Base):
    """Messages accepted from one sender on one UTC day (``max_per_day``)."""

    __tablename__ = "send_counters"

    sender: Mapped[str] = mapped_column(sa.String, primary_key=True)
    day: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    count: Mapped[int] = mapped_column(sa.Integer, default=0)


class AuthFailure(Base):
    """One failed SMTP AUTH attempt from a client IP (the lockout every node and worker sees)."""

    __tablename__ = "auth_failures"
    __table_args__ = (sa.Index("ix_auth_failures_ip_at", "ip", "at"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    ip: Mapped[str] = mapped_column(sa.String)
    #: seconds since the epoch
    at: Mapped[float] = mapped_column(sa.Float)


class ContactAssignment(Base):
    """The rep a shared mailbox's round robin gave a contact: its later mail goes there too."""

    __tablename__ = "contact_assignments"

    account: Mapped[str] = mapped_column(sa.String, primary_key=True)
    contact_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    user: Mapped[str] = mapped_column(sa.String)
    at: Mapped[datetime] = mapped_column()


class AssignmentCursor(Base):
    """A shared mailbox's round-robin position: how many picks it has made."""

    __tablename__ = "assignment_cursors"

    account: Mapped[str] = mapped_column(sa.String, primary_key=True)
    position: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column()


#: The time a message sorts and filters by: its Date header, else when it was stored.
sort_at = sa.func.coalesce(Message.date, Message.created_at)

sa.Index("ix_messages_sort_at", sort_at)
sa.Index("ix_message_addresses_address", MessageAddress.address, MessageAddress.message_pk)
sa.Index("ix_message_addresses_domain", MessageAddress.domain, MessageAddress.message_pk)
# the daily figures per account (`accounts list`): what the sync stored today
sa.Index("ix_message_sources_at", MessageSource.at)


#: The search index (migrations 0007, 0010): SQLite's FTS5 table (its shadow tables are
#: ``messages_fts_*``), PostgreSQL's tsvector column on ``messages`` and its GIN index.
FTS_TABLE = "messages_fts"
VECTOR_COLUMN = "search_vector"
VECTOR_INDEX = "ix_messages_search_vector"


def in_models(name: str | None, type_: Any, parent_names: Mapping[Any, str | None]) -> bool:
    """Alembic ``include_name``: False for the search index, which these models leave out."""
    if type_ == "table":
        return not (name or "").startswith(FTS_TABLE)
    if type_ == "column":
        return not (parent_names.get("table_name") == "messages" and name == VECTOR_COLUMN)
    return name != VECTOR_INDEX


# -- the tables, for SQLAlchemy Core queries --------------------------------------------------
messages_table = cast(sa.Table, Message.__table__)
sources_table = cast(sa.Table, MessageSource.__table__)                 # message_sources
events_table = cast(sa.Table, Event.__table__)
suppressions_table = cast(sa.Table, Suppression.__table__)
addresses_table = cast(sa.Table, MessageAddress.__table__)              # message_addresses
companies_table = cast(sa.Table, Company.__table__)
contacts_table = cast(sa.Table, Contact.__table__)
contact_addresses_table = cast(sa.Table, ContactAddress.__table__)
ambiguities_table = cast(sa.Table, ContactAmbiguity.__table__)        # contact_ambiguities
message_contacts_table = cast(sa.Table, MessageContact.__table__)
message_companies_table = cast(sa.Table, MessageCompany.__table__)
raw_table = cast(sa.Table, RawMessage.__table__)                        # raw_messages
accounts_table = cast(sa.Table, AccountState.__table__)
connect_links_table = cast(sa.Table, ConnectLink.__table__)
sync_state_table = cast(sa.Table, SyncState.__table__)
sync_runs_table = cast(sa.Table, SyncRun.__table__)
outbox_table = cast(sa.Table, WebhookDelivery.__table__)                # webhook_outbox
send_counters_table = cast(sa.Table, SendCounter.__table__)
nodes_table = cast(sa.Table, Node.__table__)
auth_failures_table = cast(sa.Table, AuthFailure.__table__)
contact_assignments_table = cast(sa.Table, ContactAssignment.__table__)
assignment_cursors_table = cast(sa.Table, AssignmentCursor.__table__)
