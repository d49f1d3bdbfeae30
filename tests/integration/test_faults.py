"""The fault suite: each test injects one real fault and asserts the promise that must hold through it.

- the spool on a full file system (a small tmpfs): 452 4.3.1, never 250 for a message not
  on disk, no half-written queue file, mail accepted and delivered again once space is back;
  and the disk filling as a partial delivery ends: the delivered recipient never gets a second copy;
- the CRM store (a private PostgreSQL) crashing mid-batch under load and coming back: every
  accepted message delivered once and recorded once;
- the upstream resetting the connection mid-DATA: deferred (451 4.4.2), retried, delivered once;
- the IMAP server SIGKILLed mid-FETCH of the initial sync: every message stored once, the
  checkpoint at the last UID;
- a webhook receiver down for hours (a fake clock): the backoff schedule and its cap followed,
  nothing dropped before ``max_age``, deliveries resumed oldest first, the give-up recorded;
- kill -9 of the daemon under load: `bench/chaos.py --scenario kill` (too slow for the suite).

`bench/chaos.py --scenario ...` runs the same faults at a larger scale and prints the counts.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.api.webhooks import JITTER, Endpoint, WebhookDispatcher, targets
from gateway.config import Account
from gateway.crm import outbox
from gateway.crm.store import Store
from gateway.imap import tailer as tailer_mod
from gateway.imap.client import IMAPClient
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage
from tests.conftest import free_port, require, require_tool
from tests.integration.harness import PASSWORD, USER, running_app, wait_until, write_config
from tests.integration.tailer_support import (
    LEAD,
    account_dict,
    add_contacts,
    make_config,
    new_user,
    stored_ids,
    tailers_for,
    wait_synced,
)
from tests.support.dovecot import Dovecot
from tests.support.dovecot import message as imap_message
from tests.support.faults import (
    Load,
    PrivatePostgres,
    ResettingUpstream,
    Tmpfs,
    can_mount,
    pg_bindir,
)
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration


def message(mid: str, size: int = 0) -> bytes:
    body = b"Hello Bob,\r\nthe figures.\r\n"
    if size:
        line = b"x" * 76 + b"\r\n"
        body += line * (size // len(line) + 1)
    return (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\n"
            b"Subject: fault " + mid.encode() + b"\r\nMessage-ID: <" + mid.encode() + b">\r\n"
            b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n" + body)


async def submit(port: int, msg: bytes) -> tuple[int, str]:
    """One authenticated submission; the reply to DATA (or to whatever refused the message)."""
    def go() -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.example.com")
            c.login(USER, PASSWORD)
            try:
                c.sendmail(USER, ["bob@example.net"], msg)
            except smtplib.SMTPDataError as exc:
                err = exc.smtp_error
                return exc.smtp_code, err.decode(errors="replace") if isinstance(err, bytes) else err
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = next(iter(exc.recipients.values()))
                return code, text.decode(errors="replace")
            return 250, ""
    return await asyncio.to_thread(go)


@pytest.fixture
async def upstream() -> AsyncIterator[ResettingUpstream]:
    async with ResettingUpstream() as up:
        yield up


# -- the spool on a full file system ---------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Tmpfs]:
    require(can_mount(), "mounting a tmpfs (root)")
    fs = Tmpfs(tmp_path / "state", 4 * 1024 * 1024)
    try:
        yield fs
    finally:
        fs.close()


async def test_full_spool_answers_452_4_3_1_and_keeps_no_half_written_file(
        tmp_path: Path, small_fs: Tmpfs, upstream: ResettingUpstream) -> None:
    # the spool (state_dir) is the 4 MB tmpfs; the store lives elsewhere
    cfg = write_config(tmp_path, upstream_port=upstream.port,
                       store={"url": f"sqlite+aiosqlite:///{tmp_path}/crm.db"})
    async with running_app(cfg) as app:
        assert app.submission is not None
        port, spool = app.submission.port, app.spool
        assert spool.root.is_relative_to(small_fs.path)
        assert await submit(port, message("before@fault.test")) == (250, "")
        await wait_until(lambda: upstream.received["<before@fault.test>"] == 1, 15,
                         "delivery before the disk is full")

        def queued() -> list[str]:
            return [f"{s}/{q}" for s in ("incoming", "deferred", "hold", "corrupt")
                    for q in spool.list_ids(s)] + [p.name for p in spool.tmp.iterdir()]

        # a large message (written on the spool's threads) runs out of space half-way
        small_fs.fill(leave=200 * 1024)
        code, text = await submit(port, message("large@fault.test", size=600 * 1024))
        assert (code, text.split(" ", 1)[0]) == (452, "4.3.1"), text
        assert "Insufficient system storage" in text
        assert queued() == []                      # the partial tmp/ file was taken back
        # a small one (written on the loop) meets a disk with no room at all
        small_fs.fill()
        code, text = await submit(port, message("small@fault.test"))
        assert (code, text.split(" ", 1)[0]) == (452, "4.3.1"), text
        assert queued() == []

        small_fs.unfill()                          # space is back: accepted and delivered
        assert await submit(port, message("after@fault.test")) == (250, "")
        await wait_until(lambda: upstream.received["<after@fault.test>"] == 1, 15,
                         "delivery after space came back")
        await wait_until(lambda: queued() == [], 10, "an empty spool")
    # nothing refused was ever delivered, nothing delivered twice
    assert dict(upstream.received) == {"<before@fault.test>": 1, "<after@fault.test>": 1}


async def test_full_spool_after_a_partial_delivery_never_resends_to_the_delivered(
        tmp_path: Path, small_fs: Tmpfs, upstream: ResettingUpstream) -> None:
    """bob@ gets 250 and carol@ 451 in one transaction, and the disk fills at that moment:
    the queue file cannot be rewritten to say bob@ is done. The retry must still not send
    to bob@ again."""
    cfg = write_config(tmp_path, upstream_port=upstream.port,
                       store={"url": f"sqlite+aiosqlite:///{tmp_path}/crm.db"})
    upstream.rcpt_replies["carol@example.net"] = "451 4.2.1 Mailbox busy, try later"
    upstream.on_message = small_fs.fill       # the disk is full as the 250 comes
    async with running_app(cfg) as app:
        assert app.submission is not None
        code = await asyncio.to_thread(_send_two, app.submission.port)
        assert code == {}
        await wait_until(lambda: len(upstream.messages) == 1, 15, "the first attempt")
        await asyncio.sleep(0)
        upstream.on_message = None
        # a retry or two while the disk is still full
        await wait_until(lambda: upstream.transactions >= 2, 15, "a retry on the full disk")
        small_fs.unfill()
        upstream.rcpt_replies.clear()
        await wait_until(lambda: ["carol@example.net"] in upstream.rcpts, 30,
                         "carol's delivery once the upstream takes it")
        await wait_until(lambda: not app.spool.list_ids("deferred")
                         and not app.spool.list_ids("incoming"), 15, "an empty spool")
        assert app.spool.list_ids("hold") == []   # a full disk is no poison message
    assert [r for rs in upstream.rcpts for r in rs].count("bob@example.net") == 1, upstream.rcpts


def _send_two(port: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example.com")
        c.login(USER, PASSWORD)
        return c.sendmail(USER, ["bob@example.net", "carol@example.net"],
                          message("partial@fault.test"))


# -- the upstream resetting mid-DATA ---------------------------------------------------------

async def test_upstream_reset_mid_data_defers_retries_and_delivers_once(
        tmp_path: Path) -> None:
    async with ResettingUpstream(resets_first=2) as upstream:
        cfg = write_config(tmp_path, upstream_port=upstream.port)
        async with running_app(cfg) as app:
            assert app.submission is not None and app.writer is not None
            assert await submit(app.submission.port, message("reset@fault.test")) == (250, "")
            await wait_until(lambda: upstream.distinct == 1, 20, "delivery after two resets")
            await wait_until(lambda: not app.spool.list_ids("deferred")
                             and not app.spool.list_ids("incoming"), 10, "an empty spool")
            await wait_until(lambda: app.writer is not None and app.writer.pending == 0, 10,
                             "the store records written")
            assert app.store is not None
            [row] = await app.store.list_messages()
    assert upstream.resets == 2 and upstream.sessions >= 3
    # exactly one message reached the upstream: the original, once; no bounce to the sender
    assert dict(upstream.received) == {"<reset@fault.test>": 1} and len(upstream.messages) == 1
    events = [(e["type"], (e["details"] or {}).get("reply", "")) for e in row["events"]]
    assert [t for t, _ in events] == ["queued", "deferred", "deferred", "sent"]
    for _, reply in events[1:3]:
        assert reply.startswith("451 4.4.2 lost connection with 127.0.0.1") and "DATA" in reply
    assert events[3][1].startswith("250")


# -- the store going away mid-batch ----------------------------------------------------------

@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = pg_bindir()
    require(bindir is not None, "PostgreSQL server binaries (initdb, pg_ctl) and a postgres user")
    assert bindir is not None
    pg = PrivatePostgres(bindir).start()
    try:
        yield pg
    finally:
        pg.close()


async def test_store_crash_mid_batch_loses_no_record_and_no_delivery(
        tmp_path: Path, private_pg: PrivatePostgres, upstream: ResettingUpstream) -> None:
    from gateway.crm.migrate import upgrade

    await upgrade(private_pg.url)
    cfg = write_config(tmp_path, upstream_port=upstream.port, store={"url": private_pg.url},
                       delivery={"concurrency": 8})
    n = 240
    mids = [f"<store-{i}@fault.test>" for i in range(n)]
    load_msgs = [message(m[1:-1]) for m in mids]
    async with running_app(cfg) as app:
        assert app.submission is not None and app.writer is not None and app.store is not None
        writer, store = app.writer, app.store
        load = Load(app.submission.port, load_msgs, sessions=6, login=(USER, PASSWORD))
        sending = asyncio.create_task(load.run())
        await wait_until(lambda: len(load.accepted) >= n // 4, 30, "a quarter accepted")
        written_before = writer.written
        await asyncio.to_thread(private_pg.crash)       # the store dies under load
        accepted_at_crash = len(load.accepted)
        await wait_until(lambda: len(load.accepted) >= accepted_at_crash + 30, 30,
                         "more mail accepted while the store is down")
        assert writer.failures >= 1 or writer.pending > 0  # the writer saw the store gone
        await asyncio.to_thread(private_pg.start)
        await asyncio.wait_for(sending, 60)
        assert len(load.accepted) == n
        await wait_until(lambda: upstream.distinct == n, 60, "every accepted message delivered")
        await wait_until(lambda: writer.pending == 0, 60, "the writer's backlog written")

        async def all_recorded() -> bool:
            stored = {m["message_id"] for m in await store.list_messages(limit=10000)}
            return stored >= set(mids)
        await wait_until(all_recorded, 60, "a CRM record for every accepted message")
        rows = await store.list_messages(limit=10000)
    assert written_before < n
    assert upstream.duplicates == 0 and set(upstream.received) == set(mids)
    by_mid = {}
    for r in rows:
        assert r["message_id"] not in by_mid, f"{r['message_id']} recorded twice"
        by_mid[r["message_id"]] = r
    for mid in mids:
        types = [e["type"] for e in by_mid[mid]["events"]]
        assert types.count("queued") == 1 and types.count("sent") == 1, (mid, types)


# -- the IMAP server killed mid-FETCH --------------------------------------------------------

class KillMidFetch:
    """An opener whose clients SIGKILL the Dovecot the moment their `at`-th body FETCH is on
    the wire (the command sent, the answer being read)."""

    def __init__(self, inner: Callable[[Account], Awaitable[IMAPClient]], dovecot: Dovecot,
                 at: int) -> None:
        self.inner, self.dovecot, self.at = inner, dovecot, at
        self.body_fetches = 0
        self.fetch_done_at_kill: bool | None = None
        self.killed = asyncio.Event()

    async def __call__(self, account: Account) -> IMAPClient:
        imap = await self.inner(account)
        real = imap._fetch

        async def fetch(uids: Sequence[int] | None, items: str,
                        modifier: str | None = None) -> dict[int, dict[str, Any]]:
            if "BODY.PEEK[]" not in items:
                return await real(uids, items, modifier)
            self.body_fetches += 1
            if self.body_fetches != self.at:
                return await real(uids, items, modifier)
            task = asyncio.ensure_future(real(uids, items, modifier))
            for _ in range(3):               # the command written, the first bytes back
                await asyncio.sleep(0)
            self.fetch_done_at_kill = task.done()
            self.dovecot.kill()
            self.killed.set()
            return await task

        imap._fetch = fetch  # type: ignore[method-assign]
        return imap


async def _count(store: Store) -> int:
    return len(await stored_ids(store))


async def test_imap_server_killed_mid_fetch_stores_every_message_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("dovecot")
    n = 450                                  # batches of 200 UIDs, bodies 50 a FETCH
    monkeypatch.setattr(tailer_mod, "BULK_BATCH", 200)
    monkeypatch.setattr(tailer_mod, "BODY_FETCH_COUNT", 50)
    with Dovecot() as dovecot:
        user = new_user(dovecot)
        now = datetime.now(UTC)
        filler = "lorem ipsum dolor sit amet " * 700 + "\r\n"        # ~19 KB a message
        mids = [f"<imap-{i}@fault.test>" for i in range(n)]
        await asyncio.to_thread(dovecot.fill, user, [
            (imap_message(f"m{i}", sender=LEAD, to=user, message_id=mid, body=filler,
                          date=now - timedelta(hours=n - i)), [], now - timedelta(hours=n - i))
            for i, mid in enumerate(mids)])
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
        try:
            await add_contacts(store, LEAD)
            cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path,
                                                      sync={"folders": ["INBOX"]})])
            tailers, spy = tailers_for(cfg, store)
            # the 6th body FETCH: the first 200-UID batch is committed, the second half-read
            killer = KillMidFetch(tailers.opener, dovecot, at=6)
            tailers.opener = killer
            await tailers.start()
            try:
                await asyncio.wait_for(killer.killed.wait(), 60)
                assert killer.fetch_done_at_kill is False
                # the first batch commits (its commit runs while the next one is fetched);
                # the half-read one is not stored
                await wait_until(lambda: _count(store), 10, "the first batch committed")
                assert 0 < len(await stored_ids(store)) < n
                await asyncio.to_thread(dovecot.start)
                [cp] = (await wait_synced(tailers.accounts, "rep", ["INBOX"], timeout=60)).values()
                t = tailers.tailer("rep")
                assert t is not None and t.stats.sessions >= 2 and spy.logins >= 2
            finally:
                await tailers.stop()
            assert await stored_ids(store) == set(mids)
            async with store.engine.connect() as conn:
                rows = (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar()
                sources = (await conn.execute(sa.text(
                    "SELECT count(*), count(DISTINCT ref) FROM message_sources "
                    "WHERE source = 'imap'"))).one()
            assert rows == n                                  # no duplicates
            assert tuple(sources) == (n, n), sources          # one IMAP sighting each
            assert cp.initial_done and cp.last_uid == n and cp.backfill_uid == 1
        finally:
            await store.close()


# -- a webhook receiver down for hours (a fake clock) ----------------------------------------

HOOK_SECRET = b"fault-suite-webhook-secret"


def accepted(qid: str, at: datetime) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@fault.test>",
                           from_addr="alice@example.com", to_addrs=["bob@acme.test"], cc_addrs=[],
                           subject=f"about {qid}", date=at, snippet="hi", size=10,
                           recipients=["bob@acme.test"], user="alice@example.com", account=None,
                           at=at)


async def test_webhook_receiver_down_for_hours_follows_the_backoff_and_loses_nothing(
        tmp_path: Path) -> None:
    initial, cap, max_age = 10.0, 3600.0, 3 * 86400.0       # the documented defaults
    receiver = Receiver(HOOK_SECRET, port=free_port())      # not started: connection refused
    ep = Endpoint(url=receiver.url, secret=HOOK_SECRET, events=frozenset(), timeout=2.0,
                  max_age=max_age, retry_initial=initial, retry_max=cap)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    metrics = Metrics()
    clock = [datetime.now(UTC) + timedelta(seconds=1)]      # every row is due at once
    d = WebhookDispatcher(store, {ep.url: ep}, metrics=metrics, concurrency=1,
                          poll_interval=0.01, clock=lambda: clock[0], seed=7)

    async def table() -> list[Any]:
        async with store.engine.connect() as conn:
            return list((await conn.execute(sa.text(
                "SELECT id, event_id, status, attempts, last_error, next_attempt_at, created_at "
                "FROM webhook_outbox ORDER BY id"))).all())

    def as_dt(v: Any) -> datetime:
        t: datetime = datetime.fromisoformat(v) if isinstance(v, str) else v
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t

    async def step_to_next_due() -> dict[int, float]:
        """Move the clock to the earliest retry and let every row due then be tried;
        the delays (next attempt - this attempt) each got, by row id."""
        pending = [r for r in await table() if r.status == "pending"]
        clock[0] = max(clock[0], min(as_dt(r.next_attempt_at) for r in pending))
        due = {r.id: r.attempts for r in pending if as_dt(r.next_attempt_at) <= clock[0]}
        done = d.failed + d.delivered + d.dead
        d.notify()
        await wait_until(lambda: d.failed + d.delivered + d.dead >= done + len(due), 10,
                         "the due rows tried")
        after = {r.id: r for r in await table()}
        assert all(after[i].attempts == n + 1 for i, n in due.items())
        return {i: (as_dt(after[i].next_attempt_at) - clock[0]).total_seconds() for i in due
                if after[i].status == "pending"}

    try:
        store.configure(store.rules, targets({ep.url: ep}))
        for i in range(5):
            await store.record([accepted(f"W{i}", clock[0])], [])
        await d.start()
        start = clock[0]
        delays: dict[int, list[float]] = {}
        while clock[0] - start < timedelta(hours=6):          # six hours down
            for i, delay in (await step_to_next_due()).items():
                delays.setdefault(i, []).append(delay)
        rows = await table()
        assert [r.status for r in rows] == ["pending"] * 5       # nothing dropped
        assert all("ClientConnectorError" in (r.last_error or "") for r in rows)
        for i, got in delays.items():
            assert len(got) >= 12                                # ~5110 s doubling, then hourly
            for k, delay in enumerate(got, start=1):
                base = min(cap, initial * 2 ** (k - 1))
                assert base * (1 - JITTER) - 0.01 <= delay <= base * (1 + JITTER) + 0.01, (i, k)
            assert max(got) <= cap * (1 + JITTER) + 0.01

        # back: once every row's retry has come (at most retry_max + jitter later), the
        # backlog is delivered oldest event first, each once
        await receiver.start()
        clock[0] += timedelta(seconds=cap * (1 + JITTER) + 1)
        await step_to_next_due()
        assert all(r.status == "delivered" for r in await table())
        assert [a.status for a in receiver.attempts] == [200] * 5
        assert [a.payload["data"]["message"]["subject"] for a in receiver.attempts] == [
            f"about W{i}" for i in range(5)]
        assert len(receiver.processed) == 5

        # the give-up: down again; still retried a second before max_age, dead after it
        await receiver.stop()
        await store.record([accepted("LATE", clock[0])], [])
        [late] = [r for r in await table() if r.status == "pending"]
        created = as_dt(late.created_at)
        await step_to_next_due()
        clock[0] = created + timedelta(seconds=max_age - 1)
        await step_to_next_due()
        [late] = [r for r in await table() if r.status == "pending"]   # not given up yet
        await step_to_next_due()                                  # past max_age now
        [late] = [r for r in await table() if r.event_id == late.event_id]
        assert late.status == "dead" and "ClientConnectorError" in late.last_error
        assert d.dead == 1
        summary = await outbox.summary(store)
        assert summary[ep.url]["dead"] == 1 and summary[ep.url]["pending"] == 0
        assert 'mailgw_webhook_deliveries_total{result="dead"} 1.0' in (
            await metrics.collect()).decode()
    finally:
        await d.stop(timeout=5)
        await receiver.stop()
        await store.close()
