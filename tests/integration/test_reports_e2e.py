"""Bounces that come back later, end to end: the VERP return path, the bounce address, null-sender reports.

The daemon (in-process App) relays to an aiosmtpd upstream with ``delivery.return_path``
set, so each copy leaves with the envelope sender ``bounces+<queue id>@gw.example.test``;
a remote server's bounce to that address arrives at the ingest listener (from the null
sender, as MTAs send them) and becomes a ``bounced`` event on that copy's recipient.
Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.crm.migrate import upgrade
from gateway.crm.reports import engagement
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from tests.conftest import free_port
from tests.integration.harness import PASSWORD, USER, running_app, wait_until, write_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
CRM = "crm@gw.example.test"
RETURN_PATH = "bounces@gw.example.test"


class Gateway:
    def __init__(self, app: App, upstream: Upstream) -> None:
        self.app, self.upstream = app, upstream

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    def submit(self, raw: bytes, rcpts: list[str]) -> None:
        assert self.app.submission is not None
        with smtplib.SMTP("127.0.0.1", self.app.submission.port, timeout=30) as s:
            s.login(USER, PASSWORD)
            assert not s.sendmail(USER, rcpts, raw)

    def to_ingest(self, mail_from: str, rcpt: str, raw: bytes) -> tuple[int, bytes]:
        """One transaction on the ingest listener: the reply to DATA (or to RCPT)."""
        assert self.app.ingest_listener is not None
        with smtplib.SMTP("127.0.0.1", self.app.ingest_listener.port, timeout=30) as s:
            s.ehlo("mx.remote.test")
            s.mail(mail_from)
            code, text = s.rcpt(rcpt)
            if code >= 400:
                return code, text
            return s.data(raw)


@pytest.fixture
async def gw(url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    if url.startswith("postgresql"):
        await upgrade(url)
    async with Upstream() as upstream:
        cfg = write_config(tmp_path, upstream_port=upstream.port, store={"url": url},
                           listeners={"ingest": {"host": "127.0.0.1", "port": free_port()}},
                           ingest={"addresses": [CRM]}, delivery={"return_path": RETURN_PATH})
        async with running_app(cfg) as app:
            yield Gateway(app, upstream)


def offer(to: list[str]) -> bytes:
    m = EmailMessage()
    m["From"] = USER
    m["To"] = ", ".join(to)
    m["Subject"] = "Offer"
    m["Message-ID"] = make_msgid(domain="example.test")
    m.set_content("Hello,\n\nour offer.\n")
    return bytes(m).replace(b"\n", b"\r\n")


def bounce(rcpt: str, *, status: str = "5.1.1", returned: bytes = b"") -> bytes:
    """A bounce as a remote MTA sends it; `returned` the returned headers (may be none)."""
    b = "=_b"
    parts = [f"From: MAILER-DAEMON@mx.remote.test\nTo: {RETURN_PATH}\n"
             f"Subject: Undelivered Mail Returned to Sender\nMessage-ID: {make_msgid()}\n"
             f'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; '
             f'boundary="{b}"\n\n'
             f"--{b}\nContent-Type: text/plain\n\n<{rcpt}>: 550 {status} no such user\n\n"
             f"--{b}\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.remote.test\n\n"
             f"Final-Recipient: rfc822; {rcpt}\nAction: failed\nStatus: {status}\n"
             f"Diagnostic-Code: smtp; 550 {status} <{rcpt}>: no such user\n"]
    raw = "".join(parts).encode()
    if returned:
        raw += f"\n--{b}\nContent-Type: text/rfc822-headers\n\n".encode() + returned
    raw += f"\n--{b}--\n".encode()
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def events_of(store: Store, subject: str = "Offer") -> list[dict[str, Any]]:
    rows = [r for r in await store.list_messages() if r["subject"] == subject]
    return rows[0]["events"] if rows else []


async def test_verp_bounce_to_the_bounce_address_lands_on_its_recipient(gw: Gateway) -> None:
    people = ["ann@remote.test", "ben@remote.test"]
    await asyncio.to_thread(gw.submit, offer(people), people)
    await wait_until(lambda: sum(len(m.rcpt_tos) for m in gw.upstream.messages) == 2,
                     timeout=20, what="2 deliveries")
    senders = {m.mail_from for m in gw.upstream.messages}
    assert all(s.startswith("bounces+") and s.endswith("@gw.example.test") for s in senders), senders
    # the returned copy's From is still the rep's (only the envelope sender changes)
    assert all(b"From: " + USER.encode() in m.data for m in gw.upstream.messages)

    async def sent() -> bool:
        return bool(sum(e["type"] == "sent" for e in await events_of(gw.store)) == 2)

    await wait_until(sent, timeout=30, what="2 sent events")
    ann_copy = next(m for m in gw.upstream.messages if "ann@remote.test" in m.rcpt_tos)
    # the remote server accepted, then bounced asynchronously, returning no headers at all:
    # the VERP address alone names the copy
    code, text = await asyncio.to_thread(gw.to_ingest, "", ann_copy.mail_from,
                                         bounce("ann@remote.test"))
    assert code == 250, text
    evs = await events_of(gw.store)
    bounced = [(e["recipient"], e["details"]["status"]) for e in evs if e["type"] == "bounced"]
    assert bounced == [("ann@remote.test", "5.1.1")]
    assert await SuppressionList(gw.store).reason("ann@remote.test") == "bounced"
    total = (await engagement(gw.store, days=7))["total"]
    assert (total["sent"], total["delivered"], total["bounced"]) == (2, 1, 1), total
    # no conversation for the bounce
    assert [r["subject"] for r in await gw.store.list_messages()] == ["Offer"]


async def test_the_bounce_address_takes_reports_only(gw: Gateway) -> None:
    m = EmailMessage()
    m["From"] = "someone@remote.test"
    m["To"] = RETURN_PATH
    m["Subject"] = "hello"
    m.set_content("not a report\n")
    raw = bytes(m).replace(b"\n", b"\r\n")
    code, text = await asyncio.to_thread(gw.to_ingest, "someone@remote.test",
                                         "bounces+01JXXXXXXXXXXXXXXXXXXXXXXX@gw.example.test", raw)
    assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
    # an address at the domain that is not the return path is no recipient here
    code, text = await asyncio.to_thread(gw.to_ingest, "", "other+x@gw.example.test", raw)
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    # a report for a copy the gateway does not know: taken (250), nothing recorded
    unknown = "bounces+01JUNKNOWN0000000000000000@gw.example.test"
    code, text = await asyncio.to_thread(gw.to_ingest, "", unknown, bounce("x@remote.test"))
    assert code == 250, text
    assert await gw.store.list_messages() == []


async def test_a_null_sender_report_at_the_ingest_address_needs_a_queue_id(gw: Gateway) -> None:
    await asyncio.to_thread(gw.submit, offer(["cat@remote.test"]), ["cat@remote.test"])
    await wait_until(lambda: len(gw.upstream.messages) == 1, timeout=20, what="1 delivery")
    delivered = gw.upstream.messages[0].data
    head = delivered.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0] + b"\n"

    async def sent() -> bool:
        return any(e["type"] == "sent" for e in await events_of(gw.store))

    await wait_until(sent, timeout=30, what="the sent event")
    # a mailbox's redirect rule passes the bounce on to the ingest address, null sender kept;
    # the returned headers carry the gateway's Received line with the queue id
    code, text = await asyncio.to_thread(gw.to_ingest, "", CRM,
                                         bounce("cat@remote.test", returned=head))
    assert code == 250, text
    assert [e["recipient"] for e in await events_of(gw.store) if e["type"] == "bounced"] \
        == ["cat@remote.test"]
    # without anything that names the gateway's copy, the usual sender check applies
    code, text = await asyncio.to_thread(gw.to_ingest, "", CRM, bounce("cat@remote.test"))
    assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
