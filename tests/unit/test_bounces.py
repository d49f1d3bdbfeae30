"""Reports become events on the message they are about, on SQLite and PostgreSQL (gateway.crm.bounces)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.crm.linking import LinkRules
from gateway.crm.models import events_table, messages_table, outbox_table
from gateway.crm.reports import engagement
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from gateway.mail.parse import parse_message
from gateway.records import AcceptedMessage, Copy, NewMessage, SourceRef, WebhookTarget

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"
NOW = datetime.now(UTC).replace(microsecond=0)
REP = "rep@sales.example"


def relayed(qid: str, mid: str, to: list[str], *, per_recipient: bool = True,
            cc: tuple[str, ...] = ()) -> AcceptedMessage:
    rcpts = [*to, *cc]
    copies = [Copy(qid if i == 0 else f"{qid}-{i}", recipient=r) for i, r in enumerate(rcpts)] \
        if per_recipient else []
    return AcceptedMessage(queue_id=qid, message_id=mid, from_addr=REP, to_addrs=to,
                           cc_addrs=list(cc), subject="Hello", date=NOW - timedelta(hours=1),
                           snippet="hi", size=100, recipients=rcpts, user=REP, account=None,
                           at=NOW - timedelta(hours=1), copies=copies)


def report(name: str, source: str = "imap", ref: str | None = None) -> NewMessage:
    raw = (DATA / f"{name}.eml").read_bytes()
    return NewMessage.from_parsed(parse_message(raw), raw, direction="inbound",
                                  sources=[SourceRef(source, ref or f"rep/INBOX/1/{name}", NOW,
                                                     account="rep")], account="rep")


async def events(store: Store, type_: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    q = sa.select(events_table.c.type, events_table.c.recipient, events_table.c.details)
    if type_ is not None:
        q = q.where(events_table.c.type == type_)
    async with store.engine.connect() as conn:
        return [(t, r, d) for t, r, d in (await conn.execute(q.order_by(events_table.c.id))).all()]


async def message_count(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(messages_table)))
                   .scalar_one())


async def test_bounce_in_the_mailbox_is_a_bounced_event_not_a_conversation(store: Store) -> None:
    store.configure(LinkRules(), [WebhookTarget(id="http://127.0.0.1:9/hook", events=frozenset())])
    await store.record([relayed("01JEQ4Z8N9X2K7PD3MVA6TRB0C", "<proposal-0001@sales.example>",
                                ["jane.doe@customer.example"])], [])
    before = await message_count(store)
    [stored] = await store.store_messages([report("postfix_bounce")])
    assert stored.report and not stored.created and stored.id > 0
    assert await message_count(store) == before          # no conversation stored
    [(t, rcpt, details)] = await events(store, "bounced")
    assert (t, rcpt) == ("bounced", "jane.doe@customer.example")
    assert details["status"] == "5.1.1" and details["hard"] is True
    assert details["report"] == "rfc3464" and details["reporting_mta"] == "mx.customer.example"
    assert "User unknown" in details["diagnostic"]
    # the hard bounce lists the address; the webhook is queued
    assert await SuppressionList(store).reason("Jane.Doe@customer.example") == "bounced"
    async with store.engine.connect() as conn:
        hooks = [r for (r,) in (await conn.execute(sa.select(outbox_table.c.event_type))).all()]
    assert "message.bounced" in hooks
    # the same report again, now through the ingest address: recorded once
    await store.store_messages([report("postfix_bounce", "ingest", "I-again")])
    assert len(await events(store, "bounced")) == 1
    rep = await engagement(store, days=7)
    assert rep["total"]["bounced"] == 1 and rep["total"]["sent"] == 1


async def test_every_golden_report_lands_on_its_message(store: Store) -> None:
    cases = {  # golden file -> (queue id, Message-ID, recipient, event)
        "postfix_delay": ("QDELAY", "<followup-0002@sales.example>", "bob@customer.example", "delayed"),
        "gmail_bounce": ("01JEQ55B3R8C1W0V9KZ2HYF4DM", "<demo-0003@sales.example>",
                         "no.such.person@gmail.com", "bounced"),
        "gmail_legacy_notice": ("01JEQ5C0RS8J2N4FYVQW1A9XKE", "<checkin-0004@sales.example>",
                                "old.address@gmail.com", "bounced"),
        "exchange_online_ndr": ("01JEQ5F7T2M6B0H8XCZ3QW4PNR", "<offer-0005@sales.example>",
                                "max.muster@contoso.com", "bounced"),
        "exchange_legacy_notice": ("QOTHER", "<notes-0006@sales.example>",
                                   "anna.berg@fabrikam.example", "bounced"),
        "yahoo_notice": ("01JEQ5PQ8Y1Z3A5C7E9G1J3L5N", "<question-0007@sales.example>",
                         "gone.user@yahoo.com", "bounced"),
        "exim_notice": ("01JEQ5T3B6D8F0H2K4M6P8R0T2", "<partner-0008@sales.example>",
                        "info@partner.example", "bounced"),
        "qmail_notice": ("01JEQ5X9C2E4G6J8L0N2Q4S6U8", "<renewal-0009@sales.example>",
                         "sam@oldhost.example", "bounced"),
        "read_receipt": ("01JEQ4Z8N9X2K7PD3MVA6TRB0C", "<proposal-0001@sales.example>",
                         "jane.doe@customer.example", "read_receipt"),
        "arf_complaint": ("01JEQ62D5F7H9K1M3P5R7T9V1X", "<spring-0010@sales.example>",
                          "pat@yahoo.com", "complained"),
    }
    await store.record([relayed(q, mid, [rcpt]) for q, mid, rcpt, _ in cases.values()], [])
    before = await message_count(store)
    results = await store.store_messages([report(name) for name in cases])
    assert all(r.report and r.id > 0 for r in results)
    assert await message_count(store) == before
    got = {(t, r) for t, r, _ in await events(store) if t != "queued"}
    assert got == {(ev, rcpt) for _, _, rcpt, ev in cases.values()}
    sup = SuppressionList(store)
    # hard bounces and the complaint list the address; a full mailbox (5.2.2) does not
    assert await sup.reason("gone.user@yahoo.com") == "bounced"
    assert await sup.reason("max.muster@contoso.com") == "bounced"
    assert await sup.reason("pat@yahoo.com") == "complained"
    assert await sup.reason("info@partner.example") is None
    assert await sup.reason("bob@customer.example") is None


async def test_reports_speak_only_for_recipients_of_the_gateways_mail(store: Store) -> None:
    # a bounce for a message the gateway never saw: nothing stored, nothing recorded
    [r] = await store.store_messages([report("postfix_bounce")])
    assert r.report and r.id == 0
    assert await message_count(store) == 0 and await events(store) == []
    # the message exists but went to someone else: the report names no recipient of it
    await store.record([relayed("QX", "<proposal-0001@sales.example>",
                                ["a@customer.example", "b@customer.example"],
                                per_recipient=False)], [])
    await store.store_messages([report("postfix_bounce", ref="x/2")])
    assert await events(store, "bounced") == []


async def test_a_bounce_after_the_schedulers_own_is_not_counted_twice(store: Store) -> None:
    from gateway.records import EventRecord
    qid = "01JEQ4Z8N9X2K7PD3MVA6TRB0C"
    await store.record([relayed(qid, "<proposal-0001@sales.example>", ["jane.doe@customer.example"])],
                       [EventRecord(queue_id=qid, type="bounced", recipient="jane.doe@customer.example",
                                    at=NOW, details={"status": "5.1.1", "reply": "550 5.1.1 no"})])
    await store.store_messages([report("postfix_bounce")])
    assert len(await events(store, "bounced")) == 1


async def test_an_unreadable_report_stays_an_ordinary_message(store: Store) -> None:
    raw = (b"From: MAILER-DAEMON@mx.example\r\nTo: rep@sales.example\r\nSubject: hello\r\n"
           b"Message-ID: <daemon-chat@mx.example>\r\n\r\nJust saying hi.\r\n")
    m = NewMessage.from_parsed(parse_message(raw), raw, direction="inbound",
                               sources=[SourceRef("imap", "rep/INBOX/1/9", NOW)])
    assert m.kind == "delivery_report" and m.report is None
    [r] = await store.store_messages([m])
    assert r.created and not r.report
