"""Shared mailboxes assign inbound mail to reps, and the daily figures per account, on SQLite
and PostgreSQL (the store's transactions; the path through Dovecot is test_shared_e2e).

Contact owner, then company owner, then sticky round robin over `assign.users`, or nothing
(`fallback: none`); the rotation and stickiness survive a new Store on the same database;
`message.assigned` lands in the outbox with the rule; two stores writing at once never give
the same turn twice; the figures come from one grouped query for all accounts.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from gateway.config import Config
from gateway.crm.accounts import Accounts
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.linking import LinkRules
from gateway.crm.migrate import upgrade
from gateway.crm.models import outbox_table
from gateway.crm.store import Store
from gateway.records import AcceptedMessage, NewMessage, SourceRef, WebhookTarget

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
_uid = itertools.count(1)
ADDRESS = {"sales": "sales@ours.test", "support": "support@ours.test", "rep": "dave@ours.test"}


def shared_config(tmp_path: Path, *, fallback: str = "round_robin") -> Config:
    return Config.model_validate({
        "state_dir": str(tmp_path / "state"), "source": str(tmp_path / "gateway.yaml"),
        "users": [{"login": login, "password_hash": HASH}
                  for login in ("Alice@ours.test", "bob@ours.test", "carol@ours.test")],
        "accounts": [
            {"id": "sales", "email": "sales@ours.test", "shared": True,
             "imap": {"host": "127.0.0.1", "port": 1}, "sync": {"enabled": False},
             "assign": {"fallback": fallback, "users": ["alice@ours.test", "bob@ours.test"]}},
            {"id": "support", "email": "support@ours.test", "shared": True,
             "imap": {"host": "127.0.0.1", "port": 1}, "sync": {"enabled": False}},
            {"id": "rep", "email": "dave@ours.test",
             "imap": {"host": "127.0.0.1", "port": 1}, "sync": {"enabled": False}}],
        "crm": {"auto_create_contacts": True}})


def inbound(sender: str, account: str = "sales", *, at: datetime | None = None,
            date: datetime | None = None) -> NewMessage:
    n = next(_uid)
    at = at or datetime.now(UTC)
    return NewMessage(
        message_id=f"<m{n}.{id(at)}@{sender.split('@')[1]}>", from_addr=sender,
        to_addrs=[ADDRESS[account]], cc_addrs=[], subject=f"question {n}",
        date=date or at, direction="inbound", account=account,
        sources=[SourceRef("imap", f"{account}/INBOX/1/{n}", at, account=account,
                           folder="INBOX", uidvalidity=1, uid=n)])


async def open_store(url: str, cfg: Config, hooks: Sequence[WebhookTarget] = ()) -> Store:
    if url.startswith("postgresql"):
        await upgrade(url)
    store = await Store.open(url)
    store.configure(LinkRules.from_config(cfg), hooks)
    return store


async def assigned(store: Store, items: list[NewMessage]) -> list[tuple[Any, Any]]:
    stored = await store.store_messages(items)
    out = []
    for s in stored:
        m = await store.get_message(s.id)
        assert m is not None
        out.append((m["assigned_to"], m["assigned_rule"]))
    return out


async def test_owner_then_company_then_sticky_round_robin_surviving_a_new_store(
        url: str, tmp_path: Path) -> None:
    cfg = shared_config(tmp_path)
    store = await open_store(url, cfg, [WebhookTarget(id="http://hook.test/", events=frozenset())])
    try:
        await upsert_contacts(store, [
            ContactInput(email="owned@acme.test", company="Acme", owner="carol@ours.test"),
            ContactInput(email="plain@acme.test", company="Acme"),
            ContactInput(email="x@beta.test", domain="beta.test", company_owner="bob@ours.test")])
        got = await assigned(store, [
            inbound("owned@acme.test"),        # the contact's owner
            inbound("plain@acme.test"),        # no owner anywhere: round robin
            inbound("y@beta.test"),            # auto-created, its domain's company has an owner
            inbound("new1@gamma.test"),        # unknown: round robin
            inbound("new1@gamma.test"),        # the same contact again in this batch: sticky
        ])
        assert got == [("carol@ours.test", "contact_owner"), ("Alice@ours.test", "round_robin"),
                       ("bob@ours.test", "company_owner"), ("bob@ours.test", "round_robin"),
                       ("bob@ours.test", "sticky")]
        assert await assigned(store, [inbound("plain@acme.test")]) == [("Alice@ours.test", "sticky")]
        # a third turn: the rotation stands at an odd position when the store closes
        assert await assigned(store, [inbound("new0@gamma.test")]) == [("Alice@ours.test", "round_robin")]
        # not a shared account, and outbound mail: never assigned
        assert await assigned(store, [inbound("new9@gamma.test", "rep")]) == [(None, None)]
        # a shared account with fallback none: owners still apply, the rest stays unassigned
        assert await assigned(store, [inbound("owned@acme.test", "support"),
                                      inbound("new2@gamma.test", "support")]) == [
            ("carol@ours.test", "contact_owner"), (None, None)]
        mine = await store.list_messages(assigned_to="bob@ours.test")
        assert len(mine) == 3 and {m["assigned_to"] for m in mine} == {"bob@ours.test"}
        async with store.engine.connect() as conn:
            hooks = (await conn.execute(sa.select(outbox_table.c.payload).where(
                outbox_table.c.event_type == "message.assigned")
                .order_by(outbox_table.c.id))).scalars().all()
        assert [(h["data"]["assigned_to"], h["data"]["rule"], h["data"]["account"]) for h in hooks] == [
            ("carol@ours.test", "contact_owner", "sales"), ("Alice@ours.test", "round_robin", "sales"),
            ("bob@ours.test", "company_owner", "sales"), ("bob@ours.test", "round_robin", "sales"),
            ("bob@ours.test", "sticky", "sales"), ("Alice@ours.test", "sticky", "sales"),
            ("Alice@ours.test", "round_robin", "sales"), ("carol@ours.test", "contact_owner", "support")]
        assert hooks[0]["data"]["contact"] == "owned@acme.test"
        # the message's JSON beside them (the store's id under `id`, the header under
        # `message_id`), as assigned; its message.stored, queued before it, shows it too
        for h in hooks:
            m = h["data"]["message"]
            assert (m["assigned_to"], m["assigned_rule"]) == (h["data"]["assigned_to"],
                                                              h["data"]["rule"])
            assert "message_id" not in h["data"] and m["message_id"].startswith("<")
        async with store.engine.connect() as conn:
            order = (await conn.execute(sa.select(outbox_table.c.event_type, outbox_table.c.payload)
                                        .order_by(outbox_table.c.id))).all()
        first_told: dict[int, tuple[str, dict[str, Any]]] = {}
        for t, payload in order:
            first_told.setdefault(payload["data"]["message"]["id"], (t, payload["data"]))
        for h in hooks:
            t, data = first_told[h["data"]["message"]["id"]]
            assert t == "message.stored" and data["message"]["assigned_to"] == h["data"]["assigned_to"]
    finally:
        await store.close()

    # a restart: a new Store on the same database keeps the picks and the rotation
    store = await open_store(url, cfg)
    try:
        assert await assigned(store, [inbound("new1@gamma.test"), inbound("plain@acme.test"),
                                      inbound("new3@gamma.test"), inbound("new4@gamma.test")]) == [
            ("bob@ours.test", "sticky"), ("Alice@ours.test", "sticky"),
            ("bob@ours.test", "round_robin"), ("Alice@ours.test", "round_robin")]
        # an owner given later wins over the earlier round-robin pick
        await upsert_contacts(store, [ContactInput(email="new1@gamma.test", owner="carol@ours.test")])
        assert await assigned(store, [inbound("new1@gamma.test")]) == [
            ("carol@ours.test", "contact_owner")]
    finally:
        await store.close()


async def test_a_rep_taken_off_the_list_loses_the_sticky_contacts(url: str, tmp_path: Path) -> None:
    cfg = shared_config(tmp_path)
    store = await open_store(url, cfg)
    try:
        assert await assigned(store, [inbound("c1@delta.test")]) == [("Alice@ours.test", "round_robin")]
        only_bob = cfg.model_copy(update={"accounts": [cfg.accounts[0].model_copy(update={
            "assign": cfg.accounts[0].assign.model_copy(update={"users": ["bob@ours.test"]})})]})
        store.configure(LinkRules.from_config(only_bob), ())
        assert await assigned(store, [inbound("c1@delta.test")]) == [("bob@ours.test", "round_robin")]
        assert await assigned(store, [inbound("c1@delta.test")]) == [("bob@ours.test", "sticky")]
    finally:
        await store.close()


async def test_two_stores_at_once_take_turns_without_repeating_one(url: str, tmp_path: Path) -> None:
    cfg = shared_config(tmp_path)
    a, b = await open_store(url, cfg), await open_store(url, cfg)
    try:
        async def write(store: Store, n: int) -> None:
            for i in range(n):
                await store.store_messages([inbound(f"p{id(store)}-{i}@epsilon.test")])

        await asyncio.gather(write(a, 10), write(b, 10))
        rows = await a.list_messages(limit=100)
        users = [r["assigned_to"] for r in rows]
        assert len(users) == 20 and users.count("Alice@ours.test") == 10 \
            and users.count("bob@ours.test") == 10
    finally:
        await a.close()
        await b.close()


async def test_daily_figures_per_account_from_one_query(url: str, tmp_path: Path) -> None:
    cfg = shared_config(tmp_path, fallback="none")
    store = await open_store(url, cfg)
    try:
        await upsert_contacts(store, [ContactInput(email="known@acme.test")])
        now = datetime.now(UTC)
        yesterday = now - timedelta(days=1, hours=1)
        await store.store_messages([
            inbound("known@acme.test", "rep"), inbound("known@acme.test", "rep"),
            inbound("known@acme.test", "sales"),
            # synced today, dated yesterday: synced, not received today
            inbound("known@acme.test", "rep", date=yesterday),
            # synced yesterday: counts for nothing today
            inbound("known@acme.test", "rep", at=yesterday),
        ])
        sent = AcceptedMessage(queue_id="QSHARED1", message_id="<sent1@ours.test>",
                               from_addr="dave@ours.test", to_addrs=["known@acme.test"],
                               cc_addrs=[], subject="offer", date=now, snippet="", size=10,
                               recipients=["known@acme.test"], user="dave@ours.test",
                               account="rep", at=now)
        await store.record([sent], [])
        # no contact for this one: synced, not linked
        cfg_off = cfg.model_copy(update={"crm": cfg.crm.model_copy(
            update={"auto_create_contacts": False})})
        store.configure(LinkRules.from_config(cfg_off), ())
        await store.store_messages([inbound("stranger@zeta.test", "rep")])

        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(store.engine.sync_engine, "before_cursor_execute", count)
        try:
            figures = await Accounts(store).daily_figures()
        finally:
            event.remove(store.engine.sync_engine, "before_cursor_execute", count)
        assert len(statements) == 1
        day = now.date().isoformat()
        assert figures["rep"] == {"date": day, "synced": 4, "linked": 3, "sent": 1, "received": 3}
        assert figures["sales"] == {"date": day, "synced": 1, "linked": 1, "sent": 0, "received": 1}
        assert "support" not in figures
        rows = {r["id"]: r for r in await Accounts(store).overview(cfg.accounts)}
        assert rows["support"]["today"] == {"date": day, "synced": 0, "linked": 0, "sent": 0,
                                            "received": 0}
        assert rows["rep"]["today"]["synced"] == 4 and rows["sales"]["shared"] is True
        assert rows["sales"]["assign"] == {"fallback": "none",
                                           "users": ["alice@ours.test", "bob@ours.test"]}
        info = await Accounts(store).sync_info("rep", configured=cfg.account("rep"))
        assert info["today"] == figures["rep"]
        tomorrow = await Accounts(store).daily_figures(now=now + timedelta(days=1))
        assert set(tomorrow) == {""}
    finally:
        await store.close()


@pytest.mark.parametrize("bad, key, message", [
    ({"users": ["nobody@ours.test"], "fallback": "round_robin"}, "users", "no user with login"),
    ({"fallback": "round_robin"}, "assign", "needs users"),
    ({"fallback": "sometimes"}, "fallback", "round_robin"),
])
def test_config_names_the_bad_assign_key(tmp_path: Path, bad: dict[str, Any], key: str,
                                         message: str) -> None:
    from gateway.config import load_config
    from gateway.errors import ConfigError

    (tmp_path / "pw").write_text("x\n")
    users = "\n".join(f"  - login: {u}\n    password_hash: '{HASH}'" for u in ("alice@ours.test",))
    assign = "\n".join(f"      {k}: {v!r}" if isinstance(v, str) else f"      {k}: {list(v)}"
                       for k, v in bad.items())
    (tmp_path / "gateway.yaml").write_text(
        f"state_dir: ./var\nusers:\n{users}\naccounts:\n  - id: sales\n    email: sales@ours.test\n"
        f"    imap: {{host: 127.0.0.1, port: 1}}\n    auth: {{password_file: pw}}\n"
        f"    shared: true\n    assign:\n{assign}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "gateway.yaml")
    text = str(err.value)
    assert "gateway.yaml:" in text and key in text and message in text, text
