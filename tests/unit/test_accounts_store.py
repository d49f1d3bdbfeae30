"""Account runtime state on SQLite and PostgreSQL: rows, status and webhook, checkpoints with
messages, sync runs, leases, purge, the OAuth2 token store, and the read side (list, sync info)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Account
from gateway.crm.accounts import Accounts, Checkpoint, DBTokenStore, RunCounts
from gateway.crm.store import Store
from gateway.errors import AccountAuthError, NotFound, StoreError
from gateway.imap.slots import ConnectionSlots
from gateway.keys.tokens import AccessToken, TokenCipher
from gateway.records import AcceptedMessage, NewMessage, SourceRef, WebhookTarget
from tests.support.wait import wait_for

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def acct(aid: str = "alice", email: str = "alice@example.com") -> Account:
    return Account.model_validate({"id": aid, "email": email, "provider": "gmail",
                                   "sync": {"enabled": False}})


def imap_msg(mid: str, uid: int, *, account: str = "alice", folder: str = "INBOX",
             raw: bytes | None = None) -> NewMessage:
    return NewMessage(message_id=mid, from_addr="carol@acme.test", to_addrs=["alice@example.com"],
                      cc_addrs=[], subject="Quote", date=T0, direction="inbound", account=account,
                      raw=raw, sources=[SourceRef("imap", f"{account}/{folder}/7/{uid}", T0,
                                                  account=account, folder=folder, uidvalidity=7,
                                                  uid=uid)])


async def count(store: Store, table: str) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar() or 0)


async def test_ensure_and_status_changes_with_one_webhook(store: Store) -> None:
    store.configure(store.rules, [WebhookTarget("http://hook.test/", frozenset({"account.needs_reconnect"}))])
    accounts = Accounts(store)
    await accounts.ensure([acct(), acct("bob", "bob@example.com")])
    await accounts.ensure([acct(email="alice@new.example.com")])       # idempotent, email kept current
    rows = await accounts.rows()
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["status"] == "active" and rows["alice"]["email"] == "alice@new.example.com"
    assert "token_ciphertext" not in rows["alice"]

    assert await accounts.set_status("alice", "needs_reconnect", "NO [AUTHENTICATIONFAILED] nope") == "active"
    assert await accounts.set_status("alice", "needs_reconnect", "again") == "needs_reconnect"
    row = await accounts.get("alice")
    assert row is not None and row["status"] == "needs_reconnect" and row["status_reason"] == "again"
    assert row["status_at"] is not None
    async with store.engine.connect() as conn:
        hooks = (await conn.execute(sa.text("SELECT event_type, payload FROM webhook_outbox"))).all()
    assert [h[0] for h in hooks] == ["account.needs_reconnect"]     # once, on the transition
    payload = hooks[0][1] if isinstance(hooks[0][1], dict) else json.loads(hooks[0][1])
    assert payload["data"]["account"]["reason"] == "NO [AUTHENTICATIONFAILED] nope"

    # only_from: `enable` of a deleted account is explicit, a reconnect only clears needs_reconnect
    assert await accounts.set_status("bob", "active", only_from=("needs_reconnect",)) == "active"
    await accounts.set_status("bob", "deleted")
    assert await accounts.set_status("bob", "active", only_from=("needs_reconnect",)) == "deleted"
    assert (await accounts.statuses())["bob"] == "deleted"
    with pytest.raises(ValueError):
        await accounts.set_status("bob", "paused")


async def test_checkpoint_commits_with_the_messages_or_not_at_all(store: Store) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct()])
    assert await accounts.checkpoint("alice", "INBOX") is None
    run = await accounts.start_run("alice", "INBOX", "initial")
    counts = RunCounts(fetched=3, stored=2, skipped=1)
    cp = Checkpoint("INBOX", uidvalidity=7, last_uid=10, highestmodseq=99, backfill_uid=8)
    await store.store_messages([imap_msg("<a@x>", 9), imap_msg("<b@x>", 10)],
                               then=accounts.save_checkpoint("alice", cp, run_id=run, counts=counts))
    assert await accounts.checkpoint("alice", "INBOX") == cp
    row = await accounts.get("alice")
    assert row is not None and row["last_sync_at"] is not None

    async def boom(conn: object) -> None:
        raise OSError("disk on fire")

    later = Checkpoint("INBOX", uidvalidity=7, last_uid=11)

    async def both(conn: AsyncConnection) -> None:
        await accounts.save_checkpoint("alice", later)(conn)
        await boom(conn)

    with pytest.raises(StoreError):
        await store.store_messages([imap_msg("<c@x>", 11)], then=both)
    assert await accounts.checkpoint("alice", "INBOX") == cp          # neither the checkpoint ...
    assert await count(store, "messages") == 2                        # ... nor the message
    await accounts.finish_run(run, counts)
    info = await accounts.sync_info("alice")
    [folder] = info["folders_synced"]
    assert folder["folder"] == "INBOX" and folder["last_uid"] == 10 and folder["messages"] == 2
    assert folder["last_run"]["kind"] == "initial" and folder["last_run"]["stored"] == 2
    assert info["totals"]["stored"] == 2 and info["totals"]["messages"] == 2

    assert await accounts.forget_folders("alice", keep=["Sent"]) == 1
    assert await accounts.checkpoint("alice", "INBOX") is None


async def test_runs_interrupted_pruned_and_shown_newest_first(store: Store) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct()])
    old = datetime.now(UTC) - timedelta(days=40)
    await accounts.record_run("alice", "INBOX", "tail", old, RunCounts(1, 1, 0))
    await accounts.record_run("alice", "", "connect", datetime.now(UTC), RunCounts(),
                              "cannot connect to imap.example.com:993: refused")
    running = await accounts.start_run("alice", "Sent Items", "initial")
    assert await accounts.interrupt_runs("alice", "interrupted") == 1
    info = await accounts.sync_info("alice")
    assert [r["kind"] for r in info["recent_runs"]] == ["initial", "connect", "tail"]
    assert info["recent_runs"][0]["id"] == running and info["recent_runs"][0]["status"] == "error"
    assert info["totals"]["errors"] == 2 and len(info["recent_errors"]) == 2
    assert await accounts.prune_runs(timedelta(days=30)) == 1
    assert len((await accounts.sync_info("alice"))["recent_runs"]) == 2
    with pytest.raises(NotFound):
        await accounts.sync_info("nobody")
    configured = await accounts.sync_info("fresh", configured=acct("fresh", "f@example.com"))
    assert configured["status"] == "active" and configured["recent_runs"] == []


async def test_leases_one_owner_renewal_expiry_takeover_release(store: Store) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct()])
    assert await accounts.acquire_lease("alice", "node-a", ttl=30)
    assert not await accounts.acquire_lease("alice", "node-b", ttl=30)
    assert await accounts.acquire_lease("alice", "node-a", ttl=1)        # renewal, shorter
    assert not await accounts.acquire_lease("nobody", "node-a", ttl=30)  # no row, no lease
    await wait_for(lambda: accounts.acquire_lease("alice", "node-b", ttl=30),  # node-a stopped renewing
                   what="node-b to take over the expired lease", interval=0.1)
    assert not await accounts.acquire_lease("alice", "node-a", ttl=30)
    row = await accounts.get("alice")
    assert row is not None and row["lease_owner"] == "node-b"
    await accounts.release_lease("alice", "node-a")                     # not the owner: no effect
    assert (await accounts.get("alice") or {})["lease_owner"] == "node-b"
    await accounts.release_lease("alice", "node-b")
    assert await accounts.acquire_lease("alice", "node-a", ttl=30)      # free again at once


async def test_concurrent_lease_attempts_have_one_winner(store: Store) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct()])
    results = await asyncio.gather(*(accounts.acquire_lease("alice", f"node-{i}", ttl=30)
                                     for i in range(8)), return_exceptions=True)
    wins = [r for r in results if r is True]
    assert len(wins) == 1, results


async def test_many_leases_in_one_statement_each_to_one_node(store: Store) -> None:
    """acquire_leases: what one node holds after one call, and concurrent batches of two
    nodes over the same mailboxes never give one mailbox to both."""
    accounts = Accounts(store)
    await accounts.ensure([acct(f"m{i}", f"m{i}@example.com") for i in range(30)])
    assert await accounts.acquire_leases(["m0", "m1"], "node-b", ttl=30) == {"m0", "m1"}
    ids = [f"m{i}" for i in range(30)] + ["nobody"]
    got = await accounts.acquire_leases(ids, "node-a", ttl=30)
    assert got == {f"m{i}" for i in range(2, 30)}               # m0, m1 are node-b's
    assert await accounts.acquire_leases(ids, "node-a", ttl=30) == got   # renewal
    assert await accounts.acquire_leases([], "node-a", ttl=30) == set()
    await accounts.ensure([acct(f"x{i}", f"x{i}@example.com") for i in range(20)])
    xs = [f"x{i}" for i in range(20)]
    a, b = await asyncio.gather(accounts.acquire_leases(xs, "node-a", ttl=30),
                                accounts.acquire_leases(xs, "node-b", ttl=30),
                                return_exceptions=True)
    won = [r for r in (a, b) if isinstance(r, set)]
    assert won, (a, b)                       # a loser may also fail outright (serialisation)
    if len(won) == 2:
        assert not (won[0] & won[1]) and won[0] | won[1] == set(xs)


async def test_purge_removes_only_what_the_account_alone_holds(store: Store, tmp_path: Path) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct(), acct("bob", "bob@example.com")])
    store.raw.directory = tmp_path / "raw"
    await store.store_messages([imap_msg("<only@x>", 1, raw=b"Subject: only\r\n\r\nonly"),
                                imap_msg("<shared@x>", 2, raw=b"Subject: shared\r\n\r\nshared")])
    await store.store_messages([imap_msg("<shared@x>", 5, account="bob")])
    await store.record([AcceptedMessage(
        queue_id="Q1", message_id="<relayed@x>", from_addr="alice@example.com",
        to_addrs=["carol@acme.test"], cc_addrs=[], subject="s", date=T0, snippet="", size=1,
        recipients=["carol@acme.test"], user=None, account="alice", at=T0)], [])
    await store.store_messages([imap_msg("<relayed@x>", 3, folder="Sent")])
    await accounts.write_checkpoint("alice", Checkpoint("INBOX", uidvalidity=7, last_uid=3))
    only_sha = (await store.list_messages(account="alice"))
    assert len(only_sha) == 3
    files_before = {p.name for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    assert len(files_before) == 2

    result = await accounts.purge("alice")
    assert result.sources == 3 and result.messages == 1 and result.checkpoints == 1
    left = {m["message_id"]: m["sources"] for m in await store.list_messages()}
    assert left == {"<shared@x>": ["imap"], "<relayed@x>": ["relay"]}
    assert await accounts.checkpoint("alice", "INBOX") is None
    files_after = {p.name for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    assert len(files_after) == 1 and files_after < files_before     # the shared message's raw stays
    assert (await accounts.overview([acct(), acct("bob", "bob@example.com")]))[0]["messages"] == 0


async def test_db_token_store_keeps_ciphertext_only(store: Store) -> None:
    tokens = DBTokenStore(store)
    assert await tokens.load("carol") is None
    cipher = TokenCipher(TokenCipher.generate_key())
    blob = cipher.encrypt("carol", AccessToken("secret-access-token", 2_000_000_000.0), "origin")
    await tokens.save("carol", blob, 2_000_000_000.0)                   # no row yet: created
    got = await tokens.load("carol")
    assert got is not None and got.ciphertext == blob and got.expires_at == 2_000_000_000.0
    async with store.engine.connect() as conn:
        raw = (await conn.execute(sa.text("SELECT token_ciphertext FROM accounts"))).scalar()
    assert raw is not None and b"secret-access-token" not in bytes(raw)
    decrypted = cipher.decrypt("carol", got.ciphertext)
    assert decrypted is not None and decrypted[0].token == "secret-access-token"


async def test_overview_lists_configured_and_leftover_accounts(store: Store) -> None:
    accounts = Accounts(store)
    await accounts.ensure([acct(), acct("gone", "gone@example.com")])
    await accounts.set_status("gone", "deleted")
    await store.store_messages([imap_msg("<a@x>", 1)])
    rows = await accounts.overview([acct(), acct("new", "new@example.com")])
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == ["alice", "new", "gone"]
    assert by_id["alice"]["messages"] == 1 and by_id["alice"]["provider"] == "gmail"
    assert by_id["new"]["status"] == "active" and by_id["new"]["last_sync_at"] is None
    assert by_id["gone"]["configured"] is False and by_id["gone"]["status"] == "deleted"


# -- the connection cap --------------------------------------------------------------------

async def test_connection_slots_first_come_first_served_and_resize() -> None:
    slots = ConnectionSlots(2)
    await slots.acquire()
    await slots.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await slots.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert slots.waiting == 3 and slots.in_use == 2
    slots.release()
    await asyncio.sleep(0)
    assert order == [0] and slots.in_use == 2
    tasks[1].cancel()                                  # a waiter that gives up loses its place
    await asyncio.sleep(0)
    slots.resize(4)                                    # more room: the next waiter goes at once
    await asyncio.sleep(0)
    assert order == [0, 2] and slots.in_use == 3 and slots.waiting == 0
    slots.resize(1)
    for _ in range(3):
        slots.release()
    assert slots.in_use == 0
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_runtime_accounts_registry_webhooks_and_secrets(store: Store, tmp_path: Path) -> None:
    from gateway.accounts.registry import AccountRegistry, InvalidAccount
    from gateway.config import Config
    from gateway.errors import Conflict

    store.configure(store.rules, [WebhookTarget("http://hook.test/", frozenset(
        {"account.connected", "account.deleted"}))])
    cfg = Config.model_validate({"accounts": [acct().model_dump()],
                                 "oauth": {"providers": {"google": {"client_id": "cid"}}},
                                 "users": [{"login": "rep@example.com", "password_hash": "$argon2id$x"}],
                                 "source": str(tmp_path / "gateway.yaml")})
    cipher = TokenCipher(TokenCipher.generate_key())
    reg = AccountRegistry(lambda: cfg, store, cipher)
    other_node = AccountRegistry(lambda: cfg, store, cipher)
    await other_node.refresh()
    definition = {"id": "rep", "email": "rep@example.com", "provider": "gmail",
                  "auth": {"method": "oauth2", "oauth_provider": "google"},
                  "send_as": ["rep@example.com"]}
    created = await reg.create(definition, secret="rt-secret", connected_email="rep@example.com")
    assert created.origin == "runtime" and [a.id for a in reg.accounts()] == ["alice", "rep"]
    assert await reg.refresh_token("rep") == "rt-secret"
    async with store.engine.connect() as conn:
        blob = (await conn.execute(sa.text("SELECT credential_ciphertext FROM accounts "
                                           "WHERE id = 'rep'"))).scalar()
    assert blob and b"rt-secret" not in bytes(blob)
    # the other node sees it at its next look; the config in force gains it and the send-as user
    assert await other_node.refresh() is True and other_node.account("rep") is not None
    eff = reg.effective(cfg)
    rep_user = eff.user("rep@example.com")
    assert [a.id for a in eff.accounts] == ["alice", "rep"] and rep_user and rep_user.account == "rep"
    assert reg.effective(cfg) is eff                                 # stable while nothing changes
    assert reg.account_for_user("rep@example.com") is not None
    # refused: files, duplicate ids, ids declared in the file, unknown send-as users
    with pytest.raises(InvalidAccount) as bad:
        reg.validate({**definition, "id": "x",
                      "auth": {"method": "password", "password_file": "/etc/shadow"}})
    assert bad.value.problems[0][0] == "auth.password_file"
    with pytest.raises(InvalidAccount) as bad:      # a token account's servers are the provider's
        reg.validate({**definition, "id": "x", "imap": {"host": "imap.evil.test", "port": 993}})
    assert bad.value.problems[0][0] == "imap"
    with pytest.raises(Conflict):
        await reg.create(definition, secret="again")
    with pytest.raises(Conflict):
        await reg.create({**definition, "id": "alice"}, secret="x")
    with pytest.raises(InvalidAccount) as bad:
        await reg.create({**definition, "id": "y", "send_as": ["nobody@example.com"]}, secret="x")
    assert bad.value.problems[0][0] == "send_as.0"
    changed = await reg.update("rep", {"sync": {"folders": ["INBOX"]}})
    assert changed.sync.folders == ["INBOX"]
    assert await reg.delete("rep", reason="test") == "active"
    assert reg.account("rep") is None and await other_node.refresh() is True
    assert other_node.account("rep") is None
    with pytest.raises(AccountAuthError):
        await reg.refresh_token("alice")                              # declared, no refresh token
    # a deleted runtime id may be created again
    await reg.create(definition, secret="rt-2", connected_email="rep@example.com")
    assert await reg.refresh_token("rep") == "rt-2"
    # another token key cannot read the secret
    stranger = AccountRegistry(lambda: cfg, store, TokenCipher(TokenCipher.generate_key()))
    await stranger.refresh()
    with pytest.raises(AccountAuthError, match="does not decrypt"):
        await stranger.refresh_token("rep")
    async with store.engine.connect() as conn:
        hooks = [h[0] for h in (await conn.execute(sa.text(
            "SELECT event_type FROM webhook_outbox ORDER BY id"))).all()]
    assert hooks == ["account.connected", "account.deleted", "account.connected"]


async def test_connect_links_are_used_once_refuse_late_openings_and_are_pruned(store: Store) -> None:
    accounts = Accounts(store)
    now = datetime.now(UTC)
    for ident, expires in (("live", now + timedelta(hours=1)), ("late", now - timedelta(minutes=1)),
                           ("old", now - timedelta(days=40))):
        await accounts.create_link({"id": ident, "provider": "google", "email": "a@example.com",
                                    "created_at": now, "expires_at": expires})
    assert await accounts.open_link("live", b"flow") is True
    assert await accounts.open_link("late", b"flow") is False              # expired
    assert await accounts.use_link("live") is True
    assert await accounts.use_link("live") is False                        # single use
    assert await accounts.open_link("live", b"again") is False             # used
    await accounts.finish_link("live", "connected", account_id="a")
    row = await accounts.link("live")
    assert row is not None and row["result"] == "connected" and row["flow_ciphertext"] is None
    assert await accounts.prune_links(timedelta(days=30)) == 1
    assert await accounts.link("old") is None and await accounts.link("late") is not None
