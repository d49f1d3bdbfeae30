#!/usr/bin/env python3
"""Benchmark message search (``Store.list_messages(query=...)``, what ``GET /api/v1/messages?q=`` runs).

For each backend (an SQLite file in a temporary directory, and a fresh PostgreSQL database
next to the machine's ``test`` database) it stores ``--messages`` messages (20,000 by
default; subjects and ~120-word bodies from a business vocabulary, 500 correspondents at 50
domains) in batches of 500 through ``Store.store_messages``, the ingest/IMAP path, timing
the writes (the index is written in the same transactions), ANALYZEs PostgreSQL (as
autovacuum does after a bulk load), then runs each query of
:data:`QUERIES` ``--reads`` times (first page of 50, newest first) and prints per query
the hits on that page and p50/p95 in ms, and all queries' p50/p95 together.

    python3 bench/search.py                          # both backends, 20,000 messages
    python3 bench/search.py --backend sqlite --messages 5000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.store import database  # a scratch SQLite file or PostgreSQL database
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.records import NewMessage, SourceRef

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_WORDS = ("pricing proposal renewal contract meeting quote invoice demo roadmap discount timeline "
          "security review onboarding integration budget approval schedule legal procurement "
          "support ticket escalation migration training workshop license seats enterprise pilot "
          "feedback deadline signature agreement order shipment delivery payment terms question "
          "the a to of and for in on with we you our your is are be this that will can next week")
VOCABULARY = tuple(_WORDS.split())
#: (label, query): the plain list (the baseline: a page of 50 with its events and contacts),
#: a common word (in 87% of messages), a rare one (0.1%), a stem, a phrase, two words, an
#: address, a domain
QUERIES: tuple[tuple[str, str | None], ...] = (
    ("no query", None),
    ("common word", "pricing"),
    ("rare word", "zebra"),
    ("stem", "renewals"),
    ("phrase", '"contract renewal"'),
    ("two words", "invoice payment"),
    ("address", "person7@company7.test"),
    ("domain", "company3.test"),
)


def message(i: int, rnd: random.Random) -> NewMessage:
    words = [rnd.choice(VOCABULARY) for _ in range(120)]
    if i % 1000 == 0:
        words.append("zebra")
    person = rnd.randrange(500)
    at = T0 + timedelta(minutes=i)
    return NewMessage(
        message_id=f"<bench.{i}@company{person % 50}.test>",
        from_addr=f"person{person}@company{person % 50}.test", from_name=f"Person {person}",
        to_addrs=["rep@ours.test"], cc_addrs=[], date=at, direction="inbound", account="bench",
        subject=" ".join(rnd.choice(VOCABULARY) for _ in range(5)).capitalize(),
        text_body=" ".join(words), sources=[SourceRef("imap", f"bench/INBOX/1/{i}", at,
                                                      account="bench", folder="INBOX",
                                                      uidvalidity=1, uid=i)])


def ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 \
        else values[0] * 1000


async def run(backend: str, args: argparse.Namespace) -> None:
    rnd = random.Random(7)
    with tempfile.TemporaryDirectory() as d:
        async with database(backend, Path(d)) as url:
            await upgrade(url)
            store = await Store.open(url)
            try:
                t = time.perf_counter()
                for start in range(0, args.messages, 500):
                    await store.store_messages([message(i, rnd) for i in
                                                range(start, min(start + 500, args.messages))])
                write = time.perf_counter() - t
                print(f"{backend}: stored {args.messages} messages in {write:.1f} s "
                      f"({args.messages / write:.0f}/s, index included)")
                if backend == "postgresql":
                    # what autovacuum does after a bulk load: without statistics on
                    # search_vector the planner sorts every hit of a common word (150 ms)
                    async with store.engine.begin() as conn:
                        await conn.exec_driver_sql("ANALYZE messages")
                every: list[float] = []
                for label, q in QUERIES:
                    times: list[float] = []
                    hits = 0
                    for _ in range(args.reads):
                        t = time.perf_counter()
                        rows: list[dict[str, Any]] = await store.list_messages(query=q, limit=50)
                        times.append(time.perf_counter() - t)
                        hits = len(rows)
                    if q is not None:
                        every += times
                    print(f"  {label:<12} {q!r:<26} {hits:>3} on page 1   "
                          f"p50 {ms(times, 50):6.1f} ms   p95 {ms(times, 95):6.1f} ms")
                print(f"  every search: p50 {ms(every, 50):.1f} ms, p95 {ms(every, 95):.1f} ms")
            finally:
                await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--reads", type=int, default=30)
    args = p.parse_args()
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        asyncio.run(run(backend, args))


if __name__ == "__main__":
    main()
