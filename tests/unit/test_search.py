"""Message search (gateway.crm.search, migrations 0007 and 0010) on SQLite and PostgreSQL.

Every test runs on both backends (the ``store`` fixture): word stems, addresses whole and
by domain (Bcc recipients and invitation attendees too), phrases, the HTML body of a
message without text, the existing filters, and the index kept in step by every write:
the relay and ingest/IMAP batches, an update of a message's body, a purge, and the
migrations' backfill of messages stored before them.
A property test feeds arbitrary queries: each is searched or refused (BadQuery), never an
SQL error.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.crm.accounts import Accounts
from gateway.crm.engine import make_engine
from gateway.crm.migrate import upgrade
from gateway.crm.models import FTS_TABLE, messages_table
from gateway.crm.search import MAX_QUERY_CHARS, BadQuery, fts5_match, matching, parse_query
from gateway.crm.store import Store
from gateway.records import AcceptedMessage, NewMessage, SourceRef
from tests.unit.test_store import _downgrade

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def inbound(n: int, *, subject: str = "hello", body: str = "", html: str = "",
            frm: str = "carol@acme.test", name: str = "", to: tuple[str, ...] = ("rep@ours.test",),
            account: str = "rep", at: datetime = T0) -> NewMessage:
    return NewMessage(message_id=f"<in{n}@example.org>", from_addr=frm, from_name=name,
                      to_addrs=list(to), cc_addrs=[], subject=subject, date=at, direction="inbound",
                      account=account, text_body=body, html_body=html,
                      sources=[SourceRef("imap", f"{account}/INBOX/1/{n}", at, account=account,
                                         folder="INBOX", uidvalidity=1, uid=n)])


def relayed(qid: str, *, subject: str, body: str, to: str = "dan@beta.test",
            at: datetime = T0) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@ours.test>", from_addr="rep@ours.test",
                           to_addrs=[to], cc_addrs=[], subject=subject, date=at, snippet="",
                           size=10, recipients=[to], user="rep@ours.test", account=None, at=at,
                           text_body=body)


async def ids(store: Store, query: str, **kw: Any) -> list[int]:
    return [m["id"] for m in await store.list_messages(query=query, **kw)]


async def seed(store: Store) -> list[int]:
    stored = await store.store_messages([
        inbound(1, subject="Pricing for 2027", body="We discussed the prices at length.",
                name="Carol Smith", at=T0),
        inbound(2, subject="Lunch", body="See you at noon, Carol.", frm="erin@acme.test",
                to=("rep@ours.test", "carol@acme.test"), at=T0 + timedelta(hours=1)),
        inbound(3, subject="Newsletter", html="<p>Our <b>roadmap</b> for the year</p>",
                frm="news@vendor.test", at=T0 + timedelta(hours=2)),
    ])
    await store.record([relayed("Q1", subject="Proposal", body="The price list is attached.",
                                at=T0 + timedelta(hours=3))], [])
    relay = await store.get_message_by_queue_id("Q1")
    assert relay is not None
    return [s.id for s in stored] + [relay["id"]]


async def test_words_stems_phrases_and_and(store: Store) -> None:
    m1, _, m3, m4 = await seed(store)
    assert await ids(store, "discussing") == [m1]              # stems: discussed
    assert await ids(store, "pricing") == [m4, m1]             # Pricing, prices, price; newest first
    assert await ids(store, "price") == [m4, m1]
    assert await ids(store, "proposal") == [m4]                # the subject
    assert await ids(store, "PRICES") == [m4, m1]
    assert await ids(store, "roadmap") == [m3]                 # the HTML body of an HTML-only message
    assert await ids(store, "price attached") == [m4]          # every word
    assert await ids(store, '"discussed the prices"') == [m1]  # a phrase, in order
    assert await ids(store, '"prices the discussed"') == []
    assert await ids(store, "smith") == [m1]                   # the sender's name
    assert await ids(store, "nothing-like-it") == []


async def test_addresses_whole_and_by_domain(store: Store) -> None:
    m1, m2, _, m4 = await seed(store)
    assert await ids(store, "carol@acme.test") == [m2, m1]      # From of m1, To of m2
    assert await ids(store, "erin@acme.test") == [m2]
    assert await ids(store, "acme.test") == [m2, m1]            # every address at the domain
    assert await ids(store, "dan@beta.test") == [m4]            # a relay recipient
    assert await ids(store, "rep@ours.test lunch") == [m2]
    assert await ids(store, "carol@beta.test") == []


async def test_search_combines_with_filters_and_cursor(store: Store) -> None:
    m1, m2, _, m4 = await seed(store)
    assert await ids(store, "price", direction="outbound") == [m4]
    assert await ids(store, "price", direction="inbound") == [m1]
    assert await ids(store, "carol@acme.test", contact="erin@acme.test") == [m2]
    assert await ids(store, "acme.test", since=T0 + timedelta(minutes=30)) == [m2]
    assert await ids(store, "price", account="rep") == [m1]
    page = await store.list_messages(query="acme.test", limit=1)
    assert [m["id"] for m in page] == [m2]
    after = (datetime.fromisoformat(page[0]["date"]), m2)
    assert await ids(store, "acme.test", before=after) == [m1]


async def test_a_body_gained_later_is_searchable_and_the_old_one_is_not(store: Store) -> None:
    m1, *_ = await seed(store)
    async with store.engine.begin() as conn:
        await conn.execute(sa.update(messages_table).where(messages_table.c.id == m1)
                           .values(text_body="Renewal terms enclosed", subject="Contract"))
    assert await ids(store, "renewal") == [m1]
    assert await ids(store, "contract") == [m1]
    assert await ids(store, "discussed") == []
    await _integrity(store)


async def test_a_purge_removes_the_hits(store: Store) -> None:
    m1, m2, _, m4 = await seed(store)
    assert await ids(store, "acme.test") == [m2, m1]
    result = await Accounts(store).purge("rep")
    assert result.messages == 3
    assert await ids(store, "acme.test") == []
    assert await ids(store, "roadmap") == []
    assert await ids(store, "price") == [m4]     # relayed mail is not the account's
    await _integrity(store)
    # stored again (another IMAP sync): found again, under a new id
    [again] = await store.store_messages([inbound(1, subject="Pricing for 2027")])
    assert again.created and await ids(store, "pricing") == [m4, again.id]
    await _integrity(store)


async def test_long_bodies_are_stored_and_searchable_at_the_start(store: Store) -> None:
    words = " ".join(f"w{i}x" for i in range(300_000))      # 2.4 MB, 300,000 distinct words
    [s] = await store.store_messages([inbound(9, subject="big", body="needle " + words)])
    assert await ids(store, "needle") == [s.id]
    assert await ids(store, "w5x") == [s.id]


async def test_existing_messages_are_indexed_by_the_migration(url: str) -> None:
    if url.startswith("postgresql"):
        await upgrade(url)
    s = await Store.open(url)
    try:
        m1, m2, m3, m4 = await seed(s)
    finally:
        await s.close()
    await _downgrade(url, "0006")            # the index is gone: as stored before 0007
    await upgrade(url)
    s = await Store.open(url)
    try:
        assert await ids(s, "price") == [m4, m1]
        assert await ids(s, "acme.test") == [m2, m1]
        assert await ids(s, "roadmap") == [m3]
        await _integrity(s)
    finally:
        await s.close()


async def _integrity(store: Store) -> None:
    """SQLite: FTS5's own check of the index (a delete with wrong values would break it)."""
    if store.dialect == "sqlite":
        async with store.engine.begin() as conn:
            await conn.execute(sa.text(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) "
                                       "VALUES ('integrity-check')"))


