"""The CRM's control headers end to end: submit through the real relay to an aiosmtpd upstream.

X-Mailgw-Template, -Campaign, -No-Track and -Send-At are read into the store and never
reach the upstream (nor DKIM's h=, checked with dkimpy against the delivered copy);
No-Track leaves the message without pixel or tracked links; Send-At holds the copy in
the queue until its time (`queue list` shows it, `queue delete` cancels it, a restart keeps it) and the
tracking timing rule counts from the real delivery; a bad control header is refused with
554 5.6.0 at the end of DATA (aiosmtplib and swaks). Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
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
BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/131.0.0.0 Safari/537.36")


def message(*controls: str, subject: str = "Our offer") -> bytes:
    return (f"From: Alice <{USER}>\r\nTo: bob@acme.test\r\nSubject: {subject}\r\n"
            + "".join(f"{c}\r\n" for c in controls)
            + "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            "<html><body><p>Hello, see <a href=\"https://acme.test/offer?id=7\">the offer</a>."
            "</p></body></html>\r\n").encode()


@dataclass
class Env:
    app: App
    config: Path
    upstream: Upstream
    key: dkimkeys.PrivateKey
    submission: int

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    async def submit(self, raw: bytes) -> None:
        """Submit with smtplib (in a thread: the app runs on this loop)."""
        def go() -> None:
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as s:
                s.login(USER, PASSWORD)
                s.sendmail(USER, ["bob@acme.test"], raw)
        await asyncio.to_thread(go)

    async def submit_qid(self, raw: bytes) -> str:
        """Submit with aiosmtplib; the queue id from the 250 reply."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.submission, timeout=30,
                               start_tls=False)
        await smtp.connect()
        try:
            await smtp.login(USER, PASSWORD)
            errors, reply = await smtp.sendmail(USER, ["bob@acme.test"], raw)
            assert not errors
        finally:
            await smtp.quit()
        return reply.rsplit(" ", 1)[1]

    def dkim_ok(self, raw: bytes) -> bool:
        record = dkimkeys.dns_record(self.key).encode()
        return bool(dkim.verify(raw, dnsfunc=lambda name, timeout=5: record))

    async def events(self, qid: str) -> list[dict[str, Any]]:
        m = await self.store.get_message_by_queue_id(qid)
        return [] if m is None else list(m["events"])

    async def queue(self, *args: str) -> Any:
        out = await asyncio.to_thread(cli, self.config, "queue", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if "--json" in args else out.stdout


@pytest.fixture
async def env(url: str, tmp_path: Path) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    key = dkimkeys.generate("rsa-sha256", 2048)
    (tmp_path / "dkim.pem").write_bytes(dkimkeys.private_pem(key))
    tport = free_port()
    async with Upstream() as upstream:
        cfg = write_config(
            tmp_path, upstream_port=upstream.port, store={"url": url},
            users=[{"login": USER, "password_hash": password_hash(), "name": "Alice"}],
            listeners={"tracking": {"host": "127.0.0.1", "port": tport,
                                    "base_url": f"http://127.0.0.1:{tport}",
                                    "trusted_proxies": ["127.0.0.1/32"]}},
            tracking={"open_after_delivery": "3s", "click_after_delivery": "3s"},
            dkim={"example.com": {"selector": "s1", "key_file": str(tmp_path / "dkim.pem")}})
        async with running_app(cfg) as app:
            assert app.submission is not None
            yield Env(app, cfg, upstream, key, app.submission.port)


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[0].lower() for line in head.split("\r\n")
            if line and not line[0].isspace()]


