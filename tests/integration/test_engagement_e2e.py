"""The main one-way and two-way sync workflows end to end, checked by the numbers the CRM reads.

The daemon (in-process App) relays to an aiosmtpd upstream, takes the ingest address and
tails the rep's mailbox on a private Dovecot. The BCC workflow: a message sent through
the relay with the ingest address in Bcc, then the same message in the rep's IMAP Sent
folder, then a forward of it to the ingest address, is one message with exactly one
``queued`` and one ``sent`` event for its recipient, and ``report engagement`` says so.
Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.crm.migrate import upgrade
from gateway.crm.reports import engagement
from gateway.crm.store import Store
from gateway.passwords import hash_password
from tests.conftest import free_port
from tests.integration.harness import running_app, wait_until, write_config
from tests.integration.tailer_support import FAST_SYNC, account_dict, add_contacts, new_user
from tests.support.dovecot import Dovecot
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration
CRM = "crm@gw.example.test"
CUSTOMER = "bob@acme.test"


@dataclass
class Env:
    app: App
    upstream: Upstream
    dovecot: Dovecot
    rep: str
    submission: int

    @property
    def store(self) -> Store:
        assert self.app.store is not None
        return self.app.store

    async def submit(self, raw: bytes, rcpts: list[str]) -> str:
        def go() -> str:
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=30) as s:
                s.login(self.rep, "rep-secret")
                refused = s.sendmail(self.rep, rcpts, raw)
                assert not refused, refused
                return ""
        return await asyncio.to_thread(go)


@pytest.fixture
async def env(url: str, tmp_path: Path, dovecot: Dovecot) -> AsyncIterator[Env]:
    if url.startswith("postgresql"):
        await upgrade(url)
    rep = new_user(dovecot)
    account = account_dict(dovecot, rep, tmp_path)
    async with Upstream() as upstream:
        cfg = write_config(
            tmp_path, upstream_port=upstream.port, store={"url": url},
            users=[{"login": rep, "password_hash": password_hash_for("rep-secret"), "name": "Rep"}],
            accounts=[account], sync=dict(FAST_SYNC),
            listeners={"ingest": {"host": "127.0.0.1", "port": free_port()}},
            ingest={"addresses": [CRM]})
        async with running_app(cfg) as app:
            assert app.submission is not None and app.store is not None
            await add_contacts(app.store, CUSTOMER)
            yield Env(app, upstream, dovecot, rep, app.submission.port)


_HASHES: dict[str, str] = {}


def password_hash_for(password: str) -> str:
    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


def offer(rep: str, mid: str) -> bytes:
    m = EmailMessage()
    m["From"] = f"Rep <{rep}>"
    m["To"] = CUSTOMER
    m["Subject"] = "Our offer"
    m["Message-ID"] = mid
    m["Date"] = "Wed, 02 Dec 2026 10:00:00 +0000"
    m.set_content("Hello Bob,\n\nplease find our offer below.\n")
    return bytes(m).replace(b"\n", b"\r\n")


def forward_of(rep: str, original: bytes) -> bytes:
    m = EmailMessage()
    m["From"] = f"Rep <{rep}>"
    m["To"] = CRM
    m["Subject"] = "Fwd: Our offer"
    m["Message-ID"] = make_msgid(domain="example.test")
    m.set_content("For the CRM.\n")
    m.add_attachment(original, maintype="message", subtype="rfc822")
    return bytes(m).replace(b"\n", b"\r\n")


async def only_message(store: Store, want_sources: set[str]) -> dict[str, Any] | None:
    rows = [r for r in await store.list_messages() if r["subject"] == "Our offer"]
    if len(rows) != 1 or not want_sources <= set(rows[0]["sources"]):
        return None
    return rows[0]


async def test_bcc_then_sent_folder_then_forward_is_one_message_with_its_events(env: Env) -> None:
    mid = make_msgid(domain="example.test")
    raw = offer(env.rep, mid)
    await env.submit(raw, [CUSTOMER, CRM])          # the ingest address in Bcc
    await wait_until(lambda: len(env.upstream.messages) == 1, timeout=20, what="1 delivery")
    delivered = env.upstream.messages[0]
    assert delivered.rcpt_tos == (CUSTOMER,)        # the ingest copy is never delivered

    async def relayed() -> bool:
        row = await only_message(env.store, {"relay", "ingest"})
        return row is not None and any(e["type"] == "sent" for e in row["events"])

    await wait_until(relayed, timeout=30, what="relay + ingest, with the sent event")
    # the mail client saves its copy in Sent; the tailer sees it there
    env.dovecot.append(env.rep, "Sent Items", raw, flags=["\\Seen"])

    async def in_sent() -> bool:
        return await only_message(env.store, {"relay", "ingest", "imap"}) is not None

    await wait_until(in_sent, timeout=30, what="the Sent copy on the same message")
    # later the rep forwards it to the CRM address from their own client (no AUTH: ingest)
    fwd = forward_of(env.rep, raw)

    def forward() -> None:
        assert env.app.ingest_listener is not None
        with smtplib.SMTP("127.0.0.1", env.app.ingest_listener.port, timeout=30) as s:
            refused = s.sendmail(env.rep, [CRM], fwd)
            assert not refused, refused

    await asyncio.to_thread(forward)

    async def forwarded() -> bool:
        row = await only_message(env.store, {"relay", "ingest", "imap"})
        if row is None:
            return False
        full = await env.store.get_message(row["id"], bodies=True)
        assert full is not None
        return sum(1 for s in full["seen"] if s["source"] == "ingest") >= 2

    await wait_until(forwarded, timeout=30, what="the forward on the same message")
    row = await only_message(env.store, {"relay", "ingest", "imap"})
    assert row is not None and row["direction"] == "outbound"
    kinds = sorted((e["type"], e["recipient"]) for e in row["events"])
    assert kinds == [("queued", CUSTOMER), ("sent", CUSTOMER)], kinds
    report = await engagement(env.store, days=7)
    total = report["total"]
    assert (total["sent"], total["delivered"], total["bounced"]) == (1, 1, 0), total
    assert total["delivery_rate"] == 1.0 and total["bounce_rate"] == 0.0, total
    assert total["replied"] == 0 and total["reply_rate"] == 0.0, total


async def test_a_bcc_recipient_is_linked_and_named_in_no_delivered_copy(env: Env) -> None:
    boss = "boss@acme.test"
    await add_contacts(env.store, boss)
    raw = offer(env.rep, make_msgid(domain="example.test")).replace(
        b"Subject: Our offer", b"Bcc: The Boss <boss@acme.test>\r\nSubject: Our offer")
    await env.submit(raw, [CUSTOMER, boss, CRM])     # boss and the ingest address in Bcc
    await wait_until(lambda: sum(len(m.rcpt_tos) for m in env.upstream.messages) == 2,
                     timeout=20, what="delivered to both recipients")
    for m in env.upstream.messages:
        if CUSTOMER in m.rcpt_tos:
            assert boss.encode() not in m.data and b"\nBcc:" not in m.data

    async def linked() -> dict[str, Any] | None:
        row = await only_message(env.store, {"relay", "ingest"})
        return row if row is not None and row["bcc"] == [boss] and any(
            c["email"] == boss for c in row["contacts"]) else None

    await wait_until(linked, timeout=30, what="the Bcc recipient on the stored message")
    row = await linked()
    assert row is not None and row["to"] == [CUSTOMER]
    assert sorted((c["email"], c["role"]) for c in row["contacts"]) == [
        (CUSTOMER, "to"), (boss, "bcc")]


CAROL = "carol@acme.test"
DAN = "dan@beta.test"
EVE = "eve@elsewhere.test"


def _header_block(raw: bytes) -> bytes:
    head, _, _ = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    return head + b"\n"


def bounce_for(delivered: bytes, rcpt: str, rep: str) -> bytes:
    """Postfix's bounce for `rcpt`, returning the headers of the copy as delivered."""
    b = "=_bounce_boundary"
    text = (
        f"Return-Path: <>\nFrom: MAILER-DAEMON@mx.acme.test (Mail Delivery System)\n"
        f"To: {rep}\nSubject: Undelivered Mail Returned to Sender\n"
        f"Date: Wed, 02 Dec 2026 10:05:00 +0000\nMessage-Id: <bounce-1@mx.acme.test>\n"
        f"Auto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\n\n'
        f"--{b}\nContent-Type: text/plain; charset=us-ascii\n\n"
        f"<{rcpt}>: host mailstore.acme.test said: 550 5.1.1 <{rcpt}>: Recipient address\n"
        f"    rejected: User unknown in local recipient table\n\n"
        f"--{b}\nContent-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; mx.acme.test\n\n"
        f"Final-Recipient: rfc822; {rcpt}\nAction: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown\n\n"
        f"--{b}\nContent-Type: text/rfc822-headers\n\n")
    tail = f"\n--{b}--\n"
    return (text.encode() + _header_block(delivered) + tail.encode()).replace(b"\n", b"\r\n")


