"""The tracking endpoint's batched copy lookup against the store (both backends), and the
recorder looking up a batch of hits on many copies in one call."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from gateway.crm.hits import RECENT_HITS, StoreTracking
from gateway.crm.store import Store
from gateway.crm.writer import StoreWriter
from gateway.http.tracking import HitRecorder
from gateway.ids import new_queue_id
from gateway.records import EventRecord, NewMessage, SourceRef
from gateway.tracking.classify import CopyInfo, Observation
from gateway.tracking.hits import MemoryHitSink
from gateway.tracking.tokens import TokenData

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


async def _message(store: Store, n: int, recipients: list[str]) -> list[str]:
    """One relayed message with a copy per recipient; the copy ids."""
    ids = [new_queue_id() for _ in recipients]
    await store.store_messages([NewMessage(
        message_id=f"<m{n}@gw.test>", from_addr="rep@gw.test", to_addrs=recipients, cc_addrs=[],
        subject="Quote", date=T0, direction="outbound", user="rep@gw.test",
        sources=[SourceRef("relay", cid, T0, recipient=r, client_ip="192.0.2.9", links=3)
                 for cid, r in zip(ids, recipients, strict=True)])])
    return ids


async def test_copies_are_looked_up_together_each_with_its_own_deliveries_and_hits(
        store: Store) -> None:
    a, b = await _message(store, 1, ["ann@acme.test", "bob@acme.test"])
    (c,) = await _message(store, 2, ["cy@acme.test"])
    await store.record([], [
        EventRecord(queue_id=a, type="sent", recipient="ann@acme.test", at=T0 + timedelta(minutes=1)),
        EventRecord(queue_id=a, type="sent", recipient="ann@acme.test", at=T0 + timedelta(minutes=5)),
        EventRecord(queue_id=b, type="deferred", recipient="bob@acme.test", at=T0 + timedelta(minutes=1)),
        *[EventRecord(queue_id=a, type="opened", recipient="ann@acme.test",
                      at=T0 + timedelta(hours=1, seconds=i), details={"hit_id": f"h{i}"}, key=f"hit:h{i}")
          for i in range(RECENT_HITS + 5)],
        EventRecord(queue_id=c, type="clicked", recipient="cy@acme.test", at=T0 + timedelta(hours=2),
                    details={"hit_id": "hc", "link": 2, "honeypot": True}, key="hit:hc"),
    ])
    unknown = new_queue_id()
    writer = StoreWriter(store)
    found = await StoreTracking(store, writer).copy_infos([a, b, c, unknown])
    assert found[unknown] is None
    ann, bob, cy = found[a], found[b], found[c]
    assert ann is not None and bob is not None and cy is not None
    assert (ann.recipient, bob.recipient, cy.recipient) == ("ann@acme.test", "bob@acme.test", "cy@acme.test")
    assert ann.delivered_at == (T0 + timedelta(minutes=1)).timestamp()   # the first delivery
    assert bob.delivered_at is None                                      # deferred only
    assert (ann.sender, ann.links, ann.client_ip) == ("rep@gw.test", 3, "192.0.2.9")
    # the latest RECENT_HITS hits of that recipient's copy, newest first; none of the others'
    assert [h.id for h in ann.recent_hits] == [f"h{i}" for i in range(RECENT_HITS + 4, 4, -1)]
    assert bob.recent_hits == ()
    assert [(h.id, h.kind, h.link) for h in cy.recent_hits] == [("hc", "honeypot", 2)]


class CountingLookup:
    """Copies in a dict; records each call's copy ids."""

    def __init__(self, copies: Sequence[CopyInfo]) -> None:
        self.copies = {c.copy_id: c for c in copies}
        self.calls: list[list[str]] = []

    async def copy_infos(self, copy_ids: Sequence[str]) -> Mapping[str, CopyInfo | None]:
        self.calls.append(list(copy_ids))
        await asyncio.sleep(0)
        return {c: self.copies.get(c) for c in copy_ids}


async def test_a_batch_of_hits_on_many_copies_is_one_lookup_and_then_cached() -> None:
    copies = [CopyInfo(copy_id=new_queue_id(), recipient=f"p{i}@acme.test", sender="rep@gw.test",
                       delivered_at=0.0, links=1) for i in range(300)]
    lookup, sink = CountingLookup(copies), MemoryHitSink()
    recorder = HitRecorder(sink, lookup, workers=1)
    for copy in copies:       # queued before the worker runs: it takes them in batches
        recorder.submit(TokenData(kind="open", copy_id=copy.copy_id, link=0, url=None),
                        Observation(kind="open", copy_id=copy.copy_id, link=0, at=1e9,
                                    ip="203.0.113.5", user_agent="Mozilla/5.0"), {})
    await recorder.start()
    try:
        assert await recorder.drain(10)
    finally:
        await recorder.stop()
    assert [len(c) for c in lookup.calls] == [HitRecorder.BATCH, 300 - HitRecorder.BATCH]
    assert sorted(h.recipient or "" for h in sink.hits) == sorted(c.recipient for c in copies)
    assert recorder.stats.lookup_failed == 0
