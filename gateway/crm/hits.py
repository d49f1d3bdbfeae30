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

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.models import events_table, messages_table, sources_table
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

    async def copy_info(self, copy_id: str) -> CopyInfo | None:
        q = (sa.select(sources_table.c.message_pk, sources_table.c.recipient, sources_table.c.client_ip,
                       sources_table.c.links, sources_table.c.at, messages_table.c.from_addr,
                       messages_table.c.message_id)
             .join(messages_table, messages_table.c.id == sources_table.c.message_pk)
             .where(sources_table.c.source == "relay", sources_table.c.ref == copy_id))
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(q)).first()
                if row is None or not row.recipient:
                    return None
                delivered = (await conn.execute(
                    sa.select(sa.func.min(events_table.c.at)).where(
                        events_table.c.message_pk == row.message_pk, events_table.c.type == "sent",
                        events_table.c.recipient == row.recipient))).scalar()
                hits = (await conn.execute(
                    sa.select(events_table.c.type, events_table.c.at, events_table.c.details).where(
                        events_table.c.message_pk == row.message_pk,
                        events_table.c.recipient == row.recipient,
                        events_table.c.type.in_(("opened", "clicked")))
                    .order_by(events_table.c.at.desc()).limit(RECENT_HITS))).all()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("tracking lookup failed", exc) from exc
        prior = []
        for type_, at, details in hits:
            d = details or {}
            kind: Kind = "open" if type_ == "opened" else (
                "honeypot" if d.get("honeypot") else "click")
            prior.append(PriorHit(id=str(d.get("hit_id", "")), kind=kind,
                                  link=int(d.get("link") or 0), at=at.timestamp()))
        return CopyInfo(copy_id=copy_id, recipient=row.recipient, sender=row.from_addr,
                        message_id=row.message_id or None, submitted_at=row.at.timestamp(),
                        delivered_at=delivered.timestamp() if delivered is not None else None,
                        client_ip=row.client_ip, links=int(row.links or 0),
                        recent_hits=tuple(prior))

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