def answer(sender: str, rep: str, mid: str, *, auto: bool) -> bytes:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = rep
    m["Subject"] = "Automatic reply: Our offer" if auto else "Re: Our offer"
    m["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    m["In-Reply-To"] = mid
    m["References"] = mid
    m["Date"] = "Wed, 02 Dec 2026 11:00:00 +0000"
    if auto:
        m["Auto-Submitted"] = "auto-generated"
        m["X-Auto-Response-Suppress"] = "All"
        m.set_content("I am out of the office until 14 December 2026 with limited access to mail.\n")
    else:
        m.set_content("Thanks, looks good. Let's talk on Monday.\n")
    return bytes(m).replace(b"\n", b"\r\n")


async def test_bounce_auto_reply_and_reply_in_the_inbox_give_exact_numbers(env: Env) -> None:
    """Sent through the relay to three people; into the rep's INBOX come a bounce for one,
    an out-of-office from another, a real reply from the third and a stranger's reply:
    3 sent, 2 delivered, 1 bounced, 1 replied, 1 auto-reply, and no bounce conversation."""
    await add_contacts(env.store, CAROL, DAN, EVE)
    mid = make_msgid(domain="example.test")
    m = EmailMessage()
    m["From"] = f"Rep <{env.rep}>"
    m["To"] = f"{CUSTOMER}, {CAROL}, {DAN}"
    m["Subject"] = "Our offer"
    m["Message-ID"] = mid
    m["Date"] = "Wed, 02 Dec 2026 10:00:00 +0000"
    m.set_content("Hello all,\n\nplease find our offer below.\n")
    await env.submit(bytes(m).replace(b"\n", b"\r\n"), [CUSTOMER, CAROL, DAN])
    await wait_until(lambda: sum(len(r.rcpt_tos) for r in env.upstream.messages) == 3,
                     timeout=20, what="3 deliveries")

    async def sent_to_all() -> bool:
        row = await only_message(env.store, {"relay"})
        return row is not None and sum(e["type"] == "sent" for e in row["events"]) == 3

    await wait_until(sent_to_all, timeout=30, what="3 sent events")
    carol_copy = next(r.data for r in env.upstream.messages if CAROL in r.rcpt_tos)
    for raw in (bounce_for(carol_copy, CAROL, env.rep),
                answer(DAN, env.rep, mid, auto=True),
                answer(CUSTOMER, env.rep, mid, auto=False),
                answer(EVE, env.rep, mid, auto=False)):
        env.dovecot.append(env.rep, "INBOX", raw)

    async def settled() -> bool:
        row = await only_message(env.store, {"relay"})
        types = {e["type"] for e in row["events"]} if row else set()
        return {"bounced", "replied", "auto_replied"} <= types

    await wait_until(settled, timeout=40, what="bounced, replied and auto_replied events")
    row = await only_message(env.store, {"relay"})
    assert row is not None
    later = sorted((e["type"], e["recipient"]) for e in row["events"]
                   if e["type"] not in ("queued", "sent"))
    assert later == [("auto_replied", DAN), ("bounced", CAROL), ("replied", CUSTOMER)], later
    bounced = next(e for e in row["events"] if e["type"] == "bounced")
    assert bounced["details"]["status"] == "5.1.1" and bounced["details"]["hard"] is True
    # the bounce is no conversation; the stranger's reply counts for nothing
    subjects = [r["subject"] for r in await env.store.list_messages()]
    assert "Undelivered Mail Returned to Sender" not in subjects, subjects
    total = (await engagement(env.store, days=7))["total"]
    got = {k: total[k] for k in ("sent", "delivered", "bounced", "replied", "auto_replied")}
    assert got == {"sent": 3, "delivered": 2, "bounced": 1, "replied": 1, "auto_replied": 1}, total
    assert total["bounce_rate"] == round(1 / 3, 4) and total["reply_rate"] == 0.5, total
    assert total["delivery_rate"] == round(2 / 3, 4), total
