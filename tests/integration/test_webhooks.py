"""Webhook delivery from the outbox to a real aiohttp receiver on loopback, on SQLite and PostgreSQL.

Retries until accepted (one event processed, by its delivery id), restarts lose nothing,
410 and max_age make a delivery dead, two dispatchers never send one row twice at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from gateway.api.http import AdminAPI
from gateway.api.webhooks import Endpoint, WebhookDispatcher, body_bytes, sign, targets, verify
from gateway.crm import outbox
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.linking import LinkRules
from gateway.crm.models import WebhookDelivery
from gateway.crm.store import Store
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage, EventRecord, NewMessage, SourceRef
from tests.integration.harness import wait_until
from tests.integration.test_api import TOKEN, Client, check
from tests.integration.test_api import cfg as api_cfg
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration
SECRET = b"s3cret-webhook-key"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RULES = LinkRules(own_addresses=frozenset({"alice@example.com"}),
                  own_domains=frozenset({"example.com"}))


def relay(qid: str) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@example.com>",
                           from_addr="alice@example.com", to_addrs=["bob@acme.test"], cc_addrs=[],
                           subject=f"about {qid}", date=T0, snippet="hi", size=10,
                           recipients=["bob@acme.test"], user="alice@example.com", account=None,
                           at=T0, text_body=f"body of {qid}")


def endpoint(url: str, **kw: Any) -> Endpoint:
    opts: dict[str, Any] = {"retry_initial": 0.05, "retry_max": 0.2, "timeout": 5.0}
    opts.update(kw)
    return Endpoint(url=url, secret=SECRET, events=frozenset(), **opts)


def dispatcher(store: Store, ep: Endpoint, metrics: Metrics | None = None,
               **kw: Any) -> WebhookDispatcher:
    return WebhookDispatcher(store, {ep.url: ep}, metrics=metrics, poll_interval=0.05, seed=1, **kw)


async def rows(store: Store) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(sa.text(
            "SELECT event_id, event_type, status, attempts, last_error, next_attempt_at "
            "FROM webhook_outbox ORDER BY id"))).all())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(SECRET).start()
    try:
        yield r
    finally:
        await r.stop()


async def test_fails_twice_then_accepted_one_event_processed(store: Store,
                                                             receiver: Receiver) -> None:
    ep = endpoint(receiver.url)
    store.configure(store.rules, targets({ep.url: ep}))
    await store.record([relay("Q1")], [])
    receiver.statuses = [500, 500]
    metrics = Metrics()
    d = dispatcher(store, ep, metrics)
    await d.start()
    try:
        await wait_until(lambda: len(receiver.processed) == 1, timeout=15, what="the delivery")
        await wait_until(lambda: d.delivered == 1, timeout=5, what="the row marked delivered")
    finally:
        await d.stop(timeout=5)
    assert [a.status for a in receiver.attempts] == [500, 500, 200]
    ids = {a.delivery for a in receiver.attempts}
    assert len(ids) == 1                                   # the same idempotency id every time
    assert all(a.signed_ok and a.event == "message.stored" for a in receiver.attempts)
    (event_id, payload), = receiver.processed.items()
    assert payload["id"] == event_id and payload["type"] == "message.stored"
    assert payload["data"]["message"]["subject"] == "about Q1"
    (row,) = await rows(store)
    assert (row.event_id, row.status, row.attempts) == (event_id, "delivered", 3)
    assert row.last_error is None
    text = (await metrics.collect()).decode()
    assert 'mailgw_webhook_deliveries_total{result="ok"} 1.0' in text
    assert 'mailgw_webhook_deliveries_total{result="failed"} 2.0' in text


async def test_restart_mid_retry_and_mid_request_loses_nothing(store: Store,
                                                              receiver: Receiver) -> None:
    ep = endpoint(receiver.url, retry_initial=30, retry_max=60)
    store.configure(store.rules, targets({ep.url: ep}))
    await store.record([relay("Q1")], [])
    receiver.statuses = [503]
    first = dispatcher(store, ep)
    await first.start()
    await wait_until(lambda: first.failed == 1, timeout=10, what="the first failure")
    await first.stop(timeout=5)
    (row,) = await rows(store)
    assert row.status == "pending" and row.attempts == 1 and row.last_error.startswith("HTTP 503")

    # "restart": the retry is due in 30 s; make it due now, as time passing would
    async with store.engine.begin() as conn:
        await conn.execute(sa.update(WebhookDelivery).values(
            next_attempt_at=datetime(2000, 1, 1, tzinfo=UTC)))
    receiver.hold = asyncio.Event()                       # the next request hangs
    second = dispatcher(store, ep)
    await second.start()
    await wait_until(lambda: second.busy == 1 and receiver.arrived == 2, timeout=10,
                     what="a request in flight")
    await second.stop(timeout=0.3)                        # stops mid-request: handed back
    (row,) = await rows(store)
    assert row.status == "pending" and row.attempts == 2
    assert receiver.processed == {}

    receiver.hold.set()
    receiver.hold = None
    third = dispatcher(store, ep)
    await third.start()
    try:
        await wait_until(lambda: third.delivered == 1, timeout=10, what="the delivery")
    finally:
        await third.stop(timeout=5)
    (row,) = await rows(store)
    assert row.status == "delivered"
    assert len(receiver.processed) == 1
    assert len({a.delivery for a in receiver.attempts}) == 1


async def test_410_is_dead_at_once_and_max_age_ends_retries(
        store: Store, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = endpoint(receiver.url)
    store.configure(store.rules, targets({gone.url: gone}))
    await store.record([relay("Q1")], [])
    receiver.statuses = [410]
    metrics = Metrics()
    d = first = dispatcher(store, gone, metrics)
    looks_after_dead = 0                          # claims that found nothing due once it died
    real_claim = outbox.claim

    async def claim(*args: Any, **kw: Any) -> list[outbox.Claimed]:
        nonlocal looks_after_dead
        dead = first.dead                         # read before: mark_dead commits before dead += 1
        claimed = await real_claim(*args, **kw)
        if dead and not claimed:
            looks_after_dead += 1
        return claimed

    monkeypatch.setattr(outbox, "claim", claim)
    await d.start()
    try:
        await wait_until(lambda: d.dead == 1, timeout=10, what="a dead delivery")
        await wait_until(lambda: looks_after_dead >= 2, timeout=10,   # nothing is retried after that
                         what="the dispatcher to look for due deliveries twice more")
    finally:
        await d.stop(timeout=5)
    assert [a.status for a in receiver.attempts] == [410]
    assert [(r.status, r.attempts, r.last_error) for r in await rows(store)] == [
        ("dead", 1, "HTTP 410: nope")]
    assert 'mailgw_webhook_deliveries_total{result="dead"} 1.0' in (await metrics.collect()).decode()

    old = endpoint(receiver.url, max_age=0.001)
    await store.record([relay("Q2")], [])
    receiver.statuses = [500]
    d = dispatcher(store, old)
    await d.start()
    try:
        await wait_until(lambda: d.dead == 1, timeout=10, what="max_age to end the retries")
    finally:
        await d.stop(timeout=5)
    assert [r.status for r in await rows(store)] == ["dead", "dead"]
    summary = await outbox.summary(store)
    assert summary[receiver.url]["dead"] == 2 and summary[receiver.url]["pending"] == 0
    assert summary[receiver.url]["last_error"] == "HTTP 500: nope"


async def test_network_errors_retry_and_redirects_are_not_followed(store: Store,
                                                                 receiver: Receiver) -> None:
    from tests.conftest import free_port

    closed = endpoint(f"http://127.0.0.1:{free_port()}/hook", max_age=3600)
    store.configure(store.rules, targets({closed.url: closed}))
    await store.record([relay("Q1")], [])
    d = dispatcher(store, closed)
    await d.start()
    try:
        await wait_until(lambda: d.failed >= 2, timeout=10, what="two failed attempts")
    finally:
        await d.stop(timeout=5)
    (row,) = await rows(store)
    assert row.status == "pending" and "Connect" in row.last_error
    receiver.statuses = [302]
    assert (await _post_once(store, endpoint(receiver.url))).error == "HTTP 302: nope"


async def _post_once(store: Store, ep: Endpoint) -> Any:
    d = dispatcher(store, ep)
    await d.start()
    try:
        claimed = outbox.Claimed(id=0, event_id="e1", webhook=ep.url, event_type="message.stored",
                                 payload={"id": "e1"}, attempts=1, created_at=T0)
        return await d.post(ep, claimed)
    finally:
        await d.stop(timeout=1)


async def test_two_dispatchers_never_send_a_row_twice(store: Store, receiver: Receiver,
                                                      url: str) -> None:
    ep = endpoint(receiver.url)
    store.configure(store.rules, targets({ep.url: ep}))
    await store.record([relay(f"Q{i:02}") for i in range(30)], [])
    other = await Store.open(url)                         # a second node on the same database
    a, b = dispatcher(store, ep, concurrency=4), dispatcher(other, ep, concurrency=4)
    await asyncio.gather(a.start(), b.start())
    try:
        await wait_until(lambda: a.delivered + b.delivered == 30, timeout=30, what="30 deliveries")
    finally:
        await asyncio.gather(a.stop(timeout=5), b.stop(timeout=5))
        await other.close()
    assert len(receiver.attempts) == 30
    assert len({x.delivery for x in receiver.attempts}) == 30
    assert {r.status for r in await rows(store)} == {"delivered"}


async def test_events_subscription_and_payload_of_delivery_events(store: Store,
                                                                  receiver: Receiver) -> None:
    ep = Endpoint(url=receiver.url, secret=SECRET, events=frozenset({"message.bounced"}),
                  retry_initial=0.05, retry_max=0.1)
    store.configure(store.rules, targets({ep.url: ep}))
    await store.record([relay("Q1")], [EventRecord("Q1", "bounced", "bob@acme.test", T0,
                                                   {"reply": "550 5.1.1 no such user"})])
    d = dispatcher(store, ep)
    await d.start()
    try:
        await wait_until(lambda: len(receiver.processed) == 1, timeout=10, what="the delivery")
    finally:
        await d.stop(timeout=5)
    (payload,) = receiver.processed.values()
    assert payload["type"] == "message.bounced"
    assert payload["data"]["event"] == {"type": "bounced", "at": T0.isoformat(),
                                        "recipient": "bob@acme.test", "machine": False,
                                        "category": None,
                                        "details": {"reply": "550 5.1.1 no such user"}}
    assert len(await rows(store)) == 1                    # no message.stored: not subscribed


def test_signature_scheme() -> None:
    body = body_bytes({"id": "e1", "type": "message.opened", "data": {"x": "é"}})
    sig = sign(SECRET, 1700000000, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify(SECRET, "1700000000", body, sig, now=1700000100)
    assert not verify(SECRET, "1700000000", body, sig, now=1700000000 + 301)   # replay window
    assert not verify(b"other", "1700000000", body, sig, now=1700000000)
    assert not verify(SECRET, "1700000000", body + b" ", sig, now=1700000000)
    assert not verify(SECRET, "not-a-time", body, sig)
    import hashlib
    import hmac

    # the documented recipe, written out as a receiver would
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == f"sha256={expected}"


async def test_sent_and_deferred_events_reach_their_subscribers(store: Store) -> None:
    store.configure(store.rules, [
        *targets({"http://127.0.0.1:9/a": endpoint("http://127.0.0.1:9/a")}),   # all events
        *targets({"http://127.0.0.1:9/b": Endpoint(url="http://127.0.0.1:9/b", secret=SECRET,
                                                    events=frozenset({"message.deferred"}))})])
    await store.record([relay("Q1")], [
        EventRecord("Q1", "deferred", "bob@acme.test", T0, {"reply": "451 4.3.0 later"}),
        EventRecord("Q1", "sent", "bob@acme.test", T0, {"reply": "250 ok"})])
    async with store.engine.connect() as conn:
        got = (await conn.execute(sa.text(
            "SELECT webhook, event_type FROM webhook_outbox ORDER BY webhook, id"))).all()
    assert [tuple(r) for r in got] == [
        ("http://127.0.0.1:9/a", "message.stored"), ("http://127.0.0.1:9/a", "message.deferred"),
        ("http://127.0.0.1:9/a", "message.sent"), ("http://127.0.0.1:9/b", "message.deferred")]


async def test_opened_and_clicked_payloads_carry_the_tracking_summary(store: Store) -> None:
    from datetime import timedelta

    store.configure(store.rules, [
        *targets({"http://127.0.0.1:9/a": Endpoint(
            url="http://127.0.0.1:9/a", secret=SECRET,
            events=frozenset({"message.opened", "message.clicked"}))})])
    later = T0 + timedelta(hours=1)
    await store.record([relay("H1")], [
        EventRecord("H1", "sent", "bob@acme.test", T0),
        EventRecord("H1", "opened", "bob@acme.test", T0 + timedelta(seconds=1),
                    {"category": "proxy"}, machine=True, key="hit:1")])
    # the next batch: a Gmail-proxied open, a scanner click, a person's click
    await store.record([], [
        EventRecord("H1", "opened", "Bob@acme.test", later, {"category": "proxied"},
                    machine=True, key="hit:2"),
        EventRecord("H1", "clicked", "bob@acme.test", later + timedelta(seconds=5),
                    {"category": "scanner", "url": "https://acme.test/x"}, machine=True,
                    key="hit:3"),
        EventRecord("H1", "clicked", "bob@acme.test", later + timedelta(minutes=2),
                    {"category": "human", "url": "https://acme.test/x"}, key="hit:4"),
        EventRecord("H1", "clicked", "bob@acme.test", later + timedelta(minutes=2),
                    {"category": "human", "url": "https://acme.test/x"}, key="hit:4")])  # replay
    async with store.engine.connect() as conn:
        got = (await conn.execute(sa.select(WebhookDelivery.event_type, WebhookDelivery.payload)
                                  .order_by(WebhookDelivery.id))).all()
    assert [t for t, _ in got] == ["message.opened", "message.opened", "message.clicked",
                                   "message.clicked"]
    first = got[0][1]["data"]["tracking"]
    assert first["recipient"]["recipient"] == "bob@acme.test"
    assert (first["total"]["opens"], first["total"]["machine_opens"], first["total"]["opened"],
            first["total"]["first_activity"]) == (1, 1, False, None)
    # the second batch's hooks all see the summary as of that transaction, this hit included
    for _, payload in got[1:]:
        tracking = payload["data"]["tracking"]
        assert tracking["recipient"] == {
            "recipient": "bob@acme.test", "opens": 2, "unique_opens": 1, "human_opens": 0,
            "proxied_opens": 1, "machine_opens": 1, "machine_opens_by_category": {"proxy": 1},
            "clicks": 2, "human_clicks": 1, "machine_clicks": 1,
            "machine_clicks_by_category": {"scanner": 1},
            "links": {"https://acme.test/x": {"clicks": 2, "human_clicks": 1}},
            "first_activity": "2026-03-01T13:00:00+00:00",
            "last_activity": "2026-03-01T13:02:00+00:00", "opened": True}
        assert tracking["total"] == {**{k: v for k, v in tracking["recipient"].items()
                                        if k != "recipient"}, "recipients_opened": 1}


async def outbox_payloads(store: Store) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        return [p for (p,) in (await conn.execute(
            sa.select(WebhookDelivery.payload).order_by(WebhookDelivery.id))).all()]


async def test_message_webhooks_post_the_read_apis_json(store: Store, receiver: Receiver,
                                                        tmp_path: Path) -> None:
    """SPEC §6 "Webhooks POST the same JSON": ``message.stored`` is ``GET /api/v1/messages/{id}``
    of the message as stored; the event webhooks carry the message as ``GET /api/v1/messages``
    lists it (less ``events``): ``id`` the store's id, ``message_id`` the header."""
    ep = endpoint(receiver.url)                           # every event
    store.configure(RULES, targets({ep.url: ep}))
    await upsert_contacts(store, [ContactInput("bob@acme.test", first_name="Bob", company="Acme",
                                               company_owner="rep@example.com")])
    api = AdminAPI(store, get_config=lambda: api_cfg(state_dir=str(tmp_path / "state")),
                   metrics=Metrics(), token=TOKEN)
    await api.start("127.0.0.1", 0, loopback_only=True)
    try:
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{api.port}")

            async def detail(pk: int) -> dict[str, Any]:
                status, body, _ = await c.get(f"/api/v1/messages/{pk}")
                assert status == 200, body
                return dict(body)

            async def listed(pk: int) -> dict[str, Any]:
                _, page, _ = await c.get("/api/v1/messages")
                (m,) = [m for m in page["messages"] if m["id"] == pk]
                return {k: v for k, v in m.items() if k != "events"}

            await store.record([relay("W1")], [])
            (stored,) = await outbox_payloads(store)
            assert stored["type"] == "message.stored"
            msg = stored["data"]["message"]
            check(stored["data"], "MessageStoredData")
            assert msg == await detail(msg["id"])          # the same JSON as the API's
            assert msg["message_id"] == "<W1@example.com>" and msg["queue_id"] == "W1"
            assert msg["thread_id"] and msg["text_body"] == "body of W1"
            assert msg["contacts"] == [{"email": "bob@acme.test", "name": "Bob", "role": "to"}]
            assert msg["companies"] == [{"domain": "acme.test", "name": "Acme"}]
            assert msg["raw"]["kept"] is False and msg["assigned_to"] is None
            assert [(e["type"], e["recipient"]) for e in msg["events"]] == [
                ("queued", "bob@acme.test")]
            w1 = msg["id"]

            # an event webhook: the message (as listed, without events) beside the event
            await store.record([], [EventRecord("W1", "sent", "bob@acme.test", T0,
                                                {"reply": "250 ok"})])
            sent = (await outbox_payloads(store))[-1]
            assert sent["type"] == "message.sent" and set(sent["data"]) == {"message", "event"}
            check(sent["data"], "MessageEventData")
            assert sent["data"]["message"] == await listed(w1)
            assert sent["data"]["message"]["message_id"] == "<W1@example.com>"
            assert "message_id" not in sent["data"] and "events" not in sent["data"]["message"]

            # a reply: its message.stored, then message.replied about the message answered
            reply = NewMessage(
                message_id="<re-w1@acme.test>", from_addr="bob@acme.test",
                to_addrs=["alice@example.com"], cc_addrs=[], subject="Re: about W1",
                date=T0 + timedelta(hours=1), direction="inbound", in_reply_to="<W1@example.com>",
                text_body="thanks", sources=[SourceRef("ingest", "I-re", T0 + timedelta(hours=1))])
            [s] = await store.store_messages([reply])
            got = (await outbox_payloads(store))[2:]
            assert [p["type"] for p in got] == ["message.stored", "message.replied"]
            assert got[0]["data"]["message"] == await detail(s.id)
            assert got[0]["data"]["message"]["thread_id"] == msg["thread_id"]
            replied = got[1]["data"]
            check(replied, "MessageEventData")
            assert replied["message"] == await listed(w1)
            assert replied["event"]["details"]["reply_id"] == s.id
            assert replied["event"]["details"]["message_id"] == "<re-w1@acme.test>"
            # a bounce report (gateway.crm.bounces): the same shape
            await store.record([], [EventRecord("W1", "bounced", "bob@acme.test", T0,
                                                {"reply": "550 5.1.1 no such user"})])
            bounced = (await outbox_payloads(store))[-1]
            assert bounced["type"] == "message.bounced"
            assert bounced["data"]["message"] == await listed(w1)
    finally:
        await api.stop()

    # POSTed as written: each body the receiver verified is its outbox payload
    d = dispatcher(store, ep)
    await d.start()
    try:
        await wait_until(lambda: len(receiver.processed) == 5, timeout=15, what="5 deliveries")
    finally:
        await d.stop(timeout=5)
    assert {p["id"]: p for p in await outbox_payloads(store)} == receiver.processed


