"""The suppression list end to end: a real upstream's 550 5.1.1 lists the address, the policy
`suppressed: refuse` then refuses it at RCPT through the real relay, `record` delivers and marks
it, and the API (real HTTP) and the CLI (the entry point) list, add and remove. SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import App
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from tests.conftest import free_port
from tests.integration.harness import PASSWORD, USER, cli, running_app, wait_until, write_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
GONE = "gone@strict.test"
POLICY = ("- name: never mail suppressed prospects\n  match: {recipient_domain: [strict.test]}\n"
          "  set: {suppressed: refuse}\n")


@dataclass
class Env:
    app: App
    config: Path
    upstream: Upstream
    admin: str

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    async def submit(self, rcpts: list[str], subject: str) -> dict[str, tuple[int, bytes]]:
        raw = (f"From: {USER}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{subject.replace(' ', '-')}@example.com>\r\n\r\nHello\r\n").encode()
        assert self.app.submission is not None
        port = self.app.submission.port

        def go() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.login(USER, PASSWORD)
                s.mail(USER)
                replies = {r: s.rcpt(r) for r in rcpts}
                if any(code == 250 for code, _ in replies.values()):
                    code, msg = s.data(raw)
                    assert code == 250, msg
                return replies
        return await asyncio.to_thread(go)


@pytest.fixture
async def env(url: str, tmp_path: Path) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "50-suppressed.yaml").write_text(POLICY)
    admin = free_port()
    async with Upstream(rcpt_replies={GONE: "550 5.1.1 <gone@strict.test>: user unknown"}) as up:
        cfg = write_config(tmp_path, upstream_port=up.port, store={"url": url},
                           policies_dir=str(pol),
                           listeners={"admin": {"host": "127.0.0.1", "port": admin}})
        async with running_app(cfg) as app:
            yield Env(app, cfg, up, f"http://127.0.0.1:{admin}")


async def test_hard_bounce_lists_then_refuse_policy_refuses_at_rcpt(env: Env) -> None:
    replies = await env.submit([GONE, "ok@strict.test"], "first offer")
    assert all(code == 250 for code, _ in replies.values()), replies
    sl = SuppressionList(env.store)

    async def listed() -> bool:
        return await sl.get(GONE) is not None

    await wait_until(listed, timeout=30, what="the hard bounce on the suppression list")
    row = await sl.get(GONE)
    assert row is not None and row["reason"] == "bounced" and row["detail"].startswith("5.1.1")
    assert await sl.get("ok@strict.test") is None
    delivered = len(env.upstream.messages)
    replies = await env.submit([GONE, "ok@strict.test"], "second offer")
    code, text = replies[GONE]
    assert code == 550 and text.startswith(b"5.1.1 ") and b"suppression list" in text, replies
    assert replies["ok@strict.test"][0] == 250
    await wait_until(lambda: len(env.upstream.messages) == delivered + 1, timeout=20,
                     what="the second offer delivered to the other recipient")
    assert env.upstream.messages[-1].rcpt_tos == ("ok@strict.test",)


async def test_record_policy_delivers_and_marks_the_queued_event(env: Env) -> None:
    out = await asyncio.to_thread(cli, env.config, "suppressions", "add", "Was@Loose.test",
                                  "--detail", "asked to stop")
    assert out.returncode == 0 and "was@loose.test: suppressed" in out.stdout, out.stderr
    replies = await env.submit(["was@loose.test"], "newsletter")
    assert replies["was@loose.test"][0] == 250      # default `record`: still sent
    await wait_until(lambda: len(env.upstream.messages) == 1, timeout=20, what="delivery")

    async def marked() -> dict[str, Any] | None:
        rows = await env.store.list_messages()
        queued = [e for r in rows for e in r["events"] if e["type"] == "queued"]
        return queued[0] if queued else None

    await wait_until(marked, timeout=20, what="the queued event")
    event = await marked()
    assert event is not None and event["details"] == {"suppressed": "manual"}
    listed = await asyncio.to_thread(cli, env.config, "suppressions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["address"], r["reason"], r["detail"], r["created_by"]) for r in rows] == [
        ("was@loose.test", "manual", "asked to stop", "cli")]
    out = await asyncio.to_thread(cli, env.config, "suppressions", "remove", "was@loose.test")
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(cli, env.config, "suppressions", "remove", "was@loose.test")
    assert out.returncode == 1 and "not on the suppression list" in out.stderr
    out = await asyncio.to_thread(cli, env.config, "suppressions", "add", "nonsense")
    assert out.returncode == 2 and "not an e-mail address" in out.stderr


async def test_api_round_trip(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, env.admin + path, json=body) as r:
                return r.status, (await r.json() if r.status != 204 else None)

        assert await call("POST", "/api/v1/suppressions", {"address": "nope"}) == (
            400, {"error": "address: 'nope' is not an e-mail address", "parameter": "address"})
        status, body = await call("POST", "/api/v1/suppressions", {"address": "x"})
        assert status == 400 and body["parameter"] == "address"
        status, body = await call("POST", "/api/v1/suppressions", {"address": "a@b.test", "why": 1})
        assert status == 400 and body["parameter"] == "why"
        status, body = await call("POST", "/api/v1/suppressions",
                                  {"address": "Lead@Acme.test", "detail": "unsubscribed by phone"})
        assert status == 201 and body["address"] == "lead@acme.test" and body["reason"] == "manual"
        assert body["created_by"] == "api"
        status, _ = await call("POST", "/api/v1/suppressions", {"address": "lead@acme.test"})
        assert status == 200
        status, body = await call("GET", "/api/v1/suppressions?reason=manual&q=lead")
        assert status == 200 and [r["address"] for r in body["suppressions"]] == ["lead@acme.test"]
        assert body["next_cursor"] is None
        status, body = await call("GET", "/api/v1/suppressions?reason=bogus")
        assert status == 400 and body["parameter"] == "reason"
        status, body = await call("GET", "/api/v1/suppressions/LEAD@acme.test")
        assert status == 200 and body["detail"] == "unsubscribed by phone"
        assert await call("DELETE", "/api/v1/suppressions/lead@acme.test") == (204, None)
        status, body = await call("DELETE", "/api/v1/suppressions/lead@acme.test")
        assert status == 404 and "not on the suppression list" in body["error"]
        status, _ = await call("GET", "/api/v1/suppressions/lead@acme.test")
        assert status == 404
