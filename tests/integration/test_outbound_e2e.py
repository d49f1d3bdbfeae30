"""The outbound pipeline end to end: submit through the relay to an aiosmtpd upstream, verify DKIM
independently, follow the click and fetch the pixel over real HTTP, and find the events with
`mailgw messages show --json`; daily caps, ingest addresses among relay recipients, `store: false`,
and `mailgw preview`. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest

from gateway.app import App
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.keys import dkim as dkimkeys
from tests.conftest import free_port
from tests.integration.harness import (
    PASSWORD,
    USER,
    cli,
    password_hash,
    running_app,
    wait_until,
    write_config,
)
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
CRM = "crm@gw.example.test"
BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/131.0.0.0 Safari/537.36")
HTML = (f"From: Alice <{USER}>\r\nTo: bob@acme.test, carol@acme.test, dan@example.com\r\n"
        "Subject: Our offer\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><body><p>Hello, see <a href=\"https://acme.test/offer?id=7&amp;ref=mail\">the offer"
        "</a> and <a href=\"mailto:sales@example.com\">write</a>.</p></body></html>\r\n").encode()
POLICIES = {
    "10-internal.yaml": "- name: internal\n  match: {recipient_domain: [example.com]}\n"
                        "  set: {track_opens: false, track_clicks: false}\n",
    "20-cap.yaml": "- name: cap\n  match: {sender: [capped@example.com]}\n  set: {max_per_day: 2}\n",
    "30-nostore.yaml": "- name: private\n  match: {recipient_domain: [private.test]}\n"
                       "  set: {store: false}\n",
}


@dataclass
class Env:
    app: App
    config: Path
    upstream: Upstream
    key: dkimkeys.PrivateKey
    submission: int
    tracking: int

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    async def submit(self, raw: bytes, rcpts: list[str], login: str = USER) -> str:
        def go() -> str:
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as s:
                s.login(login, PASSWORD)
                code, reply = s.docmd("MAIL", f"FROM:<{login}>")
                assert code == 250, reply
                for r in rcpts:
                    code, msg = s.rcpt(r)
                    if code != 250:
                        raise smtplib.SMTPRecipientsRefused({r: (code, msg)})
                code, msg = s.data(raw)
                assert code == 250, msg
                return msg.decode().rsplit(" ", 1)[1]
        return await asyncio.to_thread(go)

    def dkim_ok(self, raw: bytes) -> bool:
        record = dkimkeys.dns_record(self.key).encode()
        return bool(dkim.verify(raw, dnsfunc=lambda name, timeout=5: record))


@pytest.fixture
async def env(url: str, tmp_path: Path) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    key = dkimkeys.generate("rsa-sha256", 2048)
    (tmp_path / "dkim.pem").write_bytes(dkimkeys.private_pem(key))
    pol = tmp_path / "policies"
    pol.mkdir()
    for name, text in POLICIES.items():
        (pol / name).write_text(text)
    tport = free_port()
    async with Upstream() as upstream:
        cfg = write_config(
            tmp_path, upstream_port=upstream.port, store={"url": url},
            users=[{"login": USER, "password_hash": password_hash(), "name": "Alice"},
                   {"login": "capped@example.com", "password_hash": password_hash()}],
            listeners={"tracking": {"host": "127.0.0.1", "port": tport,
                                    "base_url": f"http://127.0.0.1:{tport}",
                                    "trusted_proxies": ["127.0.0.1/32"]}},
            tracking={"click_after_delivery": "0s", "open_after_delivery": "0s"},
            dkim={"example.com": {"selector": "s1", "key_file": str(tmp_path / "dkim.pem")}},
            ingest={"addresses": [CRM]}, policies_dir=str(pol))
        async with running_app(cfg) as app:
            assert app.submission is not None
            yield Env(app, cfg, upstream, key, app.submission.port, tport)


async def test_tracked_copies_dkim_click_pixel_and_events(env: Env) -> None:
    qid = await env.submit(HTML, ["bob@acme.test", "carol@acme.test", "dan@example.com"])
    await wait_until(lambda: len(env.upstream.messages) == 3, timeout=20, what="3 deliveries")
    by_rcpt = {m.rcpt_tos[0]: m for m in env.upstream.messages}
    assert {len(m.rcpt_tos) for m in env.upstream.messages} == {1}
    for m in by_rcpt.values():
        assert env.dkim_ok(m.data), m.rcpt_tos
        assert m.data.startswith(b"Received: ")          # trace on top, above the signature
    # the internal recipient gets the message as written (no tokens), the others their own
    # (a pixel URL, not "/o/" anywhere: the DKIM signature's base64 may hold those bytes)
    assert not re.search(rb"://[^/\s\"]+/o/", by_rcpt["dan@example.com"].data)
    assert b"https://acme.test/offer?id=7&amp;ref=mail" in by_rcpt["dan@example.com"].data
    bob = by_rcpt["bob@acme.test"].data
    pixel = re.search(rb'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', bob)
    offer = re.search(rb'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"[^>]*>the offer', bob)
    assert pixel and offer and b"mailto:sales@example.com" in bob
    assert b'aria-hidden="true"' in bob              # the honeypot is there, hidden
    headers = {"User-Agent": BROWSER, "X-Forwarded-For": "198.51.100.7"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(pixel.group(1).decode()) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/gif"
        link = offer.group(1).decode()
        async with http.get(link, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "https://acme.test/offer?id=7&ref=mail"
        forged = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
        async with http.get(forged, allow_redirects=False) as r:
            assert r.status == 404 and "Location" not in r.headers

    async def events() -> list[dict[str, Any]]:
        # `mailgw messages show` in a thread: the app under test runs on this event loop
        out = await asyncio.to_thread(cli, env.config, "messages", "show", qid, "--json")
        if out.returncode == 1 and "no message" in out.stderr:
            return []            # not written by the store writer yet
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout)["events"])

    async def seen() -> bool:
        kinds = {(e["type"], e["recipient"]) for e in await events()}
        return {("opened", "bob@acme.test"), ("clicked", "bob@acme.test"), ("sent", "bob@acme.test"),
                ("sent", "carol@acme.test"), ("sent", "dan@example.com")} <= kinds

    await wait_until(seen, timeout=30, what="sent events for all three, opened and clicked for bob")
    registry = env.app.metrics.registry
    for kind in ("open", "click"):
        assert registry.get_sample_value("mailgw_tracking_hits_total",
                                         {"kind": kind, "machine": "false"}) == 1.0, kind
    assert registry.get_sample_value("mailgw_messages_accepted_total") == 1.0
    final = await events()
    hits = [e for e in final if e["type"] in ("opened", "clicked")]
    assert all(e["machine"] is False for e in hits), hits
    clicked = next(e for e in hits if e["type"] == "clicked")
    assert clicked["details"]["url"] == "https://acme.test/offer?id=7&ref=mail"
    sent = {e["recipient"] for e in final if e["type"] == "sent"}
    assert sent == {"bob@acme.test", "carol@acme.test", "dan@example.com"}
    rows = await env.store.list_messages()
    assert len(rows) == 1 and rows[0]["subject"] == "Our offer"
    full = await env.store.get_message(rows[0]["id"], bodies=True)
    assert full is not None and "/o/" not in full["html_body"]    # the original is stored


async def test_daily_cap_answers_452_at_rcpt(env: Env) -> None:
    raw = HTML.replace(USER.encode(), b"capped@example.com")
    await env.submit(raw, ["x@acme.test", "y@acme.test"], login="capped@example.com")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await env.submit(raw, ["z@acme.test"], login="capped@example.com")
    code, msg = next(iter(info.value.recipients.values()))
    assert code == 452 and msg.startswith(b"4.5.3 Daily sending limit of 2")
    await env.submit(HTML, ["z@acme.test"])           # another sender is not capped


async def test_ingest_address_among_recipients_is_stored_never_delivered(env: Env) -> None:
    text = HTML.replace(b"text/html", b"text/plain")
    await env.submit(text, ["bob@acme.test", CRM])
    await wait_until(lambda: len(env.upstream.messages) == 1, timeout=20, what="1 delivery")
    assert env.upstream.messages[0].rcpt_tos == ("bob@acme.test",)

    async def both() -> bool:
        rows = await env.store.list_messages()
        return len(rows) == 1 and set(rows[0]["sources"]) == {"relay", "ingest"}

    await wait_until(both, timeout=20, what="one message seen on relay and ingest")


async def test_store_false_keeps_the_message_out_of_the_crm(env: Env) -> None:
    await env.submit(HTML, ["x@private.test"])
    await wait_until(lambda: len(env.upstream.messages) == 1, timeout=20, what="delivery")
    assert env.app.writer is not None
    await wait_until(lambda: env.app.writer is not None and env.app.writer.pending == 0,
                     what="store writer idle")
    assert await env.store.list_messages() == []


async def test_preview_prints_the_tracked_signed_copy(env: Env, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(HTML.replace(b"\r\n", b"\n"))
    out = await asyncio.to_thread(cli, env.config, "preview", str(eml), "--from", USER,
                                  "--to", "bob@acme.test")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Received: ") and "DKIM-Signature:" in out.stdout
    assert re.search(r"/c/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", out.stdout)
    assert "own copy" in out.stderr and "links tracked: 1" in out.stderr
    assert "throwaway" not in out.stderr            # the daemon's key made these links
    assert env.dkim_ok(out.stdout.encode().replace(b"\n", b"\r\n").split(b"\r\n", 3)[3])