async def test_a_batch_of_200_is_announced_in_a_few_queries(store: Store) -> None:
    """The message JSON of a batch's webhooks costs a few queries for the whole batch (no N+1):
    counted against the same batch recorded with nobody subscribed."""
    store.configure(RULES, [])

    def count(statements: list[str]) -> Any:
        def on(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
        return on

    async def recorded(prefix: str) -> int:
        statements: list[str] = []
        listener = count(statements)
        sa.event.listen(store.engine.sync_engine, "before_cursor_execute", listener)
        try:
            await store.record([relay(f"{prefix}{i}") for i in range(200)],
                               [EventRecord(f"{prefix}{i}", "sent", "bob@acme.test", T0)
                                for i in range(200)])
        finally:
            sa.event.remove(store.engine.sync_engine, "before_cursor_execute", listener)
        return len(statements)

    quiet = await recorded("N")
    store.configure(RULES, targets({"http://127.0.0.1:9/a": endpoint("http://127.0.0.1:9/a")}))
    announced = await recorded("A")
    payloads = await outbox_payloads(store)
    assert [p["type"] for p in payloads] == ["message.stored"] * 200 + ["message.sent"] * 200
    assert [p["data"]["message"]["queue_id"] for p in payloads[:200]] == [
        f"A{i}" for i in range(200)]                      # in batch order
    assert {p["data"]["message"]["id"] for p in payloads[200:]} == {
        p["data"]["message"]["id"] for p in payloads[:200]}
    # stored: messages, events, sources, contacts, companies; sent: the same less events;
    # two outbox INSERTs (a chunk each)
    assert announced - quiet <= 12, (quiet, announced)


def test_every_webhook_event_is_documented() -> None:
    from gateway.api.openapi import document
    from gateway.config import WEBHOOK_EVENTS

    assert set(document()["webhooks"]) == set(WEBHOOK_EVENTS)
