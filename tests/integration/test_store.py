"""The CRM store on SQLite and on the machine's PostgreSQL: migrations, records, reads."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.crm.migrate import current_revision, head_revision, upgrade
from gateway.crm.store import Store
from gateway.crm.writer import StoreWriter
from gateway.errors import StoreError
from gateway.records import AcceptedMessage, EventRecord
from tests.conftest import require
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration
PG_ADMIN = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _pg_available() -> bool:
    try:
        import asyncpg

        conn = await asyncio.wait_for(asyncpg.connect(host="127.0.0.1", port=5432,
                                                      user="postgres", database="test"), 5)
        await conn.close()
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/crm.db"
        return
    require(await _pg_available(), "PostgreSQL at 127.0.0.1:5432")
    import asyncpg

    name = f"mailgw_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def accepted(qid: str, to: str = "bob@example.net", at: datetime | None = None) -> AcceptedMessage:
    at = at or datetime.now(UTC)
    return AcceptedMessage(queue_id=qid, message_id=f"<{qid}@example.com>",
                           from_addr="alice@example.com", to_addrs=[to], cc_addrs=[],
                           subject=f"about {qid}", date=at, snippet="hello", size=123,
                           recipients=[to], user="alice@example.com", account=None, at=at)


async def open_store(url: str) -> Store:
    if url.startswith("postgresql"):
        with pytest.raises(StoreError, match="mailgw db upgrade"):
            await Store.open(url)
        await upgrade(url)
        assert await current_revision(url) == await head_revision()
    return await Store.open(url)


async def test_record_is_idempotent_and_events_attach(url: str) -> None:
    store = await open_store(url)
    try:
        now = datetime.now(UTC)
        await store.record([accepted("Q1", at=now),
                            accepted("Q2", to="carol@example.org", at=now)],
                           [EventRecord("Q1", "sent", "bob@example.net", now,
                                        {"reply": "250 2.0.0 OK"})])
        await store.record([accepted("Q1")], [EventRecord("Q2", "bounced", "carol@example.org",
                                                          now, {"reply": "550 5.1.1 no"}),
                                              EventRecord("UNKNOWN", "sent", "x@y.z", now)])
        rows = await store.list_messages()
        assert len(rows) == 2
        q1 = await store.get_message_by_queue_id("Q1")
        assert q1 is not None
        assert [e["type"] for e in q1["events"]] == ["queued", "sent"]
        assert q1["events"][1]["details"] == {"reply": "250 2.0.0 OK"}
        assert datetime.fromisoformat(q1["events"][0]["at"]).tzinfo is not None
        assert (await store.get_message(q1["id"])) == q1
        carol = await store.list_messages(contact="Carol@Example.org")
        assert [r["queue_id"] for r in carol] == ["Q2"]
        assert [e["type"] for e in carol[0]["events"]] == ["queued", "bounced"]
        future = await store.list_messages(since=datetime.now(UTC) + timedelta(hours=1))
        assert future == []
    finally:
        await store.close()


async def test_writer_batches_and_survives_store_failures(url: str) -> None:
    store = await open_store(url)
    real = store.record
    calls = {"n": 0}

    async def flaky(accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise StoreError("simulated outage")
        await real(accepted, events)

    store.record = flaky  # type: ignore[method-assign]  # a failing stand-in
    writer = StoreWriter(store, batch=50, max_delay=0.01)
    await writer.start()
    for i in range(120):
        writer.add_accepted(accepted(f"W{i:03}"))
    try:
        await wait_until(lambda: writer.pending == 0, timeout=20, what="the writer to drain")
        assert writer.pending == 0 and writer.failures == 2
        assert len(await store.list_messages(limit=500)) == 120
        writer.add_event(EventRecord("W000", "sent", "bob@example.net", datetime.now(UTC)))
        assert await writer.stop(timeout=5) == 0
        row = await store.get_message_by_queue_id("W000")
        assert row is not None and [e["type"] for e in row["events"]] == ["queued", "sent"]
    finally:
        await store.close()
