"""The CRM store: record accepted messages and their events in bulk, read them back as SPEC §6 JSON.

One :class:`Store` owns one AsyncEngine; every call is one short transaction, so a
store shared by the writer, the CLI and the API never holds a connection between
calls. Writes come in batches from :class:`gateway.crm.writer.StoreWriter`:
:meth:`Store.record` inserts a whole batch with a handful of statements, whatever
its size, and is idempotent per queue id (a replayed batch adds no message twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.crm.engine import describe_error, make_engine, safe_url
from gateway.crm.migrate import current_revision_sync, head_revision, is_known_revision, upgrade
from gateway.crm.models import (
    DIRECTIONS,
    EVENT_TYPES,
    SNIPPET_MAX,
    Event,
    Message,
    MessageAddress,
    sort_at,
)
from gateway.errors import StoreError

_messages = cast(sa.Table, Message.__table__)
_events = cast(sa.Table, Event.__table__)
_addresses = cast(sa.Table, MessageAddress.__table__)

#: Values per IN (...) lookup; far below SQLite's 32,766 bound parameters.
_CHUNK = 500


@dataclass
class AcceptedMessage:
    """A message the relay (or ingest) accepted, as the store records it."""

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

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")


@dataclass
class EventRecord:
    """Something that happened to the message with this queue id, for one recipient."""

    queue_id: str
    type: str
    recipient: str
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)
    machine: bool = False

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {EVENT_TYPES}, not {self.type!r}")


# -- cleaning: nothing a caller passes may make a whole batch fail ----------------------------
def _text(value: str | None, limit: int | None = None) -> str:
    """A string PostgreSQL and SQLite both take: no NUL, no lone surrogate, at most `limit` chars."""
    s = value or ""
    if "\x00" in s:
        s = s.replace("\x00", "")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s[:limit] if limit is not None else s


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


class Store:
    """The CRM store on one AsyncEngine (SQLite file or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, url: str, *, log: Any = None) -> None:
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name
        self.log = log or structlog.get_logger("mailgw.crm")

    # -- opening ------------------------------------------------------------------------
    @classmethod
    async def open(cls, url: str, *, auto_upgrade: bool = True, log: Any = None) -> Store:
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
        return cls(engine, url, log=log)

    @staticmethod
    async def _inspect(engine: AsyncEngine) -> tuple[str | None, list[str]]:
        async with engine.connect() as conn:
            tables: list[str] = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            current = await conn.run_sync(current_revision_sync) if tables else None
        return current, tables

    async def close(self) -> None:
        await self.engine.dispose()

    # -- writing ------------------------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    @staticmethod
    def _message_row(a: AcceptedMessage) -> dict[str, Any]:
        return {
            "message_id": _text(a.message_id), "thread_id": None, "direction": a.direction,
            "account": _opt_text(a.account), "user": _opt_text(a.user),
            "from_addr": _text(a.from_addr), "to_addrs": _addrs(a.to_addrs),
            "cc_addrs": _addrs(a.cc_addrs), "subject": _text(a.subject), "date": a.date,
            "snippet": _text(a.snippet, SNIPPET_MAX), "size": int(a.size),
            "sources": [_text(a.source)], "queue_id": _text(a.queue_id), "created_at": a.at,
        }

    @staticmethod
    def _address_rows(pk: int, a: AcceptedMessage) -> list[dict[str, Any]]:
        seen: set[tuple[str, str]] = set()
        rows = []
        for role, values in (("from", [a.from_addr]), ("to", a.to_addrs), ("cc", a.cc_addrs)):
            for v in values:
                addr = _text(v).strip().lower()
                if addr and (role, addr) not in seen:
                    seen.add((role, addr))
                    rows.append({"message_pk": pk, "role": role, "address": addr})
        return rows

    async def record(self, accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        """Store a batch in one transaction: new messages, their `queued` events, then `events`.

        A message whose queue id is already stored is skipped (on both backends, also
        against a concurrent writer). An event whose queue id is neither in `accepted`
        nor in the store is logged and skipped. Database failures raise StoreError and
        leave nothing half-written.
        """
        if not accepted and not events:
            return
        batch: dict[str, AcceptedMessage] = {}
        for a in accepted:
            batch.setdefault(a.queue_id, a)
        unknown: list[EventRecord] = []
        try:
            async with self.engine.begin() as conn:
                new = await self._insert_messages(conn, batch)
                pks = dict(new)
                missing = sorted({e.queue_id for e in events} - new.keys())
                if missing:
                    pks.update(await self._lookup(conn, missing))
                address_rows: list[dict[str, Any]] = []
                event_rows: list[dict[str, Any]] = []
                for qid, pk in new.items():
                    a = batch[qid]
                    address_rows.extend(self._address_rows(pk, a))
                    event_rows.extend({"message_pk": pk, "type": "queued", "at": a.at,
                                       "recipient": _text(r), "machine": False, "details": {}}
                                      for r in a.recipients)
                for e in events:
                    target = pks.get(e.queue_id)
                    if target is None:
                        unknown.append(e)
                        continue
                    event_rows.append({"message_pk": target, "type": e.type, "at": e.at,
                                       "recipient": _text(e.recipient), "machine": bool(e.machine),
                                       "details": _json(e.details or {})})
                if address_rows:
                    await conn.execute(sa.insert(_addresses), address_rows)
                if event_rows:
                    await conn.execute(sa.insert(_events), event_rows)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"store write failed ({len(accepted)} messages, {len(events)} events): "
                             f"{describe_error(exc, self.url)}") from exc
        if unknown:
            # e.g. the delivery of a DSN the gateway wrote itself: it is no stored message
            self.log.info("store_events_skipped", reason="unknown queue id", count=len(unknown),
                          queue_ids=sorted({e.queue_id for e in unknown})[:20])

    async def _insert_messages(self, conn: AsyncConnection,
                               batch: dict[str, AcceptedMessage]) -> dict[str, int]:
        """Insert the batch's messages not stored yet; return queue id -> pk of those inserted."""
        if not batch:
            return {}
        stmt = (self._insert(_messages)
                .on_conflict_do_nothing(index_elements=[_messages.c.queue_id])
                .returning(_messages.c.id, _messages.c.queue_id))
        result = await conn.execute(stmt, [self._message_row(a) for a in batch.values()])
        return {qid: pk for pk, qid in result.all()}

    @staticmethod
    async def _lookup(conn: AsyncConnection, queue_ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(queue_ids):
            rows = await conn.execute(sa.select(_messages.c.queue_id, _messages.c.id)
                                      .where(_messages.c.queue_id.in_(chunk)))
            found.update({q: pk for q, pk in rows.all() if q is not None})
        return found

    # -- reading ------------------------------------------------------------------------
    async def list_messages(self, *, contact: str | None = None, since: datetime | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        """Newest first (by Date header, else by when it was accepted), each with its events.

        `contact`: an address among From, To and Cc (whole address, case-insensitive).
        `since`: only messages dated at or after it (a naive datetime is taken as UTC).
        """
        q = sa.select(_messages).order_by(sort_at.desc(), _messages.c.id.desc())
        if since is not None:
            q = q.where(sort_at >= _utc(since))
        if contact:
            q = q.where(_messages.c.id.in_(
                sa.select(_addresses.c.message_pk)
                .where(_addresses.c.address == contact.strip().lower())))
        return await self._fetch(q.limit(max(0, limit)))

    async def get_message(self, id: int) -> dict[str, Any] | None:
        rows = await self._fetch(sa.select(_messages).where(_messages.c.id == id))
        return rows[0] if rows else None

    async def get_message_by_queue_id(self, queue_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(sa.select(_messages).where(_messages.c.queue_id == queue_id))
        return rows[0] if rows else None

    async def _fetch(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        try:
            async with self.engine.connect() as conn:
                messages = (await conn.execute(query)).mappings().all()
                by_pk: dict[int, list[dict[str, Any]]] = {m["id"]: [] for m in messages}
                for chunk in _chunks(list(by_pk)):
                    rows = await conn.execute(
                        sa.select(_events).where(_events.c.message_pk.in_(chunk))
                        .order_by(_events.c.message_pk, _events.c.at, _events.c.id))
                    for e in rows.mappings():
                        by_pk[e["message_pk"]].append({
                            "type": e["type"], "at": _iso(e["at"]), "recipient": e["recipient"],
                            "machine": bool(e["machine"]), "details": e["details"] or {}})
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"store read failed: {describe_error(exc, self.url)}") from exc
        return [_message_dict(m, by_pk[m["id"]]) for m in messages]


def _message_dict(m: Mapping[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """A message as SPEC §6 JSON."""
    return {
        "id": m["id"], "message_id": m["message_id"], "thread_id": m["thread_id"],
        "direction": m["direction"], "account": m["account"], "user": m["user"],
        "from": m["from_addr"], "to": list(m["to_addrs"] or []), "cc": list(m["cc_addrs"] or []),
        "subject": m["subject"], "date": _iso(m["date"]), "snippet": m["snippet"],
        "size": m["size"], "sources": list(m["sources"] or []), "queue_id": m["queue_id"],
        "contacts": [], "events": events,
    }
