"""The tracking endpoint's view of the CRM store: copy lookups, and hits recorded as events.

:class:`StoreTracking` is both the endpoint's :class:`~gateway.http.tracking.CopyLookup`
(what the store knows about a recipient's copy: recipient, sender, submitting client,
delivery time, links, earlier hits) and its :class:`~gateway.http.tracking.HitSink`.
A hit becomes an ``opened`` or ``clicked`` event (a honeypot hit a ``clicked`` event with
``details.honeypot``), keyed ``hit:<id>`` so a replay records it once, written through
the batching :class:`~gateway.crm.writer.StoreWriter` like delivery events (which also
queues the ``message.opened`` / ``message.clicked`` webhooks, with the message's tracking
summary, in the same transaction). ``details.category`` is the classifier's category
(``human``, ``proxied``, or the machine's kind); reports and summaries read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import events_table, messages_table, sources_table
from gateway.crm.sql import chunks
from gateway.crm.store import Store
from gateway.crm.writer import StoreWriter
from gateway.metrics import Metrics
from gateway.records import EventRecord
from gateway.tracking.classify import CopyInfo, Kind, PriorHit
from gateway.tracking.hits import Hit

RECENT_HITS = 50


class StoreTracking:
    """Copy lookups from, and hit events into, the CRM store."""

    def __init__(self, store: Store, writer: StoreWriter, metrics: Metrics | None = None) -> None:
        self.store = store
        self.writer = writer
        self.metrics = metrics

    async def copy_infos(self, copy_ids: Sequence[str]) -> dict[str, CopyInfo | None]:
        """What the store knows about each copy, in three queries per chunk of copies
        (the copies, their first deliveries, their latest hits); an unknown copy is None."""
        out: dict[str, CopyInfo | None] = {c: None for c in copy_ids}
        try:
            async with self.store.engine.connect() as conn:
                for chunk in chunks(sorted(out)):
                    out.update(await self._chunk(conn, chunk))
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("tracking lookup failed", exc) from exc
        return out

    @staticmethod
    async def _chunk(conn: AsyncConnection, copy_ids: Sequence[str]) -> dict[str, CopyInfo]:
        s, e = sources_table.c, events_table.c
        copies = (await conn.execute(
            sa.select(s.ref, s.message_pk, s.recipient, s.client_ip, s.links, s.at,
                      messages_table.c.from_addr, messages_table.c.message_id)
            .join(messages_table, messages_table.c.id == s.message_pk)
            .where(s.source == "relay", s.ref.in_(copy_ids)))).all()
        copies = [row for row in copies if row.recipient]
        pks = sorted({row.message_pk for row in copies})
        if not pks:
            return {}
        delivered = {(pk, rcpt): at for pk, rcpt, at in (await conn.execute(
            sa.select(e.message_pk, e.recipient, sa.func.min(e.at))
            .where(e.message_pk.in_(pks), e.type == "sent")
            .group_by(e.message_pk, e.recipient))).all()}
        # each copy's latest RECENT_HITS hits: ranked per (message, recipient)
        rank = sa.func.row_number().over(partition_by=(e.message_pk, e.recipient),
                                         order_by=(e.at.desc(), e.id.desc())).label("rank")
        ranked = (sa.select(e.message_pk, e.recipient, e.type, e.at, e.details, rank)
                  .where(e.message_pk.in_(pks), e.type.in_(("opened", "clicked")))
                  .subquery())
        hits: dict[tuple[int, str], list[PriorHit]] = {}
        for pk, rcpt, type_, at, details in (await conn.execute(
                sa.select(ranked.c.message_pk, ranked.c.recipient, ranked.c.type, ranked.c.at,
                          ranked.c.details).where(ranked.c.rank <= RECENT_HITS)
                .order_by(ranked.c.message_pk, ranked.c.recipient, ranked.c.rank))).all():
            d = details or {}
            kind: Kind = "open" if type_ == "opened" else (
                "honeypot" if d.get("honeypot") else "click")
            hits.setdefault((pk, rcpt), []).append(PriorHit(
                id=str(d.get("hit_id", "")), kind=kind, link=int(d.get("link") or 0),
                at=at.timestamp()))
        out: dict[str, CopyInfo] = {}
        for row in copies:
            sent = delivered.get((row.message_pk, row.recipient))
            out[row.ref] = CopyInfo(
                copy_id=row.ref, recipient=row.recipient, sender=row.from_addr,
                message_id=row.message_id or None, submitted_at=row.at.timestamp(),
                delivered_at=sent.timestamp() if sent is not None else None,
                client_ip=row.client_ip, links=int(row.links or 0),
                recent_hits=tuple(hits.get((row.message_pk, row.recipient), ())))
        return out

    async def record_hit(self, hit: Hit) -> None:
        if self.metrics is not None:
            self.metrics.tracking_hit("open" if hit.kind == "open" else "click", hit.machine)
        details = {"hit_id": hit.id, "link": hit.link, "url": hit.url, "ip": hit.ip,
                   "user_agent": hit.user_agent, "referer": hit.referer or None,
                   "category": hit.category, "reason": hit.reason,
                   "honeypot": hit.kind == "honeypot"}
        self.writer.add_event(EventRecord(
            queue_id=hit.copy_id, type="opened" if hit.kind == "open" else "clicked",
            recipient=hit.recipient or "", at=datetime.fromtimestamp(hit.at, UTC),
            details={k: v for k, v in details.items() if v is not None},
            machine=hit.machine, key=f"hit:{hit.id}"))
