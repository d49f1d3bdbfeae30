"""Daily send counts (max_per_day) on SQLite and PostgreSQL: counted, shared through the store, per day."""

from __future__ import annotations

from gateway.crm.counters import REFRESH, SendCounts
from gateway.crm.store import Store

DAY = 1_790_000_000.0   # 2026-09-21T...Z


async def test_counts_add_up_persist_and_reset_next_day(store: Store) -> None:
    now = [DAY]
    a = SendCounts(store, clock=lambda: now[0])
    assert await a.today("Rep@Example.com") == 0
    a.add("rep@example.com", 3)
    a.add("REP@example.com", 2)
    assert await a.today("rep@example.com") == 5
    await a.close()
    b = SendCounts(store, clock=lambda: now[0])         # another node sees them
    assert await b.today("rep@example.com") == 5
    b.add("rep@example.com", 1)
    await b.close()
    assert await a.today("rep@example.com") == 5        # a's cache, not yet refreshed
    now[0] += REFRESH + 1
    assert await a.today("rep@example.com") == 6        # refreshed from the store
    now[0] += 86400
    assert await a.today("rep@example.com") == 0        # a new UTC day


async def test_unwritten_counts_are_kept_until_the_store_is_back(store: Store, url: str) -> None:
    from gateway.crm.engine import make_engine
    from tests.conftest import free_port

    bad_url = f"postgresql+asyncpg://x@127.0.0.1:{free_port()}/none"
    broken = Store(make_engine(bad_url), bad_url)
    c = SendCounts(broken, clock=lambda: DAY)
    c.add("rep@example.com", 4)
    await c.close()                       # fails quietly, keeps the count pending
    assert c._pending == {("rep@example.com", "2026-09-21"): 4}
    await broken.close()
    c.store = store
    await c.flush()
    assert await SendCounts(store, clock=lambda: DAY).today("rep@example.com") == 4
