"""The CRM store: messages seen on any path, stored once, linked to contacts; read back as SPEC §6 JSON.

One :class:`Store` owns one AsyncEngine; every call is one short transaction, so a
store shared by the writer, the ingest listener, the IMAP tailers, the CLI and the
API never holds a connection between calls.

Writing. Every path hands the store :class:`NewMessage` values (the relay through
:meth:`Store.record` with :class:`AcceptedMessage`, from the batching StoreWriter;
ingest and IMAP through :meth:`Store.store_messages`, synchronously, so that a
failure can be answered with 451 or retried, and an IMAP checkpoint is committed in
the same transaction as the messages it covers). In one transaction a batch:

1. inserts the messages not stored yet, unique by ``dedupe_key`` (the Message-ID,
   else a normalised header + body hash), so one message seen on several paths is one
   row; the thread is found from References / In-Reply-To, else, for a reply without
   them, by subject and participants;
2. records every path in ``message_sources`` (unique per source and ref, so a
   replayed batch adds nothing);
3. for new messages: addresses, links to contacts and companies (:mod:`linking`),
   ``queued`` events for relay recipients, ``replied`` on the outbound message an
   inbound reply answers, and ``message.stored`` / ``message.replied`` webhook
   deliveries in the outbox;
4. events (delivery, tracking) for queue ids of this or earlier batches.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.config import Config
from gateway.crm.engine import describe_error, make_engine, safe_url
from gateway.crm.linking import LinkRules
from gateway.crm.migrate import current_revision_sync, head_revision, is_known_revision, upgrade
from gateway.crm.models import (
    SNIPPET_MAX,
    Company,
    Contact,
    Event,
    Message,
    MessageAddress,
    MessageCompany,
    MessageContact,
    MessageSource,
    RawMessage,
    WebhookDelivery,
    sort_at,
)
from gateway.errors import StoreError
from gateway.mail.addresses import domain_of
from gateway.records import (
    AcceptedMessage,
    EventRecord,
    NewMessage,
    Stored,
    WebhookTarget,
    accepted_to_new,
    message_id_key,
    subject_key,
)
from gateway.records import clean_text as _text

_messages = cast(sa.Table, Message.__table__)
_sources = cast(sa.Table, MessageSource.__table__)
_events = cast(sa.Table, Event.__table__)
_addresses = cast(sa.Table, MessageAddress.__table__)
_contacts = cast(sa.Table, Contact.__table__)
_companies = cast(sa.Table, Company.__table__)
_msg_contacts = cast(sa.Table, MessageContact.__table__)
_msg_companies = cast(sa.Table, MessageCompany.__table__)
_raw = cast(sa.Table, RawMessage.__table__)
_outbox = cast(sa.Table, WebhookDelivery.__table__)

#: Values per IN (...) lookup; far below SQLite's 32,766 bound parameters.
_CHUNK = 500
#: A reply without References / In-Reply-To joins a thread by subject only this recent.
SUBJECT_THREAD_WINDOW = timedelta(days=30)


# -- cleaning: nothing a caller passes may make a whole batch fail ----------------------------
def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _json(value: Any) -> Any:
    """A JSON-serialisable copy with clean strings; anything else becomes its str()."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Mapping):
        return {_text(str(k)): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json(v) for v in value]
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bytes):
        return _text(value.decode("utf-8", "replace"))
    return _text(str(value))


def _addrs(values: Iterable[str]) -> list[str]:
    return [_text(v) for v in values if v]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _utc(value).isoformat()


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