# -- queries from outside --------------------------------------------------------------------
def test_parse_query_words_phrases_addresses() -> None:
    assert parse_query('pricing  "next year"  carol@acme.test') == [
        "pricing", "next year", "carol@acme.test"]
    assert parse_query('"unclosed phrase') == ["unclosed phrase"]
    assert parse_query("a - && b a") == ["a", "b"]
    too_many = " ".join(f"w{i}" for i in range(21))
    for bad in ("", "   ", '""', "- && ||", "x" * (MAX_QUERY_CHARS + 1), too_many):
        with pytest.raises(BadQuery):
            parse_query(bad)
    assert fts5_match(['say "hi"', "x"]) == '"say ""hi""" AND "x"'


_HOSTILE = st.sampled_from(['"', "'", "*", "^", ":", "(", ")", "-", "+", "NEAR", "AND", "OR",
                            "NOT", "&", "|", "!", "<->", "\\", "\x00", "\ud800", "col:", "{", "}",
                            "@", ".", "carol@acme.test", "price", "é", "™", " ", "\t", "\u3000"])
QUERIES = st.one_of(st.text(max_size=60), st.lists(st.one_of(_HOSTILE, st.text(max_size=4)),
                                                   max_size=15).map("".join))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(q=QUERIES)
@example(q='NEAR("a" "b")')
@example(q="subject:pricing")
@example(q='"" AND OR NOT')
@example(q="price*")
@example(q="\x00carol@acme.test\ud800")
async def test_any_query_is_searched_or_refused_never_an_error(store: Store, q: str) -> None:
    await seed(store)   # the same messages each time: stored once
    try:
        await store.list_messages(query=q, limit=5)
    except BadQuery:
        pass