async def test_controls_are_stored_stripped_unsigned_and_no_track_applies(env: Env) -> None:
    raw = message("X-Mailgw-Template: spring-offer", "X-MAILGW-Campaign: Q4", "\tlaunch",
                  "X-Mailgw-No-Track: yes", "X-Mailgw-Other: kept")
    qid = await env.submit_qid(raw)
    [got] = await env.upstream.wait_for(1)
    assert b"x-mailgw-template" not in got.data.lower()
    assert not {"x-mailgw-template", "x-mailgw-campaign", "x-mailgw-no-track"} & set(
        header_names(got.data))
    assert b"launch" not in got.data                      # the folded line went with its field
    assert "x-mailgw-other" in header_names(got.data)     # other X-Mailgw-* fields stay
    assert env.dkim_ok(got.data)
    sig = re.search(rb"DKIM-Signature:.*?(?=\r\n\S)", got.data, re.S)
    assert sig is not None
    signed = re.search(rb"h=([^;]+)", sig.group().replace(b"\r\n", b""))
    assert signed is not None and b"mailgw-t" not in signed.group(1).lower()
    # No-Track: no pixel, no rewritten link, whatever the (default: tracking on) policies say
    assert not re.search(rb"://[^/\s\"]+/o/", got.data) and b'href="https://acme.test/offer?id=7"' in got.data

    async def stored() -> bool:
        return any(e["type"] == "sent" for e in await env.events(qid))

    await wait_until(stored, timeout=20, what="the sent event")
    m = await env.store.get_message_by_queue_id(qid, bodies=True)
    assert m is not None
    assert (m["template"], m["campaign"], m["scheduled_at"]) == ("spring-offer", "Q4 launch",
                                                                 None)


async def test_a_tracked_message_without_controls_still_gets_its_pixel(env: Env) -> None:
    await env.submit(message("X-Mailgw-No-Track: no"))
    [got] = await env.upstream.wait_for(1)
    assert b"/o/" in got.data and env.dkim_ok(got.data)
    assert "x-mailgw-no-track" not in header_names(got.data)


async def test_send_at_waits_until_then_and_timing_counts_from_delivery(env: Env) -> None:
    send_at = datetime.now(UTC) + timedelta(seconds=12)  # time for two CLI runs before it
    qid = await env.submit_qid(message(f"X-Mailgw-Send-At: {send_at.isoformat()}",
                                       "X-Mailgw-Campaign: later"))
    accepted = time.time()

    async def deferred() -> bool:
        return (env.app.spool.dir("deferred") / qid).exists()

    await wait_until(deferred, timeout=10, what="the scheduled copy in deferred/")
    [entry] = await env.queue("list", "--json")
    assert entry["id"] == qid and entry["state"] == "deferred" and entry["attempts"] == 0
    assert datetime.fromisoformat(entry["scheduled_for"]) == send_at
    text = await env.queue("list")
    assert "scheduled for" in text
    queued = [e for e in await env.events(qid) if e["type"] == "queued"]
    assert queued and datetime.fromisoformat(queued[0]["details"]["scheduled_for"]) == send_at
    assert env.upstream.messages == []                       # nothing before the time

    [got] = await env.upstream.wait_for(1, timeout=20)
    assert "x-mailgw-send-at" not in header_names(got.data) and env.dkim_ok(got.data)

    async def sent_event() -> dict[str, Any] | None:
        return next((e for e in await env.events(qid) if e["type"] == "sent"), None)

    await wait_until(sent_event, timeout=20, what="the sent event")
    sent = await sent_event()
    assert sent is not None
    sent_at = datetime.fromisoformat(sent["at"].replace("Z", "+00:00"))
    assert sent_at >= send_at
    types = [e["type"] for e in await env.events(qid)]
    assert "deferred" not in types and sent["details"]["attempt"] == 1
    # the timing rule counts from the real delivery: an open right after it is a machine's,
    # although more than open_after_delivery (3 s) passed since the message was accepted
    assert time.time() - accepted > 3
    pixel = re.search(rb'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', got.data)
    assert pixel is not None
    headers = {"User-Agent": BROWSER, "X-Forwarded-For": "198.51.100.7"}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.get(pixel.group(1).decode()) as r:
        assert r.status == 200

    async def opened() -> dict[str, Any] | None:
        return next((e for e in await env.events(qid) if e["type"] == "opened"), None)

    await wait_until(opened, timeout=20, what="the opened event")
    hit = await opened()
    assert hit is not None
    if (datetime.fromisoformat(hit["at"].replace("Z", "+00:00")) - sent_at).total_seconds() < 3:
        assert hit["machine"] is True and "after delivery" in json.dumps(hit), hit
    m = await env.store.get_message_by_queue_id(qid, bodies=True)
    assert m is not None and m["campaign"] == "later"
    assert datetime.fromisoformat(m["scheduled_at"].replace("Z", "+00:00")) == send_at


