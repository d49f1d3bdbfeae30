"""The CRM store (gateway.crm) on SQLite and PostgreSQL: migrations, record, reads, StoreWriter.

Every store test runs twice: on an SQLite file in tmp_path, and on a PostgreSQL
database created for this test session (``mailgw_test_<random>`` next to the
database ``test`` at 127.0.0.1:5432, dropped at the end; the admin DSN can be changed
with ``MAILGW_TEST_PG``). Without PostgreSQL the PostgreSQL half is skipped, or fails
when ``CI=true``. Run: ``python -m pytest tests/unit/test_store.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import warnings
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.crm import writer as writer_mod
from gateway.crm.engine import make_engine
from gateway.crm.migrate import current_revision, head_revision, upgrade
from gateway.crm.models import in_models, metadata
from gateway.crm.store import Store
from gateway.crm.threads import thread_by_subject, threads_by_subject
from gateway.crm.writer import StoreWriter
from gateway.errors import StoreError
from gateway.records import AcceptedMessage, EventRecord, NewMessage, SourceRef, subject_key
from tests.conftest import free_port
from tests.support.wait import wait_for

PG_ADMIN = os.environ.get("MAILGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def msg(qid: str, *, frm: str = "alice@example.com", to: tuple[str, ...] = ("bob@example.net",),
        cc: tuple[str, ...] = (), at: datetime = T0, date: datetime | None = None,
        recipients: tuple[str, ...] | None = None, **kw: Any) -> AcceptedMessage:
    return AcceptedMessage(
        queue_id=qid, message_id=f"<{qid}@example.com>", from_addr=frm, to_addrs=list(to),
        cc_addrs=list(cc), subject=f"about {qid}", date=date if date is not None else at,
        snippet="hello", size=123, recipients=list(recipients if recipients is not None else to + cc),
        user="alice@example.com", account=None, at=at, **kw)


def ev(qid: str, type_: str, rcpt: str = "bob@example.net", at: datetime = T0,
       **details: Any) -> EventRecord:
    return EventRecord(queue_id=qid, type=type_, recipient=rcpt, at=at, details=details)


class Log:
    """A structlog stand-in that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **kw: Any) -> None:
            self.records.append((level, event, kw))
        return log

    def events(self, level: str | None = None) -> list[str]:
        return [e for lv, e, _ in self.records if level is None or lv == level]


# -- opening and migrations -------------------------------------------------------------
async def test_empty_sqlite_is_upgraded_on_open(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/a/b/crm.db"
    s = await Store.open(url)
    try:
        assert (tmp_path / "a" / "b" / "crm.db").exists()
        assert await current_revision(url) == await head_revision()
        async with s.engine.connect() as conn:
            pragmas = {p: (await conn.exec_driver_sql(f"PRAGMA {p}")).scalar()
                       for p in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")}
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "synchronous": 1,
                           "busy_timeout": 5000}
    finally:
        await s.close()
    # opening again finds it at head and changes nothing
    s = await Store.open(url, auto_upgrade=False)
    await s.close()


async def test_empty_sqlite_without_auto_upgrade_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"revision none.*head is \w+: run `mailgw db upgrade`"):
        await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db", auto_upgrade=False)


@pytest.mark.integration
async def test_postgresql_not_upgraded_is_refused_until_upgrade(pg_url: str) -> None:
    url = pg_url  # an empty PostgreSQL is never upgraded implicitly, unlike an empty SQLite
    with pytest.raises(StoreError, match="run `mailgw db upgrade`"):
        await Store.open(url)
    assert await current_revision(url) is None
    await upgrade(url)
    assert await current_revision(url) == await head_revision()
    await upgrade(url)  # at head: a no-op
    s = await Store.open(url)
    await s.close()


