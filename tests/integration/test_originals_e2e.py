"""The original bytes end to end: what a rep submits over SMTP to the running gateway, and what
lands in their private Dovecot mailbox and the tailer fetches, come back byte for byte from
``GET /api/v1/messages/{id}/raw``, and each attachment from ``/attachments/{n}`` as the
sender's program encoded it; the messages carry their company. SQLite and PostgreSQL,
``store.raw: disk`` and ``database``."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import App
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from tests.conftest import free_port
from tests.integration.harness import running_app, wait_until, write_config
from tests.integration.tailer_support import FAST_SYNC, account_dict, new_user
from tests.integration.test_engagement_e2e import password_hash_for
from tests.support.dovecot import Dovecot
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
CUSTOMER = "bob@acme.test"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
CSV = "name;amount\r\nMüller;12.400 €\r\n".encode()


@dataclass
class Env:
    app: App
    upstream: Upstream
    dovecot: Dovecot
    rep: str
    http: aiohttp.ClientSession

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    @property
    def base(self) -> str:
        assert self.app.admin is not None
        return f"http://127.0.0.1:{self.app.admin.port}"

    async def get(self, path: str) -> tuple[int, bytes, Any]:
        async with self.http.get(self.base + path) as r:
            return r.status, await r.read(), r.headers


@pytest.fixture(params=["disk", "database"])
async def env(request: pytest.FixtureRequest, url: str, tmp_path: Path,
              dovecot: Dovecot) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    rep = new_user(dovecot)
    account = account_dict(dovecot, rep, tmp_path, sync={"folders": ["INBOX"]})
    async with Upstream() as upstream:
        cfg = write_config(
            tmp_path, upstream_port=upstream.port, store={"url": url, "raw": request.param},
            users=[{"login": rep, "password_hash": password_hash_for("rep-secret"), "name": "Rep"}],
            accounts=[account], sync=dict(FAST_SYNC),
            listeners={"admin": {"host": "127.0.0.1", "port": free_port()}})
        async with running_app(cfg) as app, aiohttp.ClientSession() as http:
            assert app.store is not None and app.admin is not None
            await upsert_contacts(app.store, [ContactInput(CUSTOMER, first_name="Bob",
                                                           company="Acme")])
            yield Env(app, upstream, dovecot, rep, http)


def with_files(sender: str, to: str, subject: str) -> bytes:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = make_msgid(domain="example.test")
    m["Date"] = "Wed, 02 Dec 2026 10:00:00 +0000"
    m.set_content("Hello,\n\nthe offer and the figures are attached.\n")
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="Angebot Müller.pdf")
    m.add_attachment(CSV, maintype="text", subtype="csv", filename="figures.csv",
                     cte="quoted-printable")
    return bytes(m).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def stored(env: Env, subject: str, source: str) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        rows = [r for r in await env.store.list_messages() if r["subject"] == subject]
        return rows[0] if rows and source in rows[0]["sources"] else None

    await wait_until(lambda: find(), timeout=30, what=f"{subject!r} stored from {source}")
    row = await find()
    assert row is not None
    return row


async def check_bytes(env: Env, row: dict[str, Any], raw: bytes) -> None:
    assert row["raw"]["kept"] and row["raw"]["size"] == len(raw)
    status, data, headers = await env.get(row["raw"]["url"])
    assert status == 200 and headers["Content-Type"] == "message/rfc822"
    assert data == raw
    status, body, _ = await env.get(f"/api/v1/messages/{row['id']}")
    detail = json.loads(body)
    assert [a["filename"] for a in detail["attachments"]] == ["Angebot Müller.pdf", "figures.csv"]
    status, data, headers = await env.get(detail["attachments"][0]["url"])
    assert status == 200 and data == PDF and headers["Content-Type"] == "application/pdf"
    assert "filename*=UTF-8''Angebot%20M%C3%BCller.pdf" in headers["Content-Disposition"]
    status, data, headers = await env.get(detail["attachments"][1]["url"])
    assert status == 200 and data == CSV
    assert headers["Content-Type"] == "text/csv"   # bytes added: no charset declared
    assert row["companies"] == [{"domain": "acme.test", "name": "Acme"}]


async def test_relayed_and_fetched_bytes_come_back_identical(env: Env) -> None:
    sent = with_files(f"Rep <{env.rep}>", CUSTOMER, "Offer with files")

    def submit() -> None:
        assert env.app.submission is not None
        with smtplib.SMTP("127.0.0.1", env.app.submission.port, timeout=30) as s:
            s.login(env.rep, "rep-secret")
            assert not s.sendmail(env.rep, [CUSTOMER], sent)

    await asyncio.to_thread(submit)
    await check_bytes(env, await stored(env, "Offer with files", "relay"), sent)

    received = with_files(f"Bob <{CUSTOMER}>", env.rep, "Re: Offer with files")
    env.dovecot.append(env.rep, "INBOX", received)
    row = await stored(env, "Re: Offer with files", "imap")
    assert row["sources"] == ["imap"]
    await check_bytes(env, row, received)
    # the company's timeline has both, newest first by Date (same Date: by id)
    status, body, _ = await env.get("/api/v1/companies/acme.test/timeline")
    timeline = json.loads(body)
    assert status == 200 and [m["subject"] for m in timeline["messages"]] == [
        "Re: Offer with files", "Offer with files"]
    assert timeline["company"]["message_count"] == 2