async def test_queue_delete_cancels_a_scheduled_send(env: Env) -> None:
    # the two CLI runs (real subprocesses) must both come before the send time: give them
    # 12 s, or four times what one run takes now on a loaded machine (it failed with 12 s)
    started = time.monotonic()
    assert await env.queue("list", "--json") == []
    budget = max(12.0, 4 * (time.monotonic() - started))
    send_at = datetime.now(UTC) + timedelta(seconds=budget)
    qid = await env.submit_qid(message(f"X-Mailgw-Send-At: {send_at.isoformat()}"))
    await wait_until(lambda: (env.app.spool.dir("deferred") / qid).exists(), timeout=10,
                     what="the scheduled copy in deferred/")
    out = await asyncio.to_thread(cli, env.config, "queue", "retry", qid)
    assert out.returncode == 2 and "scheduled send" in out.stderr
    assert "deleted" in await env.queue("delete", qid)
    # past the time, and a later message is delivered: the cancelled one never was
    await wait_until(lambda: datetime.now(UTC) > send_at + timedelta(seconds=1),
                     timeout=budget + 10, what="the scheduled time to pass")
    await env.submit(message(subject="after"))
    [got] = await env.upstream.wait_for(1)
    assert b"Subject: after" in got.data
    scheduler = env.app.scheduler
    assert scheduler is not None
    await wait_until(lambda: scheduler.busy == 0, timeout=10, what="scheduler idle")
    assert len(env.upstream.messages) == 1
    assert await env.queue("list", "--json") == []


@pytest.mark.parametrize(("line", "name"), [
    ("X-Mailgw-Send-At: next tuesday", "X-Mailgw-Send-At"),
    ("X-Mailgw-Send-At: 2020-01-01T00:00:00", "X-Mailgw-Send-At"),
    ("X-Mailgw-No-Track: perhaps", "X-Mailgw-No-Track"),
])
async def test_a_bad_control_header_is_refused_at_end_of_data(env: Env, line: str,
                                                              name: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.submission, timeout=30,
                           start_tls=False)
    await smtp.connect()
    try:
        await smtp.login(USER, PASSWORD)
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await smtp.sendmail(USER, ["bob@acme.test"], message(line))
    finally:
        await smtp.quit()
    assert err.value.code == 554 and err.value.message.startswith(f"5.6.0 {name}:")
    assert env.app.relay is not None and env.app.relay.accepted == 0
    assert env.app.spool.list_ids("incoming") == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
async def test_swaks_sees_554_for_a_repeated_control_header(env: Env, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(message("X-Mailgw-Campaign: a", "X-Mailgw-Campaign: b"))
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(env.submission), "--from", USER,
        "--to", "bob@acme.test", "--auth", "PLAIN", "--auth-user", USER,
        "--auth-password", PASSWORD, "--data", str(eml),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode != 0
    assert "554 5.6.0 X-Mailgw-Campaign: given more than once" in text, text
    assert env.upstream.messages == []


async def test_a_scheduled_send_survives_a_daemon_restart(url: str, tmp_path: Path) -> None:
    if url.startswith("postgresql"):
        await upgrade(url)
    async with Upstream() as upstream:
        cfg = write_config(tmp_path, upstream_port=upstream.port, store={"url": url})
        send_at = datetime.now(UTC) + timedelta(seconds=8)
        async with running_app(cfg) as app:
            assert app.submission is not None
            env = Env(app, cfg, upstream, dkimkeys.generate("ed25519-sha256"),
                      app.submission.port)
            qid = await env.submit_qid(message(f"X-Mailgw-Send-At: {send_at.isoformat()}"))
            await wait_until(lambda: (app.spool.dir("deferred") / qid).exists(), timeout=10,
                             what="the scheduled copy in deferred/")
        assert upstream.messages == [] and datetime.now(UTC) < send_at
        async with running_app(cfg) as app:        # a new daemon reads the schedule from disk
            [got] = await upstream.wait_for(1, timeout=20)
            assert datetime.now(UTC) >= send_at
            assert "x-mailgw-send-at" not in header_names(got.data)
            store = app.store
            assert store is not None

            async def sent() -> bool:
                m = await store.get_message_by_queue_id(qid)
                return m is not None and any(e["type"] == "sent" for e in m["events"])

            await wait_until(sent, timeout=20, what="the sent event after the restart")