async def test_schema_behind_or_unknown_is_refused(url: str) -> None:
    await upgrade(url)
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DELETE FROM alembic_version"))
        with pytest.raises(StoreError, match=r"revision none.*run `mailgw db upgrade`"):
            await Store.open(url)  # tables but no revision: not "empty", so no auto-upgrade
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO alembic_version VALUES ('ffffffff')"))
        with pytest.raises(StoreError, match=r"ffffffff, which this mailgw does not know"):
            await Store.open(url)
    finally:
        await engine.dispose()


async def test_migrations_match_the_models(url: str) -> None:
    await upgrade(url)
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            def compare(sync_conn: sa.Connection) -> list[Any]:
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True,
                                                                  "include_name": in_models})
                with warnings.catch_warnings():  # expression indexes cannot be reflected on SQLite
                    warnings.simplefilter("ignore")
                    return list(compare_metadata(ctx, metadata))
            assert await conn.run_sync(compare) == []
    finally:
        await engine.dispose()



async def _at_0001_with_mail(url: str) -> None:
    """A store at revision 0001 holding what the 0001 relay wrote: a relayed message whose
    Message-ID has an upper-case domain, and a message seen through IMAP and ingest."""
    await upgrade(url, "0001")
    # what the 0001 store bound for a UTCDateTime: naive UTC text on SQLite
    at: Any = T0 if url.startswith("postgresql") else "2026-03-01 12:00:00.000000"
    engine = make_engine(url, migrations=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO messages (message_id, direction, from_addr, to_addrs, cc_addrs, "
                "subject, date, snippet, size, sources, queue_id, created_at) VALUES "
                "(:mid, :d, 'alice@example.com', '[]', '[]', :subj, NULL, '', 1, :src, :qid, :at)"),
                [{"mid": "<Relayed.1@MAIL.Example.COM>", "d": "outbound", "subj": "Re: Pricing",
                  "src": '["relay"]', "qid": "Q0001", "at": at},
                 {"mid": "<in.2@example.org>", "d": "inbound", "subj": "Hello",
                  "src": '["imap", "ingest"]', "qid": None, "at": at}])
            await conn.execute(sa.text(
                "INSERT INTO message_addresses (message_pk, role, address) VALUES (:m, :r, :a)"),
                [{"m": 1, "r": "from", "a": "alice@example.com"},
                 {"m": 1, "r": "to", "a": "bob@example.net"}])
    finally:
        await engine.dispose()


async def _downgrade(url: str, target: str) -> None:
    from alembic import command

    from gateway.crm.migrate import alembic_config

    def run(conn: sa.Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)

    engine = make_engine(url, migrations=True)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def test_upgraded_messages_are_keyed_as_the_store_keys_them(url: str) -> None:
    await _at_0001_with_mail(url)
    await upgrade(url)
    s = await Store.open(url)
    try:
        # the same message seen again (e.g. in the Sent folder): the row the relay stored
        seen = NewMessage(message_id="<Relayed.1@mail.example.com>", from_addr="alice@example.com",
                          to_addrs=[], cc_addrs=[], subject="Re: Pricing", date=None,
                          direction="outbound",
                          sources=[SourceRef("imap", "rep/Sent/1/1", T0, account="rep")])
        [stored] = await s.store_messages([seen])
        assert (stored.id, stored.created) == (1, False)
        assert [m["id"] for m in await s.list_messages()] == [2, 1]
    finally:
        await s.close()




async def test_upgraded_messages_thread_with_their_replies(url: str) -> None:
    await _at_0001_with_mail(url)
    await upgrade(url)
    s = await Store.open(url)
    try:
        def reply(mid: str, irt: str | None, at: datetime) -> NewMessage:
            return NewMessage(message_id=mid, in_reply_to=irt, from_addr="bob@example.net",
                              to_addrs=["alice@example.com"], cc_addrs=[], subject="RE: pricing",
                              date=at, direction="inbound",
                              sources=[SourceRef("ingest", mid, at)])

        await s.store_messages([reply("<r1@example.net>", "<Relayed.1@MAIL.Example.COM>",
                                      T0 + timedelta(hours=1)),
                                reply("<r2@example.net>", None, T0 + timedelta(days=1))])
        threads = {m["message_id"]: m["thread_id"] for m in await s.list_messages()}
        # by In-Reply-To, and (no references at all) by subject and participants
        assert threads["<r1@example.net>"] == threads["<Relayed.1@MAIL.Example.COM>"] is not None
        assert threads["<r2@example.net>"] == threads["<Relayed.1@MAIL.Example.COM>"]
    finally:
        await s.close()


