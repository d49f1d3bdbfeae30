"""The webhook outbox: deliveries written with what they announce; claimed, marked delivered, retried or dead.

Writing. :func:`enqueue` adds one row per subscribed webhook, inside the caller's
transaction, so a delivery exists exactly when what it announces was committed (the
store calls it through :meth:`gateway.crm.store.Store.enqueue_webhook`).

Reading. The rest of this module is how a dispatcher works through the rows.

Claiming is a lease, not a lock held during the HTTP request: one short transaction
picks due ``pending`` rows, pushes their ``next_attempt_at`` past the request's
timeout (``lease``) and counts the attempt. A node that dies mid-request leaves the
row pending; it becomes due again when the lease runs out and another node (or the
same one after a restart) delivers it. On PostgreSQL the pick is ``FOR UPDATE SKIP
LOCKED``, so several nodes on one database never claim the same row at once; SQLite
serialises writers, which is enough for its single node.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import outbox_table
from gateway.crm.sql import Database, chunks, clean_json, iso
from gateway.records import WebhookTarget


async def enqueue(conn: AsyncConnection, webhooks: Sequence[WebhookTarget],
                  events: Sequence[tuple[str, dict[str, Any]]],
                  now: datetime | None = None) -> list[str | None]:
    """For each (event type, data), in order: one pending delivery per webhook that wants it,
    all in one INSERT on `conn` (the caller's transaction).

    Returns each event's id (the idempotency id receivers see), None when nobody subscribes.
    """
    now = now or datetime.now(UTC)
    ids: list[str | None] = []
    rows: list[dict[str, Any]] = []
    for event_type, data in events:
        targets = [w for w in webhooks if w.wants(event_type)]
        if not targets:
            ids.append(None)
            continue
        event_id = str(uuid.uuid4())
        payload = {"id": event_id, "type": event_type, "created_at": iso(now),
                   "data": clean_json(data)}
        rows += [{"event_id": event_id, "webhook": w.id, "event_type": event_type,
                  "payload": payload, "status": "pending", "attempts": 0,
                  "next_attempt_at": now, "last_error": None, "created_at": now,
                  "delivered_at": None} for w in targets]
        ids.append(event_id)
    for chunk in chunks(rows):
        await conn.execute(sa.insert(outbox_table), list(chunk))
    return ids


@dataclass(frozen=True)
class Claimed:
    """One delivery to make now."""

    id: int
    event_id: str
    webhook: str
    event_type: str
    payload: dict[str, Any]
    attempts: int            # including this one
    created_at: datetime


async def claim(store: Database, webhooks: Sequence[str], *, limit: int, lease: float,
                now: datetime | None = None) -> list[Claimed]:
    """Lease up to `limit` due pending deliveries to the given webhooks, oldest event first.

    Among the rows that are due, the order is the events' (the row id), not the jittered
    retry times: after an outage the backlog goes out in the order the events happened."""
    if limit <= 0 or not webhooks:
        return []
    now = now or datetime.now(UTC)
    pick = (sa.select(outbox_table.c.id)
            .where(outbox_table.c.status == "pending", outbox_table.c.next_attempt_at <= now,
                   outbox_table.c.webhook.in_(list(webhooks)))
            .order_by(outbox_table.c.id)
            .limit(limit))
    if store.dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (sa.update(outbox_table).where(outbox_table.c.id.in_(pick.scalar_subquery()))
            .values(next_attempt_at=now + timedelta(seconds=lease),
                    attempts=outbox_table.c.attempts + 1)
            .returning(outbox_table.c.id, outbox_table.c.event_id, outbox_table.c.webhook,
                       outbox_table.c.event_type, outbox_table.c.payload, outbox_table.c.attempts,
                       outbox_table.c.created_at))
    try:
        async with store.engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("outbox claim failed", exc) from exc
    out = [Claimed(id=r.id, event_id=r.event_id, webhook=r.webhook, event_type=r.event_type,
                   payload=r.payload, attempts=r.attempts, created_at=r.created_at) for r in rows]
    out.sort(key=lambda c: c.id)
    return out


async def _update(store: Database, id: int, what: str, **values: Any) -> None:
    try:
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(outbox_table)
                               .where(outbox_table.c.id == id, outbox_table.c.status == "pending")
                               .values(**values))
    except (SQLAlchemyError, OSError) as exc:
        raise store.error(f"outbox update failed ({what})", exc) from exc


async def mark_delivered(store: Database, id: int, now: datetime | None = None) -> None:
    await _update(store, id, "delivered", status="delivered", delivered_at=now or datetime.now(UTC),
                  last_error=None)


async def mark_retry(store: Database, id: int, next_at: datetime, error: str) -> None:
    await _update(store, id, "retry", next_attempt_at=next_at, last_error=error[:500])


async def mark_dead(store: Database, id: int, error: str) -> None:
    await _update(store, id, "dead", status="dead", last_error=error[:500])


async def release(store: Database, ids: Sequence[int], now: datetime | None = None, *,
                  not_attempted: bool = False) -> None:
    """Hand leased rows back at once (a dispatcher stopping before it got an answer);
    `not_attempted`: no request was made, so the claim's attempt is not counted."""
    if not ids:
        return
    values: dict[str, Any] = {"next_attempt_at": now or datetime.now(UTC)}
    if not_attempted:
        values["attempts"] = outbox_table.c.attempts - 1
    try:
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(outbox_table)
                               .where(outbox_table.c.id.in_(list(ids)), outbox_table.c.status == "pending")
                               .values(**values))
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("outbox release failed", exc) from exc