async def test_the_index_objects_exist_at_head(store: Store) -> None:
    """A later migration that rebuilds ``messages`` in SQLite batch mode drops its triggers
    (and on PostgreSQL cannot change a column the generated one reads): this names the loss."""
    async with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            found = set((await conn.execute(sa.text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'")))
                .scalars())
            assert {"messages_fts_insert", "messages_fts_delete", "messages_fts_update"} <= found
        else:
            found = set((await conn.execute(sa.text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'"))).scalars())
            assert "ix_messages_search_vector" in found


# -- Bcc recipients and invitation attendees (migration 0010) ----------------------------------
def invitation(n: int, *, attendees: list[str]) -> NewMessage:
    m = inbound(n, subject="Kick-off", body="Join us.")
    return NewMessage(**{**m.__dict__, "attendees": attendees})


async def test_bcc_recipients_and_attendees_are_searchable(store: Store) -> None:
    # relayed with a Bcc recipient; the To is shown, dave only known to the relay
    await store.record([AcceptedMessage(
        queue_id="QB", message_id="<QB@ours.test>", from_addr="rep@ours.test",
        to_addrs=["dan@beta.test"], cc_addrs=[], subject="Offer", date=T0, snippet="", size=10,
        recipients=["dan@beta.test", "dave@beta.test"], user="rep@ours.test", account=None,
        at=T0, text_body="hi")], [])
    relay = await store.get_message_by_queue_id("QB")
    assert relay is not None and relay["bcc"] == ["dave@beta.test"]
    assert await ids(store, "dave@beta.test") == [relay["id"]]
    assert await ids(store, "dave@beta.test") == await ids(store, "offer", contact="dave@beta.test")
    # stored first from ingest (no Bcc known), then the relay's record adds it: re-indexed
    [first] = await store.store_messages([NewMessage(
        message_id="<QL@ours.test>", from_addr="rep@ours.test", to_addrs=["dan@beta.test"],
        cc_addrs=[], subject="Later", date=T0 + timedelta(hours=1), direction="outbound",
        sources=[SourceRef("ingest", "ING1", T0)])])
    assert await ids(store, "gina@delta.test") == []
    await store.record([AcceptedMessage(
        queue_id="QL", message_id="<QL@ours.test>", from_addr="rep@ours.test",
        to_addrs=["dan@beta.test"], cc_addrs=[], subject="Later", date=T0, snippet="", size=10,
        recipients=["dan@beta.test", "gina@delta.test"], user="rep@ours.test", account=None,
        at=T0)], [])
    assert await ids(store, "gina@delta.test") == [first.id]
    assert await ids(store, "delta.test") == [first.id]
    # an invitation's attendee not named in the header fields
    [inv] = await store.store_messages([invitation(7, attendees=["oyvind@fjord.test",
                                                                 "carol@acme.test"])])
    assert await ids(store, "oyvind@fjord.test") == [inv.id]
    assert await ids(store, "fjord.test kick-off") == [inv.id]
    await _integrity(store)


async def test_the_bcc_index_of_messages_stored_before_0010(url: str) -> None:
    if url.startswith("postgresql"):
        await upgrade(url)
    s = await Store.open(url)
    try:
        await s.record([relayed("Q7", subject="Offer", body="hi")], [])
        [inv] = await s.store_messages([invitation(8, attendees=["oyvind@fjord.test"])])
        async with s.engine.begin() as conn:   # a Bcc recipient, as a record before 0010 stored it
            await conn.execute(sa.update(messages_table).where(messages_table.c.id != inv.id)
                               .values(bcc_addrs=["dave@beta.test"]))
        relay = await s.get_message_by_queue_id("Q7")
        assert relay is not None
    finally:
        await s.close()
    await _downgrade(url, "0009")            # 0007's index again: neither address in it
    assert await _raw_hits(url, "dave@beta.test") == [] == await _raw_hits(url, "fjord.test")
    assert await _raw_hits(url, "dan@beta.test") == [relay["id"]]
    await upgrade(url)
    s = await Store.open(url)
    try:
        assert await ids(s, "dave@beta.test") == [relay["id"]]
        assert await ids(s, "oyvind@fjord.test") == [inv.id]
        await _integrity(s)
    finally:
        await s.close()


async def _raw_hits(url: str, term: str) -> list[int]:
    """The ids the index holds for `term`, read without a Store (at any revision)."""
    engine = make_engine(url, migrations=True)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(messages_table.c.id)
                                      .where(matching(engine.dialect.name, [term]))
                                      .order_by(messages_table.c.id))
            return list(rows.scalars())
    finally:
        await engine.dispose()
