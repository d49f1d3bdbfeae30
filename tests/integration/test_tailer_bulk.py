"""The bulk initial sync against a real Dovecot: batches parsed in the worker pool, each
batch's messages and its checkpoint in one transaction (SQLite and PostgreSQL).

A transaction that fails after its messages were inserted leaves neither them nor the
checkpoint, and the next session fetches from the checkpoint without storing anything
twice; a message whose parse raises in a worker ends the tailer as a parse failure
always did (nothing of its batch committed, the run recorded with the error), and a new
start resumes from the checkpoint.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.crm.accounts import Accounts
from gateway.crm.store import Store
from gateway.imap import parsing, tailer
from gateway.imap.parsing import BodyJob, parse_bodies
from gateway.records import NewMessage
from tests.integration.harness import wait_until
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
from tests.support.dovecot import Dovecot, message

pytestmark = pytest.mark.integration

N = 25            # UIDs 1..25, bulk0 the newest (UID 25); batches of 10, newest first
POISON = b"<bulk12@test>"


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 10 UIDs (25 messages: three batches, three transactions)."""
    monkeypatch.setattr(tailer, "BATCH", 4)
    monkeypatch.setattr(tailer, "BULK_BATCH", 10)


def fill(dovecot: Dovecot) -> str:
    user = new_user(dovecot)
    now = datetime.now(UTC)
    dovecot.fill(user, ((message(f"bulk {i}", sender=LEAD, to=user, message_id=f"<bulk{i}@test>",
                                 date=now - timedelta(hours=i)), [], now - timedelta(hours=i))
                        for i in reversed(range(N))))
    return user


def mids(indexes: range) -> set[str]:
    return {f"<bulk{i}@test>" for i in indexes}


async def imap_sources(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.text(
            "SELECT count(*) FROM message_sources WHERE source = 'imap'"))).scalar() or 0)


async def run_states(accounts: Accounts) -> list[str]:
    return [r["status"] for r in (await accounts.sync_info("rep"))["recent_runs"]
            if r["kind"] == "initial"]


async def test_a_failed_transaction_leaves_neither_messages_nor_checkpoint_and_resumes_there(
        store: Store, dovecot: Dovecot, tmp_path: Path, small_batches: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await add_contacts(store, LEAD)
    user = await asyncio.to_thread(fill, dovecot)
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path, sync={"folders": ["INBOX"]})],
                      sync={"parse_workers": 1})
    tailers, spy = tailers_for(cfg, store)
    tailers.parsers.pool_min = 1
    real = store.store_messages
    batches = 0
    failed, checked = asyncio.Event(), asyncio.Event()

    async def store_messages(items: Any, then: Any = None) -> Any:
        nonlocal batches
        if not items:
            return await real(items, then)
        batches += 1
        if batches == 2:    # the second batch: its rows and checkpoint are in, then it fails
            async def then_fail(conn: Any) -> None:
                await then(conn)
                raise sa.exc.OperationalError("COMMIT", None, Exception("injected failure"))
            try:
                return await real(items, then_fail)
            finally:
                failed.set()
        if batches > 2:     # the next session: not before the test has looked
            await checked.wait()
        return await real(items, then)

    monkeypatch.setattr(store, "store_messages", store_messages)
    await tailers.start()
    try:
        await asyncio.wait_for(failed.wait(), 30)
        # neither the second batch's messages nor its checkpoint: the first batch alone
        assert await stored_ids(store) == mids(range(10))
        assert await imap_sources(store) == 10
        cp = await tailers.accounts.checkpoint("rep", "INBOX")
        assert cp is not None and cp.backfill_uid == N - 9 and not cp.initial_done
        checked.set()
        await wait_synced(tailers.accounts, "rep", ["INBOX"], timeout=60)
        assert await stored_ids(store) == mids(range(N))
        assert await imap_sources(store) == N                      # nothing stored twice
        fetched = Counter(u for _, u in spy.body_uids)
        # the second session fetched from the checkpoint: the first batch was read once
        assert all(fetched[uid] == 1 for uid in range(N - 9, N + 1))
        assert set(fetched) == set(range(1, N + 1))
        assert spy.logins == 2 and tailers.parsers.jobs >= 3
        assert await run_states(tailers.accounts) == ["ok", "error"]
    finally:
        await tailers.stop()


def refuse_poison(job: BodyJob) -> list[NewMessage]:
    """`parse_bodies`, except that the poison message raises (in the worker process)."""
    if any(POISON in raw for _, raw, _ in job.bodies):
        raise ValueError("this message cannot be parsed")
    return parse_bodies(job)


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_parse_that_raises_in_the_pool_fails_as_in_process_and_resumes(
        store: Store, dovecot: Dovecot, tmp_path: Path, small_batches: None,
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    await add_contacts(store, LEAD)
    user = await asyncio.to_thread(fill, dovecot)
    cfg = make_config(tmp_path, [account_dict(dovecot, user, tmp_path, sync={"folders": ["INBOX"]})],
                      sync={"parse_workers": workers})
    monkeypatch.setattr(parsing, "parse_bodies", refuse_poison)
    tailers, _ = tailers_for(cfg, store)
    tailers.parsers.pool_min = 1
    await tailers.start()
    try:
        async def crashed() -> bool:
            return await run_states(tailers.accounts) == ["error"] and "rep" not in tailers.tailing()

        await wait_until(crashed, 30, "the tailer ended by the parse failure")
        run = (await tailers.accounts.sync_info("rep"))["recent_runs"][0]
        assert run["error"] == "this message cannot be parsed"
        assert (tailers.parsers.jobs >= 2) if workers else (tailers.parsers.jobs == 0)
        # the batch before the poison's is committed, the poison's batch is not
        assert await stored_ids(store) == mids(range(10))
        cp = await tailers.accounts.checkpoint("rep", "INBOX")
        assert cp is not None and cp.backfill_uid == N - 9 and not cp.initial_done
    finally:
        await tailers.stop()

    monkeypatch.setattr(parsing, "parse_bodies", parse_bodies)   # the message parses now
    again, spy = tailers_for(cfg, store)
    await again.start()
    try:
        await wait_synced(again.accounts, "rep", ["INBOX"], timeout=60)
        assert await stored_ids(store) == mids(range(N))
        assert await imap_sources(store) == N
        assert {u for _, u in spy.body_uids} == set(range(1, N - 9))  # from the checkpoint on
    finally:
        await again.stop()
