"""The IMAP tailer against a real Dovecot, into the store (SQLite and PostgreSQL where it matters).

History window, contact filter (header-first: skipped bodies are never fetched), excluded
senders, special-use folders, unread stays unread, IDLE, a restart mid-IDLE, UIDVALIDITY
changes, one message across relay and IMAP, wrong password, master user, OAuth2, the
checkpoint committed with the messages, one-way accounts, leases between two nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.crm.accounts import Accounts
from gateway.crm.store import Store
from gateway.imap import tailer as tailer_mod
from gateway.imap.client import Folder, MessageBody
from gateway.imap.manager import Tailers
from gateway.imap.parsing import Parsers
from gateway.imap.slots import ConnectionSlots
from gateway.imap.tailer import AccountTailer, TailState
from gateway.mail.parse import parse_message
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage, NewMessage, WebhookTarget
from tests.conftest import require_tool
from tests.integration.harness import wait_until
from tests.integration.tailer_support import (
    LEAD,
    STRANGER,
    account_dict,
    add_contacts,
    make_config,
    new_user,
    stored_ids,
    tailers_for,
    wait_synced,
)
from tests.support.dovecot import Dovecot, message
from tests.support.oauth_server import TokenServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as ts:
        yield ts


@pytest.fixture(scope="module")
def dovecot(token_server: TokenServer) -> Iterator[Dovecot]:
    require_tool("dovecot")
    with Dovecot(tokeninfo_url=token_server.tokeninfo_url) as dc:
        yield dc


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    return new_user(dovecot)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    try:
        yield s
    finally:
        await s.close()


def now_minus(**kw: float) -> datetime:
    return datetime.now(UTC) - timedelta(**kw)


async def _has(runs: Awaitable[set[tuple[str, str, str]]], run: tuple[str, str, str]) -> bool:
    return run in await runs


async def running(t: Tailers, aid: str, state: TailState = TailState.TAIL) -> None:
    await wait_until(lambda: (x := t.tailer(aid)) is not None and x.state == state, 20,
                     f"tailer {aid} in state {state.value}")


# -- the initial sync and IDLE -----------------------------------------------------------------

async def test_initial_sync_filters_header_first_and_idle_brings_new_mail(
        store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    await add_contacts(store, LEAD)
    mids = {}

    def put(name: str, folder: str, sender: str, to: str, age_days: float, cc: str = "") -> int:
        raw = message(f"{name}", sender=sender, to=to + (f"\r\nCc: {cc}" if cc else ""),
                      message_id=f"<{name}@test>", date=now_minus(days=age_days))
        mids[name] = f"<{name}@test>"
        return dovecot.append(user, folder, raw, date=now_minus(days=age_days))

    recent = put("recent-from-lead", "INBOX", LEAD, user, 2)
    put("old-from-lead", "INBOX", LEAD, user, 45)                 # outside history_days: 30
    stranger = put("from-stranger", "INBOX", STRANGER, user, 1)
    noreply = put("noreply-cc-lead", "INBOX", "noreply@customer.example", user, 1, cc=LEAD)
    put("sent-to-lead", "Sent Items", user, LEAD, 3)
    put("junk-from-lead", "Junk", LEAD, user, 1)                  # Junk is never synced
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path)],
                      sync={"poll_interval": "60s"})
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        cps = await wait_synced(tailers.accounts, "rep", ["INBOX", "Sent Items"])
        assert await stored_ids(store) == {mids["recent-from-lead"], mids["sent-to-lead"]}
        by_mid = {m["message_id"]: m for m in await store.list_messages()}
        inbound, sent = by_mid[mids["recent-from-lead"]], by_mid[mids["sent-to-lead"]]
        assert inbound["direction"] == "inbound" and inbound["account"] == "rep"
        assert sent["direction"] == "outbound"
        full = await store.get_message(sent["id"], bodies=True)
        assert full is not None and [s["folder"] for s in full["seen"]] == ["Sent Items"]
        assert full["text_body"].strip() == "hello"
        # header-first: the bodies of skipped messages were never fetched
        assert {u for f, u in spy.body_uids if f == "INBOX"} == {recent}
        assert stranger not in {u for _, u in spy.body_uids}
        assert noreply not in {u for _, u in spy.body_uids}
        assert not [f for f, _ in spy.body_uids if f == "Junk"]
        # nothing was marked read
        assert "\\Seen" not in await asyncio.to_thread(dovecot.flags, user, "INBOX", recent)
        assert cps["INBOX"].uidvalidity and cps["INBOX"].last_uid >= noreply

        # the tail: a new message arrives through IDLE within seconds (poll is 60s)
        await running(tailers, "rep")
        await wait_until(lambda: tailers.tailer("rep").stats.idles > 0, 10, "IDLE")  # type: ignore[union-attr]
        skipped_uid = await asyncio.to_thread(
            dovecot.append, user, "INBOX", message("new stranger", sender=STRANGER, to=user))
        await asyncio.to_thread(dovecot.append, user, "INBOX", message(
            "new from lead", sender=LEAD, to=user, message_id="<new-from-lead@test>"))

        async def arrived() -> bool:
            return "<new-from-lead@test>" in await stored_ids(store)

        # the next poll is a minute away: only IDLE can bring it within this deadline
        await wait_until(arrived, 20, "the new message stored through IDLE")
        assert skipped_uid not in {u for _, u in spy.body_uids}
        assert spy.logins == 1                                         # one connection all along

        async def runs() -> set[tuple[str, str, str]]:
            info = await tailers.accounts.sync_info("rep")
            return {(r["folder"], r["kind"], r["status"]) for r in info["recent_runs"]}

        # the tail pass records its run right after the commit the wait above saw
        await wait_until(lambda: _has(runs(), ("INBOX", "tail", "ok")), 10, "the tail run")
        kinds = await runs()
        assert ("INBOX", "initial", "ok") in kinds and ("Sent Items", "initial", "ok") in kinds
    finally:
        await tailers.stop()
    row = await tailers.accounts.get("rep")
    assert row is not None and row["lease_owner"] is None and row["last_sync_at"] is not None


async def test_server_restarted_mid_idle_reconnects_and_loses_nothing(
        sqlite_store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    store = sqlite_store
    await add_contacts(store, LEAD)
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path)],
                      sync={"poll_interval": "60s"})
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX", "Sent Items"])
        await running(tailers, "rep")
        t = tailers.tailer("rep")
        assert t is not None
        await wait_until(lambda: t.stats.idles > 0, 10, "IDLE")
        await asyncio.to_thread(dovecot.stop)
        try:
            # mail that lands while the server is down (delivered into the Maildir)
            await asyncio.to_thread(dovecot.fill, user, [(message(
                "while down", sender=LEAD, to=user, message_id="<while-down@test>"), [], now_minus())])
            await wait_until(lambda: t.stats.last_error is not None, 15, "the lost connection noticed")
        finally:
            await asyncio.to_thread(dovecot.start)
        await asyncio.to_thread(dovecot.append, user, "INBOX", message(
            "after restart", sender=LEAD, to=user, message_id="<after-restart@test>"))

        async def both() -> bool:
            return {"<while-down@test>", "<after-restart@test>"} <= await stored_ids(store)

        await wait_until(both, 20, "both messages stored after the restart")
        assert spy.logins >= 2 and t.stats.sessions >= 2
        errors = (await tailers.accounts.sync_info("rep"))["recent_errors"]
        assert errors and errors[0]["status"] == "error"
    finally:
        await tailers.stop()


@pytest.mark.parametrize("sync", [{"list_interval": "1s"}, {"idle_interval": "1s"}],
                         ids=["list-timer", "idle-reissued"])
async def test_a_folder_created_while_idling_is_picked_up(
        sqlite_store: Store, dovecot: Dovecot, user: str, tmp_path: Path,
        sync: dict[str, str]) -> None:
    """A configured folder that does not exist yet when the connection lists the folders
    is found by a later LIST (on the sync.list_interval timer, or when IDLE is re-issued)
    on the same connection, gets its initial sync, and its mail is stored. The poll is
    a minute away, so only the new LIST can bring it in time."""
    store = sqlite_store
    await add_contacts(store, LEAD)
    folder = f"Customers-{user.split('@')[0]}"
    acct = account_dict(dovecot, user, tmp_path, sync={"folders": ["INBOX", folder]})
    cfg = make_config(tmp_path, [acct], sync={"poll_interval": "60s", **sync})
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX"])
        await running(tailers, "rep")
        t = tailers.tailer("rep")
        assert t is not None
        await wait_until(lambda: t.stats.idles > 0, 10, "IDLE")
        await asyncio.to_thread(dovecot.create_mailbox, user, folder)
        await asyncio.to_thread(dovecot.append, user, folder, message(
            "in the new folder", sender=LEAD, to=user, message_id="<new-folder@test>"))

        async def stored() -> bool:
            return "<new-folder@test>" in await stored_ids(store)

        await wait_until(stored, 20, "the message in the new folder stored")
        cps = await wait_synced(tailers.accounts, "rep", [folder])
        assert cps[folder].last_uid >= 1
        assert spy.logins == 1                          # the same connection all along
        # and INBOX is still tailed through IDLE afterwards
        await asyncio.to_thread(dovecot.append, user, "INBOX", message(
            "inbox after", sender=LEAD, to=user, message_id="<inbox-after@test>"))

        async def inbox_after() -> bool:
            return "<inbox-after@test>" in await stored_ids(store)

        await wait_until(inbox_after, 20, "INBOX mail after the new folder")
    finally:
        await tailers.stop()


async def test_uidvalidity_change_resyncs_without_duplicates(
        store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    await add_contacts(store, LEAD)
    for i in range(3):
        dovecot.append(user, "INBOX", message(f"m{i}", sender=LEAD, to=user, message_id=f"<uv{i}@test>"))
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path, sync={"folders": ["INBOX"]})])
    tailers, _ = tailers_for(cfg, store)
    await tailers.start()
    try:
        before = await wait_synced(tailers.accounts, "rep", ["INBOX"])
    finally:
        await tailers.stop()
    new = before["INBOX"].uidvalidity + 1000  # type: ignore[operator]
    await asyncio.to_thread(dovecot.set_uid_validity, user, "INBOX", new)
    dovecot.append(user, "INBOX", message("m3", sender=LEAD, to=user, message_id="<uv3@test>"))
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX"], uidvalidity={"INBOX": new})
        rows = await store.list_messages()
        assert sorted(m["message_id"] for m in rows) == [f"<uv{i}@test>" for i in range(4)]
        assert len(spy.body_uids) == 4                      # all looked at again, none stored twice
        for m in rows:
            full = await store.get_message(m["id"], bodies=True)
            assert full is not None
            vals = sorted(s["uidvalidity"] for s in full["seen"])
            assert vals == ([new] if m["message_id"] == "<uv3@test>"
                            else [before["INBOX"].uidvalidity, new])
        kinds = [r["kind"] for r in (await tailers.accounts.sync_info("rep"))["recent_runs"]]
        assert "resync" in kinds
    finally:
        await tailers.stop()


@pytest.mark.parametrize("workers", [0, 1])
async def test_fetched_bodies_become_messages_as_on_every_other_path(
        tmp_path: Path, workers: int) -> None:
    # no server needed: the parse step of a batch, on bodies as fetch_bodies yields them,
    # in a thread (parse_workers: 0) and in a worker process, which writes the raw files
    cfg = make_config(tmp_path, [{"id": "rep", "email": "rep@example.test",
                                  "imap": {"host": "127.0.0.1", "port": 1, "tls": "none"},
                                  "sync": {"enabled": False}}])
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db", raw_dir=tmp_path / "raw")
    parsers = Parsers(workers, pool_min=1)
    tailer = AccountTailer(cfg.accounts[0], get_config=lambda: cfg, store=store,
                           accounts=Accounts(store), slots=ConnectionSlots(1),
                           opener=None, parsers=parsers)  # type: ignore[arg-type]
    received = datetime(2026, 5, 4, 3, 2, 1, tzinfo=UTC)
    dated = message("dated", sender=LEAD, to="rep@example.test", message_id="<d@test>",
                    date=received - timedelta(days=1))
    undated = dated.replace(b"Date: ", b"X-Old-Date: ").replace(b"<d@test>", b"<u@test>")
    bodies = [MessageBody(uid=uid, raw=raw, flags=frozenset(), internaldate=received)
              for uid, raw in ((1, dated), (2, undated))]
    try:
        got = await parsers.bodies(tailer._job(Folder("INBOX"), 7, bodies))
    finally:
        await parsers.close()
        await store.close()
    assert parsers.jobs == (1 if workers else 0)
    for m, raw in zip(got, (dated, undated), strict=True):
        want = NewMessage.from_parsed(parse_message(raw), raw, direction="inbound",
                                      sources=m.sources, account="rep")
        assert m.date is not None and want.date in (m.date, None)
        assert (m.message_id, m.dedupe_hash, m.attachments, m.size, m.text_body) == \
            (want.message_id, want.dedupe_hash, want.attachments, want.size, want.text_body)
        # store.raw: disk: the file is written before the messages come back, without the bytes
        assert m.raw is None and m.raw_sha256 == want.raw_sha256
        assert store.raw.read_file(want.raw_sha256 or "") == raw
    assert [m.date for m in got] == [received - timedelta(days=1), received]
    assert [(s.ref, s.uidvalidity, s.uid) for m in got for s in m.sources] == [
        ("rep/INBOX/7/1", 7, 1), ("rep/INBOX/7/2", 7, 2)]


async def test_message_relayed_and_seen_in_sent_is_stored_once(
        store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    await add_contacts(store, LEAD)
    mid = "<relayed-and-sent@gw.example.test>"
    at = now_minus(hours=1)
    await store.record([AcceptedMessage(
        queue_id="01HQRELAYED0000000000000000"[:26], message_id=mid, from_addr=user, to_addrs=[LEAD],
        cc_addrs=[], subject="proposal", date=at, snippet="hello", size=100, recipients=[LEAD],
        user=user, account="rep", at=at)], [])
    dovecot.append(user, "Sent Items", message("proposal", sender=user, to=LEAD, message_id=mid,
                                               date=at))
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path)])
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX", "Sent Items"])
        rows = await store.list_messages()
        assert len(rows) == 1 and rows[0]["sources"] == ["relay", "imap"]
        assert rows[0]["direction"] == "outbound" and [e["type"] for e in rows[0]["events"]] == ["queued"]
        assert len(spy.body_uids) == 1
    finally:
        await tailers.stop()


# -- authentication --------------------------------------------------------------------------

async def test_wrong_password_needs_reconnect_once_with_the_servers_words(
        sqlite_store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    store = sqlite_store
    store.configure(store.rules, [WebhookTarget("http://hook.test/", frozenset())])
    await add_contacts(store, LEAD)
    dovecot.append(user, "INBOX", message("hi", sender=LEAD, to=user, message_id="<pw@test>"))
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path, password="wrong")])
    metrics = Metrics()
    tailers, spy = tailers_for(cfg, store, metrics=metrics)

    def metric(name: str) -> float | None:
        return metrics.registry.get_sample_value(f"mailgw_imap_{name}_total", {"account": "rep"})

    await tailers.start()
    try:
        async def needs_reconnect() -> bool:
            row = await tailers.accounts.get("rep")
            return row is not None and row["status"] == "needs_reconnect"

        await wait_until(needs_reconnect, 15, "status needs_reconnect")
        row = await tailers.accounts.get("rep")
        assert row is not None and "AUTHENTICATIONFAILED" in row["status_reason"]
        # no retry storm: many checks later, still the one login
        ticks = tailers.ticks
        await wait_until(lambda: tailers.ticks >= ticks + 30, 10, "30 more checks")
        assert spy.logins == 1 and tailers.tailer("rep") is None
        assert metric("errors") == 1 and metric("messages_stored") is None
        async with store.engine.connect() as conn:
            hooks = (await conn.execute(sa.text(
                "SELECT event_type FROM webhook_outbox WHERE event_type LIKE 'account.%'"))).all()
        assert [h[0] for h in hooks] == ["account.needs_reconnect"]

        # the admin fixes the password and reloads (SIGHUP): one retry, which now works
        (tmp_path / "rep.password").write_text(dovecot.users[user] + "\n")
        tailers.reload()

        async def active() -> bool:
            r = await tailers.accounts.get("rep")
            return r is not None and r["status"] == "active" and "<pw@test>" in await stored_ids(store)

        await wait_until(active, 15, "reconnected and synced")
        assert spy.logins == 2
        assert metric("errors") == 1 and metric("messages_stored") == 1
    finally:
        await tailers.stop()


async def test_master_user_as_delegate(sqlite_store: Store, dovecot: Dovecot, user: str,
                                       tmp_path: Path) -> None:
    store = sqlite_store
    await add_contacts(store, LEAD)
    dovecot.append(user, "INBOX", message("delegated", sender=LEAD, to=user, message_id="<dl@test>"))
    secret = tmp_path / "master.pw"
    secret.write_text(dovecot.master_password + "\n")
    acct = account_dict(dovecot, user, tmp_path, auth={"method": "delegate",
                                                       "username": dovecot.master_user,
                                                       "password_file": str(secret)})
    cfg = make_config(tmp_path, [acct])
    tailers, _ = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX", "Sent Items"])
        assert await stored_ids(store) == {"<dl@test>"}
    finally:
        await tailers.stop()


async def test_oauth2_through_dovecots_oauth2_passdb(sqlite_store: Store, dovecot: Dovecot,
                                                     token_server: TokenServer, user: str,
                                                     tmp_path: Path) -> None:
    store = sqlite_store
    await add_contacts(store, LEAD)
    dovecot.append(user, "INBOX", message("oauth", sender=LEAD, to=user, message_id="<oa@test>"))
    (tmp_path / "refresh").write_text(token_server.issue_refresh_token(user))
    (tmp_path / "client_secret").write_text(token_server.client_secret)
    acct = account_dict(dovecot, user, tmp_path)
    acct["auth"] = {"method": "oauth2", "token_endpoint": token_server.token_url,
                    "client_id": token_server.client_id, "client_secret_file": "client_secret",
                    "refresh_token_file": "refresh", "mechanism": "oauthbearer"}
    cfg = make_config(tmp_path, [acct])
    grants = len(token_server.grants)
    tailers, _ = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "rep", ["INBOX", "Sent Items"])
        assert await stored_ids(store) == {"<oa@test>"}
        assert len(token_server.grants) == grants + 1
        async with store.engine.connect() as conn:
            blob, expires = (await conn.execute(sa.text(
                "SELECT token_ciphertext, token_expires_at FROM accounts WHERE id = 'rep'"))).one()
        assert blob and expires is not None                   # kept at rest, encrypted
        assert (tmp_path / "state" / "token.key").stat().st_mode & 0o777 == 0o600
    finally:
        await tailers.stop()


# -- checkpoints ------------------------------------------------------------------------------

async def test_killed_mid_sync_resumes_from_the_committed_checkpoint(
        store: Store, dovecot: Dovecot, user: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tailer_mod, "BULK_BATCH", 200)     # 450 messages: three batches
    await add_contacts(store, LEAD)
    n = 450
    # in arrival order (UIDs ascending): bulk0 is the newest, delivered last
    await asyncio.to_thread(dovecot.fill, user, (
        (message(f"bulk {i}", sender=LEAD, to=user, message_id=f"<bulk{i}@test>",
                 date=now_minus(hours=i)), [], now_minus(hours=i)) for i in reversed(range(n))))
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path, sync={"folders": ["INBOX"]})])
    tailers, spy1 = tailers_for(cfg, store)
    killed = asyncio.Event()
    kill: list[asyncio.Task[None]] = []

    def on_batch(items: object) -> None:           # the first batch is committed: kill -9 now
        if not kill:
            kill.append(asyncio.get_running_loop().create_task(tailers.abort()))
            kill[0].add_done_callback(lambda _: killed.set())

    await tailers.start()
    await wait_until(lambda: tailers.tailer("rep") is not None, 10, "the tailer started")
    tailers.tailer("rep").on_stored = on_batch  # type: ignore[union-attr]
    await asyncio.wait_for(killed.wait(), 30)
    committed = await stored_ids(store)
    cp = await tailers.accounts.checkpoint("rep", "INBOX")
    assert cp is not None and not cp.initial_done
    assert 0 < len(committed) < n
    # newest first: what was committed are the newest messages
    assert committed == {f"<bulk{i}@test>" for i in range(len(committed))}

    again, spy2 = tailers_for(cfg, store)
    await again.start()
    try:
        await wait_synced(again.accounts, "rep", ["INBOX"], timeout=60)
        assert len(await stored_ids(store)) == n
        async with store.engine.connect() as conn:
            sources = (await conn.execute(sa.text(
                "SELECT count(*) FROM message_sources WHERE source = 'imap'"))).scalar()
        assert sources == n                           # nothing stored twice
        fetched_again = {u for _, u in spy2.body_uids}
        assert len(fetched_again) == n - len(committed)      # committed ones not fetched again
        assert len(spy1.body_uids) >= len(committed)
        run_states = [r["status"] for r in (await again.accounts.sync_info("rep"))["recent_runs"]
                      if r["kind"] == "initial"]
        assert run_states == ["ok", "error"]          # the killed run is marked interrupted
    finally:
        await again.stop()


# -- one-way accounts and Sent copies ----------------------------------------------------------

async def test_one_way_imports_nothing_but_sent_copies_are_appended(
        sqlite_store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    store = sqlite_store
    await add_contacts(store, LEAD)
    dovecot.append(user, "INBOX", message("from lead", sender=LEAD, to=user))
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path,
                                              sync={"direction": "one-way"})])
    tailers, spy = tailers_for(cfg, store)
    await tailers.start()
    try:
        raw = message("sent through the gateway", sender=user, to=LEAD,
                      message_id="<via-gateway@gw.example.test>")
        await tailers.sent.enqueue("rep", raw)
        await wait_until(lambda: tailers.sent.appended == 1, 15, "the Sent copy appended")
        flags = await asyncio.to_thread(dovecot.all_flags, user, "Sent Items")
        [(uid, fl)] = flags.items()
        assert "\\Seen" in fl
        conn = await asyncio.to_thread(dovecot.imap, user)
        try:
            conn.select('"Sent Items"', readonly=True)
            _, data = conn.uid("FETCH", str(uid), "(BODY.PEEK[])")
            assert data[0][1] == raw
        finally:
            conn.logout()
        # the same copy again (a crash after APPEND, before the file was removed): not twice
        await tailers.sent.enqueue("rep", raw)
        await wait_until(lambda: tailers.sent.appended == 2, 15, "the second copy handled")
        assert len(await asyncio.to_thread(dovecot.all_flags, user, "Sent Items")) == 1
        assert spy.appends == ["Sent Items"]
        # one-way: no tailer, nothing imported, no checkpoint
        ticks = tailers.ticks
        await wait_until(lambda: tailers.ticks >= ticks + 10, 10, "10 more checks")
        assert tailers.tailer("rep") is None
        assert await store.list_messages() == [] and spy.body_uids == []
        assert await tailers.accounts.checkpoint("rep", "INBOX") is None
    finally:
        await tailers.stop()


async def test_sent_copies_survive_a_restart_and_permanent_failures_are_kept(
        sqlite_store: Store, dovecot: Dovecot, user: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path)])
    first, _ = tailers_for(cfg, sqlite_store)
    # queued while nothing runs (the relay enqueued, then the daemon died)
    await first.sent.enqueue("rep", message("one", sender=user, to=LEAD, message_id="<c1@gw>"))
    await first.sent.enqueue("ghost", message("two", sender=user, to=LEAD, message_id="<c2@gw>"))
    assert sorted(first.sent.pending()) == ["ghost", "rep"]
    tailers, _ = tailers_for(cfg, sqlite_store)
    await tailers.start()
    try:
        await wait_until(lambda: tailers.sent.appended == 1 and tailers.sent.failed == 1, 15,
                         "the copy appended and the orphan given up")
        assert tailers.sent.pending() == {}
        [failed] = tailers.sent.failed_ids()
        reason = (tmp_path / "state" / "sent-copies" / "failed" / f"{failed}.reason").read_text()
        assert "ghost" in reason and "not configured" in reason
        assert len(await asyncio.to_thread(dovecot.all_flags, user, "Sent Items")) == 1
    finally:
        await tailers.stop()


# -- leases between nodes ----------------------------------------------------------------------

async def test_nodes_share_the_mailboxes_and_take_over_a_dead_ones_never_two_at_once(
        pg_url: str, dovecot: Dovecot, tmp_path: Path) -> None:
    """Five mailboxes, two nodes on one PostgreSQL: leases 3 : 2; node a killed (leases and
    heartbeat left behind) -> b tails all five within 2 x lease_ttl and stores new mail; a
    new node joins -> 3 : 2 again; a clean stop hands over at once. A sampler checks all
    along that no mailbox is tailed by two nodes at the same moment."""
    from gateway.crm.migrate import upgrade

    await upgrade(pg_url)
    users = [new_user(dovecot) for _ in range(5)]
    stores = [await Store.open(pg_url) for _ in range(3)]
    await add_contacts(stores[0], LEAD)
    ttl = 2.0
    cfg = make_config(tmp_path, [account_dict(dovecot, u, tmp_path, aid=f"m{i}",
                                              sync={"folders": ["INBOX"]})
                                 for i, u in enumerate(users)],
                      sync={"lease_ttl": ttl, "check_interval": 0.1, "poll_interval": "60s"})
    a, _ = tailers_for(cfg, stores[0], node_id="node-a")
    b, _ = tailers_for(cfg, stores[1], node_id="node-b")
    c, _ = tailers_for(cfg, stores[2], node_id="node-c")
    nodes = [a, b, c]
    overlaps: list[set[str]] = []

    async def sample() -> None:
        while True:
            tailing = [n.tailing() for n in nodes]
            for i, x in enumerate(tailing):
                for y in tailing[i + 1:]:
                    if x & y:
                        overlaps.append(x & y)
            await asyncio.sleep(0.01)

    async def leases() -> list[int]:
        rows = await Accounts(stores[0]).nodes()
        return sorted(len(r["accounts"]) for r in rows if r["accounts"])

    sampler = asyncio.create_task(sample())
    try:
        await a.start()
        await wait_until(lambda: len(a.tailing()) == 5, 20, "node a tails all five alone")
        await b.start()
        await wait_until(lambda: sorted([len(a.tailing()), len(b.tailing())]) == [2, 3], 20,
                         "the mailboxes spread 3 : 2 over two nodes")
        assert await leases() == [2, 3]
        shown = {r["id"]: r for r in await Accounts(stores[1]).nodes()}
        assert set(shown) == {"node-a", "node-b"}
        assert sorted(shown["node-a"]["accounts"] + shown["node-b"]["accounts"]) == \
            [f"m{i}" for i in range(5)]

        await a.abort()                       # node a dies: leases and heartbeat stay behind
        loop = asyncio.get_running_loop()
        died = loop.time()
        await wait_until(lambda: len(b.tailing()) == 5, 2 * ttl + 2, "node b takes over all five")
        took = loop.time() - died
        assert took <= 2 * ttl + 2, took
        owners = {r["id"]: r["accounts"] for r in await Accounts(stores[1]).nodes()}
        assert owners.get("node-b") == [f"m{i}" for i in range(5)], owners
        await asyncio.to_thread(dovecot.append, users[0], "INBOX", message(
            "after takeover", sender=LEAD, to=users[0], message_id="<takeover@test>"))

        async def stored() -> bool:
            return "<takeover@test>" in await stored_ids(stores[1])

        await wait_until(stored, 20, "node b stores new mail of a taken-over mailbox")

        await c.start()                       # a new node joins: 3 : 2 again
        await wait_until(lambda: sorted([len(b.tailing()), len(c.tailing())]) == [2, 3], 20,
                         "the mailboxes spread over b and the new node c")
        await b.stop()                        # a clean stop: c takes b's share at once
        await wait_until(lambda: len(c.tailing()) == 5, ttl, "node c takes over without waiting")
        assert overlaps == [], overlaps[:5]
    finally:
        sampler.cancel()
        for n in nodes:
            await n.abort()
        for st in stores:
            await st.close()


async def test_a_tailer_slow_to_drain_does_not_stall_its_node_into_an_overlap(
        pg_url: str, dovecot: Dovecot, tmp_path: Path) -> None:
    """Tailers that do not end when asked (a drain slower than the lease): the node giving
    them up still renews its other leases and heartbeat (a drain in the look gets a third
    of the lease, then the tailer is cancelled), so the joining node takes only its share
    and no mailbox is ever tailed by both."""
    from gateway.crm.migrate import upgrade

    await upgrade(pg_url)
    users = [new_user(dovecot) for _ in range(4)]
    stores = [await Store.open(pg_url) for _ in range(2)]
    await add_contacts(stores[0], LEAD)
    ttl = 2.0
    cfg = make_config(tmp_path, [account_dict(dovecot, u, tmp_path, aid=f"d{i}",
                                              sync={"folders": ["INBOX"]})
                                 for i, u in enumerate(users)],
                      sync={"lease_ttl": ttl, "check_interval": 0.1, "poll_interval": "60s"},
                      drain_timeout=10)
    a, _ = tailers_for(cfg, stores[0], node_id="node-a")
    b, _ = tailers_for(cfg, stores[1], node_id="node-b")
    overlaps: list[set[str]] = []

    async def sample() -> None:
        while True:
            if both := a.tailing() & b.tailing():
                overlaps.append(both)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(AccountTailer, "stop", lambda self: None)   # deaf: only a cancel ends it
            await a.start()
            await wait_until(lambda: len(a.tailing()) == 4, 20, "node a tails all four alone")
            await b.start()
            await wait_until(lambda: sorted([len(a.tailing()), len(b.tailing())]) == [2, 2],
                             4 * ttl, "the mailboxes spread 2 : 2 although a's drains hang")
            await asyncio.sleep(ttl)          # and it stays so: a kept renewing its two
            assert sorted([len(a.tailing()), len(b.tailing())]) == [2, 2]
            assert overlaps == [], overlaps[:5]
    finally:
        sampler.cancel()
        for n in (a, b):
            await n.abort()
        for st in stores:
            await st.close()


async def test_more_accounts_than_connections_take_turns(
        sqlite_store: Store, dovecot: Dovecot, tmp_path: Path) -> None:
    store = sqlite_store
    await add_contacts(store, LEAD)
    users = [new_user(dovecot) for _ in range(3)]
    for i, u in enumerate(users):
        dovecot.append(u, "INBOX", message(f"to {i}", sender=LEAD, to=u, message_id=f"<turn{i}@test>"))
    cfg = make_config(tmp_path, [account_dict(dovecot, u, tmp_path, aid=f"r{i}",
                                              sync={"folders": ["INBOX"]})
                                 for i, u in enumerate(users)],
                      sync={"max_connections": 1, "poll_interval": "1s"})
    tailers, spy = tailers_for(cfg, store)
    most = 0

    async def all_stored(want: set[str]) -> bool:
        nonlocal most
        most = max(most, tailers.slots.in_use)
        return want <= await stored_ids(store)

    await tailers.start()
    try:
        await wait_until(lambda: all_stored({f"<turn{i}@test>" for i in range(3)}), 30,
                         "every account synced in turn")
        await asyncio.to_thread(dovecot.append, users[0], "INBOX", message(
            "later", sender=LEAD, to=users[0], message_id="<turn-later@test>"))
        await wait_until(lambda: all_stored({"<turn-later@test>"}), 30, "new mail on a shared slot")
        # the turns go on (the later message may have come in on the turn of the account
        # holding the slot then, so the logins are waited for, not expected at once)
        await wait_until(lambda: spy.logins > 3, 30, "more logins than accounts: turns")
        assert most == 1                                        # one connection at a time
    finally:
        await tailers.stop()


async def test_initial_syncs_take_turns_and_all_finish(
        sqlite_store: Store, dovecot: Dovecot, tmp_path: Path) -> None:
    """`sync.initial_syncs` bounds the initial syncs running at once on a node (a thousand
    new mailboxes would otherwise hold every store connection); every mailbox still gets
    its turn, and a mailbox whose initial sync is done tails new mail meanwhile."""
    store = sqlite_store
    await add_contacts(store, LEAD)
    users = [new_user(dovecot) for _ in range(4)]
    for i, u in enumerate(users):
        for j in range(3):
            dovecot.append(u, "INBOX", message(f"to {i}.{j}", sender=LEAD, to=u,
                                               message_id=f"<slot{i}.{j}@test>"))
    cfg = make_config(tmp_path, [account_dict(dovecot, u, tmp_path, aid=f"s{i}",
                                              sync={"folders": ["INBOX"]})
                                 for i, u in enumerate(users)],
                      sync={"initial_syncs": 1})
    tailers, _ = tailers_for(cfg, store)
    syncing: set[str] = set()
    most = 0
    real_initial = AccountTailer._initial

    async def counted(self: AccountTailer, *args: object, **kw: object) -> None:
        nonlocal most
        syncing.add(self.id)
        most = max(most, len(syncing))
        try:
            await asyncio.sleep(0.2)   # long enough for the others to be waiting
            await real_initial(self, *args, **kw)  # type: ignore[arg-type]
        finally:
            syncing.discard(self.id)

    accounts = Accounts(store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AccountTailer, "_initial", counted)
        await tailers.start()
        try:
            for i in range(4):
                await wait_synced(accounts, f"s{i}", ["INBOX"], timeout=30)
            assert {f"<slot{i}.{j}@test>" for i in range(4) for j in range(3)} <= await stored_ids(store)
            assert most == 1                       # one initial sync at a time
            await asyncio.to_thread(dovecot.append, users[0], "INBOX", message(
                "later", sender=LEAD, to=users[0], message_id="<slot-later@test>"))
            await wait_until(lambda: _stored(store, "<slot-later@test>"), 30, "new mail tailed")
        finally:
            await tailers.stop()


async def _stored(store: Store, message_id: str) -> bool:
    return message_id in await stored_ids(store)
