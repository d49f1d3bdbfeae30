"""The webhook outbox's reading side: claim due deliveries, mark them delivered, retried or dead.

Rows are written by :meth:`gateway.crm.store.Store.enqueue_webhook` in the same
transaction as what they announce; this module is how a dispatcher works through them.

Claiming is a lease, not a lock held during the HTTP request: one short transaction
picks due ``pending`` rows, pushes their ``next_attempt_at`` past the request's
timeout (``lease``) and counts the attempt. A node that dies mid-request leaves the
row pending; it becomes due again when the lease runs out and another node (or the
same one after a restart) delivers it. On PostgreSQL the pick is ``FOR UPDATE SKIP
LOCKED``, so several nodes on one database never claim the same row at once; SQLite
serialises writers, which is enough for its single node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.store import Store, _outbox


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


async def claim(store: Store, webhooks: Sequence[str], *, limit: int, lease: float,
                now: datetime | None = None) -> list[Claimed]:
    """Lease up to `limit` due pending deliveries to the given webhooks (oldest due first)."""
    if limit <= 0 or not webhooks:
        return []
    now = now or datetime.now(UTC)
    pick = (sa.select(_outbox.c.id)
            .where(_outbox.c.status == "pending", _outbox.c.next_attempt_at <= now,
                   _outbox.c.webhook.in_(list(webhooks)))
            .order_by(_outbox.c.next_attempt_at, _outbox.c.id)
            .limit(limit))
    if store.dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (sa.update(_outbox).where(_outbox.c.id.in_(pick.scalar_subquery()))
            .values(next_attempt_at=now + timedelta(seconds=lease),
                    attempts=_outbox.c.attempts + 1)
            .returning(_outbox.c.id, _outbox.c.event_id, _outbox.c.webhook, _outbox.c.event_type,
                       _outbox.c.payload, _outbox.c.attempts, _outbox.c.created_at))
    try:
        async with store.engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail("outbox claim failed", exc) from exc
    out = [Claimed(id=r.id, event_id=r.event_id, webhook=r.webhook, event_type=r.event_type,
                   payload=r.payload, attempts=r.attempts, created_at=r.created_at) for r in rows]
    out.sort(key=lambda c: c.id)
    return out


async def _update(store: Store, id: int, what: str, **values: Any) -> None:
    try:
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(_outbox)
                               .where(_outbox.c.id == id, _outbox.c.status == "pending")
                               .values(**values))
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail(f"outbox update failed ({what})", exc) from exc


async def mark_delivered(store: Store, id: int, now: datetime | None = None) -> None:
    await _update(store, id, "delivered", status="delivered", delivered_at=now or datetime.now(UTC),
                  last_error=None)


async def mark_retry(store: Store, id: int, next_at: datetime, error: str) -> None:
    await _update(store, id, "retry", next_attempt_at=next_at, last_error=error[:500])


async def mark_dead(store: Store, id: int, error: str) -> None:
    await _update(store, id, "dead", status="dead", last_error=error[:500])


async def release(store: Store, ids: Sequence[int], now: datetime | None = None, *,
                  not_attempted: bool = False) -> None:
    """Hand leased rows back at once (a dispatcher stopping before it got an answer);
    `not_attempted`: no request was made, so the claim's attempt is not counted."""
    if not ids:
        return
    values: dict[str, Any] = {"next_attempt_at": now or datetime.now(UTC)}
    if not_attempted:
        values["attempts"] = _outbox.c.attempts - 1
    try:
        async with store.engine.begin() as conn:
            await conn.execute(sa.update(_outbox)
                               .where(_outbox.c.id.in_(list(ids)), _outbox.c.status == "pending")
                               .values(**values))
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail("outbox release failed", exc) from exc


async def backlog(store: Store) -> int:
    """Deliveries still pending (to any webhook)."""
    try:
        async with store.engine.connect() as conn:
            n = (await conn.execute(sa.select(sa.func.count()).select_from(_outbox)
                                    .where(_outbox.c.status == "pending"))).scalar()
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail("store read failed", exc) from exc
    return int(n or 0)


async def purge_delivered(store: Store, older_than: datetime) -> int:
    """Delete delivered rows delivered before `older_than`; dead rows are kept."""
    try:
        async with store.engine.begin() as conn:
            result = await conn.execute(sa.delete(_outbox).where(
                _outbox.c.status == "delivered", _outbox.c.delivered_at < older_than))
    except (SQLAlchemyError, OSError) as exc:
        raise store._fail("outbox purge failed", exc) from exc
    return max(result.rowcount or 0, 0)


async def summary(store: Store) -> dict[str, dict[str, Any]]:
    """Per webhook id: counts per status, the oldest pending row's age and the last error."""
    q = (sa.select(_outbox.c.webhook, _outbox.c.status, sa.func.count().label("n"),
                   sa.func.min(_outbox.c.created_at).label("oldest"))
         .group_by(_outbox.c.webhook, _outbox.c.status))
    last_err = (sa.select(_outbox.c.webhook, _outbox.c.last_error, _outbox.c.status)
                .where(_outbox.c.id.in_(
                    sa.select(sa.func.max(_outbox.c.id))
                    .where(_outbox.c.last_error.is_not(None), _outbox.c.status != "delivered")
                    .group_by(_outbox.c.webhook))))
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
        raise store._fail("store read failed", exc) from exc
    return out


def _as_utc(value: datetime) -> datetime:
    # aggregates bypass the UTCDateTime type on SQLite: they come back as naive text/datetimes
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
