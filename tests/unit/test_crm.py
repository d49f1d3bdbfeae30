"""The CRM side of the store on SQLite and PostgreSQL: one message across paths, threads, replies,
contacts (CSV import, upsert, history linking), companies by domain, exclusions, the outbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.crm.contacts import (
    ContactInput,
    contact_timeline,
    get_contact,
    list_contacts,
    parse_csv,
    upsert_contacts,
)
from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.errors import ConfigError
from gateway.records import (
    AcceptedMessage,
    Copy,
    EventRecord,
    NewMessage,
    SourceRef,
    WebhookTarget,
    subject_key,
)

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
RULES = LinkRules(own_addresses=frozenset({"alice@example.com"}),
                  own_domains=frozenset({"example.com"}), exclude=("noreply@*", "*@marketing.*"))


def imap_msg(mid: str, *, frm: str = "carol@acme.test", to: tuple[str, ...] = ("alice@example.com",),
             subject: str = "Quote", direction: str = "inbound", folder: str = "INBOX", uid: int = 1,
             refs: tuple[str, ...] = (), irt: str | None = None, at: datetime = T0,
             account: str = "alice", **kw: Any) -> NewMessage:
    return NewMessage(
        message_id=mid, from_addr=frm, to_addrs=list(to), cc_addrs=[], subject=subject, date=at,
        direction=direction, references=list(refs), in_reply_to=irt, account=account,
        sources=[SourceRef("imap", f"{account}/{folder}/1/{uid}", at, account=account,
                           folder=folder, uidvalidity=1, uid=uid)], **kw)


def relay_msg(qid: str, mid: str, *, to: tuple[str, ...] = ("carol@acme.test",),
              subject: str = "Quote", at: datetime = T0, **kw: Any) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=mid, from_addr="alice@example.com",
                           to_addrs=list(to), cc_addrs=[], subject=subject, date=at, snippet="hi",
                           size=10, recipients=list(to), user="alice@example.com", account="alice",
                           at=at, **kw)


async def count(store: Store, table: str) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar() or 0)


# -- one message, many paths -------------------------------------------------------------
async def test_same_message_on_relay_imap_and_ingest_is_one_row(store: Store) -> None:
    store.configure(RULES)
    await store.record([relay_msg("Q1", "<m1@example.com>")], [])
    sent = imap_msg("<m1@example.com>", frm="alice@example.com", to=("carol@acme.test",),
                    direction="outbound", folder="Sent")
    r1 = await store.store_messages([sent])
    ingest = imap_msg(" <m1@example.com> ", frm="alice@example.com", to=("carol@acme.test",),
                      direction="outbound")
    ingest.sources = [SourceRef("ingest", "ING1", T0)]
    r2 = await store.store_messages([ingest])
    assert r1[0].id == r2[0].id and not r1[0].created and not r2[0].created
    rows = await store.list_messages()
    assert len(rows) == 1
    assert rows[0]["sources"] == ["relay", "imap", "ingest"]
    # the same IMAP copy again (a replayed batch) adds nothing
    await store.store_messages([sent])
    assert await count(store, "message_sources") == 3
    assert [e["type"] for e in rows[0]["events"]] == ["queued"]


async def test_message_without_message_id_dedupes_by_hash(store: Store) -> None:
    a = imap_msg("", dedupe_hash="abc123", uid=1)
    b = imap_msg("", dedupe_hash="abc123", uid=2, folder="Archive")
    c = imap_msg("", dedupe_hash="other", uid=3)
    res = await store.store_messages([a, b, c])
    assert res[0].id == res[1].id != res[2].id
    assert [r.created for r in res] == [True, False, True]
    assert await count(store, "messages") == 2


async def test_per_recipient_copies_are_one_message_with_events_per_copy(store: Store) -> None:
    a = relay_msg("QA", "<m2@example.com>", to=("x@acme.test", "y@acme.test"),
                  copies=[Copy("QA", "x@acme.test", 3), Copy("QB", "y@acme.test", 3)])
    await store.record([a], [EventRecord("QA", "sent", "x@acme.test", T0),
                             EventRecord("QB", "sent", "y@acme.test", T0)])
    row = await store.get_message_by_queue_id("QB", bodies=True)
    assert row is not None and row["queue_id"] == "QA"
    assert sorted((e["type"], e["recipient"]) for e in row["events"]) == [
        ("queued", "x@acme.test"), ("queued", "y@acme.test"),
        ("sent", "x@acme.test"), ("sent", "y@acme.test")]
    assert {s["recipient"] for s in row["seen"]} == {"x@acme.test", "y@acme.test"}


# -- threads and replies ------------------------------------------------------------------------
async def test_threads_from_references_in_any_arrival_order(store: Store) -> None:
    reply = imap_msg("<r1@acme.test>", subject="Re: Quote", refs=("<root@example.com>",),
                     irt="<root@example.com>", uid=2, at=T0 + timedelta(hours=1))
    await store.store_messages([reply])           # the reply arrives first
    root = imap_msg("<root@example.com>", frm="alice@example.com", to=("carol@acme.test",),
                    direction="outbound", folder="Sent", uid=1)
    await store.store_messages([root])
    third = imap_msg("<r2@example.com>", frm="alice@example.com", subject="Re: Quote",
                     direction="outbound", folder="Sent", uid=3,
                     refs=("<root@example.com>", "<r1@acme.test>"), irt="<r1@acme.test>")
    await store.store_messages([third])
    threads = {r["message_id"]: r["thread_id"] for r in await store.list_messages()}
    assert len(set(threads.values())) == 1, threads


async def test_reply_without_headers_threads_by_subject_and_participant(store: Store) -> None:
    first = imap_msg("<q1@acme.test>", subject="Pricing for 2027", uid=1)
    await store.store_messages([first])
    reply = imap_msg("<q2@example.com>", frm="alice@example.com", to=("carol@acme.test",),
                     subject="RE: AW: Pricing for 2027", direction="outbound", folder="Sent", uid=2,
                     at=T0 + timedelta(days=1))
    unrelated = imap_msg("<q3@other.test>", frm="zed@other.test", subject="Re: Pricing for 2027",
                         uid=3, to=("bob@example.com",))
    fresh = imap_msg("<q4@acme.test>", subject="Pricing for 2027", uid=4)  # no Re: -> new thread
    await store.store_messages([reply, unrelated, fresh])
    t = {r["message_id"]: r["thread_id"] for r in await store.list_messages()}
    assert t["<q2@example.com>"] == t["<q1@acme.test>"]
    assert t["<q3@other.test>"] != t["<q1@acme.test>"]
    assert t["<q4@acme.test>"] != t["<q1@acme.test>"]
    assert subject_key("Re:  re[2]: Fwd: Hello  world") == ("hello world", True)


async def test_inbound_reply_records_replied_once(store: Store) -> None:
    store.configure(RULES, [WebhookTarget("http://hook.test/", frozenset({"message.replied"}))])
    await store.record([relay_msg("Q1", "<out@example.com>")], [])
    reply = imap_msg("<in@acme.test>", subject="Re: Quote", irt="<out@example.com>",
                     refs=("<out@example.com>",))
    await store.store_messages([reply])
    again = imap_msg("<in@acme.test>", subject="Re: Quote", irt="<out@example.com>", uid=9)
    again.sources = [SourceRef("ingest", "ING9", T0)]
    await store.store_messages([again])
    row = await store.get_message_by_queue_id("Q1")
    assert row is not None
    replied = [e for e in row["events"] if e["type"] == "replied"]
    assert len(replied) == 1 and replied[0]["recipient"] == "carol@acme.test"
    async with store.engine.connect() as conn:
        hooks = (await conn.execute(sa.text(
            "SELECT event_type, webhook FROM webhook_outbox"))).all()
    assert hooks == [("message.replied", "http://hook.test/")]


# -- contacts and companies ----------------------------------------------------------------------
async def test_messages_link_to_contacts_and_companies_not_to_excluded(store: Store) -> None:
    store.configure(RULES)
    await upsert_contacts(store, [ContactInput("carol@acme.test", "Carol", "Ng", company="Acme")])
    await store.store_messages([
        imap_msg("<a@acme.test>", to=("alice@example.com", "dan@acme.test", "noreply@acme.test"))])
    row = (await store.list_messages())[0]
    assert row["contacts"] == [{"email": "carol@acme.test", "name": "Carol Ng", "role": "from"}]
    async with store.engine.connect() as conn:
        companies = (await conn.execute(sa.text(
            "SELECT c.domain FROM message_companies mc JOIN companies c ON c.id = mc.company_pk")
        )).scalars().all()
    assert companies == ["acme.test"]


async def test_auto_create_contacts_skips_own_and_excluded(store: Store) -> None:
    store.configure(LinkRules(auto_create_contacts=True, own_addresses=RULES.own_addresses,
                              own_domains=RULES.own_domains, exclude=RULES.exclude))
    await store.store_messages([imap_msg("<b@x.test>", frm="Eve@Gmail.com",
                                         to=("alice@example.com", "news@marketing.acme.test"))])
    assert [c["email"] for c in await list_contacts(store)] == ["eve@gmail.com"]
    c = await get_contact(store, "EVE@gmail.com")
    assert c is not None and c["source"] == "auto" and c["company_domain"] is None


async def test_import_updates_never_duplicates_and_links_history(store: Store) -> None:
    store.configure(RULES)
    await store.store_messages([imap_msg("<h1@acme.test>", uid=1),
                                imap_msg("<h2@beta.test>", frm="bo@beta.test", uid=2)])
    text = ("Email,First Name,Last Name,Company,Title,Region\n"
            "carol@acme.test,Carol,,Acme Inc,CFO,EMEA\n"
            "bo@beta.test,Bo,Li,,,\n")
    first = await upsert_contacts(store, parse_csv(text))
    assert (first.created, first.updated, first.companies_created) == (2, 0, 1)
    assert first.messages_linked >= 2   # carol's and bo's mail, and the acme.test company
    again = await upsert_contacts(store, parse_csv(
        "email,last_name,title\nCAROL@acme.test,Ng,\n"))
    assert (again.created, again.updated) == (0, 1)
    rows = await list_contacts(store)
    assert [(r["email"], r["name"], r["title"], r["company"], r["fields"]) for r in rows] == [
        ("bo@beta.test", "Bo Li", "", "", {}),
        ("carol@acme.test", "Carol Ng", "CFO", "Acme Inc", {"region": "EMEA"})]
    timeline = await contact_timeline(store, "carol@acme.test")
    assert [m["message_id"] for m in timeline] == ["<h1@acme.test>"]
    assert timeline[0]["contacts"][0]["email"] == "carol@acme.test"




async def test_upsert_updates_several_contacts_each_with_its_own_values(store: Store) -> None:
    store.configure(RULES)
    await upsert_contacts(store, [ContactInput("a@acme.test", "Ann", "A", title="CEO"),
                                  ContactInput("b@beta.test", "Bo", "B", phone="1")])
    r = await upsert_contacts(store, [ContactInput("a@acme.test", last_name="Aa", company="Acme"),
                                      ContactInput("b@beta.test", title="CTO", fields={"x": "1"}),
                                      ContactInput("c@gamma.test", "Cy")])
    assert (r.created, r.updated, r.unchanged, r.companies_created) == (1, 2, 0, 1)
    rows = {c["email"]: c for c in await list_contacts(store)}
    a, b = rows["a@acme.test"], rows["b@beta.test"]
    assert (a["name"], a["title"], a["phone"], a["company"], a["fields"]) == (
        "Ann Aa", "CEO", "", "Acme", {})
    assert (b["name"], b["title"], b["phone"], b["company"], b["fields"]) == (
        "Bo B", "CTO", "1", "", {"x": "1"})
    assert a["updated_at"] == b["updated_at"] != a["created_at"]


async def test_link_by_domain_only_links_no_contact_before_or_after_an_import(store: Store) -> None:
    store.configure(LinkRules(link_by_address=False, own_addresses=RULES.own_addresses,
                              own_domains=RULES.own_domains))
    await store.store_messages([imap_msg("<before@acme.test>", uid=1)])
    result = await upsert_contacts(store, [ContactInput("carol@acme.test", "Carol", company="Acme")])
    await store.store_messages([imap_msg("<after@acme.test>", uid=2)])
    assert result.messages_linked == 1          # the company's, by domain
    assert [m["contacts"] for m in await store.list_messages()] == [[], []]
    assert await count(store, "message_companies") == 2


def test_csv_errors_name_the_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_csv("email,first_name\nok@acme.test,A\nnot-an-address,B\n\nok@acme.test,C\n",
                  "contacts.csv")
    problems = [str(p) for p in info.value.problems]
    assert problems == [
        "contacts.csv:3: email: 'not-an-address' is not an e-mail address",
        "contacts.csv:5: email: ok@acme.test already appears on line 2"]
    with pytest.raises(ConfigError, match=r"contacts\.csv:1: email: no email column"):
        parse_csv("name,phone\nx,y\n", "contacts.csv")
    rows = parse_csv("\ufeffE-mail;Full Name;Website\nx@y.test;Ann Lee;https://www.y.test/about\n")
    assert (rows[0].email, rows[0].first_name, rows[0].last_name, rows[0].domain) == (
        "x@y.test", "Ann", "Lee", "y.test")


# -- outbox, raw storage -------------------------------------------------------------------------
async def test_outbox_rows_are_written_with_the_message(store: Store) -> None:
    store.configure(RULES, [WebhookTarget("http://a.test/", frozenset()),
                            WebhookTarget("http://b.test/", frozenset({"message.bounced"}))])
    await store.record([relay_msg("Q1", "<o1@example.com>")],
                       [EventRecord("Q1", "bounced", "carol@acme.test", T0, {"reply": "550"})])
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.text(
            "SELECT webhook, event_type, status FROM webhook_outbox ORDER BY id"))).all()
    assert rows == [("http://a.test/", "message.stored", "pending"),
                    ("http://a.test/", "message.bounced", "pending"),
                    ("http://b.test/", "message.bounced", "pending")]



async def test_keyed_events_are_recorded_and_announced_once_in_order(store: Store) -> None:
    store.configure(RULES, [WebhookTarget("http://a.test/",
                                          frozenset({"message.opened", "message.sent"}))])
    await store.record([relay_msg("Q1", "<k1@example.com>")], [])

    def hit(key: str, seconds: int) -> EventRecord:
        return EventRecord("Q1", "opened", "carol@acme.test", T0 + timedelta(seconds=seconds),
                           {"n": key}, key=key)

    await store.record([], [hit("hit:1", 1),
                            EventRecord("Q1", "sent", "carol@acme.test", T0 + timedelta(seconds=2)),
                            hit("hit:1", 3), hit("hit:2", 4)])
    await store.record([], [hit("hit:2", 5), hit("hit:3", 6)])
    [row] = await store.list_messages()
    assert [(e["type"], e["details"].get("n")) for e in row["events"]] == [
        ("queued", None), ("opened", "hit:1"), ("sent", None), ("opened", "hit:2"),
        ("opened", "hit:3")]
    async with store.engine.connect() as conn:
        outbox = (await conn.execute(
            sa.select(sa.column("event_type"), sa.column("payload", sa.JSON))
            .select_from(sa.table("webhook_outbox")).order_by(sa.column("id")))).all()
    assert [(t, p["data"]["event"]["details"].get("n")) for t, p in outbox] == [
        ("message.opened", "hit:1"), ("message.sent", None), ("message.opened", "hit:2"),
        ("message.opened", "hit:3")]
    assert len({p["id"] for _, p in outbox}) == 4


async def test_raw_bytes_are_kept_once_content_addressed(url: str, tmp_path: Path) -> None:
    from gateway.crm.migrate import upgrade

    if url.startswith("postgresql"):
        await upgrade(url)
    raw = b"From: carol@acme.test\r\nSubject: x\r\n\r\nhello\r\n"
    for in_db in (False, True):
        s = await Store.open(url, raw_dir=tmp_path / "raw", raw_in_database=in_db)
        try:
            res = await s.store_messages([imap_msg(f"<raw{in_db}@acme.test>", raw=raw, uid=1),
                                          imap_msg(f"<raw{in_db}@acme.test>", raw=raw, uid=2)])
            assert await s.raw_message(res[0].id) == raw
        finally:
            await s.close()
    files = [p for p in (tmp_path / "raw").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == raw


async def test_concerning_filters_by_contacts_companies_and_exclusions(store: Store) -> None:
    store.configure(RULES)
    await upsert_contacts(store, [ContactInput("carol@acme.test", company="Acme"),
                                  ContactInput("noreply@acme.test")])
    verdicts = await store.concerning([
        ["carol@acme.test", "alice@example.com"],          # a contact
        ["dan@acme.test", "alice@example.com"],            # the contact's company domain
        ["alice@example.com", "zed@nowhere.test"],         # nobody we know
        ["noreply@acme.test", "alice@example.com"],        # excluded sender, even if a contact
        ["alice@example.com"],                             # only ourselves
        [],
    ])
    assert verdicts == [True, True, False, False, False, False]
    store.configure(LinkRules(auto_create_contacts=True, own_addresses=RULES.own_addresses,
                              exclude=RULES.exclude))
    assert await store.concerning([["alice@example.com", "zed@nowhere.test"],
                                   ["alice@example.com"]]) == [True, False]


async def test_writer_parses_raw_off_the_loop_and_caps_the_raw_backlog(store: Store) -> None:
    from gateway.crm.writer import StoreWriter

    raw = (b"From: Alice <alice@example.com>\r\nTo: carol@acme.test\r\nSubject: =?utf-8?q?Caf=C3=A9?="
           b"\r\nMessage-ID: <w1@example.com>\r\n\r\nHello Carol\r\n")
    w = StoreWriter(store, max_raw_bytes=len(raw) + 10)
    a = relay_msg("W1", "<w1@example.com>", subject="raw header", raw=raw)
    b = relay_msg("W2", "<w2@example.com>", raw=raw)     # over the cap while W1 is buffered
    w.add_accepted(a)
    w.add_accepted(b)
    assert a.raw is raw and b.raw is None
    # without its bytes the record still carries what the header block says
    assert (b.subject, b.to_addrs, b.from_addr) == ("Café", ["carol@acme.test"], "alice@example.com")
    await w.start()
    assert await w.stop(timeout=10) == 0
    row = await store.get_message_by_queue_id("W1", bodies=True)
    assert row is not None and row["subject"] == "Café" and row["text_body"].strip() == "Hello Carol"
    assert row["from"] == "alice@example.com" and row["contacts"] == []
