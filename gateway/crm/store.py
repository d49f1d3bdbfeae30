"""The CRM store: messages seen on any path, stored once, linked to contacts; read back as the API's JSON.

One :class:`Store` owns one AsyncEngine; every call is one short transaction, so a
store shared by the writer, the ingest listener, the IMAP tailers, the CLI and the
API never holds a connection between calls. The store is the package's facade: its
siblings do one part each and it composes them in its transactions:

- the values it takes (:mod:`gateway.records`), the tables (:mod:`gateway.crm.models`),
  what every query shares (:mod:`gateway.crm.sql`);
- threads (:mod:`gateway.crm.threads`), raw bytes (:mod:`gateway.crm.blobs`), webhook
  deliveries (:mod:`gateway.crm.outbox`), the JSON shown (:mod:`gateway.crm.views`);
- contacts, accounts, counters, reports and tracking hits work on a Store
  (:meth:`insert`, :meth:`error`, :meth:`fetch` are for them).

Writing. Every path hands the store :class:`NewMessage` values (the relay through
:meth:`Store.record` with :class:`AcceptedMessage`, from the batching StoreWriter;
ingest and IMAP through :meth:`Store.store_messages`, synchronously, so that a
failure can be answered with 451 or retried, and an IMAP checkpoint is committed in
the same transaction as the messages it covers). In one transaction a batch:

1. inserts the messages not stored yet, unique by ``dedupe_key`` (the Message-ID,
   else a normalised header + body hash), so one message seen on several paths is one
   row; its thread is found by :func:`gateway.crm.threads.assign_threads`;
2. records every path in ``message_sources`` (unique per source and ref, so a
   replayed batch adds nothing);
3. for new messages: addresses (From, To, Cc, the relay's Bcc, invitation attendees),
   links to contacts and companies (:mod:`linking`; which contact an address is, or
   becomes, :mod:`identify`), ``replied`` (or ``auto_replied``) on the outbound message
   an inbound reply answers, and ``message.stored`` / ``message.replied`` /
   ``message.auto_replied`` webhook deliveries in the outbox;
4. ``queued`` events for relay recipients, also when the relay's record comes after
   the message was stored from ingest or IMAP (keyed, so recorded once), and then the
   relay's Bcc on it;
5. events (delivery, tracking) for queue ids of this or earlier batches, and their
   webhooks; ``message.opened`` / ``message.clicked`` carry the message's tracking
   summary (:mod:`gateway.crm.summary`) as of this transaction, from one query over its
   hit events;
6. inbound mail newly seen in a shared mailbox (``shared: true``) is assigned to a rep
   (:mod:`gateway.crm.assign`), announced by ``message.assigned``.

Webhooks about a message carry its JSON as ``data.message``, as the transaction leaves it
(:meth:`Store._announce`, last in the batch): ``message.stored`` the detail view, the same
JSON as ``GET /api/v1/messages/{id}``; the event webhooks and ``message.assigned`` the
list view less its events. A batch's JSON is read in a few queries per chunk of messages
(:func:`_load`, as :meth:`Store.fetch` reads the API's), and not at all for an event
type nobody subscribes to.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.config import Config
from gateway.crm import assign, bounces, identify, outbox, search, suppression
from gateway.crm.blobs import RawStore
from gateway.crm.engine import describe_error, make_engine, safe_url
from gateway.crm.linking import LinkRules
from gateway.crm.migrate import current_revision_sync, head_revision, is_known_revision, upgrade
from gateway.crm.models import (
    SNIPPET_MAX,
    addresses_table,
    companies_table,
    contacts_table,
    events_table,
    message_companies_table,
    message_contacts_table,
    messages_table,
    sort_at,
    sources_table,
)
from gateway.crm.sql import (
    chunks,
    clean_addrs,
    clean_json,
    clean_opt_text,
    insert,
    iso,
    utc,
)
from gateway.crm.summary import HIT_TYPES, recipient_summary, summarize
from gateway.crm.threads import assign_threads
from gateway.crm.views import brief_message, event_payload, message_dict
from gateway.errors import StoreError
from gateway.mail.addresses import domain_of
from gateway.records import (
    AcceptedMessage,
    EventRecord,
    NewMessage,
    Stored,
    WebhookTarget,
    accepted_to_new,
    clean_text,
    message_id_key,
    subject_key,
)


def _unique(values: Sequence[str]) -> list[str]:
    """Lower-cased, stripped, storable addresses, once each, in order."""
    return [a for a in dict.fromkeys(clean_text(v).strip().lower() for v in values) if a]


def _correspondents(m: NewMessage) -> list[tuple[str, str]]:
    """(role, address) of a message's correspondents: From, To, Cc, the relay's Bcc and
    the attendees of its invitations not named in those (role ``attendee``)."""
    out: list[tuple[str, str]] = []
    named: set[str] = set()
    for role, values in (("from", [m.from_addr]), ("to", m.to_addrs), ("cc", m.cc_addrs),
                         ("bcc", m.bcc_addrs)):
        for addr in _unique(values):
            out.append((role, addr))
            named.add(addr)
    out += [("attendee", a) for a in _unique(m.attendees) if a not in named]
    return sorted(set(out))


def _display_names(messages: Iterable[NewMessage]) -> dict[str, str]:
    """Lower-cased address -> display name over `messages` (the first one given wins)."""
    names: dict[str, str] = {}
    for m in messages:
        if m.from_name and m.from_addr:
            names.setdefault(clean_text(m.from_addr).strip().lower(), m.from_name)
        for addr, name in m.display_names.items():
            if name:
                names.setdefault(addr, name)
    return names


#: a webhook about a message: (event type, message id, data beside the message's JSON)
_About = tuple[str, int, dict[str, Any]]

#: Newest first: by Date header, else when stored; the id breaks ties (the cursor's order).
NEWEST_FIRST = (sort_at.desc(), messages_table.c.id.desc())


def _past(before: tuple[datetime, int]) -> sa.ColumnElement[bool]:
    """The messages after the cursor `before` (the sort time and id of a page's last
    message) in :data:`NEWEST_FIRST` order."""
    t, pk = before
    return sa.or_(sort_at < utc(t), sa.and_(sort_at == utc(t), messages_table.c.id < pk))


class Store:
    """The CRM store on one AsyncEngine (SQLite file or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, url: str, *, log: Any = None,
                 raw_dir: Path | None = None, raw_in_database: bool = False) -> None:
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name
        self.log = log or structlog.get_logger("mailgw.crm")
        self.rules = LinkRules()
        self.webhooks: tuple[WebhookTarget, ...] = ()
        self.raw = RawStore(raw_dir, raw_in_database)

    def configure(self, rules: LinkRules, webhooks: Sequence[WebhookTarget] = ()) -> None:
        """Set the linking rules and webhook subscriptions (at start and on reload)."""
        self.rules = rules
        self.webhooks = tuple(webhooks)

    # -- opening ------------------------------------------------------------------------
    @classmethod
    async def open(cls, url: str, *, auto_upgrade: bool = True, log: Any = None,
                   raw_dir: Path | None = None, raw_in_database: bool = False) -> Store:
        """Connect and check that the schema is at head.

        An SQLite database without any table is migrated to head here (when
        `auto_upgrade`); a schema behind head, or an empty PostgreSQL database, is an
        error that says to run ``mailgw db upgrade``. Connection failures are StoreError.
        """
        engine = make_engine(url)
        try:
            try:
                current, tables = await cls._inspect(engine)
                if not tables and engine.dialect.name == "sqlite" and auto_upgrade:
                    await upgrade(url)
                    current, tables = await cls._inspect(engine)
            except (SQLAlchemyError, OSError) as exc:
                reason = describe_error(exc, url)
                if engine.dialect.name == "postgresql" and re.search(r'database ".*" does not exist',
                                                                     reason):
                    # say how to make the database, not only that it is not there
                    reason += (f" (create it: createdb -O {engine.url.username or 'USER'} "
                               f"{engine.url.database or 'DB'}, then `mailgw db upgrade`)")
                raise StoreError(f"cannot open the store {safe_url(url)}: {reason}") from exc
            head = await head_revision()
            if current != head:
                if current is not None and not await is_known_revision(current):
                    raise StoreError(f"the store schema is at revision {current}, which this mailgw "
                                     f"does not know (head is {head}): upgrade mailgw")
                raise StoreError(f"the store schema is at revision {current or 'none'}, "
                                 f"head is {head}: run `mailgw db upgrade`")
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, url, log=log, raw_dir=raw_dir, raw_in_database=raw_in_database)

    @classmethod
    async def from_config(cls, cfg: Config, *, auto_upgrade: bool = True, log: Any = None) -> Store:
        """The store `cfg` names, with its raw-message storage and linking rules set."""
        store = await cls.open(cfg.store_url, auto_upgrade=auto_upgrade, log=log,
                               raw_dir=cfg.raw_path, raw_in_database=cfg.store.raw == "database")
        store.configure(LinkRules.from_config(cfg), store.webhooks)
        return store

    @staticmethod
    async def _inspect(engine: AsyncEngine) -> tuple[str | None, list[str]]:
        async with engine.connect() as conn:
            tables: list[str] = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            current = await conn.run_sync(current_revision_sync) if tables else None
        return current, tables

    async def close(self) -> None:
        await self.engine.dispose()

    def insert(self, table: sa.Table) -> Any:
        """An INSERT into `table` for this store's backend (see :func:`gateway.crm.sql.insert`)."""
        return insert(self.dialect, table)

    def error(self, what: str, exc: BaseException) -> StoreError:
        """The StoreError to raise for `exc` (a database or OS error) while doing `what`."""
        return StoreError(f"{what}: {describe_error(exc, self.url)}")

    #: the old name of :meth:`error`, still called from outside the package (``gateway.api``)

    # -- writing: the relay's batches ---------------------------------------------------
    async def record(self, accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        """Store a relay batch in one transaction: new messages, their `queued` events, `events`.

        A copy (queue id) already stored is skipped (on both backends, also against a
        concurrent writer). An event whose queue id is neither in `accepted` nor in the
        store is logged and skipped. Failures raise StoreError and write nothing.
        """
        if not accepted and not events:
            return
        news = [accepted_to_new(a) for a in accepted]
        await self._write_blobs(news)
        try:
            async with self.engine.begin() as conn:
                await self._store_batch(conn, news)
                unknown = await self._add_events(conn, events)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(f"store write failed ({len(accepted)} messages, {len(events)} events)",
                             exc) from exc
        if unknown:
            # e.g. the delivery of a DSN the gateway wrote itself: it is no stored message
            self.log.info("store_events_skipped", reason="unknown queue id", count=len(unknown),
                          queue_ids=sorted({e.queue_id for e in unknown})[:20])

    # -- writing: ingest and IMAP ---------------------------------------------------------
    async def store_messages(self, items: Sequence[NewMessage],
                             then: Any = None) -> list[Stored]:
        """Store messages from ingest or IMAP in one transaction; one :class:`Stored` per item.

        `then`, if given, is an ``async (conn) -> None`` run in the same transaction
        after the messages (an IMAP checkpoint), so both commit or neither does.
        """
        await self._write_blobs(items)
        try:
            async with self.engine.begin() as conn:
                result = await self._store_batch(conn, list(items))
                if then is not None:
                    await then(conn)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(f"store write failed ({len(items)} messages)", exc) from exc
        return result

    async def _write_blobs(self, items: Sequence[NewMessage]) -> None:
        if not self.raw.on_disk:
            return
        blobs = {m.raw_sha256: m.raw for m in items if m.raw_sha256 is not None and m.raw is not None}
        if blobs:
            await self.raw.save_files(blobs)

    async def _store_batch(self, conn: AsyncConnection, items: list[NewMessage]) -> list[Stored]:
        if not items:
            return []
        if any(m.report is not None for m in items):
            reports = [m for m in items if m.report is not None]
            applied = dict(zip(map(id, reports), await self._reports(conn, reports), strict=True))
            rest = iter(await self._store_batch(conn, [m for m in items if m.report is None]))
            return [Stored(id=applied[id(m)].message_pk or 0, created=False, report=True)
                    if m.report is not None else next(rest) for m in items]
        now = datetime.now(UTC)
        keys = [m.dedupe_key for m in items]
        first: dict[str, NewMessage] = {}
        for k, m in zip(keys, items, strict=True):
            first.setdefault(k, m)
        threads = await assign_threads(conn, list(first.values()))
        rows = []
        for k, m in first.items():
            digest = m.raw_sha256 if self.raw.enabled else None
            skey, _ = subject_key(m.subject)
            at = m.sources[0].at
            rows.append({
                "dedupe_key": clean_text(k), "message_id": clean_text(m.message_id.strip()),
                "thread_id": threads[k], "in_reply_to": clean_opt_text(m.in_reply_to),
                "reference_ids": clean_addrs(m.references), "direction": m.direction,
                "account": clean_opt_text(m.account), "user": clean_opt_text(m.user),
                "from_addr": clean_text(m.from_addr), "from_name": clean_text(m.from_name),
                "to_addrs": clean_addrs(m.to_addrs), "cc_addrs": clean_addrs(m.cc_addrs),
                "bcc_addrs": clean_addrs(m.bcc_addrs),
                "attendee_addrs": [a for role, a in _correspondents(m) if role == "attendee"],
                "subject": clean_text(m.subject), "subject_key": skey, "date": m.date,
                "snippet": clean_text(m.snippet, SNIPPET_MAX), "text_body": clean_text(m.text_body),
                "html_body": clean_text(m.html_body), "attachments": clean_json(m.attachments),
                "size": int(m.size), "raw_sha256": digest, "template": clean_opt_text(m.template),
                "campaign": clean_opt_text(m.campaign), "scheduled_at": m.scheduled_at,
                "created_at": at, "updated_at": now})
        stmt = (self.insert(messages_table)
                .on_conflict_do_nothing(index_elements=[messages_table.c.dedupe_key])
                .returning(messages_table.c.id, messages_table.c.dedupe_key))
        created: dict[str, int] = {}
        for chunk in chunks(rows):
            result = await conn.execute(stmt, list(chunk))
            created.update({k: pk for pk, k in result.all()})
        pks = dict(created)
        missing = [k for k in first if k not in pks]
        for chunk in chunks(missing):
            found = await conn.execute(sa.select(messages_table.c.dedupe_key, messages_table.c.id)
                                       .where(messages_table.c.dedupe_key.in_(chunk)))
            pks.update({k: pk for k, pk in found.all()})

        source_rows = [{"message_pk": pks[k], "source": s.source, "ref": clean_text(s.ref),
                        "account": clean_opt_text(s.account), "folder": clean_opt_text(s.folder),
                        "uidvalidity": s.uidvalidity, "uid": s.uid,
                        "recipient": clean_opt_text(s.recipient), "client_ip": clean_opt_text(s.client_ip),
                        "links": s.links, "at": s.at}
                       for k, m in zip(keys, items, strict=True) for s in m.sources]
        new_sources: set[int] = set()
        new_relay_refs: set[str] = set()      # relay copies (queue ids) first seen now
        seen_in: list[tuple[int, str]] = []   # (message, account) of new mailbox sources
        sstmt = (self.insert(sources_table)
                 .on_conflict_do_nothing(index_elements=[sources_table.c.source, sources_table.c.ref])
                 .returning(sources_table.c.message_pk, sources_table.c.source, sources_table.c.ref,
                            sources_table.c.account))
        for chunk in chunks(source_rows):
            result = await conn.execute(sstmt, list(chunk))
            for pk, source, ref, account in result.all():
                new_sources.add(pk)
                if source == "relay":
                    new_relay_refs.add(ref)
                elif account:
                    seen_in.append((pk, account))

        if self.raw.in_database:
            blobs = {r["raw_sha256"]: first[r["dedupe_key"]].raw for r in rows
                     if r["raw_sha256"] and r["dedupe_key"] in created}
            if blobs:
                await self.raw.insert_rows(conn, self.dialect, blobs)

        relayed = [(pks[k], m) for k, m in zip(keys, items, strict=True) if m.queued_recipients
                   and any(s.source == "relay" and clean_text(s.ref) in new_relay_refs
                           for s in m.sources)]
        await self._queued(conn, relayed, created=set(created.values()), now=now)
        new = {created[k]: m for k, m in first.items() if k in created}   # in batch order
        about: list[_About] = []
        if new:
            about += await self._index_new(conn, new, now)
        made = set(created.values())
        await self._late_bcc(conn, [(pk, m) for pk, m in relayed
                                    if m.bcc_addrs and pk not in made], now)
        if seen_in and self.rules.shared:
            about += await self._assign(conn, seen_in, now)
        # announced last, so that each message's JSON is as this transaction leaves it
        # (its links, queued events and assignment included)
        await self._announce(conn, list(new), about, now)
        # a message seen again on a new path: bump updated_at (API consumers poll by it)
        seen_again = new_sources - set(created.values())
        for chunk in chunks(sorted(seen_again)):
            await conn.execute(sa.update(messages_table).where(messages_table.c.id.in_(chunk))
                               .values(updated_at=now))
        return [Stored(id=pks[k], created=(k in created and first[k] is m))
                for k, m in zip(keys, items, strict=True)]

    async def _index_new(self, conn: AsyncConnection, new: dict[int, NewMessage],
                         now: datetime) -> list[_About]:
        """Addresses, contact and company links, replied events of new messages; the
        replies' webhooks to announce."""
        await self._link_correspondents(conn, {pk: _correspondents(m) for pk, m in new.items()},
                                        _display_names(new.values()), now)
        return await self._replies(conn, new, now)

    async def _late_bcc(self, conn: AsyncConnection, relayed: list[tuple[int, NewMessage]],
                        now: datetime) -> None:
        """The relay's Bcc of a message stored first from another path (the ingest address
        in Bcc, IMAP Sent): its ``bcc_addrs``, addresses and links added now."""
        for pk, m in relayed:
            await conn.execute(sa.update(messages_table).where(messages_table.c.id == pk)
                               .values(bcc_addrs=clean_addrs(m.bcc_addrs)))
        if relayed:
            await self._link_correspondents(
                conn, {pk: [("bcc", a) for a in _unique(m.bcc_addrs)] for pk, m in relayed},
                _display_names(m for _, m in relayed), now, existing=True)

    async def _link_correspondents(self, conn: AsyncConnection,
                                   by_pk_addrs: dict[int, list[tuple[str, str]]],
                                   names: dict[str, str], now: datetime, *,
                                   existing: bool = False) -> None:
        """``message_addresses`` rows and contact and company links of (role, address)
        pairs by message; `existing`: the messages may have some already."""
        rules = self.rules
        address_rows = [{"message_pk": pk, "role": role, "address": addr, "domain": domain_of(addr)}
                        for pk, pairs in by_pk_addrs.items() for role, addr in pairs]
        astmt: Any = sa.insert(addresses_table)
        if existing:
            astmt = self.insert(addresses_table).on_conflict_do_nothing()
        for chunk in chunks(address_rows):
            await conn.execute(astmt, list(chunk))

        counts: dict[str, int] = {}
        for pairs in by_pk_addrs.values():
            for a in {a for _, a in pairs if rules.linkable(a)}:
                counts[a] = counts.get(a, 0) + 1
        linkable = sorted(counts)
        contacts = await identify.resolve(
            conn, self.dialect, rules, {a: names.get(a, "") for a in linkable}, now,
            self._company_ids, counts=counts, batch=sorted(by_pk_addrs))
        domains = sorted({d for a in linkable if (d := rules.company_domain(a))})
        companies = await self._company_ids(conn, domains) if domains else {}
        contact_rows: list[dict[str, Any]] = []
        company_rows: set[tuple[int, int]] = set()
        for pk, pairs in by_pk_addrs.items():
            for role, addr in pairs:
                if addr in contacts:
                    contact_rows.append({"message_pk": pk, "contact_pk": contacts[addr], "role": role})
                d = rules.company_domain(addr)
                if d and d in companies:
                    company_rows.add((pk, companies[d]))
        cstmt: Any = sa.insert(message_contacts_table)
        mstmt: Any = sa.insert(message_companies_table)
        if existing:
            cstmt = self.insert(message_contacts_table).on_conflict_do_nothing()
            mstmt = self.insert(message_companies_table).on_conflict_do_nothing()
        for chunk in chunks(contact_rows):
            await conn.execute(cstmt, list(chunk))
        crows = [{"message_pk": m, "company_pk": c} for m, c in sorted(company_rows)]
        for chunk in chunks(crows):
            await conn.execute(mstmt, list(chunk))

    async def _assign(self, conn: AsyncConnection, seen_in: list[tuple[int, str]],
                      now: datetime) -> list[_About]:
        """Inbound mail newly seen in a shared mailbox goes to a rep (:mod:`gateway.crm.assign`),
        announced by ``message.assigned`` (returned)."""
        done = await assign.assign_messages(conn, self.dialect,
                                            {p.account: p for p in self.rules.shared}, seen_in, now)
        return [("message.assigned", a.message_pk, {
            "account": a.account, "assigned_to": a.user, "rule": a.rule, "contact": a.contact})
            for a in done if a.user]

    def _wanted(self, event_type: str) -> bool:
        return any(w.wants(event_type) for w in self.webhooks)

    async def _announce(self, conn: AsyncConnection, stored: Sequence[int],
                        about: Sequence[_About], now: datetime) -> None:
        """Queue ``message.stored`` for the messages `stored`, then the webhooks `about`
        messages (type, message id, data), each with its message's JSON as ``message``
        (:meth:`_webhook_messages`: as this transaction has it, a few queries for the
        whole batch, none for an event nobody subscribes to)."""
        stored = list(stored) if self._wanted("message.stored") else []
        about = [a for a in about if self._wanted(a[0])]
        if not stored and not about:
            return
        details, briefs = await self._webhook_messages(conn, stored, {pk for _, pk, _ in about})
        await self.enqueue_webhooks(
            conn, [("message.stored", {"message": details[pk]}) for pk in stored]
            + [(t, {"message": briefs[pk], **data}) for t, pk, data in about], now)

    async def _queued(self, conn: AsyncConnection, relayed: list[tuple[int, NewMessage]], *,
                      created: set[int], now: datetime) -> None:
        """``queued`` events for the relay's envelope recipients, whenever the relay's record comes.

        The relay's record may arrive after the same message was stored from ingest (the
        ingest address in Bcc) or IMAP Sent, so this runs for every relay item whose copy
        (queue id) is new in the store, not only for new rows. Each event is keyed
        ``queued:<queue id>:<recipient>`` (the copy's queue id for a per-recipient copy),
        so a replayed batch adds nothing. A row that existed already is the relay's from
        now on: outbound, and the relay's account, user, template, campaign and schedule
        where it had none. A scheduled send's events carry ``scheduled_for`` (ISO).
        """
        rows: list[dict[str, Any]] = []
        for pk, m in relayed:
            relay = [s for s in m.sources if s.source == "relay"] or m.sources[:1]
            by_rcpt = {s.recipient.lower(): s for s in relay if s.recipient}
            for r in dict.fromkeys(clean_text(x).strip() for x in m.queued_recipients):
                if not r:
                    continue
                src = by_rcpt.get(r.lower(), relay[0])
                details = ({"scheduled_for": m.scheduled_at.isoformat()}
                           if m.scheduled_at is not None else {})
                rows.append({"message_pk": pk, "type": "queued", "at": src.at, "recipient": r,
                             "machine": False, "details": details,
                             "key": clean_text(f"queued:{src.ref}:{r.lower()}")})
        await self._mark_suppressed(conn, rows)
        stmt = self.insert(events_table).on_conflict_do_nothing(index_elements=[events_table.c.key])
        for chunk in chunks(rows):
            await conn.execute(stmt, list(chunk))
        m_ = messages_table.c
        for pk, m in relayed:
            if pk in created or m.direction != "outbound":
                continue
            await conn.execute(
                sa.update(messages_table).where(m_.id == pk).values(
                    direction="outbound",
                    account=sa.func.coalesce(m_.account, clean_opt_text(m.account)),
                    user=sa.func.coalesce(m_.user, clean_opt_text(m.user)),
                    template=sa.func.coalesce(m_.template, clean_opt_text(m.template)),
                    campaign=sa.func.coalesce(m_.campaign, clean_opt_text(m.campaign)),
                    scheduled_at=sa.func.coalesce(
                        m_.scheduled_at, sa.literal(m.scheduled_at, m_.scheduled_at.type)),
                    updated_at=now))

    async def _replies(self, conn: AsyncConnection, new: dict[int, NewMessage],
                       now: datetime) -> list[_About]:
        """An inbound answer to an outbound message, from one of its recipients, records on it
        ``replied`` (a person's ``message``) or ``auto_replied`` (an ``auto_reply``).

        A recipient is an address in the outbound message's To or Cc, or an envelope
        recipient of its ``queued`` events (Bcc). Contacts have one address each, so the
        match is by address (case-insensitive). Automatic and bulk mail and reports
        (:mod:`gateway.mail.autoreply`) record nothing here.
        """
        asked: dict[int, list[str]] = {}
        for pk, m in new.items():
            if m.direction != "inbound" or m.kind not in ("message", "auto_reply"):
                continue
            parents = [message_id_key(m.in_reply_to)] if m.in_reply_to else []
            parents += [message_id_key(r) for r in reversed(m.references)]
            parents = [p for p in dict.fromkeys(parents) if p]
            if parents:
                asked[pk] = parents
        if not asked:
            return []
        outbound = await bounces.outbound_by_message_id(
            conn, sorted({p for ps in asked.values() for p in ps}))
        recipients = await bounces.recipients_of(conn, sorted(set(outbound.values())))
        hooks: list[_About] = []
        for pk, parents in asked.items():
            m = new[pk]
            sender = clean_text(m.from_addr).strip().lower()
            target = next((outbound[p] for p in parents if p in outbound
                           and sender in recipients.get(outbound[p], ())), None)
            if target is None:
                continue
            at = m.date or m.sources[0].at
            kind = "replied" if m.kind == "message" else "auto_replied"
            details: dict[str, Any] = {"reply_id": pk, "message_id": m.message_id,
                                       "subject": m.subject}
            if kind == "auto_replied":
                details["return_date"] = m.return_date
            machine = kind == "auto_replied"
            result = await conn.execute(
                self.insert(events_table).on_conflict_do_nothing(index_elements=[events_table.c.key])
                .returning(events_table.c.id),
                [{"message_pk": target, "type": kind, "at": at, "recipient": sender,
                  "machine": machine, "details": clean_json(details), "key": f"{kind}:{pk}"}])
            if result.first() is not None:
                hooks.append((f"message.{kind}", target, {
                    "event": {"type": kind, "at": iso(at), "recipient": sender,
                              "machine": machine, "category": None, "details": details}}))
        return hooks

    async def _contact_ids(self, conn: AsyncConnection, emails: Sequence[str]) -> dict[str, int]:
        """Address -> contact pk, by any of a contact's addresses (:mod:`gateway.crm.identify`)."""
        return await identify.contact_ids(conn, emails)

    async def _company_ids(self, conn: AsyncConnection, domains: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in chunks(domains):
            rows = await conn.execute(sa.select(companies_table.c.domain, companies_table.c.id)
                                      .where(companies_table.c.domain.in_(chunk)))
            out.update({d: pk for d, pk in rows.all()})
        return out

    async def _add_events(self, conn: AsyncConnection,
                          events: list[EventRecord]) -> list[EventRecord]:
        """Insert events by queue id; returns those whose queue id is unknown."""
        if not events:
            return []
        pks: dict[str, int] = {}
        copy_rcpt: dict[str, str] = {}   # a per-recipient copy's recipient
        for chunk in chunks(sorted({e.queue_id for e in events})):
            found = await conn.execute(sa.select(sources_table.c.ref, sources_table.c.message_pk,
                                                 sources_table.c.recipient)
                                       .where(sources_table.c.source == "relay",
                                              sources_table.c.ref.in_(chunk)))
            for q, pk, rcpt in found.all():
                pks[q] = pk
                if rcpt:
                    copy_rcpt[q] = rcpt
        unknown: list[EventRecord] = []
        rows: list[dict[str, Any]] = []
        for e in events:
            target = pks.get(e.queue_id)
            if target is None:
                unknown.append(e)
                continue
            recipient = e.recipient or copy_rcpt.get(e.queue_id, "")
            rows.append({"message_pk": target, "type": e.type, "at": e.at,
                         "recipient": clean_text(recipient), "machine": bool(e.machine),
                         "details": clean_json(e.details or {}), "key": clean_opt_text(e.key)})
        # keyed events (tracking hits, replies) are recorded once: the first of a key wins
        keyed = [r for r in rows if r["key"] is not None]
        inserted: set[str] = set()
        kstmt = (self.insert(events_table).on_conflict_do_nothing(index_elements=[events_table.c.key])
                 .returning(events_table.c.key))
        for chunk in chunks(keyed):
            inserted.update(k for (k,) in (await conn.execute(kstmt, list(chunk))).all())
        plain = [r for r in rows if r["key"] is None]
        for chunk in chunks(plain):
            await conn.execute(sa.insert(events_table), list(chunk))
        await self._suppress(conn, [r for r in rows if r["key"] is None or r["key"] in inserted])
        announced: list[dict[str, Any]] = []
        for row in rows:
            if row["key"] is not None:
                if row["key"] not in inserted:
                    continue
                inserted.discard(row["key"])   # a key repeated in this batch: announced once
            if row["type"] in ("sent", "deferred", "bounced", "opened", "clicked"):
                announced.append(row)
        summaries = await self._tracking_summaries(
            conn, {r["message_pk"] for r in announced if r["type"] in HIT_TYPES})
        hooks: list[_About] = []
        for row in announced:
            data: dict[str, Any] = {"event": event_payload(row)}
            if row["type"] in HIT_TYPES:
                summary = summaries[row["message_pk"]]
                data["tracking"] = {"recipient": recipient_summary(summary, row["recipient"]),
                                    "total": summary["total"]}
            hooks.append((f"message.{row['type']}", row["message_pk"], data))
        await self._announce(conn, [], hooks, datetime.now(UTC))
        return unknown

    async def _reports(self, conn: AsyncConnection,
                       reports: list[NewMessage]) -> list[bounces.Applied]:
        """Delivery reports, read receipts and feedback reports as events on the messages
        they are about (:mod:`gateway.crm.bounces`), with their suppressions and webhooks."""
        applied = await bounces.apply_reports(conn, self.dialect, reports)
        rows = [row for a in applied for row in a.rows]
        await self._suppress(conn, rows)
        await self._announce(conn, [], [(f"message.{row['type']}", row["message_pk"], {
            "event": event_payload(row)}) for row in rows], datetime.now(UTC))
        for m, a in zip(reports, applied, strict=True):
            self.log.info("report_recorded" if a.rows else "report_ignored",
                          report=m.report.type if m.report else None,
                          report_message_id=m.message_id, message=a.message_pk,
                          events=[f"{r['type']}:{r['recipient']}" for r in a.rows],
                          skipped=list(a.skipped)[:10])
        return applied

    async def _tracking_summaries(self, conn: AsyncConnection,
                                  pks: set[int]) -> dict[int, dict[str, Any]]:
        """The tracking summary of each message (its hit events, this transaction's included)."""
        hits: dict[int, list[Any]] = {pk: [] for pk in pks}
        if not pks or not any(w.wants(f"message.{t}") for w in self.webhooks for t in HIT_TYPES):
            return {pk: summarize(()) for pk in pks}     # nobody is told: no query
        for chunk in chunks(sorted(pks)):
            rows = await conn.execute(
                sa.select(events_table.c.message_pk, events_table.c.type, events_table.c.at,
                          events_table.c.recipient, events_table.c.machine, events_table.c.details)
                .where(events_table.c.message_pk.in_(chunk), events_table.c.type.in_(HIT_TYPES)))
            for e in rows.mappings():
                hits[e["message_pk"]].append(e)
        return {pk: summarize(evs) for pk, evs in hits.items()}

    # -- the suppression list (gateway.crm.suppression) ------------------------------------
    async def _suppress(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        """Hard bounces and complaints among event rows just inserted list their recipient."""
        added = await suppression.from_events(conn, self.dialect, rows)
        if added:
            self.log.info("suppressed", addresses=added[:20], count=len(added))

    async def _mark_suppressed(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        """`queued` event rows about to be inserted say when their recipient is suppressed."""
        marked = await suppression.mark_queued(conn, rows)
        if marked:
            self.log.info("queued_to_suppressed", recipients=marked[:20], count=len(marked))

    # -- webhook outbox --------------------------------------------------------------------
    async def enqueue_webhook(self, conn: AsyncConnection, event_type: str, data: dict[str, Any],
                              now: datetime | None = None) -> str | None:
        """Add one delivery per subscribed webhook, inside the caller's transaction.

        Returns the event id (the idempotency id receivers see), None when nobody subscribes.
        """
        return (await self.enqueue_webhooks(conn, [(event_type, data)], now))[0]

    async def enqueue_webhooks(self, conn: AsyncConnection,
                               events: Sequence[tuple[str, dict[str, Any]]],
                               now: datetime | None = None) -> list[str | None]:
        """:meth:`enqueue_webhook` for several events, in order, with one INSERT for them all."""
        return await outbox.enqueue(conn, self.webhooks, events, now)

    # -- filtering (IMAP header-first, ingest) ------------------------------------------
    async def concerning(self, messages: Sequence[Sequence[str]],
                         names: Sequence[Mapping[str, str]] = ()) -> list[bool]:
        """For each message (its From, To and Cc addresses): does it concern the CRM?

        Yes when one of its linkable addresses (not ours, not excluded) is a contact, or
        has a known company's domain (`link_by: domain`), or, with `link_by: name`, has
        a display name (`names`: per message, lower-cased address -> name) that is a
        contact's full name, or, with `crm.auto_create_contacts`, exists at all. A
        message whose sender (the first address) is excluded never does. One query per
        batch, whatever its size.
        """
        rules = self.rules
        linkable = [[a.strip().lower() for a in addrs if a and rules.linkable(a)]
                    for addrs in messages]
        out = [bool(addrs) and not (addrs[0] and rules.excluded(addrs[0])) for addrs in messages]
        if rules.auto_create_contacts:
            return [ok and bool(la) for ok, la in zip(out, linkable, strict=True)]
        emails = sorted({a for la in linkable for a in la})
        domains = sorted({d for la in linkable for a in la if (d := rules.company_domain(a))})
        keys = [identify.name_keys(n, la) if rules.link_by_name else set()
                for n, la in zip(names or [{}] * len(linkable), linkable, strict=True)]
        try:
            async with self.engine.connect() as conn:
                known = set((await self._contact_ids(conn, emails)).keys()) if emails else set()
                companies = set((await self._company_ids(conn, domains)).keys()) if domains \
                    else set()
                named = await identify.known_names(conn, sorted(set().union(*keys)))
        except (SQLAlchemyError, OSError) as exc:
            raise self.error("store read failed", exc) from exc
        return [ok and (any(a in known or rules.company_domain(a) in companies for a in la)
                        or bool(k & named))
                for ok, la, k in zip(out, linkable, keys, strict=True)]

    # -- reading ------------------------------------------------------------------------
    async def list_messages(self, *, contact: str | None = None, since: datetime | None = None,
                            account: str | None = None, direction: str | None = None,
                            before: tuple[datetime, int] | None = None,
                            limit: int = 100, query: str | None = None,
                            assigned_to: str | None = None) -> list[dict[str, Any]]:
        """Newest first (by Date header, else by when it was stored), each with its events.

        `query`: a search (:func:`gateway.crm.search.parse_query`: words, "phrases" and
        addresses, every one in the subject, sender's name, addresses or body; raises
        :class:`gateway.crm.search.BadQuery` when it has nothing to search for).
        `contact`: an address among From, To and Cc (whole address, case-insensitive).
        `since`: only messages dated at or after it (a naive datetime is taken as UTC).
        `account`: stored for, or seen in the mailbox of, this account.
        `before`: a cursor, (sort time, id) of the last message of the previous page.
        `assigned_to`: assigned to this user login by a shared mailbox (as configured).
        """
        q = sa.select(messages_table).order_by(*NEWEST_FIRST)
        if query is not None:
            q = q.where(search.matching(self.dialect, search.parse_query(query)))
        if since is not None:
            q = q.where(sort_at >= utc(since))
        if contact:
            q = q.where(messages_table.c.id.in_(
                sa.select(addresses_table.c.message_pk)
                .where(addresses_table.c.address == contact.strip().lower())))
        if account:
            q = q.where(sa.or_(messages_table.c.account == account, messages_table.c.id.in_(
                sa.select(sources_table.c.message_pk).where(sources_table.c.account == account))))
        if direction:
            q = q.where(messages_table.c.direction == direction)
        if assigned_to:
            q = q.where(messages_table.c.assigned_to == assigned_to.strip())
        if before is not None:
            q = q.where(_past(before))
        return await self.fetch(q.limit(max(0, limit)))

    async def timeline(self, ids: sa.Select[Any], *, before: tuple[datetime, int] | None,
                       limit: int) -> list[dict[str, Any]]:
        """A page of the messages whose ids `ids` selects, newest first (as
        :meth:`list_messages`), after the cursor `before` (sort time, id)."""
        # the page's ids first, then their rows: the sort then moves ids, not whole messages
        # (about 3x faster on SQLite for a contact with thousands of messages)
        page = sa.select(messages_table.c.id).where(messages_table.c.id.in_(ids)).order_by(*NEWEST_FIRST)
        if before is not None:
            page = page.where(_past(before))
        q = sa.select(messages_table).where(
            messages_table.c.id.in_(page.limit(max(0, limit)).scalar_subquery()))
        return await self.fetch(q.order_by(*NEWEST_FIRST))

    async def get_message(self, id: int, *, bodies: bool = False) -> dict[str, Any] | None:
        rows = await self.fetch(sa.select(messages_table).where(messages_table.c.id == id), bodies=bodies)
        return rows[0] if rows else None

    async def known_relay_refs(self, refs: Sequence[str]) -> set[str]:
        """The queue ids among `refs` the store has a relay record of (a message source)."""
        known: set[str] = set()
        try:
            async with self.engine.connect() as conn:
                for chunk in chunks(sorted(set(refs))):
                    found = await conn.execute(
                        sa.select(sources_table.c.ref).where(sources_table.c.source == "relay",
                                                             sources_table.c.ref.in_(chunk)))
                    known.update(found.scalars())
        except (SQLAlchemyError, OSError) as exc:
            raise self.error("store read failed", exc) from exc
        return known

    async def get_message_by_queue_id(self, queue_id: str, *,
                                      bodies: bool = False) -> dict[str, Any] | None:
        q = sa.select(messages_table).where(messages_table.c.id.in_(
            sa.select(sources_table.c.message_pk).where(sources_table.c.source.in_(("relay", "ingest")),
                                                   sources_table.c.ref == queue_id)))
        rows = await self.fetch(q, bodies=bodies)
        return rows[0] if rows else None

    async def raw_message(self, id: int) -> bytes | None:
        """The raw bytes of a stored message, if they were kept."""
        try:
            async with self.engine.connect() as conn:
                digest = (await conn.execute(sa.select(messages_table.c.raw_sha256)
                                             .where(messages_table.c.id == id))).scalar()
                if not digest:
                    return None
                if self.raw.in_database:
                    return await self.raw.read_row(conn, digest)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error("store read failed", exc) from exc
        return await asyncio.to_thread(self.raw.read_file, digest)

    async def fetch(self, query: sa.Select[Any], *, bodies: bool = False) -> list[dict[str, Any]]:
        """The messages `query` selects (rows of ``messages``), in its order, as JSON with
        their events, sources, contacts and companies (and, with `bodies`, everything stored)."""
        try:
            async with self.engine.connect() as conn:
                loaded = await _load(conn, query)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error("store read failed", exc) from exc
        return [message_dict(*parts, bodies=bodies) for parts in loaded]

    async def _webhook_messages(self, conn: AsyncConnection, detail: Iterable[int],
                                brief: Iterable[int] = ()
                                ) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
        """The message JSON webhooks carry, as of the caller's transaction, in a few queries
        per :data:`~gateway.crm.sql.CHUNK` messages (never one per message).

        `detail`: as ``GET /api/v1/messages/{id}`` shows it (``message.stored``);
        `brief`: as ``GET /api/v1/messages`` lists it, less ``events``
        (:func:`~gateway.crm.views.brief_message`; the event webhooks, whose event is
        beside it). Returns (detail JSON by id, brief JSON by id)."""
        full, short = set(detail), set(brief)
        details: dict[int, dict[str, Any]] = {}
        briefs: dict[int, dict[str, Any]] = {}
        for pks, with_events in ((full, True), (short - full, False)):
            for chunk in chunks(sorted(pks)):
                query = sa.select(messages_table).where(messages_table.c.id.in_(chunk))
                for parts in await _load(conn, query, events=with_events):
                    pk = parts[0]["id"]
                    if pk in full:
                        details[pk] = message_dict(*parts, bodies=True)
                    if pk in short:
                        briefs[pk] = brief_message(message_dict(*parts, bodies=False))
        return details, briefs


_Loaded = tuple[Mapping[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                list[dict[str, Any]]]


async def _load(conn: AsyncConnection, query: sa.Select[Any], *,
                events: bool = True) -> list[_Loaded]:
    """The rows of ``messages`` `query` selects, in its order, each with its events (unless
    not `events`: then none), sources, contacts and companies, as :func:`message_dict`
    takes them: four queries per :data:`~gateway.crm.sql.CHUNK` messages."""
    messages: Sequence[Mapping[str, Any]] = (await conn.execute(query)).mappings().all()
    pks = [m["id"] for m in messages]
    evs: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
    sources: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
    contacts: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
    companies: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
    for chunk in chunks(pks):
        if events:
            rows = await conn.execute(
                sa.select(events_table).where(events_table.c.message_pk.in_(chunk))
                .order_by(events_table.c.message_pk, events_table.c.at, events_table.c.id))
            for e in rows.mappings():
                evs[e["message_pk"]].append(event_payload(e))
        rows = await conn.execute(
            sa.select(sources_table).where(sources_table.c.message_pk.in_(chunk))
            .order_by(sources_table.c.id))
        for s in rows.mappings():
            sources[s["message_pk"]].append(dict(s))
        rows = await conn.execute(
            sa.select(message_contacts_table.c.message_pk, message_contacts_table.c.role,
                      contacts_table.c.email, contacts_table.c.first_name,
                      contacts_table.c.last_name)
            .join(contacts_table, contacts_table.c.id == message_contacts_table.c.contact_pk)
            .where(message_contacts_table.c.message_pk.in_(chunk))
            .order_by(message_contacts_table.c.message_pk, contacts_table.c.email))
        for c in rows.mappings():
            name = f"{c['first_name']} {c['last_name']}".strip()
            contacts[c["message_pk"]].append({"email": c["email"], "name": name, "role": c["role"]})
        rows = await conn.execute(
            sa.select(message_companies_table.c.message_pk, companies_table.c.domain,
                      companies_table.c.name)
            .join(companies_table, companies_table.c.id == message_companies_table.c.company_pk)
            .where(message_companies_table.c.message_pk.in_(chunk))
            .order_by(message_companies_table.c.message_pk, companies_table.c.domain))
        for co in rows.mappings():
            companies[co["message_pk"]].append({"domain": co["domain"], "name": co["name"]})
    return [(m, evs[m["id"]], sources[m["id"]], contacts[m["id"]], companies[m["id"]])
            for m in messages]
