"""Delivery routes `account` and `mx` end to end: submission, spool, the daemon's scheduler,
the right upstream, and the `sent` event in the store."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    PASSWORD,
    USER,
    Sink,
    cli,
    password_hash,
    running_app,
    wait_until,
    write_config,
)
from tests.support.dns import DNSServer, Zone
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\n"
           b"Subject: route test\r\nMessage-ID: <route@example.com>\r\n"
           b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nHello Bob.\r\n")


@pytest.fixture
def smarthost() -> Iterator[Sink]:
    """The smarthost: what no message in these tests should reach unless said so."""
    s = Sink().start()
    yield s
    s.stop()


async def submit(port: int, rcpts: list[str], login: bool = True,
                 message: bytes = MESSAGE) -> None:
    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.ehlo("client.example.com")
            if login:
                c.login(USER, PASSWORD)
            c.sendmail(USER, rcpts, message)
    await asyncio.to_thread(go)


def stored(cfg: Path) -> list[dict[str, Any]]:
    out = cli(cfg, "messages", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


async def test_route_account_uses_the_users_upstream_with_its_credentials(
        tmp_path: Path, smarthost: Sink) -> None:
    secret = tmp_path / "alice-upstream.pw"
    secret.write_text("upstream-secret\n")
    async with Upstream(auth=("alice.upstream", "upstream-secret")) as up:
        cfg = write_config(
            tmp_path, upstream_port=smarthost.port,
            listeners={"submission": {"trusted_networks": ["127.0.0.0/8"]}},
            users=[{"login": USER, "password_hash": password_hash(), "name": "Alice",
                    "account": "alice-mailbox"}],
            accounts=[{"id": "alice-mailbox", "email": USER, "provider": "imap",
                       "imap": {"host": "127.0.0.1", "port": 993},
                       "auth": {"username": "alice.upstream", "password_file": str(secret)},
                       "smtp": {"host": "127.0.0.1", "port": up.port, "tls": "none"},
                       "sync": {"enabled": False}}],
            delivery={"route": "account"})
        async with running_app(cfg) as app:
            assert app.submission is not None and app.writer is not None
            await submit(app.submission.port, ["bob@example.net"])
            [got] = await up.wait_for(1, timeout=15)
            # a client on a trusted network without AUTH has no user: the smarthost
            await submit(app.submission.port, ["carol@example.org"], login=False,
                         message=MESSAGE.replace(b"<route@", b"<route2@"))
            await wait_until(lambda: len(smarthost.received) == 1, what="the smarthost")
            await wait_until(lambda: app.writer is not None and app.writer.pending == 0
                             and app.scheduler is not None and app.scheduler.busy == 0,
                             what="events written")
    assert got.login == "alice.upstream" and up.auth_failures == 0
    assert got.mail_from == USER and got.rcpt_tos == ("bob@example.net",)
    assert got.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert smarthost.received[0][1] == ["carol@example.org"]
    by_rcpt = {row["to"][0]: row for row in stored(cfg)}
    events = [(e["type"], e["recipient"]) for e in by_rcpt["bob@example.net"]["events"]]
    assert events == [("queued", "bob@example.net"), ("sent", "bob@example.net")]
    sent = by_rcpt["bob@example.net"]["events"][1]["details"]
    assert sent["reply"].startswith("250") and sent["remote"].endswith(f":{up.port}")


async def test_route_mx_resolves_through_the_configured_nameserver(
        tmp_path: Path, smarthost: Sink) -> None:
    zone: Zone = {"example.net": {"MX": [(10, "mx.example.net")]},
                  "mx.example.net": {"A": ["127.0.0.1"]}}
    dns_server = DNSServer(zone)
    await dns_server.start()
    try:
        async with Upstream(hostname="mx.example.net") as up:
            cfg = write_config(tmp_path, upstream_port=smarthost.port,
                               delivery={"route": "mx",
                                         "nameservers": [f"127.0.0.1:{dns_server.port}"],
                                         "mx_port": up.port})
            async with running_app(cfg) as app:
                assert app.submission is not None
                await submit(app.submission.port, ["bob@example.net"])
                [got] = await up.wait_for(1, timeout=15)
                await wait_until(lambda: app.writer is not None and app.writer.pending == 0
                                 and app.scheduler is not None and app.scheduler.busy == 0,
                                 what="events written")
    finally:
        await dns_server.stop()
    assert ("example.net", "MX") in dns_server.queries
    assert got.rcpt_tos == ("bob@example.net",) and got.mail_from == USER
    assert smarthost.received == []
    [row] = stored(cfg)
    assert [(e["type"], e["recipient"]) for e in row["events"]] == [
        ("queued", "bob@example.net"), ("sent", "bob@example.net")]
    sent = row["events"][1]["details"]
    assert sent["reply"].startswith("250")
    assert sent["remote"] == f"mx.example.net[127.0.0.1]:{up.port}"
