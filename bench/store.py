#!/usr/bin/env python3
"""Benchmark the CRM store: contacts import, message ingest (stored and linked), timeline reads.

For each backend (an SQLite file in a temporary directory, and a fresh PostgreSQL
database next to the machine's ``test`` database) it

1. imports ``--contacts`` contacts (50,000 by default) from a generated CSV,
2. stores ``--messages`` messages (10,000) in batches as the ingest listener and the IMAP
   tailer do (``Store.store_messages``): raw bytes parsed by ``gateway.mail.parse`` when
   it is available, half of them from or to a contact, threaded replies, raw kept on disk,
3. reads one busy contact's timeline ``--reads`` times (50 per page),

and prints contacts/s, messages/s (stored and linked), and timeline p50/p99 in ms.

    python3 bench/store.py                       # both backends, default sizes
    python3 bench/store.py --backend sqlite --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.crm.contacts import contact_timeline, parse_csv, upsert_contacts
from gateway.crm.linking import LinkRules
from gateway.crm.migrate import upgrade
from gateway.crm.store import Store
from gateway.records import NewMessage, SourceRef

PG_ADMIN = os.environ.get("MAILGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
WORDS = (
    "pricing", "proposal", "renewal", "contract", "meeting", "follow-up", "quote", "invoice",
    "demo", "roadmap", "discount", "timeline", "security", "review", "onboarding", "integration",
    "budget", "approval",
)
T0 = datetime(2026, 10, 1, tzinfo=UTC)


def contacts_csv(n: int) -> str:
    lines = ["email,first_name,last_name,company,title"]
    for i in range(n):
        lines.append(f"person{i}@company{i % 5000}.test,First{i},Last{i},Company {i % 5000},Buyer")
    return "\n".join(lines) + "\n"


def raw_message(i: int, rnd: random.Random, n_contacts: int) -> tuple[bytes, str]:
    """A realistic ~5 KB message; half are with a contact, every third is a reply."""
    if i % 2 == 0:
        other = f"person{rnd.randrange(n_contacts)}@company{rnd.randrange(5000)}.test"
    else:
        other = f"stranger{i}@elsewhere{i % 300}.test"
    inbound = i % 3 != 0
    frm, to = (other, "rep@example.com") if inbound else ("rep@example.com", other)
    subject = " ".join(rnd.choice(WORDS) for _ in range(5))
    refs = ""
    if i % 3 == 1 and i > 10:
        parent = f"<bench{i - 7}@example.com>"
        refs = f"In-Reply-To: {parent}\r\nReferences: {parent}\r\n"
        subject = "Re: " + subject
    body = "\r\n".join(" ".join(rnd.choice(WORDS) for _ in range(12)) for _ in range(60))
    date = (T0 + timedelta(minutes=i)).strftime("%a, %d %b %Y %H:%M:%S +0000")
    raw = (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
           f"Message-ID: <bench{i}@example.com>\r\n{refs}MIME-Version: 1.0\r\n"
           f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n").encode()
    return raw, "inbound" if inbound else "outbound"


def make_converter() -> tuple[str, Callable[[bytes, str, int], NewMessage]]:
    """Raw bytes -> NewMessage: through gateway.mail.parse if present, else a header scan."""
    parse_message: Callable[[bytes], Any] | None
    try:  # a checkout from before gateway.mail.parse existed takes the header scan
        from gateway.mail import parse as parse_module
        parse_message = parse_module.parse_message
    except ImportError:
        parse_message = None

    def convert(raw: bytes, direction: str, i: int) -> NewMessage:
        src = [SourceRef("imap", f"bench/INBOX/1/{i}", T0 + timedelta(minutes=i), account="bench",
                         folder="INBOX", uidvalidity=1, uid=i)]
        if parse_message is not None:
            p: Any = parse_message(raw)
            return NewMessage(message_id=p.message_id, from_addr=p.from_addr, from_name=p.from_name,
                              to_addrs=list(p.to_addrs), cc_addrs=list(p.cc_addrs),
                              subject=p.subject, date=p.date, direction=direction,
                              in_reply_to=p.in_reply_to, references=list(p.references),
                              snippet=p.snippet, text_body=p.text_body, html_body=p.html_body,
                              size=len(raw), dedupe_hash=p.dedupe_hash, raw=raw, account="bench",
                              sources=src)
        head, _, body = raw.partition(b"\r\n\r\n")
        h = {k.lower(): v for k, v in (line.split(": ", 1) for line in
                                       head.decode().split("\r\n") if ": " in line)}
        return NewMessage(message_id=h["message-id"], from_addr=h["from"], to_addrs=[h["to"]],
                          cc_addrs=[], subject=h["subject"], date=T0 + timedelta(minutes=i),
                          direction=direction, in_reply_to=h.get("in-reply-to"),
                          references=[h["references"]] if "references" in h else [],
                          snippet=body[:200].decode(), text_body=body.decode(), size=len(raw),
                          raw=raw, account="bench", sources=src)

    return ("gateway.mail.parse" if parse_message is not None else "header scan"), convert


@asynccontextmanager
async def database(backend: str, tmp: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp}/crm.db"
        return
    import asyncpg

    name = f"mailgw_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(7)
    how, convert = make_converter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        async with database(backend, tmp) as url:
            await upgrade(url)
            store = await Store.open(url, raw_dir=tmp / "raw")
            store.configure(LinkRules(own_addresses=frozenset({"rep@example.com"}),
                                      own_domains=frozenset({"example.com"})))
            try:
                rows = parse_csv(contacts_csv(args.contacts))
                t = time.perf_counter()
                for i in range(0, len(rows), 5000):
                    await upsert_contacts(store, rows[i:i + 5000])
                t_contacts = time.perf_counter() - t

                raws = [raw_message(i, rnd, args.contacts) for i in range(args.messages)]
                t = time.perf_counter()
                for i in range(0, len(raws), args.batch):
                    batch = [convert(raw, direction, i + j)
                             for j, (raw, direction) in enumerate(raws[i:i + args.batch])]
                    await store.store_messages(batch)
                t_msgs = time.perf_counter() - t

                busy = "person0@company0.test"
                for i in range(200):   # give one contact a long history
                    raw = raw_message(2 * i, rnd, args.contacts)[0].replace(
                        b"To: rep@example.com", b"To: rep@example.com", 1)
                    m = convert(raw, "inbound", 10_000_000 + i)
                    m.from_addr = busy
                    m.message_id = f"<busy{i}@company0.test>"
                    await store.store_messages([m])
                lat = []
                for _ in range(args.reads):
                    t = time.perf_counter()
                    page = await contact_timeline(store, busy, limit=50)
                    lat.append((time.perf_counter() - t) * 1000)
                assert len(page) == 50
            finally:
                await store.close()
    lat.sort()
    return {"backend": backend, "parse": how, "contacts_per_s": args.contacts / t_contacts,
            "messages_per_s": args.messages / t_msgs,
            "timeline_p50_ms": statistics.median(lat),
            "timeline_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--contacts", type=int, default=50_000)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=100, help="messages per store call")
    ap.add_argument("--reads", type=int, default=300, help="timeline reads")
    args = ap.parse_args()
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    print(f"{'backend':<11} {'parse':<19} {'contacts/s':>11} {'messages/s':>11} "
          f"{'timeline p50':>13} {'p99':>8}")
    for b in backends:
        r = asyncio.run(run(b, args))
        print(f"{r['backend']:<11} {r['parse']:<19} {r['contacts_per_s']:>11.0f} "
              f"{r['messages_per_s']:>11.0f} {r['timeline_p50_ms']:>10.2f} ms "
              f"{r['timeline_p99_ms']:>5.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
