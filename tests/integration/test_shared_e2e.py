"""Shared mailboxes end to end: a private Dovecot's sales@ and support@ tailed into the store,
assigned to reps, announced to a real webhook receiver, across a restart of the tailers.

sales@ (`assign: round_robin` over alice and bob): mail from a contact with an owner goes
to that owner, from a contact whose company has an owner to the company's owner, from
unknown senders (auto-created contacts) by turns, and the same sender again to the same
rep, also after the tailers and the Store are replaced (a daemon restart) with the
rotation continuing where it was. support@ (`fallback: none`) leaves unowned mail unassigned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.api.webhooks import Endpoint, WebhookDispatcher, targets
from gateway.config import Config
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from tests.integration.harness import wait_until
from tests.integration.tailer_support import account_dict, make_config, new_user, tailers_for, wait_synced
from tests.support.dovecot import Dovecot, message
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration
SECRET = b"shared-mailbox-hook"
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
ALICE, BOB, CAROL = "alice@ours.test", "bob@ours.test", "carol@ours.test"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(SECRET).start()
    try:
        yield r
    finally:
        await r.stop()


def config(dovecot: Dovecot, sales: str, support: str, tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        [account_dict(dovecot, sales, tmp_path, aid="sales", shared=True,
                      assign={"fallback": "round_robin", "users": [ALICE, BOB]},
                      sync={"folders": ["INBOX"]}),
         account_dict(dovecot, support, tmp_path, aid="support", shared=True,
                      sync={"folders": ["INBOX"]})],
        users=[{"login": u, "password_hash": HASH} for u in (ALICE, BOB, CAROL)],
        crm={"auto_create_contacts": True})


async def open_store(url: str, receiver: Receiver) -> Store:
    if url.startswith("postgresql"):
        await upgrade(url)
    store = await Store.open(url)
    store.configure(store.rules, targets({receiver.url: endpoint(receiver)}))
    return store


def endpoint(receiver: Receiver) -> Endpoint:
    return Endpoint(url=receiver.url, secret=SECRET, events=frozenset({"message.assigned"}),
                    timeout=5.0, retry_initial=0.05, retry_max=0.2)


async def assignments(store: Store) -> dict[str, tuple[Any, Any]]:
    return {m["message_id"]: (m["assigned_to"], m["assigned_rule"])
            for m in await store.list_messages(limit=1000)}


async def test_shared_mailbox_routes_to_owners_then_sticky_round_robin_across_a_restart(
        url: str, dovecot: Dovecot, receiver: Receiver, tmp_path: Path) -> None:
    sales, support = new_user(dovecot), new_user(dovecot)
    cfg = config(dovecot, sales, support, tmp_path)
    earlier = datetime.now(UTC) - timedelta(hours=2)

    def put(box: str, sender: str, mid: str) -> None:
        dovecot.append(box, "INBOX", message(f"from {sender}", sender=sender, to=box,
                                             message_id=mid, date=earlier), date=earlier)

    put(sales, "owned@acme.test", "<owned@t>")
    put(sales, "someone@beta.test", "<company@t>")
    put(sales, "new1@gamma.test", "<new1@t>")
    put(sales, "new2@gamma.test", "<new2@t>")
    put(sales, "new2b@gamma.test", "<new2b@t>")
    put(support, "owned@acme.test", "<support-owned@t>")
    put(support, "new9@gamma.test", "<support-new9@t>")

    store = await open_store(url, receiver)
    await upsert_contacts(store, [
        ContactInput(email="owned@acme.test", company="Acme", owner=CAROL),
        ContactInput(email="buyer@beta.test", domain="beta.test", company_owner=BOB)])
    hooks = WebhookDispatcher(store, {receiver.url: endpoint(receiver)}, poll_interval=0.05, seed=1)
    await hooks.start()
    tailers, _ = tailers_for(cfg, store)
    await tailers.start()
    try:
        await wait_synced(tailers.accounts, "sales", ["INBOX"])
        await wait_synced(tailers.accounts, "support", ["INBOX"])
        got = await assignments(store)
        assert got["<owned@t>"] == (CAROL, "contact_owner")
        assert got["<company@t>"] == (BOB, "company_owner")
        # the three strangers took three turns, in whichever order the sync met them
        assert sorted([got["<new1@t>"], got["<new2@t>"], got["<new2b@t>"]]) == [
            (ALICE, "round_robin"), (ALICE, "round_robin"), (BOB, "round_robin")]
        first_rep = got["<new1@t>"][0]
        assert got["<support-owned@t>"] == (CAROL, "contact_owner")
        assert got["<support-new9@t>"] == (None, None)
        assert len(await store.list_messages(assigned_to=CAROL)) == 2

        # new mail while tailing: the same stranger goes to the same rep
        await asyncio.to_thread(put, sales, "new1@gamma.test", "<new1-again@t>")

        async def again() -> bool:
            return (await assignments(store)).get("<new1-again@t>") == (first_rep, "sticky")

        await wait_until(again, 20, "the second message of new1 assigned to the same rep")
    finally:
        await tailers.stop()
        await hooks.stop(timeout=5)
        await store.close()

    # a restart: new tailers on a new Store over the same database
    store = await open_store(url, receiver)
    hooks = WebhookDispatcher(store, {receiver.url: endpoint(receiver)}, poll_interval=0.05, seed=1)
    await hooks.start()
    put(sales, "new1@gamma.test", "<new1-after@t>")
    put(sales, "new3@gamma.test", "<new3@t>")
    tailers, _ = tailers_for(cfg, store)
    await tailers.start()
    try:
        async def after() -> bool:
            got = await assignments(store)
            return "<new1-after@t>" in got and "<new3@t>" in got

        await wait_until(after, 20, "the mail that came during the restart stored")
        got = await assignments(store)
        assert got["<new1-after@t>"] == (first_rep, "sticky")
        # three turns were taken before the restart: the fourth goes to the second rep
        assert got["<new3@t>"] == (BOB, "round_robin")

        want = {"<owned@t>", "<company@t>", "<new1@t>", "<new2@t>", "<new2b@t>", "<support-owned@t>",
                "<new1-again@t>", "<new1-after@t>", "<new3@t>"}

        def announced() -> dict[str, dict[str, Any]]:
            return {p["data"]["message"]["message_id"]: p["data"]
                    for p in receiver.processed.values() if p["type"] == "message.assigned"}

        await wait_until(lambda: set(announced()) == want, 15, "a message.assigned per assignment")
        told = announced()
        assert told["<company@t>"]["rule"] == "company_owner"
        assert told["<company@t>"]["assigned_to"] == BOB and told["<company@t>"]["account"] == "sales"
        assert told["<new1-after@t>"]["rule"] == "sticky"
        assert told["<company@t>"]["message"]["assigned_to"] == BOB
        assert all(a.signed_ok for a in receiver.attempts)
    finally:
        await tailers.stop()
        await hooks.stop(timeout=5)
        await store.close()