async def test_downgrade_to_0001_keeps_each_messages_sources(url: str) -> None:
    await _at_0001_with_mail(url)
    await upgrade(url)
    await _downgrade(url, "0001")
    engine = make_engine(url, migrations=True)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(
                sa.column("id"), sa.column("queue_id"), sa.column("sources", sa.JSON))
                .select_from(sa.table("messages")).order_by(sa.column("id")))).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "Q0001", ["relay"]), (2, None, ["imap", "ingest"])]


async def test_unreachable_postgresql_is_a_store_error_without_the_password() -> None:
    url = f"postgresql+asyncpg://mailgw:s3cr3t-pw@127.0.0.1:{free_port()}/crm"
    with pytest.raises(StoreError) as info:
        await Store.open(url)
    text = str(info.value)
    assert "cannot open the store postgresql+asyncpg://mailgw:***@127.0.0.1" in text
    assert "s3cr3t-pw" not in text and "s3cr3t-pw" not in repr(info.value.args)
    with pytest.raises(StoreError) as info2:
        await upgrade(url)
    assert "s3cr3t-pw" not in str(info2.value)


async def test_bad_urls_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported store URL mysql"):
        await Store.open("mysql://u:pw@localhost/db")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        await Store.open(f"sqlite+aiosqlite:///{tmp_path}/file/sub/crm.db")


# -- record -------------------------------------------------------------------------------
async def test_record_is_idempotent_per_queue_id(store: Store) -> None:
    await store.record([msg("Q1"), msg("Q1")], [])
    await store.record([msg("Q1", to=("someone@else.org",))], [])
    rows = await store.list_messages()
    assert [r["queue_id"] for r in rows] == ["Q1"]
    assert rows[0]["to"] == ["bob@example.net"]
    assert [(e["type"], e["recipient"]) for e in rows[0]["events"]] == [("queued", "bob@example.net")]


async def test_known_relay_refs_names_the_recorded_copies(store: Store) -> None:
    """What the start-up recovery from the spool asks (`gateway.relay.record_unrecorded`)."""
    from gateway.records import Copy

    await store.record([msg("Q1", copies=[Copy("Q1", "bob@example.net"), Copy("Q2")])], [])
    assert await store.known_relay_refs(["Q1", "Q2", "Q3", "Q1"]) == {"Q1", "Q2"}
    assert await store.known_relay_refs([]) == set()