class RawStore:
    """Raw message bytes, content-addressed: on disk (``dir/ab/cd/<sha256>``) or in the database."""

    def __init__(self, directory: Path | None, in_database: bool) -> None:
        self.directory = directory
        self.in_database = in_database

    @property
    def enabled(self) -> bool:
        return self.in_database or self.directory is not None

    def path(self, digest: str) -> Path:
        assert self.directory is not None
        return self.directory / digest[:2] / digest[2:4] / digest

    def write_files(self, blobs: Mapping[str, bytes]) -> None:
        """Write each blob not on disk yet (tmp, fsync, rename): never twice, never half.

        The fsyncs of a batch run side by side (the filesystem's journal commits them
        together), so a batch costs about one disk flush, not one per message."""
        pending: list[tuple[Path, Path, int]] = []
        try:
            for digest, data in blobs.items():
                final = self.path(digest)
                if final.exists():
                    continue
                final.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                tmp = final.with_name(f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                pending.append((tmp, final, fd))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if len(pending) > 1:
                with ThreadPoolExecutor(min(16, len(pending))) as pool:
                    list(pool.map(os.fsync, [fd for _, _, fd in pending]))
            elif pending:
                os.fsync(pending[0][2])
            for tmp, final, _ in pending:
                os.replace(tmp, final)
        finally:
            for tmp, _, fd in pending:
                os.close(fd)
                tmp.unlink(missing_ok=True)   # only left over when something failed

    def read_file(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except (FileNotFoundError, AssertionError):
            return None


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
                raise StoreError(f"cannot open the store {safe_url(url)}: "
                                 f"{describe_error(exc, url)}") from exc
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

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _fail(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{what}: {describe_error(exc, self.url)}")

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
            raise self._fail(f"store write failed ({len(accepted)} messages, {len(events)} events)",
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
            raise self._fail(f"store write failed ({len(items)} messages)", exc) from exc
        return result

    async def _write_blobs(self, items: Sequence[NewMessage]) -> None:
        if self.raw.directory is None or self.raw.in_database:
            return
        blobs = {m.raw_sha256: m.raw for m in items if m.raw_sha256 is not None and m.raw is not None}
        if blobs:
            try:
                await asyncio.to_thread(self.raw.write_files, blobs)
            except OSError as exc:
                raise StoreError(f"cannot write raw messages to {self.raw.directory}: "
                                 f"{exc.strerror or exc}") from exc

    async def _store_batch(self, conn: AsyncConnection, items: list[NewMessage]) -> list[Stored]:
        if not items:
            return []
        now = datetime.now(UTC)
        keys = [m.dedupe_key for m in items]
        first: dict[str, NewMessage] = {}
        for k, m in zip(keys, items, strict=True):
            first.setdefault(k, m)
        threads = await self._threads(conn, list(first.values()))
        rows = []
        for k, m in first.items():
            digest = m.raw_sha256 if self.raw.enabled else None
            skey, _ = subject_key(m.subject)
            at = m.sources[0].at
            rows.append({
                "dedupe_key": _text(k), "message_id": _text(m.message_id.strip()),
                "thread_id": threads[k], "in_reply_to": _opt_text(m.in_reply_to),
                "reference_ids": _addrs(m.references), "direction": m.direction,
                "account": _opt_text(m.account), "user": _opt_text(m.user),
                "from_addr": _text(m.from_addr), "from_name": _text(m.from_name),
                "to_addrs": _addrs(m.to_addrs), "cc_addrs": _addrs(m.cc_addrs),
                "subject": _text(m.subject), "subject_key": skey, "date": m.date,
                "snippet": _text(m.snippet, SNIPPET_MAX), "text_body": _text(m.text_body),
                "html_body": _text(m.html_body), "attachments": _json(m.attachments),
                "size": int(m.size), "raw_sha256": digest, "template": _opt_text(m.template),
                "created_at": at, "updated_at": now})
        stmt = (self._insert(_messages)
                .on_conflict_do_nothing(index_elements=[_messages.c.dedupe_key])
                .returning(_messages.c.id, _messages.c.dedupe_key))
        created: dict[str, int] = {}
        for chunk in _chunks(rows):
            result = await conn.execute(stmt, list(chunk))
            created.update({k: pk for pk, k in result.all()})
        pks = dict(created)
        missing = [k for k in first if k not in pks]
        for chunk in _chunks(missing):
            found = await conn.execute(sa.select(_messages.c.dedupe_key, _messages.c.id)
                                       .where(_messages.c.dedupe_key.in_(chunk)))
            pks.update({k: pk for k, pk in found.all()})

        source_rows = [{"message_pk": pks[k], "source": s.source, "ref": _text(s.ref),
                        "account": _opt_text(s.account), "folder": _opt_text(s.folder),
                        "uidvalidity": s.uidvalidity, "uid": s.uid,
                        "recipient": _opt_text(s.recipient), "client_ip": _opt_text(s.client_ip),
                        "links": s.links, "at": s.at}
                       for k, m in zip(keys, items, strict=True) for s in m.sources]
        new_sources: set[int] = set()
        sstmt = (self._insert(_sources)
                 .on_conflict_do_nothing(index_elements=[_sources.c.source, _sources.c.ref])
                 .returning(_sources.c.message_pk))
        for chunk in _chunks(source_rows):
            result = await conn.execute(sstmt, list(chunk))
            new_sources.update(pk for (pk,) in result.all())

        if self.raw.in_database:
            blobs = {r["raw_sha256"]: first[r["dedupe_key"]].raw for r in rows
                     if r["raw_sha256"] and r["dedupe_key"] in created}
            if blobs:
                await conn.execute(self._insert(_raw).on_conflict_do_nothing(
                    index_elements=[_raw.c.sha256]),
                    [{"sha256": d, "data": b, "size": len(b or b"")} for d, b in blobs.items()])

        new = {k: first[k] for k in created}
        if new:
            await self._index_new(conn, {created[k]: m for k, m in new.items()}, now)
        # a message seen again on a new path: bump updated_at (API consumers poll by it)
        seen_again = new_sources - set(created.values())
        for chunk in _chunks(sorted(seen_again)):
            await conn.execute(sa.update(_messages).where(_messages.c.id.in_(chunk))
                               .values(updated_at=now))
        return [Stored(id=pks[k], created=(k in created and first[k] is m))
                for k, m in zip(keys, items, strict=True)]

    async def _threads(self, conn: AsyncConnection, items: list[NewMessage]) -> dict[str, str]:
        """thread_id per dedupe key: a referenced message's thread, else the first reference,
        else (a reply without references) a recent thread with the same subject and a shared
        participant, else the message's own key."""
        refs = {message_id_key(r) for m in items for r in [*m.references, m.in_reply_to or ""]}
        refs.discard("")
        known: dict[str, str] = {}
        for chunk in _chunks(sorted(f"mid:{r}" for r in refs)):
            rows = await conn.execute(sa.select(_messages.c.dedupe_key, _messages.c.thread_id)
                                      .where(_messages.c.dedupe_key.in_(chunk)))
            known.update({k[4:]: t for k, t in rows.all() if t})
        out: dict[str, str] = {}
        batch_threads: dict[str, str] = {}
        for m in items:
            key = m.dedupe_key
            chain = [message_id_key(r) for r in [*m.references, m.in_reply_to or ""]]
            chain = [r for r in chain if r]
            thread = next((known.get(r) or batch_threads.get(r) for r in chain
                           if known.get(r) or batch_threads.get(r)), None)
            if thread is None and chain:
                thread = chain[0]
            if thread is None:
                skey, is_reply = subject_key(m.subject)
                if is_reply and skey:
                    thread = await self._thread_by_subject(conn, m, skey)
            if thread is None:
                thread = message_id_key(m.message_id) or key
            out[key] = _text(thread)
            mid = message_id_key(m.message_id)
            if mid:
                batch_threads[mid] = out[key]
        return out

    async def _thread_by_subject(self, conn: AsyncConnection, m: NewMessage,
                                 skey: str) -> str | None:
        people = {a.strip().lower() for a in [m.from_addr, *m.to_addrs, *m.cc_addrs] if a}
        if not people:
            return None
        since = (m.date or m.sources[0].at) - SUBJECT_THREAD_WINDOW
        q = (sa.select(_messages.c.thread_id).where(
            _messages.c.subject_key == skey, sort_at >= _utc(since),
            _messages.c.id.in_(sa.select(_addresses.c.message_pk)
                               .where(_addresses.c.address.in_(sorted(people)))))
             .order_by(sort_at.desc()).limit(1))
        return (await conn.execute(q)).scalar()

    async def _index_new(self, conn: AsyncConnection, new: dict[int, NewMessage],
                         now: datetime) -> None:
        """Addresses, contact and company links, queued/replied events, webhooks of new messages."""
        rules = self.rules
        address_rows: list[dict[str, Any]] = []
        by_pk_addrs: dict[int, list[tuple[str, str]]] = {}
        for pk, m in new.items():
            seen: set[tuple[str, str]] = set()
            for role, values in (("from", [m.from_addr]), ("to", m.to_addrs), ("cc", m.cc_addrs)):
                for v in values:
                    addr = _text(v).strip().lower()
                    if addr and (role, addr) not in seen:
                        seen.add((role, addr))
                        address_rows.append({"message_pk": pk, "role": role, "address": addr,
                                             "domain": domain_of(addr)})
            by_pk_addrs[pk] = sorted(seen)
        for chunk in _chunks(address_rows):
            await conn.execute(sa.insert(_addresses), list(chunk))

        linkable = sorted({a for pairs in by_pk_addrs.values() for _, a in pairs
                           if rules.linkable(a)})
        contacts: dict[str, int] = {}
        if rules.links_contacts:
            contacts = await self._contact_ids(conn, linkable)
            if rules.auto_create_contacts:
                missing = [a for a in linkable if a not in contacts]
                if missing:
                    contacts.update(await self._create_contacts(conn, missing, now))
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
        for chunk in _chunks(contact_rows):
            await conn.execute(sa.insert(_msg_contacts), list(chunk))
        crows = [{"message_pk": m, "company_pk": c} for m, c in sorted(company_rows)]
        for chunk in _chunks(crows):
            await conn.execute(sa.insert(_msg_companies), list(chunk))

        event_rows: list[dict[str, Any]] = [{"message_pk": pk, "type": "queued", "at": m.sources[0].at,
                       "recipient": _text(r), "machine": False, "details": {}, "key": None}
                      for pk, m in new.items() for r in m.queued_recipients]
        for chunk in _chunks(event_rows):
            await conn.execute(sa.insert(_events), list(chunk))
        await self._replies(conn, new, now)
        await self.enqueue_webhooks(conn, [("message.stored", {"message": _summary_payload(pk, m)})
                                           for pk, m in new.items()], now)

    async def _replies(self, conn: AsyncConnection, new: dict[int, NewMessage],
                       now: datetime) -> None:
        """An inbound reply to an outbound message records `replied` on that message."""
        asked: dict[int, list[str]] = {}
        for pk, m in new.items():
            if m.direction != "inbound":
                continue
            parents = [message_id_key(m.in_reply_to)] if m.in_reply_to else []
            parents += [message_id_key(r) for r in reversed(m.references)]
            parents = [p for p in dict.fromkeys(parents) if p]
            if parents:
                asked[pk] = parents
        if not asked:
            return
        wanted = sorted({f"mid:{p}" for ps in asked.values() for p in ps})
        outbound: dict[str, int] = {}
        for chunk in _chunks(wanted):
            rows = await conn.execute(sa.select(_messages.c.dedupe_key, _messages.c.id)
                                      .where(_messages.c.dedupe_key.in_(chunk),
                                             _messages.c.direction == "outbound"))
            outbound.update({k[4:]: pk for k, pk in rows.all()})
        hooks: list[tuple[str, dict[str, Any]]] = []
        for pk, parents in asked.items():
            target = next((outbound[p] for p in parents if p in outbound), None)
            if target is None:
                continue
            m = new[pk]
            at = m.date or m.sources[0].at
            details = {"reply_id": pk, "message_id": m.message_id, "subject": m.subject}
            result = await conn.execute(
                self._insert(_events).on_conflict_do_nothing(index_elements=[_events.c.key])
                .returning(_events.c.id),
                [{"message_pk": target, "type": "replied", "at": at,
                  "recipient": _text(m.from_addr.lower()), "machine": False,
                  "details": _json(details), "key": f"replied:{pk}"}])
            if result.first() is not None:
                hooks.append(("message.replied", {
                    "message_id": target, "event": {"type": "replied", "at": _iso(at),
                                                    "recipient": m.from_addr.lower(),
                                                    "machine": False, "details": details}}))
        await self.enqueue_webhooks(conn, hooks, now)

    async def _contact_ids(self, conn: AsyncConnection, emails: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in _chunks(emails):
            rows = await conn.execute(sa.select(_contacts.c.email, _contacts.c.id)
                                      .where(_contacts.c.email.in_(chunk)))
            out.update({e: pk for e, pk in rows.all()})
        return out

    async def _company_ids(self, conn: AsyncConnection, domains: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in _chunks(domains):
            rows = await conn.execute(sa.select(_companies.c.domain, _companies.c.id)
                                      .where(_companies.c.domain.in_(chunk)))
            out.update({d: pk for d, pk in rows.all()})
        return out

    async def _create_contacts(self, conn: AsyncConnection, emails: Sequence[str],
                               now: datetime) -> dict[str, int]:
        """Contacts made automatically (`crm.auto_create_contacts`) for addresses not known yet."""
        domains = sorted({d for e in emails if (d := self.rules.company_domain(e))})
        companies = await self._company_ids(conn, domains) if domains else {}
        rows: list[dict[str, Any]] = [
            {"email": e, "first_name": "", "last_name": "", "title": "", "phone": "",
                 "company_pk": companies.get(domain_of(e)), "fields": {}, "source": "auto",
                 "created_at": now, "updated_at": now} for e in emails]
        stmt = self._insert(_contacts).on_conflict_do_nothing(index_elements=[_contacts.c.email])
        for chunk in _chunks(rows):
            await conn.execute(stmt, list(chunk))
        return await self._contact_ids(conn, emails)

    async def _add_events(self, conn: AsyncConnection,
                          events: list[EventRecord]) -> list[EventRecord]:
        """Insert events by queue id; returns those whose queue id is unknown."""
        if not events:
            return []
        pks: dict[str, int] = {}
        copy_rcpt: dict[str, str] = {}   # a per-recipient copy's recipient
        for chunk in _chunks(sorted({e.queue_id for e in events})):
            found = await conn.execute(sa.select(_sources.c.ref, _sources.c.message_pk,
                                                 _sources.c.recipient)
                                       .where(_sources.c.source == "relay", _sources.c.ref.in_(chunk)))
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
                         "recipient": _text(recipient), "machine": bool(e.machine),
                         "details": _json(e.details or {}), "key": _opt_text(e.key)})
        # keyed events (tracking hits, replies) are recorded once: the first of a key wins
        keyed = [r for r in rows if r["key"] is not None]
        inserted: set[str] = set()
        kstmt = (self._insert(_events).on_conflict_do_nothing(index_elements=[_events.c.key])
                 .returning(_events.c.key))
        for chunk in _chunks(keyed):
            inserted.update(k for (k,) in (await conn.execute(kstmt, list(chunk))).all())
        plain = [r for r in rows if r["key"] is None]
        for chunk in _chunks(plain):
            await conn.execute(sa.insert(_events), list(chunk))
        hooks: list[tuple[str, dict[str, Any]]] = []
        for row in rows:
            if row["key"] is not None:
                if row["key"] not in inserted:
                    continue
                inserted.discard(row["key"])   # a key repeated in this batch: announced once
            if row["type"] in ("sent", "deferred", "bounced", "opened", "clicked"):
                hooks.append((f"message.{row['type']}",
                              {"message_id": row["message_pk"], "event": _event_payload(row)}))
        await self.enqueue_webhooks(conn, hooks, datetime.now(UTC))
        return unknown

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
        now = now or datetime.now(UTC)
        ids: list[str | None] = []
        rows: list[dict[str, Any]] = []
        for event_type, data in events:
            targets = [w for w in self.webhooks if w.wants(event_type)]
            if not targets:
                ids.append(None)
                continue
            event_id = str(uuid.uuid4())
            payload = {"id": event_id, "type": event_type, "created_at": _iso(now),
                       "data": _json(data)}
            rows += [{"event_id": event_id, "webhook": w.id, "event_type": event_type,
                      "payload": payload, "status": "pending", "attempts": 0,
                      "next_attempt_at": now, "last_error": None, "created_at": now,
                      "delivered_at": None} for w in targets]
            ids.append(event_id)
        for chunk in _chunks(rows):
            await conn.execute(sa.insert(_outbox), list(chunk))
        return ids

    # -- filtering (IMAP header-first, ingest) ------------------------------------------
    async def concerning(self, messages: Sequence[Sequence[str]]) -> list[bool]:
        """For each message (its From, To and Cc addresses): does it concern the CRM?

        Yes when one of its linkable addresses (not ours, not excluded) is a contact, or
        has a known company's domain (`link_by: domain`), or, with
        `crm.auto_create_contacts`, exists at all. A message whose sender (the first
        address) is excluded never does. One query per batch, whatever its size.
        """
        rules = self.rules
        linkable = [[a.strip().lower() for a in addrs if a and rules.linkable(a)]
                    for addrs in messages]
        out = [bool(addrs) and not (addrs[0] and rules.excluded(addrs[0])) for addrs in messages]
        if rules.auto_create_contacts:
            return [ok and bool(la) for ok, la in zip(out, linkable, strict=True)]
        emails = sorted({a for la in linkable for a in la})
        domains = sorted({d for la in linkable for a in la if (d := rules.company_domain(a))})
        try:
            async with self.engine.connect() as conn:
                known = set((await self._contact_ids(conn, emails)).keys()) if emails else set()
                companies = set((await self._company_ids(conn, domains)).keys()) if domains \
                    else set()
        except (SQLAlchemyError, OSError) as exc:
            raise self._fail("store read failed", exc) from exc
        return [ok and any(a in known or rules.company_domain(a) in companies for a in la)
                for ok, la in zip(out, linkable, strict=True)]

    # -- reading ------------------------------------------------------------------------
    async def list_messages(self, *, contact: str | None = None, since: datetime | None = None,
                            account: str | None = None, direction: str | None = None,
                            before: tuple[datetime, int] | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        """Newest first (by Date header, else by when it was stored), each with its events.

        `contact`: an address among From, To and Cc (whole address, case-insensitive).
        `since`: only messages dated at or after it (a naive datetime is taken as UTC).
        `account`: stored for, or seen in the mailbox of, this account.
        `before`: a cursor, (sort time, id) of the last message of the previous page.
        """
        q = sa.select(_messages).order_by(sort_at.desc(), _messages.c.id.desc())
        if since is not None:
            q = q.where(sort_at >= _utc(since))
        if contact:
            q = q.where(_messages.c.id.in_(
                sa.select(_addresses.c.message_pk)
                .where(_addresses.c.address == contact.strip().lower())))
        if account:
            q = q.where(sa.or_(_messages.c.account == account, _messages.c.id.in_(
                sa.select(_sources.c.message_pk).where(_sources.c.account == account))))
        if direction:
            q = q.where(_messages.c.direction == direction)
        if before is not None:
            t, pk = before
            q = q.where(sa.or_(sort_at < _utc(t), sa.and_(sort_at == _utc(t), _messages.c.id < pk)))
        return await self._fetch(q.limit(max(0, limit)))

    async def get_message(self, id: int, *, bodies: bool = False) -> dict[str, Any] | None:
        rows = await self._fetch(sa.select(_messages).where(_messages.c.id == id), bodies=bodies)
        return rows[0] if rows else None

    async def get_message_by_queue_id(self, queue_id: str, *,
                                      bodies: bool = False) -> dict[str, Any] | None:
        q = sa.select(_messages).where(_messages.c.id.in_(
            sa.select(_sources.c.message_pk).where(_sources.c.source.in_(("relay", "ingest")),
                                                   _sources.c.ref == queue_id)))
        rows = await self._fetch(q, bodies=bodies)
        return rows[0] if rows else None

    async def raw_message(self, id: int) -> bytes | None:
        """The raw bytes of a stored message, if they were kept."""
        try:
            async with self.engine.connect() as conn:
                digest = (await conn.execute(sa.select(_messages.c.raw_sha256)
                                             .where(_messages.c.id == id))).scalar()
                if not digest:
                    return None
                if self.raw.in_database:
                    data = (await conn.execute(sa.select(_raw.c.data)
                                               .where(_raw.c.sha256 == digest))).scalar()
                    return bytes(data) if data is not None else None
        except (SQLAlchemyError, OSError) as exc:
            raise self._fail("store read failed", exc) from exc
        return await asyncio.to_thread(self.raw.read_file, digest)

    async def _fetch(self, query: sa.Select[Any], *, bodies: bool = False) -> list[dict[str, Any]]:
        try:
            async with self.engine.connect() as conn:
                messages = (await conn.execute(query)).mappings().all()
                pks = [m["id"] for m in messages]
                events: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
                sources: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
                contacts: dict[int, list[dict[str, Any]]] = {pk: [] for pk in pks}
                for chunk in _chunks(pks):
                    rows = await conn.execute(
                        sa.select(_events).where(_events.c.message_pk.in_(chunk))
                        .order_by(_events.c.message_pk, _events.c.at, _events.c.id))
                    for e in rows.mappings():
                        events[e["message_pk"]].append(_event_payload(e))
                    rows = await conn.execute(
                        sa.select(_sources).where(_sources.c.message_pk.in_(chunk))
                        .order_by(_sources.c.id))
                    for s in rows.mappings():
                        sources[s["message_pk"]].append(dict(s))
                    rows = await conn.execute(
                        sa.select(_msg_contacts.c.message_pk, _msg_contacts.c.role,
                                  _contacts.c.email, _contacts.c.first_name, _contacts.c.last_name)
                        .join(_contacts, _contacts.c.id == _msg_contacts.c.contact_pk)
                        .where(_msg_contacts.c.message_pk.in_(chunk))
                        .order_by(_msg_contacts.c.message_pk, _contacts.c.email))
                    for c in rows.mappings():
                        name = f"{c['first_name']} {c['last_name']}".strip()
                        contacts[c["message_pk"]].append(
                            {"email": c["email"], "name": name, "role": c["role"]})
        except (SQLAlchemyError, OSError) as exc:
            raise self._fail("store read failed", exc) from exc
        return [_message_dict(m, events[m["id"]], sources[m["id"]], contacts[m["id"]], bodies)
                for m in messages]


def _event_payload(e: Mapping[str, Any] | sa.RowMapping) -> dict[str, Any]:
    return {"type": e["type"], "at": _iso(e["at"]), "recipient": e["recipient"],
            "machine": bool(e["machine"]), "details": e["details"] or {}}


def _summary_payload(pk: int, m: NewMessage) -> dict[str, Any]:
    """The message as webhooks announce it when it is stored (no bodies)."""
    return {"id": pk, "message_id": m.message_id, "direction": m.direction, "account": m.account,
            "from": m.from_addr, "to": list(m.to_addrs), "cc": list(m.cc_addrs),
            "subject": m.subject, "date": _iso(m.date), "snippet": m.snippet[:SNIPPET_MAX],
            "sources": sorted({s.source for s in m.sources})}


def _message_dict(m: Mapping[str, Any], events: list[dict[str, Any]], sources: list[dict[str, Any]],
                  contacts: list[dict[str, Any]], bodies: bool) -> dict[str, Any]:
    """A message as SPEC §6 JSON."""
    relay = [s["ref"] for s in sources if s["source"] == "relay"]
    out = {
        "id": m["id"], "message_id": m["message_id"], "thread_id": m["thread_id"],
        "direction": m["direction"], "account": m["account"], "user": m["user"],
        "from": m["from_addr"], "to": list(m["to_addrs"] or []), "cc": list(m["cc_addrs"] or []),
        "subject": m["subject"], "date": _iso(m["date"]), "snippet": m["snippet"],
        "size": m["size"], "sources": list(dict.fromkeys(s["source"] for s in sources)),
        "queue_id": relay[0] if relay else None,
        "contacts": contacts, "events": events,
    }
    if bodies:
        out["from_name"] = m["from_name"]
        out["in_reply_to"] = m["in_reply_to"]
        out["references"] = list(m["reference_ids"] or [])
        out["text_body"] = m["text_body"]
        out["html_body"] = m["html_body"]
        out["attachments"] = list(m["attachments"] or [])
        out["template"] = m["template"]
        out["seen"] = [{k: (_iso(v) if isinstance(v, datetime) else v) for k, v in s.items()
                        if k not in ("id", "message_pk") and v is not None} for s in sources]
    return out
