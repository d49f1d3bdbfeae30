"""The read API over real HTTP on loopback, on SQLite and PostgreSQL; every response checked
against the OpenAPI document's schema; /healthz, /metrics; the App's wiring and reload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from gateway.accounts.service import AccountService
from gateway.api import openapi
from gateway.api.http import AdminAPI, encode_cursor
from gateway.config import Config
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.engine import make_engine
from gateway.crm.linking import LinkRules
from gateway.crm.models import AccountState
from gateway.crm.reports import engagement
from gateway.crm.store import Store
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage, EventRecord, NewMessage, SourceRef
from tests.conftest import free_port, require_module
from tests.integration.harness import running_app, wait_until, write_config
from tests.support.receiver import Receiver

jsonschema = require_module("jsonschema")
pytestmark = pytest.mark.integration

TOKEN = "tok-0123456789abcdef"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DOC = openapi.document()


def check(body: Any, schema: str) -> None:
    """Validate a response body against a component schema of the served document."""
    jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": DOC["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)


def cfg(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "accounts": [{"id": "alice", "email": "alice@example.com", "provider": "gmail",
                      "auth": {"password_file": "env:NOPE"}},
                     {"id": "bob", "email": "bob@example.com", "provider": "gmail",
                      "auth": {"password_file": "env:NOPE"}, "sync": {"folders": ["INBOX"]}}],
        "webhooks": [{"url": "http://127.0.0.1:9/hook", "secret_file": "env:NOPE",
                      "events": ["message.bounced"]}]}
    data.update(extra)
    return Config.model_validate(data)


def relay(qid: str, *, to: str = "bob@acme.test", date: datetime | None = T0,
          at: datetime = T0, **kw: Any) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@example.com>",
                           from_addr="alice@example.com", to_addrs=[to], cc_addrs=[],
                           subject=f"about {qid}", date=date, snippet="hi", size=10,
                           recipients=[to], user="alice@example.com", account=None, at=at,
                           text_body=f"body of {qid}", **kw)


def inbound(mid: str, *, account: str = "bob", frm: str = "carol@acme.test",
            date: datetime = T0) -> NewMessage:
    return NewMessage(message_id=mid, from_addr=frm, to_addrs=["bob@example.com"], cc_addrs=[],
                      subject="hello", date=date, direction="inbound", account=account,
                      sources=[SourceRef("imap", f"{account}/INBOX/1/{mid}", date,
                                         account=account, folder="INBOX", uidvalidity=1, uid=1)])


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def send(self, method: str, path: str, body: Any,
                   token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.base + path, json=body,
                                        headers=headers) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str, token: str | None = TOKEN,
                  **params: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        url = path if path.startswith("http") else self.base + path
        async with self.session.get(url, headers=headers, params=params or None) as resp:
            ctype = resp.headers.get("Content-Type", "")
            body = await resp.json() if ctype.startswith("application/json") else await resp.text()
            return resp.status, body, resp


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def api(store: Store, metrics: Metrics,
              tmp_path: Path) -> AsyncIterator[tuple[AdminAPI, Client]]:
    config = cfg(state_dir=str(tmp_path / "state"))
    accounts = AccountService(lambda: config, store)
    a = AdminAPI(store, get_config=lambda: accounts.effective(config), metrics=metrics, token=TOKEN,
                 spool_counts=lambda: {"incoming": 1, "deferred": 2}, accounts=accounts)
    await a.start("127.0.0.1", 0, loopback_only=True)
    async with aiohttp.ClientSession() as session:
        yield a, Client(session, f"http://127.0.0.1:{a.port}")
    await a.stop()
    await accounts.stop()


async def test_token_required_on_api_not_on_health_metrics_openapi(
        api: tuple[AdminAPI, Client]) -> None:
    a, c = api
    for token in (None, "wrong-token", ""):
        status, body, resp = await c.get("/api/v1/messages", token=token)
        assert status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        check(body, "Error")
    async with c.session.get(c.base + "/api/v1/accounts",
                             headers={"Authorization": f"Basic {TOKEN}"}) as resp:
        assert resp.status == 401
    status, body, _ = await c.get("/api/v1/messages")
    assert status == 200 and body == {"messages": [], "next_cursor": None}
    for path in ("/healthz", "/metrics", "/api/v1/openapi.json"):
        assert (await c.get(path, token=None))[0] == 200
    a.set_token("rotated")                                  # a reload with a new token file
    assert (await c.get("/api/v1/messages"))[0] == 401
    assert (await c.get("/api/v1/messages", token="rotated"))[0] == 200
    status, body, _ = await c.get("/api/v1/nothing-here", token="rotated")
    assert status == 404 and "error" in body


async def test_messages_paginate_across_pages_without_duplicates_or_gaps(
        store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    # 8 messages sorting at the same instant (half by Date, half by when stored): the id decides
    await store.record([relay(f"P{i}", date=T0 if i % 2 else None) for i in range(8)], [])
    await store.record([relay("OLD", date=T0 - timedelta(days=1))], [])
    seen: list[int] = []
    pages = 0
    status, body, resp = await c.get("/api/v1/messages", limit=3)
    while True:
        assert status == 200
        check(body, "MessagePage")
        pages += 1
        seen += [m["id"] for m in body["messages"]]
        if body["next_cursor"] is None:
            assert "Link" not in resp.headers
            break
        assert len(body["messages"]) == 3
        link = resp.headers["Link"]
        assert link.endswith('>; rel="next"') and body["next_cursor"] in link
        status, body, resp = await c.get(c.base + link[1:link.index(">")])   # follow the Link
    all_rows = await store.list_messages(limit=100)
    assert pages == 3
    assert seen == [r["id"] for r in all_rows]              # same order, no gap, no duplicate
    assert len(set(seen)) == 9 and all_rows[-1]["queue_id"] == "OLD"
    status, body, _ = await c.get("/api/v1/messages", limit=1000)       # capped, not refused
    assert status == 200 and len(body["messages"]) == 9


async def test_message_filters(store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    await store.record([relay("R1", to="Dan@Beta.test"), relay("R2", date=T0 - timedelta(days=10))],
                       [])
    await store.store_messages([inbound("<in1@acme.test>")])

    async def ids(**params: Any) -> list[str]:
        status, body, _ = await c.get("/api/v1/messages", **params)
        assert status == 200, body
        check(body, "MessagePage")
        return sorted(m["queue_id"] or m["message_id"] for m in body["messages"])

    assert await ids() == ["<in1@acme.test>", "R1", "R2"]
    assert await ids(contact="dan@beta.TEST") == ["R1"]
    assert await ids(direction="inbound") == ["<in1@acme.test>"]
    assert await ids(direction="outbound") == ["R1", "R2"]
    assert await ids(account="bob") == ["<in1@acme.test>"]
    assert await ids(since="2026-02-25") == ["<in1@acme.test>", "R1"]
    assert await ids(since="2026-03-01T12:00:00+00:00", direction="outbound") == ["R1"]


@pytest.mark.parametrize(("path", "params", "parameter"), [
    ("/api/v1/messages", {"since": "last tuesday"}, "since"),
    ("/api/v1/messages", {"direction": "sideways"}, "direction"),
    ("/api/v1/messages", {"limit": "0"}, "limit"),
    ("/api/v1/messages", {"limit": "ten"}, "limit"),
    ("/api/v1/messages", {"cursor": "not-a-cursor"}, "cursor"),
    ("/api/v1/messages", {"contact": "nobody"}, "contact"),
    ("/api/v1/contacts/x@y.test/timeline", {"cursor": "eyJ4Ijox"}, "cursor"),
    ("/api/v1/stats/engagement", {"days": "0"}, "days"),
    ("/api/v1/stats/engagement", {"by": "color"}, "by"),
])
async def test_bad_parameters_are_400_naming_the_parameter(
        api: tuple[AdminAPI, Client], path: str, params: dict[str, str], parameter: str) -> None:
    _, c = api
    status, body, _ = await c.get(path, **params)
    assert status == 400
    check(body, "Error")
    assert body["parameter"] == parameter and body["error"].startswith(parameter)


async def test_message_detail_with_bodies_and_events_or_404(
        store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    await store.record([relay("D1")], [EventRecord("D1", "sent", "bob@acme.test", T0,
                                                   {"reply": "250 2.0.0 OK"})])
    (row,) = await store.list_messages()
    for ident in (str(row["id"]), "D1"):
        status, body, _ = await c.get(f"/api/v1/messages/{ident}")
        assert status == 200
        check(body, "MessageDetail")
        assert body["text_body"] == "body of D1" and body["id"] == row["id"]
        assert [(e["type"], e["details"]) for e in body["events"]] == [
            ("queued", {}), ("sent", {"reply": "250 2.0.0 OK"})]
    for ident in ("999999", "nope", "99999999999999999999999"):
        status, body, _ = await c.get(f"/api/v1/messages/{ident}")
        assert status == 404
        check(body, "Error")


async def test_contact_timeline_pages(store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    await upsert_contacts(store, [ContactInput("carol@acme.test", "Carol", "Ng", company="Acme")])
    await store.record([relay(f"T{i}", to="carol@acme.test", date=T0 + timedelta(minutes=i))
                        for i in range(3)] + [relay("X", to="zed@acme.test")], [])
    await store.store_messages([inbound("<from-carol@acme.test>", date=T0 - timedelta(days=1))])
    got: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        status, body, _ = await c.get("/api/v1/contacts/Carol%40acme.test/timeline", **params)
        assert status == 200
        check(body, "Timeline")
        assert body["email"] == "carol@acme.test" and body["contact"]["name"] == "Carol Ng"
        got += [m["queue_id"] or m["message_id"] for m in body["messages"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert got == ["T2", "T1", "T0", "<from-carol@acme.test>"]
    status, body, _ = await c.get("/api/v1/contacts/nobody@acme.test/timeline")
    assert status == 200 and body["contact"] is None and body["messages"] == []


async def test_accounts_join_config_and_runtime_state(store: Store,
                                                      api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    status, body, _ = await c.get("/api/v1/accounts")
    assert status == 200
    check(body, "AccountList")
    assert [(a["id"], a["status"], a["last_sync_at"], a["configured"]) for a in body["accounts"]] \
        == [("alice", "active", None, True), ("bob", "active", None, True)]
    async with store.engine.begin() as conn:
        await conn.execute(sa.insert(AccountState), [
            {"id": "bob", "email": "bob@example.com", "status": "needs_reconnect",
             "status_reason": "OAuth token revoked", "status_at": T0, "last_sync_at": T0},
            {"id": "gone", "email": "gone@example.com", "status": "deleted",
             "status_reason": None, "status_at": None, "last_sync_at": None}])
    status, body, _ = await c.get("/api/v1/accounts")
    check(body, "AccountList")
    bob = body["accounts"][1]
    assert (bob["status"], bob["reason"], bob["last_sync_at"], bob["folders"]) == (
        "needs_reconnect", "OAuth token revoked", T0.isoformat(), ["INBOX"])
    assert (body["accounts"][2]["id"], body["accounts"][2]["configured"]) == ("gone", False)
    status, body, _ = await c.get("/api/v1/accounts/bob/sync")
    assert status == 200 and body["id"] == "bob" and body["totals"]["runs"] == 0
    status, body, _ = await c.get("/api/v1/accounts/nobody/sync")
    assert status == 404 and "nobody" in body["error"]


async def test_engagement_and_webhooks_routes(store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    now = datetime.now(UTC)
    await store.record([relay("E1", at=now, template="promo")],
                       [EventRecord("E1", "sent", "bob@acme.test", now),
                        EventRecord("E1", "opened", "bob@acme.test", now),
                        EventRecord("E1", "opened", "bob@acme.test", now, machine=True)])
    status, body, _ = await c.get("/api/v1/stats/engagement", days=7, by="template")
    assert status == 200
    check(body, "Engagement")
    direct = await engagement(store, days=7, by="template")
    assert body["groups"] == direct["groups"]
    assert [(g["group"], g["sent"], g["delivered"], g["opened"], g["machine_opens"],
             g["open_rate"]) for g in body["groups"]] == [("promo", 1, 1, 1, 1, 1.0)]
    status, body, _ = await c.get("/api/v1/webhooks")
    assert status == 200
    check(body, "WebhookList")
    assert body["webhooks"] == [{"url": "http://127.0.0.1:9/hook", "events": ["message.bounced"],
                                 "configured": True, "pending": 0, "delivered": 0, "dead": 0,
                                 "oldest_pending_at": None, "last_error": None}]


async def test_health_and_metrics(store: Store, api: tuple[AdminAPI, Client],
                                  metrics: Metrics) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, c = api
    status, body, _ = await c.get("/healthz", token=None)
    assert status == 200
    check(body, "Health")
    assert body == {"status": "ok", "store": {"ok": True}, "spool": {"incoming": 1, "deferred": 2}}
    metrics.on_collect(lambda: metrics.set_queue({"incoming": 4}))
    metrics.tracking_hit("open", machine=True)
    metrics.delivered(3)
    await c.get("/api/v1/messages")
    status, text, resp = await c.get("/metrics", token=None)
    assert status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("mailgw_queue_messages", (("state", "incoming"),))] == 4
    assert samples[("mailgw_tracking_hits_total", (("kind", "open"), ("machine", "true")))] == 1
    assert samples[("mailgw_deliveries_total", (("result", "delivered"),))] == 3
    assert samples[("mailgw_api_requests_total",
                    (("route", "/api/v1/messages"), ("status", "200")))] == 1


async def test_healthz_503_and_api_503_when_the_store_is_unreachable() -> None:
    url = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/nothing"
    down = Store(make_engine(url), url)
    a = AdminAPI(down, get_config=cfg, metrics=Metrics(), token=TOKEN)
    await a.start("127.0.0.1", 0, loopback_only=True)
    try:
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{a.port}")
            status, body, _ = await c.get("/healthz", token=None)
            assert status == 503
            check(body, "Health")
            assert body["status"] == "unavailable" and body["store"]["ok"] is False
            status, body, _ = await c.get("/api/v1/messages")
            assert status == 503 and body == {"error": "the store is unavailable"}
    finally:
        await a.stop()
        await down.close()


async def test_contacts_upsert_list_get_and_history_links(store: Store,
                                                          api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    await store.record([relay("Q1", to="carol@acme.test")], [])
    status, body = await c.send("PUT", "/api/v1/contacts/Carol@Acme.test",
                                {"first_name": "Carol", "company": "Acme", "fields": {"tier": "A"}})
    assert status == 201 and body["email"] == "carol@acme.test" and body["company"] == "Acme"
    check(body, "Contact")
    status, body = await c.send("PUT", "/api/v1/contacts/carol@acme.test", {"last_name": "Ng"})
    assert status == 200 and (body["name"], body["fields"]) == ("Carol Ng", {"tier": "A"})
    status, body = await c.send("POST", "/api/v1/contacts", [
        {"email": "dan@acme.test"}, {"email": "erin@beta.test", "title": "CTO"}])
    assert status == 200 and (body["created"], body["updated"], body["unchanged"]) == (2, 0, 0)
    check(body, "UpsertResult")
    status, body, resp = await c.get("/api/v1/contacts", limit=2)
    assert status == 200 and [x["email"] for x in body["contacts"]] == [
        "carol@acme.test", "dan@acme.test"]
    check(body, "ContactList")
    status, body, _ = await c.get(resp.headers["Link"].split(">")[0][1:])
    assert [x["email"] for x in body["contacts"]] == ["erin@beta.test"] and not body["next_cursor"]
    status, body, _ = await c.get("/api/v1/contacts/dan@acme.test")
    assert status == 200 and body["email"] == "dan@acme.test"
    status, body, _ = await c.get("/api/v1/contacts/zed@acme.test")
    assert status == 404
    row = await store.get_message_by_queue_id("Q1")
    assert row is not None and [x["email"] for x in row["contacts"]] == ["carol@acme.test"]
    # bad input names the field; nothing is written
    for bad, parameter in [([{"email": "nope"}], "contacts[0].email"),
                           ([{"email": "a@b.test", "titel": "x"}], "contacts[0].titel"),
                           ([{"email": "a@b.test"}, {"email": "A@b.test"}], "contacts[1].email"),
                           ({"contacts": []}, "contacts"), ("text", "contacts")]:
        status, body = await c.send("POST", "/api/v1/contacts", bad)
        assert (status, body["parameter"]) == (400, parameter), bad
    status, body = await c.send("POST", "/api/v1/contacts", [{"email": "x@y.test"}], token="wrong")
    assert status == 401
    status, body, _ = await c.get("/api/v1/contacts", search="beta")
    assert [x["email"] for x in body["contacts"]] == ["erin@beta.test"]


async def test_link_by_name_shows_in_contacts_and_ambiguous_names_are_listed(
        store: Store, api: tuple[AdminAPI, Client]) -> None:
    _, c = api
    store.configure(LinkRules(link_by_name=True, own_addresses=frozenset({"alice@example.com"})))
    status, _ = await c.send("POST", "/api/v1/contacts", [
        {"email": "carol@acme.test", "first_name": "Carol", "last_name": "Smith"},
        {"email": "john@a.test", "first_name": "John", "last_name": "Doe"},
        {"email": "jd@b.test", "first_name": "John", "last_name": "Doe"}])
    assert status == 200
    for i, (addr, name) in enumerate([("carol.personal@gmail.com", "Carol Smith"),
                                      ("john.doe@gmail.com", "Doe, John"),
                                      ("j.doe@gmail.com", "John Doe")]):
        await store.store_messages([NewMessage(
            message_id=f"<n{i}@gmail.com>", from_addr=addr, from_name=name,
            to_addrs=["alice@example.com"], cc_addrs=[], subject="Hi", date=None,
            direction="inbound", sources=[SourceRef("ingest", f"ING{i}", datetime.now(UTC))])])
    status, body, _ = await c.get("/api/v1/contacts/carol.personal@gmail.com")
    assert status == 200 and body["emails"] == ["carol@acme.test", "carol.personal@gmail.com"]
    check(body, "Contact")
    status, body, _ = await c.get("/api/v1/contacts/carol@acme.test/timeline")
    assert [m["message_id"] for m in body["messages"]] == ["<n0@gmail.com>"]
    status, body, resp = await c.get("/api/v1/ambiguous-contacts", limit=1)
    assert status == 200 and [x["address"] for x in body["ambiguous"]] == ["j.doe@gmail.com"]
    assert body["ambiguous"][0]["candidates"] == ["jd@b.test", "john@a.test"]
    check(body, "AmbiguousList")
    status, body, _ = await c.get(resp.headers["Link"].split(">")[0][1:])
    assert [x["address"] for x in body["ambiguous"]] == ["john.doe@gmail.com"]
    status, body, _ = await c.get("/api/v1/ambiguous-contacts", search="x")
    assert (status, body["parameter"]) == (400, "search")


async def test_openapi_document_covers_every_route(api: tuple[AdminAPI, Client]) -> None:
    a, c = api
    status, body, _ = await c.get("/api/v1/openapi.json", token=None)
    assert status == 200 and body == DOC and body["openapi"].startswith("3.1")
    routes = {r.resource.canonical for r in a.app.router.routes() if r.resource is not None}
    assert routes == set(DOC["paths"])
    # a valid OpenAPI 3.1 document; openapi-spec-validator is in the test extra, so a missing
    # package fails this test instead of skipping the check
    from openapi_spec_validator import validate
    validate(body)


async def test_no_token_is_loopback_only(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    a = AdminAPI(store, get_config=cfg, metrics=Metrics(), token=None)
    with pytest.raises(GatewayError, match="token_file"):
        await a.start("0.0.0.0", 0, loopback_only=False)
    await a.start("127.0.0.1", 0, loopback_only=True)
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{a.port}/api/v1/accounts") as resp:
            assert resp.status == 200     # open on loopback without a token
    finally:
        await a.stop()
        await store.close()


def test_cursor_roundtrip_is_opaque_base64url() -> None:
    from gateway.api.http import decode_cursor

    cur = encode_cursor(T0, 42)
    assert "=" not in cur and "+" not in cur and "/" not in cur
    assert decode_cursor(cur) == (T0, 42)


# -- the App: admin listener, webhooks, reload -------------------------------------------------
@pytest.fixture
def secrets_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    (d / "hook").write_text("hook-secret\n")
    yield d


async def test_app_serves_api_delivers_webhooks_and_reloads_token(
        tmp_path: Path, secrets_dir: Path) -> None:
    receiver = await Receiver(b"hook-secret").start()
    admin_port = free_port()
    path = write_config(tmp_path, upstream_port=free_port(), listeners={
        "admin": {"host": "127.0.0.1", "port": admin_port,
                  "token_file": str(secrets_dir / "token")}},
        webhooks=[{"url": receiver.url, "secret_file": str(secrets_dir / "hook"),
                   "events": ["message.stored"], "retry_initial": "1s"}])
    try:
        async with running_app(path) as app, aiohttp.ClientSession() as session:
            assert app.admin is not None and app.admin.port == admin_port
            c = Client(session, f"http://127.0.0.1:{admin_port}")
            assert app.store is not None
            await app.store.record([relay("A1")], [])
            assert app.webhooks is not None
            app.webhooks.notify()
            await wait_until(lambda: len(receiver.processed) == 1, timeout=10,
                             what="the message.stored webhook")
            (payload,) = receiver.processed.values()
            assert payload["type"] == "message.stored"
            status, body, _ = await c.get("/api/v1/messages")
            assert status == 200 and [m["queue_id"] for m in body["messages"]] == ["A1"]
            # the POSTed message is the API's JSON of it (SPEC §6)
            status, one, _ = await c.get(f"/api/v1/messages/{body['messages'][0]['id']}")
            assert status == 200 and payload["data"]["message"] == one
            status, text, _ = await c.get("/metrics", token=None)
            assert 'mailgw_webhook_deliveries_total{result="ok"} 1.0' in text
            assert 'mailgw_queue_messages{state="incoming"} 0.0' in text
            assert "mailgw_queue_done 0.0" in text
            assert "mailgw_webhook_outbox_backlog 0.0" in text
            # IMAP sync counts into the same registry (imap_*_total per account)
            assert app.tailers is not None and app.tailers.metrics is app.metrics

            (secrets_dir / "token").write_text("new-token\n")
            assert await app.reload(path)
            assert (await c.get("/api/v1/messages"))[0] == 401
            assert (await c.get("/api/v1/messages", token="new-token"))[0] == 200
        await asyncio.sleep(0)
    finally:
        await receiver.stop()


async def test_nodes_lists_heartbeats_and_the_mailboxes_each_tails(
        store: Store, api: tuple[AdminAPI, Client]) -> None:
    from gateway.crm.accounts import Accounts

    _, c = api
    accounts = Accounts(store)
    assert await accounts.heartbeat("node-a", hostname="h1", pid=11, within=60) == ["node-a"]
    assert await accounts.heartbeat("node-b", hostname="h2", pid=22, within=60) == \
        ["node-a", "node-b"]
    await accounts.ensure(cfg().accounts)
    assert await accounts.acquire_lease("alice", "node-b", 60)
    status, body, _ = await c.get("/api/v1/nodes")
    assert status == 200, body
    check(body, "NodeList")
    nodes = {n["id"]: n for n in body["nodes"]}
    assert nodes["node-a"]["accounts"] == [] and nodes["node-b"]["accounts"] == ["alice"]
    assert nodes["node-b"]["live"] is True and nodes["node-b"]["pid"] == 22
    await accounts.forget_node("node-a")
    status, body, _ = await c.get("/api/v1/nodes")
    assert [n["id"] for n in body["nodes"]] == ["node-b"]