async def test_events_attach_to_the_right_message(store: Store) -> None:
    log = Log()
    store.log = log
    await store.record(
        [msg("Q1", to=("bob@example.net", "carol@example.org")),
         msg("Q2", to=("dave@example.org",), at=T0 + timedelta(seconds=1))],
        [ev("Q1", "sent", "bob@example.net", T0 + timedelta(seconds=2), reply="250 2.0.0 OK"),
         ev("Q2", "deferred", "dave@example.org", T0 + timedelta(seconds=3), reply="451 later")])
    # a later batch: events for messages stored by an earlier call, one unknown, one for a
    # message accepted again in the same batch (already stored: skipped, its event still lands)
    await store.record(
        [msg("Q2")],
        [ev("Q1", "bounced", "carol@example.org", T0 + timedelta(seconds=4), reply="550 5.1.1 no"),
         ev("Q2", "sent", "dave@example.org", T0 + timedelta(seconds=5)),
         ev("NOPE", "sent", "x@example.org", T0)])
    q1 = await store.get_message_by_queue_id("Q1")
    q2 = await store.get_message_by_queue_id("Q2")
    assert q1 is not None and q2 is not None
    assert [(e["type"], e["recipient"]) for e in q1["events"]] == [
        ("queued", "bob@example.net"), ("queued", "carol@example.org"),
        ("sent", "bob@example.net"), ("bounced", "carol@example.org")]
    assert q1["events"][2]["details"] == {"reply": "250 2.0.0 OK"}
    assert [e["type"] for e in q2["events"]] == ["queued", "deferred", "sent"]
    assert await store.get_message(q1["id"]) == q1
    assert await store.get_message(999999) is None
    assert await store.get_message_by_queue_id("NOPE") is None
    assert "store_events_skipped" in log.events()
    # the JSON shape of the read API's MessageSummary (gateway/api/openapi.py)
    assert set(q1) == {"id", "message_id", "thread_id", "direction", "account", "user", "from",
                       "to", "cc", "bcc", "subject", "date", "snippet", "size", "sources", "queue_id",
                       "contacts", "companies", "raw", "events", "assigned_to", "assigned_rule"}
    assert q1["sources"] == ["relay"] and q1["direction"] == "outbound" and q1["contacts"] == []
    assert set(q1["events"][0]) == {"type", "at", "recipient", "machine", "category",
                                    "details"}


async def test_event_of_a_message_in_the_same_batch_and_machine_flag(store: Store) -> None:
    opened = EventRecord("Q1", "opened", "bob@example.net", T0 + timedelta(minutes=5),
                         {"user_agent": "GoogleImageProxy"}, machine=True)
    await store.record([msg("Q1")], [opened])
    row = await store.get_message_by_queue_id("Q1")
    assert row is not None
    assert [(e["type"], e["machine"]) for e in row["events"]] == [("queued", False), ("opened", True)]


