"""The CRM store: record relayed messages and their events, and read them back (short sessions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Text, event, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import configure_mappers, selectinload

from gateway.crm.migrate import current_revision_of, head_revision, upgrade_engine
from gateway.crm.models import Event, Message
from gateway.errors import StoreError


@dataclass
class AcceptedMessage:
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


@dataclass
class EventRecord:
    queue_id: str
    type: str
    recipient: str
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)
    machine: bool = False


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid store URL>"


def make_engine(url: str) -> AsyncEngine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                           "busy_timeout=5000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()
        return engine
    return create_async_engine(url, pool_pre_ping=True)


def message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id, "message_id": m.message_id, "thread_id": m.thread_id,
        "direction": m.direction, "account": m.account, "user": m.user,
        "from": m.from_addr, "to": list(m.to_addrs), "cc": list(m.cc_addrs),
        "subject": m.subject, "date": m.date.isoformat() if m.date else None,
        "snippet": m.snippet, "size": m.size, "sources": list(m.sources),
        "queue_id": m.queue_id, "contacts": [],
        "events": [{"type": e.type, "at": e.at.isoformat(), "recipient": e.recipient,
                    "machine": e.machine, "details": e.details}
                   for e in sorted(m.events, key=lambda e: (e.at, e.id))],
    }


class Store:
    """One AsyncEngine; every call is one short session."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        configure_mappers()
        self.engine = engine
        self.url = url
        self.session = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str, *, auto_upgrade: bool = True) -> Store:
        engine = make_engine(url)
        try:
            current = await current_revision_of(engine)
            head = head_revision()
            if current != head:
                if current is None and auto_upgrade and engine.dialect.name == "sqlite":
                    await upgrade_engine(engine)
                else:
                    raise StoreError(f"the store schema is at revision {current or 'none'}, "
                                     f"head is {head}: run `mailgw db upgrade`")
        except StoreError:
            await engine.dispose()
            raise
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            raise StoreError(f"cannot open the store {_safe_url(url)}: "
                             f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}") from None
        return cls(engine, url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def record(self, accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        """Insert accepted messages (idempotent by queue_id) with `queued` events, then events."""
        try:
            async with self.session.begin() as s:
                qids = {a.queue_id for a in accepted} | {e.queue_id for e in events}
                known: dict[str, int] = {}
                if qids:
                    rows = await s.execute(select(Message.queue_id, Message.id)
                                           .where(Message.queue_id.in_(qids)))
                    known = {q: i for q, i in rows.all() if q is not None}
                new_msgs: list[tuple[AcceptedMessage, Message]] = []
                for a in accepted:
                    if a.queue_id in known or any(a.queue_id == n[0].queue_id for n in new_msgs):
                        continue
                    m = Message(message_id=a.message_id, direction=a.direction, account=a.account,
                                user=a.user, from_addr=a.from_addr, to_addrs=a.to_addrs,
                                cc_addrs=a.cc_addrs, subject=a.subject, date=a.date,
                                snippet=a.snippet[:200], size=a.size, sources=[a.source],
                                queue_id=a.queue_id, created_at=a.at)
                    new_msgs.append((a, m))
                s.add_all([m for _, m in new_msgs])
                await s.flush()
                for a, m in new_msgs:
                    known[a.queue_id] = m.id
                    s.add_all([Event(message_pk=m.id, type="queued", at=a.at, recipient=r,
                                     machine=False, details={}) for r in a.recipients])
                for e in events:
                    pk = known.get(e.queue_id)
                    if pk is None:
                        continue  # e.g. a DSN's own delivery: not a stored message
                    s.add(Event(message_pk=pk, type=e.type, at=e.at, recipient=e.recipient,
                                machine=e.machine, details=e.details))
        except SQLAlchemyError as exc:
            raise StoreError(f"store write failed: {str(exc).splitlines()[0][:300]}") from exc

    async def list_messages(self, *, contact: str | None = None, since: datetime | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        q = select(Message).options(selectinload(Message.events))
        if since is not None:
            q = q.where(Message.created_at >= since)
        if contact:
            c = contact.lower()
            q = q.where(or_(Message.from_addr.ilike(c), Message.to_addrs.cast(
                Text).ilike(f'%"{c}"%'), Message.cc_addrs.cast(
                Text).ilike(f'%"{c}"%')))
        q = q.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)
        async with self.session() as s:
            rows = (await s.execute(q)).scalars().all()
            return [message_dict(m) for m in rows]

    async def get_message(self, id: int) -> dict[str, Any] | None:
        async with self.session() as s:
            m = (await s.execute(select(Message).options(selectinload(Message.events))
                                 .where(Message.id == id))).scalar_one_or_none()
            return message_dict(m) if m else None

    async def get_message_by_queue_id(self, queue_id: str) -> dict[str, Any] | None:
        async with self.session() as s:
            m = (await s.execute(select(Message).options(selectinload(Message.events))
                                 .where(Message.queue_id == queue_id))).scalar_one_or_none()
            return message_dict(m) if m else None
