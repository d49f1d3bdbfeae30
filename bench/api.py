"""Read API latency for a contact timeline: seed N messages for one contact, time real HTTP GETs.

One job: fill a store (a fresh SQLite file by default, or the PostgreSQL database named by
``--store``) with ``--messages`` messages to one contact, each with queued/sent/opened
events, plus ``--noise`` messages to other people, start the admin listener on loopback
and GET ``/api/v1/contacts/{email}/timeline`` ``--requests`` times over real HTTP (first
pages, and pages deep in the history through the cursor), then print p50/p99/max latency.
It is a benchmark, not a test: nothing is asserted.

    PYTHONPATH=. python3 bench/api.py                          # 5000 + 20000 messages, SQLite
    PYTHONPATH=. python3 bench/api.py --store postgresql+asyncpg://postgres@127.0.0.1/bench --json

``measure()`` is importable (bench/store.py calls it) and returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from gateway.api.http import AdminAPI
from gateway.config import Config
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage, EventRecord

CONTACT = "carol@acme.test"
TOKEN = "bench-token"
BATCH = 500


def _msg(i: int, to: str, at: datetime) -> AcceptedMessage:
    return AcceptedMessage(queue_id=f"B{i:08d}", message_id=f"<b{i}@example.com>",
                           from_addr="alice@example.com", to_addrs=[to], cc_addrs=[],
                           subject=f"Quote #{i}", date=at, snippet="Hello, here is the quote " * 4,
                           size=4096, recipients=[to], user="alice@example.com", account=None,
                           at=at, template="quote", text_body="Hello " * 200)


async def seed(store: Store, messages: int, noise: int) -> None:
    start = datetime.now(UTC) - timedelta(days=365)
    total = messages + noise
    step = timedelta(days=365) / max(total, 1)
    every = max(1, total // max(messages, 1))
    batch: list[AcceptedMessage] = []
    events: list[EventRecord] = []
    mine = 0
    for i in range(total):
        to = CONTACT if (i % every == 0 and mine < messages) else f"p{i}@other{i % 97}.test"
        mine += to == CONTACT
        at = start + step * i
        batch.append(_msg(i, to, at))
        events += [EventRecord(f"B{i:08d}", "sent", to, at + timedelta(seconds=5)),
                   EventRecord(f"B{i:08d}", "opened", to, at + timedelta(hours=1))]
        if len(batch) >= BATCH:
            await store.record(batch, events)
            batch, events = [], []
    if batch:
        await store.record(batch, events)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def measure(store_url: str | None = None, *, messages: int = 5000, noise: int = 20000,
                  requests: int = 500, limit: int = 50, concurrency: int = 1) -> dict[str, Any]:
    """Seed, serve, time; returns {messages, noise, requests, limit, p50_ms, p99_ms, ...}."""
    tmp = None
    if store_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="mailgw-bench-api-")
        store_url = f"sqlite+aiosqlite:///{tmp.name}/crm.db"
    elif store_url.startswith("postgresql"):
        await upgrade(store_url)
    store = await Store.open(store_url)
    try:
        t0 = time.perf_counter()
        await seed(store, messages, noise)
        seed_s = time.perf_counter() - t0
        cfg = Config()
        api = AdminAPI(store, get_config=lambda: cfg, metrics=Metrics(), token=TOKEN)
        await api.start("127.0.0.1", 0, loopback_only=True)
        try:
            base = f"http://127.0.0.1:{api.port}/api/v1/contacts/{CONTACT}/timeline"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession(headers=headers) as session:
                # cursors deep in the history, collected once (walk the first pages)
                cursors: list[str | None] = [None]
                cur: str | None = None
                for _ in range(min(20, messages // limit)):
                    async with session.get(base, params={"limit": limit,
                                                         **({"cursor": cur} if cur else {})}) as r:
                        cur = (await r.json())["next_cursor"]
                    if cur is None:
                        break
                    cursors.append(cur)
                latencies: list[float] = []
                sem = asyncio.Semaphore(concurrency)

                async def one(i: int) -> None:
                    c = cursors[i % len(cursors)] if i % 2 else None   # half first pages
                    params: dict[str, Any] = {"limit": limit, **({"cursor": c} if c else {})}
                    async with sem:
                        t = time.perf_counter()
                        async with session.get(base, params=params) as r:
                            body = await r.read()
                            if r.status != 200:
                                raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
                        latencies.append(time.perf_counter() - t)

                for i in range(10):  # warm-up
                    await one(i)
                latencies.clear()
                t = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(requests)))
                wall = time.perf_counter() - t
        finally:
            await api.stop()
    finally:
        await store.close()
        if tmp is not None:
            tmp.cleanup()
    ms = [x * 1000 for x in latencies]
    return {"store": store_url.split(":", 1)[0], "messages": messages, "noise": noise,
            "requests": requests, "limit": limit, "concurrency": concurrency,
            "seed_s": round(seed_s, 1), "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(_pct(ms, 99), 2), "max_ms": round(max(ms), 2),
            "req_per_s": round(requests / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="store URL (default: a fresh SQLite file in a temp dir)")
    p.add_argument("--messages", type=int, default=5000, help="messages to the contact")
    p.add_argument("--noise", type=int, default=20000, help="messages to other people")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--limit", type=int, default=50, help="page size")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    print(f"seeding {args.messages} + {args.noise} messages ...", file=sys.stderr)
    r = asyncio.run(measure(args.store, messages=args.messages, noise=args.noise,
                            requests=args.requests, limit=args.limit,
                            concurrency=args.concurrency))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"timeline {r['store']}: {r['messages']} msgs for the contact + {r['noise']} others, "
              f"limit {r['limit']}, {r['requests']} requests x{r['concurrency']}: "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms, "
              f"{r['req_per_s']} req/s (seeded in {r['seed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