async def test_deleting_a_message_deletes_its_events(store: Store) -> None:
    await store.record([msg("Q1", cc=("carol@example.org",))], [ev("Q1", "sent")])
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM messages"))
        left = [(await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar()
                for t in ("events", "message_addresses")]
    assert left == [0, 0]


async def test_unclean_input_does_not_fail_the_batch(store: Store) -> None:
    dirty = msg("Q1", frm="al\x00ice@example.com", to=("b\udcffob@example.net",))
    dirty.subject = "sub\x00ject \udc80"
    dirty.snippet = "x" * 500
    weird = EventRecord("Q1", "sent", "bob@example.net", T0,
                        {"reply": "250 ok\x00", "raw": b"\xff\xfe", "when": T0, "n": float("nan"),
                         "obj": object.__name__, "nested": {"set": {1}}})
    await store.record([dirty], [weird])
    row = await store.get_message_by_queue_id("Q1")
    assert row is not None
    assert row["from"] == "alice@example.com" and "\x00" not in row["subject"]
    assert len(row["snippet"]) == 200
    assert row["events"][-1]["details"]["when"] == T0.isoformat()


async def test_record_throughput_smoke(store: Store) -> None:
    # not a timing assertion (see bench/): a batch of 200 with events goes through in one call
    batch = [msg(f"B{i:04}", to=("a@x.org", "b@y.org"), cc=("c@z.org",)) for i in range(200)]
    await store.record(batch, [ev(f"B{i:04}", "sent", "a@x.org") for i in range(200)])
    rows = await store.list_messages(limit=1000)
    assert len(rows) == 200 and all(len(r["events"]) == 4 for r in rows)


# -- reading --------------------------------------------------------------------------------
async def test_list_filters_and_order(store: Store) -> None:
    await store.record([
        msg("OLD", frm="Alice@Example.com", to=("bob@example.net",), at=T0 - timedelta(days=3)),
        msg("CC", frm="alice@example.com", to=("x@example.org",), cc=("Bob@Example.NET",),
            at=T0 - timedelta(days=1)),
        msg("NEW", frm="carol@example.org", to=("dave@example.org",), at=T0),
        msg("SUB", frm="alice@example.com", to=("robob@example.net",), at=T0 - timedelta(days=2)),
    ], [])
    all_ = await store.list_messages()
    assert [r["queue_id"] for r in all_] == ["NEW", "CC", "SUB", "OLD"]
    assert all(r["events"] for r in all_)
    bob = await store.list_messages(contact=" BOB@example.net ")
    assert [r["queue_id"] for r in bob] == ["CC", "OLD"]  # not robob@: whole addresses only
    alice = await store.list_messages(contact="alice@EXAMPLE.com")
    assert [r["queue_id"] for r in alice] == ["CC", "SUB", "OLD"]
    recent = await store.list_messages(since=T0 - timedelta(days=1, hours=1))
    assert [r["queue_id"] for r in recent] == ["NEW", "CC"]
    assert [r["queue_id"] for r in await store.list_messages(contact="bob@example.net",
                                                             since=T0 - timedelta(days=2))] == ["CC"]
    assert len(await store.list_messages(limit=2)) == 2
    assert await store.list_messages(contact="nobody@example.com") == []
    # a naive `since` is UTC
    naive = (T0 - timedelta(hours=1)).replace(tzinfo=None)
    assert [r["queue_id"] for r in await store.list_messages(since=naive)] == ["NEW"]


async def test_message_without_date_sorts_by_when_it_was_accepted(store: Store) -> None:
    undated = msg("UNDATED", at=T0 + timedelta(hours=1))
    undated.date = None
    await store.record([msg("DATED", at=T0), undated], [])
    rows = await store.list_messages()
    assert [(r["queue_id"], r["date"]) for r in rows] == [("UNDATED", None),
                                                          ("DATED", T0.isoformat())]


async def test_datetimes_round_trip_timezone_aware(store: Store) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    date = datetime(2026, 1, 31, 23, 59, 58, 123456, tzinfo=ist)
    sent_at = datetime(2026, 2, 1, 8, 0, 0, tzinfo=timezone(timedelta(hours=-8)))
    m = msg("TZ", date=date, at=datetime(2026, 2, 1, 0, 0, 0))  # naive `at`: UTC
    await store.record([m], [ev("TZ", "sent", at=sent_at)])
    row = await store.get_message_by_queue_id("TZ")
    assert row is not None
    got = datetime.fromisoformat(row["date"])
    assert got == date and got.utcoffset() == timedelta(0)
    assert row["date"] == "2026-01-31T18:29:58.123456+00:00"
    queued, sent = (datetime.fromisoformat(e["at"]) for e in row["events"])
    assert queued == datetime(2026, 2, 1, tzinfo=UTC)
    assert sent == sent_at and sent.tzinfo is not None
    # straight from the table too: aware, in UTC
    async with store.engine.connect() as conn:
        from gateway.crm.models import Message

        value = (await conn.execute(sa.select(Message.date))).scalar_one()
    assert value == date and value.tzinfo is not None and value.utcoffset() == timedelta(0)


# -- StoreWriter ---------------------------------------------------------------------------
class Recording:
    """Wraps a Store: counts record() calls and their sizes; fails the first `fail` calls."""

    def __init__(self, store: Store, fail: int = 0) -> None:
        self.store = store
        self.fail = fail
        self.calls: list[tuple[int, int]] = []
        self.errors = 0
        self.real = store.record

    async def record(self, accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        self.calls.append((len(accepted), len(events)))
        if self.fail:
            self.fail -= 1
            self.errors += 1
            raise StoreError("simulated outage")
        await self.real(accepted, events)

    def install(self) -> Store:
        self.store.record = self.record  # type: ignore[method-assign]  # the recording stand-in
        return self.store


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "BACKOFF_MIN", 0.01)
    monkeypatch.setattr(writer_mod, "BACKOFF_MAX", 0.04)


async def test_writer_flushes_in_batches(store: Store) -> None:
    rec = Recording(store)
    w = StoreWriter(rec.install(), batch=200, max_delay=0.05)
    for i in range(450):
        w.add_accepted(msg(f"W{i:03}"))
    assert w.pending == 450  # nothing written before the loop runs: add_* never waits
    await w.start()
    await wait_for(lambda: w.pending == 0, what="the writer to drain")
    assert rec.calls == [(200, 0), (200, 0), (50, 0)]
    assert w.written == 450 and w.failures == 0
    # a lone item goes out after max_delay, not when a batch fills
    w.add_event(ev("W000", "sent"))
    await wait_for(lambda: w.pending == 0, what="the lone event to be written")
    assert rec.calls[-1] == (0, 1)
    assert await w.stop(timeout=5) == 0
    assert len(await store.list_messages(limit=1000)) == 450


async def test_writer_marks_say_what_is_written(store: Store, fast_backoff: None) -> None:
    """The scheduler keeps a delivered entry in done/ until `flushed` reaches the mark it
    took after the entry's events (StoreWriter.mark): items are written in order, so the
    mark covers the copy's record too; a store that is down holds it back."""
    rec = Recording(store, fail=3)
    w = StoreWriter(rec.install(), batch=50, max_delay=0.01)
    assert w.mark() == 0 and w.flushed == 0      # nothing given: nothing owed
    w.add_accepted(msg("WM1"))
    w.add_event(ev("WM1", "sent"))
    mark = w.mark()
    assert mark == 2 and w.flushed < mark
    w.add_event(ev("WM1", "opened"))
    await w.start()
    while w.flushed < mark:
        assert await w.wait_flushed(10.0) or w.flushed >= mark
    assert rec.errors == 3                       # it waited through the outage
    assert await store.get_message_by_queue_id("WM1") is not None
    assert await w.stop(timeout=5) == 0
    assert w.flushed == w.mark() == 3


async def test_keyed_outcome_events_are_added_once(store: Store) -> None:
    """The scheduler's outcome events carry keys (`sent:<qid>:<rcpt>`, ...): a replay from
    the spool after a crash, in a later batch or in the same one, adds nothing more."""
    def keyed(type_: str, rcpt: str, key: str) -> EventRecord:
        return EventRecord(queue_id="WK1", type=type_, recipient=rcpt, at=T0,
                           details={"reply": "250 ok"}, key=key)

    live = [keyed("sent", "bob@example.net", "sent:WK1:bob@example.net"),
            keyed("deferred", "carol@example.net", "deferred:WK1:carol@example.net:1")]
    await store.record([msg("WK1", to=("bob@example.net", "carol@example.net"))], live)
    again = [*live, keyed("sent", "carol@example.net", "sent:WK1:carol@example.net")]
    await store.record([], again)
    await store.record([], [again[2], again[2]])
    m = await store.get_message_by_queue_id("WK1")
    assert m is not None
    assert sorted((e["type"], e["recipient"]) for e in m["events"] if e["type"] != "queued") \
        == [("deferred", "carol@example.net"), ("sent", "bob@example.net"),
            ("sent", "carol@example.net")]


async def test_writer_retries_after_failures_without_losing_items(store: Store,
                                                                  fast_backoff: None) -> None:
    log = Log()
    rec = Recording(store, fail=2)
    failed: list[int] = []
    w = StoreWriter(rec.install(), batch=50, max_delay=0.01, log=log,
                    on_failure=lambda: failed.append(1))
    await w.start()
    for i in range(120):
        w.add_accepted(msg(f"R{i:03}"))
        if i % 10 == 0:
            w.add_event(ev(f"R{i:03}", "sent"))
    await wait_for(lambda: w.pending == 0, what="the writer to drain")
    assert w.failures == 2 and rec.errors == 2 and len(failed) == 2   # the metric's hook
    assert w.written == 132
    assert log.events("error").count("store_write_failed") == 2
    assert "store_write_recovered" in log.events()
    assert await w.stop(timeout=5) == 0
    rows = await store.list_messages(limit=500)
    assert len(rows) == 120
    assert sum(1 for r in rows for e in r["events"] if e["type"] == "sent") == 12


async def test_writer_backs_off_exponentially(store: Store, fast_backoff: None) -> None:
    rec = Recording(store, fail=5)
    log = Log()
    w = StoreWriter(rec.install(), batch=10, max_delay=0.001, log=log)
    loop = asyncio.get_running_loop()
    times: list[float] = []
    real = rec.record

    async def timed(accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        times.append(loop.time())
        await real(accepted, events)

    store.record = timed  # type: ignore[method-assign]  # a timing stand-in
    w.add_accepted(msg("B1"))
    await w.start()
    await wait_for(lambda: w.pending == 0, what="the writer to drain")
    # the delay doubles from BACKOFF_MIN (0.01) up to BACKOFF_MAX (0.04) ...
    delays = [kw["retry_in"] for _, event, kw in log.records if event == "store_write_failed"]
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]
    # ... and each retry waited at least that long (a slow machine only makes gaps longer)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 5
    assert all(gap >= delay - 0.005 for gap, delay in zip(gaps, delays, strict=True)), gaps
    assert await w.stop(timeout=1) == 0


async def test_stop_drains_what_is_buffered(store: Store) -> None:
    w = StoreWriter(store, batch=200, max_delay=10.0)  # a long max_delay: stop must not wait it
    await w.start()
    for i in range(300):
        w.add_accepted(msg(f"S{i:03}"))
    w.add_event(ev("S299", "sent"))
    assert await w.stop(timeout=5) == 0  # had stop() waited out max_delay, 301 would be lost
    assert w.pending == 0 and w.written == 301
    row = await store.get_message_by_queue_id("S299")
    assert row is not None and [e["type"] for e in row["events"]] == ["queued", "sent"]


async def test_stop_without_start_still_flushes(store: Store) -> None:
    w = StoreWriter(store)
    w.add_accepted(msg("N1"))
    assert await w.stop(timeout=5) == 0
    assert await store.get_message_by_queue_id("N1") is not None


async def test_stop_reports_what_it_could_not_write(store: Store, fast_backoff: None) -> None:
    log = Log()
    rec = Recording(store, fail=10**6)
    w = StoreWriter(rec.install(), batch=200, max_delay=0.01, log=log)
    await w.start()
    w.add_accepted(msg("L1"))
    w.add_event(ev("L1", "sent"))
    await wait_for(lambda: w.failures >= 1, what="a failed write")
    lost = await w.stop(timeout=0.3)
    assert lost == 2 and w.pending == 2
    assert len(rec.calls) >= 2  # kept trying while draining
    assert "store_items_unwritten" in log.events("error")
    unwritten = [kw for lv, e, kw in log.records if e == "store_item_unwritten"]
    assert [(u["kind"], u["queue_id"]) for u in unwritten] == [("message", "L1"), ("event", "L1")]


async def test_expression_index_survives_the_migrations(url: str) -> None:
    # alembic cannot compare expression indexes on SQLite, and batch mode drops them there
    await upgrade(url)
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            if url.startswith("sqlite"):
                q = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
            else:
                q = "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'"
            names = set((await conn.execute(sa.text(q))).scalars())
    finally:
        await engine.dispose()
    assert "ix_messages_sort_at" in names


async def test_control_headers_are_stored_and_the_queued_event_says_when(store: Store) -> None:
    at = T0 + timedelta(hours=5)
    await store.record([msg("S1", template="offer", campaign="q4", scheduled_at=at)], [])
    [row] = await store.list_messages()
    full = await store.get_message(row["id"], bodies=True)
    assert full is not None
    assert (full["template"], full["campaign"]) == ("offer", "q4")
    assert datetime.fromisoformat(full["scheduled_at"].replace("Z", "+00:00")) == at
    [queued] = [e for e in full["events"] if e["type"] == "queued"]
    assert datetime.fromisoformat(queued["details"]["scheduled_for"]) == at


async def test_late_relay_record_brings_campaign_and_schedule(store: Store) -> None:
    """The ingest copy (Bcc) was stored first, without control headers: the relay's record
    arriving later fills template, campaign and schedule."""
    at = T0 + timedelta(hours=1)
    await store.store_messages([NewMessage(
        message_id="<S2@example.com>", from_addr="alice@example.com",
        to_addrs=["bob@example.net"], cc_addrs=[], subject="s", date=T0, direction="inbound",
        sources=[SourceRef("ingest", "ING-S2", T0)])])
    await store.record([msg("S2", template="offer", campaign="q4", scheduled_at=at)], [])
    [row] = await store.list_messages()
    full = await store.get_message(row["id"], bodies=True)
    assert full is not None and full["direction"] == "outbound"
    assert (full["template"], full["campaign"]) == ("offer", "q4")
    assert datetime.fromisoformat(full["scheduled_at"].replace("Z", "+00:00")) == at


async def test_subject_threads_of_a_batch_are_those_asked_one_by_one(store: Store) -> None:
    """The batch's one subject query picks, for every reply without references, the thread
    the per-message query picks: same subject key, a shared participant, the newest within
    the window (threads by time, ties by the newer row), none outside it."""
    def new(mid: str, subject: str, at: datetime, frm: str, to: list[str],
            date: datetime | None = None) -> NewMessage:
        return NewMessage(message_id=mid, from_addr=frm, to_addrs=to, cc_addrs=[], subject=subject,
                          date=date, direction="inbound", sources=[SourceRef("ingest", mid, at)])

    earlier = [
        new("<a1@x>", "Pricing", T0, "alice@example.com", ["bob@example.net"]),
        new("<a2@x>", "Pricing", T0 + timedelta(days=2), "carol@example.org", ["alice@example.com"]),
        new("<a3@x>", "pricing", T0 + timedelta(days=3), "dave@example.org", ["erin@example.org"]),
        new("<b1@x>", "Renewal", T0 - timedelta(days=40), "bob@example.net", ["alice@example.com"]),
        new("<c1@x>", "Seats", T0, "bob@example.net", ["frank@example.org"]),
        new("<c2@x>", "Seats", T0, "frank@example.org", ["bob@example.net"],
            date=T0 + timedelta(hours=1)),
    ]
    await store.store_messages(earlier)
    later = T0 + timedelta(days=5)
    batch = [
        new("<r1@x>", "Re: Pricing", later, "bob@example.net", ["alice@example.com"]),   # a2 (alice)
        new("<r2@x>", "RE: pricing", later, "erin@example.org", []),                     # a3
        new("<r3@x>", "Re: Pricing", later, "zoe@example.org", []),                      # nobody shared
        new("<r4@x>", "Re: Renewal", later, "alice@example.com", []),                    # outside window
        new("<r5@x>", "Re: Renewal", T0 - timedelta(days=35), "alice@example.com", []),  # inside its own
        new("<r6@x>", "Re: Seats", later, "BOB@example.net", []),                        # c2 (newer date)
        new("<r7@x>", "Re: Pricing", later + timedelta(days=29), "bob@example.net", []),  # a1 is old
    ]
    async with store.engine.begin() as conn:
        one_by_one = {}
        for m in batch:
            skey, _ = subject_key(m.subject)
            one_by_one[m.message_id] = await thread_by_subject(conn, m, skey)
        batched = await threads_by_subject(conn, [(m, subject_key(m.subject)[0]) for m in batch])
    assert {m.message_id: batched.get(id(m)) for m in batch} == one_by_one
    threads = {m["message_id"]: m["thread_id"] for m in await store.list_messages()}
    assert one_by_one == {"<r1@x>": threads["<a2@x>"], "<r2@x>": threads["<a3@x>"], "<r3@x>": None,
                          "<r4@x>": None, "<r5@x>": threads["<b1@x>"], "<r6@x>": threads["<c2@x>"],
                          "<r7@x>": None}
