"""The tracking summary end to end, on SQLite and PostgreSQL: a tracked message through the
relay, hits over real HTTP on the tracking endpoint from Gmail's image proxy, a person and a
link scanner, then exact numbers in ``GET /api/v1/messages/{id}`` (valid against the OpenAPI
schema), in the engagement report, and in the signed ``message.opened`` / ``message.clicked``
webhooks a real receiver gets."""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.api import openapi
from gateway.app import App
from gateway.crm.migrate import upgrade
from gateway.crm.reports import engagement
from gateway.crm.store import Store
from tests.conftest import free_port, require_module
from tests.integration.harness import PASSWORD, USER, running_app, wait_until, write_config
from tests.support.receiver import Receiver
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
jsonschema = require_module("jsonschema")
TOKEN = "tok-summary-0123456789"
HOOK_SECRET = b"hook-secret"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
OFFER = "https://acme.test/offer?id=7"
HTML = (f"From: Alice <{USER}>\r\nTo: bob@acme.test\r\nSubject: Our offer\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body><p>Hello, see <a href=\"{OFFER}\">the offer</a>.</p></body></html>\r\n"
        ).encode()


@dataclass
class Env:
    app: App
    upstream: Upstream
    receiver: Receiver
    submission: int
    admin: int

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    async def submit(self, raw: bytes, rcpts: list[str]) -> None:
        def go() -> None:
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as s:
                s.login(USER, PASSWORD)
                assert not s.sendmail(USER, rcpts, raw)
        await asyncio.to_thread(go)

    async def api(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{self.admin}{path}",
                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, await r.json()


@pytest.fixture
async def env(url: str, tmp_path: Path) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "hook").write_bytes(HOOK_SECRET + b"\n")
    tport, aport = free_port(), free_port()
    receiver = await Receiver(HOOK_SECRET).start()
    try:
        async with Upstream() as upstream:
            cfg = write_config(
                tmp_path, upstream_port=upstream.port, store={"url": url},
                listeners={"tracking": {"host": "127.0.0.1", "port": tport,
                                        "base_url": f"http://127.0.0.1:{tport}",
                                        "trusted_proxies": ["127.0.0.1/32"]},
                           "admin": {"host": "127.0.0.1", "port": aport,
                                     "token_file": str(tmp_path / "token")}},
                tracking={"click_after_delivery": "0s", "open_after_delivery": "0s"},
                webhooks=[{"url": receiver.url, "secret_file": str(tmp_path / "hook"),
                           "events": ["message.opened", "message.clicked"],
                           "retry_initial": "1s"}])
            async with running_app(cfg) as app:
                assert app.submission is not None
                yield Env(app, upstream, receiver, app.submission.port, aport)
    finally:
        await receiver.stop()


def check(body: Any, schema: str) -> None:
    doc = openapi.document()
    jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": doc["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(body)


async def test_gmail_proxy_person_and_scanner_give_exact_summary(env: Env) -> None:
    await env.submit(HTML, ["bob@acme.test"])
    await wait_until(lambda: len(env.upstream.messages) == 1, timeout=20, what="the delivery")
    data = env.upstream.messages[0].data
    pixel = re.search(rb'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', data)
    link = re.search(rb'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"[^>]*>the offer', data)
    assert pixel and link
    message_id = 0

    async def hits() -> int:
        nonlocal message_id
        rows = await env.store.list_messages()
        if not rows:
            return 0
        message_id = rows[0]["id"]
        return sum(1 for e in rows[0]["events"] if e["type"] in ("opened", "clicked"))

    async def hit(target: bytes, ua: str, ip: str, **extra: str) -> None:
        before = await hits()
        async with aiohttp.ClientSession() as http, http.get(
                target.decode(), allow_redirects=False,
                headers={"User-Agent": ua, "X-Forwarded-For": ip, **extra}) as r:
            assert r.status in (200, 302)
        # one hit at a time, so each webhook's summary is exact
        await wait_until(lambda: _more(hits, before), timeout=20, what="the hit recorded")

    await wait_until(lambda: _sent(env.store), timeout=20, what="the sent event")
    await hit(pixel.group(1), GMAIL, "66.249.84.10")                  # Gmail shows it
    await hit(pixel.group(1), CHROME, "203.0.113.9")                  # Bob reads it himself
    await hit(link.group(1), CHROME, "40.94.1.2",                     # Safe Links checks the link
              Referer="https://nam10.safelinks.protection.outlook.com/?url=x")
    await hit(link.group(1), CHROME, "203.0.113.9")                   # Bob clicks

    status, body = await env.api(f"/api/v1/messages/{message_id}")
    assert status == 200
    check(body, "MessageDetail")
    tracking = body["tracking"]
    (bob,) = tracking["recipients"]
    first, last = bob.pop("first_activity"), bob.pop("last_activity")
    assert bob == {
        "recipient": "bob@acme.test", "opens": 2, "unique_opens": 1, "human_opens": 1,
        "proxied_opens": 1, "machine_opens": 0, "machine_opens_by_category": {},
        "clicks": 2, "human_clicks": 1, "machine_clicks": 1,
        "machine_clicks_by_category": {"scanner": 1},
        "links": {OFFER: {"clicks": 2, "human_clicks": 1}}, "opened": True}
    hit_times = [e["at"] for e in body["events"] if e["type"] in ("opened", "clicked")]
    # people: from the proxied open (the first hit) to Bob's click (the last)
    assert (first, last) == (min(hit_times), max(hit_times))
    total = dict(tracking["total"])
    assert total.pop("recipients_opened") == 1
    assert total == {**{k: v for k, v in bob.items() if k != "recipient"},
                     "first_activity": first, "last_activity": last}
    categories = [e["details"]["category"] for e in body["events"]
                  if e["type"] in ("opened", "clicked")]
    assert sorted(categories) == ["human", "human", "proxied", "scanner"]

    report = (await engagement(env.store, days=1))["total"]
    assert (report["opened"], report["clicked"], report["proxied_opens"], report["machine_opens"],
            report["machine_clicks"], report["open_rate"]) == (1, 1, 1, 0, 1, 1.0)

    # the webhooks: one per hit, each with the summary as of its own hit
    await wait_until(lambda: len(env.receiver.processed) == 4, timeout=20, what="4 webhooks")
    payloads = sorted(env.receiver.processed.values(), key=lambda p: p["data"]["event"]["at"])
    assert [p["type"] for p in payloads] == ["message.opened", "message.opened",
                                             "message.clicked", "message.clicked"]
    seen = [(p["data"]["tracking"]["recipient"]["opens"],
             p["data"]["tracking"]["recipient"]["human_opens"],
             p["data"]["tracking"]["recipient"]["proxied_opens"],
             p["data"]["tracking"]["recipient"]["clicks"],
             p["data"]["tracking"]["recipient"]["human_clicks"],
             p["data"]["tracking"]["total"]["opened"]) for p in payloads]
    assert seen == [(1, 0, 1, 0, 0, True), (2, 1, 1, 0, 0, True), (2, 1, 1, 1, 0, True),
                    (2, 1, 1, 2, 1, True)]
    last_hook = payloads[-1]["data"]["tracking"]
    assert last_hook["recipient"] == {**bob, "first_activity": first, "last_activity": last}
    assert all(a.signed_ok for a in env.receiver.attempts)


async def _more(count: Any, before: int) -> bool:
    return bool(await count() > before)


async def _sent(store: Store) -> bool:
    rows = await store.list_messages()
    return bool(rows) and any(e["type"] == "sent" for e in rows[0]["events"])