async def backlog(store: Database) -> int:
    """Deliveries still pending (to any webhook)."""
    try:
        async with store.engine.connect() as conn:
            n = (await conn.execute(sa.select(sa.func.count()).select_from(outbox_table)
                                    .where(outbox_table.c.status == "pending"))).scalar()
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("store read failed", exc) from exc
    return int(n or 0)


async def purge_delivered(store: Database, older_than: datetime) -> int:
    """Delete delivered rows delivered before `older_than`; dead rows are kept."""
    try:
        async with store.engine.begin() as conn:
            result = await conn.execute(sa.delete(outbox_table).where(
                outbox_table.c.status == "delivered", outbox_table.c.delivered_at < older_than))
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("outbox purge failed", exc) from exc
    return max(result.rowcount or 0, 0)


async def summary(store: Database) -> dict[str, dict[str, Any]]:
    """Per webhook id: counts per status, the oldest pending row's age and the last error."""
    q = (sa.select(outbox_table.c.webhook, outbox_table.c.status, sa.func.count().label("n"),
                   sa.func.min(outbox_table.c.created_at).label("oldest"))
         .group_by(outbox_table.c.webhook, outbox_table.c.status))
    last_err = (sa.select(outbox_table.c.webhook, outbox_table.c.last_error, outbox_table.c.status)
                .where(outbox_table.c.id.in_(
                    sa.select(sa.func.max(outbox_table.c.id))
                    .where(outbox_table.c.last_error.is_not(None), outbox_table.c.status != "delivered")
                    .group_by(outbox_table.c.webhook))))
    out: dict[str, dict[str, Any]] = {}
    try:
        async with store.engine.connect() as conn:
            for r in (await conn.execute(q)).all():
                w = out.setdefault(r.webhook, {"pending": 0, "delivered": 0, "dead": 0,
                                               "oldest_pending_at": None, "last_error": None})
                w[r.status] = int(r.n)
                if r.status == "pending" and r.oldest is not None:
                    w["oldest_pending_at"] = _as_utc(r.oldest).isoformat()
            for r in (await conn.execute(last_err)).all():
                if r.webhook in out:
                    out[r.webhook]["last_error"] = r.last_error
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("store read failed", exc) from exc
    return out


def _as_utc(value: datetime) -> datetime:
    # aggregates bypass the UTCDateTime type on SQLite: they come back as naive text/datetimes
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
