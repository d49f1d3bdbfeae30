#!/usr/bin/env python3
"""Engagement benchmark: a replayed day of opens and clicks with known truth, and how close the report gets.

Its one job: build a day of outbound mail in a fresh SQLite CRM store (N messages to M
recipients, one tracked copy per recipient with three links, each copy with its
``queued`` and ``sent`` events, delivered between a few seconds and eight hours ago),
then replay what happens to those copies over real HTTP against the tracking endpoint
(``gateway.http.tracking.make_app`` with the store's copy lookup and hit recording, the
same objects the daemon runs), through ``trusted_proxies`` so each request's client
address is set with ``X-Forwarded-For``. Every copy gets one scenario, drawn with a seed:

============  ====================================================  ==============  ==============
scenario      what hits the endpoint                                truly opened    truly clicked
============  ====================================================  ==============  ==============
reader        a person opens 1-3 times (Outlook, Thunderbird,       yes             in 40 %
              iPhone Mail) from a home network; 40 % click a link
gmail         Gmail's image proxy fetches the pixel when the        yes             in 30 %
              person reads; 30 % click from Chrome
blocked       images blocked: no pixel, the person clicks a link    yes             yes
mpp-idle      Apple Mail Privacy Protection prefetches the pixel    no              no
              on download; nobody reads it
mpp-reader    the same prefetch, and the person reads it in Apple   yes             no
              Mail (MPP hides it: looks exactly like mpp-idle)
scanner       the receiving gateway's link scanner follows every    no              no
              link seconds after delivery (Safe Links, or Chrome
              from a cloud address)
prefetch      a mail client prefetches the pixel (Sec-Purpose)      no              no
sender        the rep opens their own copy, from the address they   no              no
              submitted it from
nothing       no hit at all                                         no              no
============  ====================================================  ==============  ==============

Then it reads ``gateway.crm.reports.engagement`` and prints, for the open rate and the
click rate: the true rate, the rate the product reports, the error in points, and what a
tracker that counts every hit as a person would say; the per-scenario verdicts (how many
copies each scenario's hits made "opened" / "clicked"); hits per second through the
endpoint. Nothing is asserted; figures go to stdout (``--json`` for a machine).

    python3 bench/engagement.py                          # 400 messages, 250 recipients
    python3 bench/engagement.py --messages 2000 --recipients 800 --seed 7 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECRET = b"bench-engagement-" + b"k" * 32
SENDER = "rep@ours.example"
SENDER_IP = "203.0.113.5"
LINKS = ("https://ours.example/pricing", "https://ours.example/case-study",
         "https://ours.example/book-a-demo")
UA = {
    "outlook": "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
    "thunderbird": ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 "
                    "Thunderbird/128.5.0"),
    "iphone": ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
               "(KHTML, like Gecko) Mobile/15E148"),
    "chrome": ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
               "Chrome/131.0.0.0 Safari/537.36"),
    "gmail_proxy": ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
                    "(via ggpht.com GoogleImageProxy)"),
    "mpp": "Mozilla/5.0",
    "safelinks": "Mozilla/5.0 (compatible; Microsoft-URLAnalyzer/1.0; +SafeLinks)",
}
#: scenario -> share of copies
MIX: dict[str, float] = {"reader": 0.22, "gmail": 0.12, "blocked": 0.04, "mpp-idle": 0.08,
                         "mpp-reader": 0.05, "scanner": 0.14, "prefetch": 0.04, "sender": 0.06,
                         "nothing": 0.25}
TRUTH: dict[str, tuple[bool, bool | None]] = {   # (opened, clicked: None = decided per copy)
    "reader": (True, None), "gmail": (True, None), "blocked": (True, True),
    "mpp-idle": (False, False), "mpp-reader": (True, False), "scanner": (False, False),
    "prefetch": (False, False), "sender": (False, False), "nothing": (False, False)}


@dataclass
class CopyCase:
    copy_id: str
    recipient: str
    scenario: str
    delivered_ago: float            # seconds
    clicks: bool = False            # the person clicks (reader, gmail)
    hits: list[tuple[str, dict[str, str]]] = field(default_factory=list)   # (path, headers)


def home_ip(rng: random.Random) -> str:
    return f"198.51.100.{rng.randrange(1, 255)}"


def plan_day(n_messages: int, n_recipients: int, rng: random.Random) -> list[tuple[str, list[CopyCase]]]:
    from gateway.ids import new_queue_id

    people = [f"person{i}@customer{i % 37}.example" for i in range(n_recipients)]
    scenarios = list(MIX)
    weights = [MIX[s] for s in scenarios]
    day: list[tuple[str, list[CopyCase]]] = []
    for n in range(n_messages):
        mid = f"<bench-{n}@ours.example>"
        rcpts = rng.sample(people, rng.choice((1, 1, 1, 2, 3)))
        copies = []
        for r in rcpts:
            sc = rng.choices(scenarios, weights)[0]
            ago = rng.uniform(2.0, 4.0) if sc == "scanner" else rng.uniform(300, 8 * 3600)
            c = CopyCase(new_queue_id(), r, sc, ago)
            if sc in ("reader", "gmail"):
                c.clicks = rng.random() < (0.4 if sc == "reader" else 0.3)
            copies.append(c)
        day.append((mid, copies))
    return day


def make_hits(c: CopyCase, signer: Any, rng: random.Random) -> None:
    o = f"/o/{signer.open_token(c.copy_id)}"

    def click(i: int) -> str:
        return f"/c/{signer.click_token(c.copy_id, i + 1, LINKS[i])}"

    def hdr(ua: str, ip: str, **extra: str) -> dict[str, str]:
        return {"User-Agent": ua, "X-Forwarded-For": ip, **extra}

    ip = home_ip(rng)
    if c.scenario == "reader":
        ua = UA[rng.choice(("outlook", "thunderbird", "iphone"))]
        c.hits += [(o, hdr(ua, ip)) for _ in range(rng.randint(1, 3))]
        if c.clicks:
            c.hits.append((click(rng.randrange(3)), hdr(UA["chrome"], ip)))
    elif c.scenario == "gmail":
        c.hits += [(o, hdr(UA["gmail_proxy"], f"66.249.84.{rng.randrange(1, 255)}"))
                   for _ in range(rng.randint(1, 2))]
        if c.clicks:
            c.hits.append((click(rng.randrange(3)), hdr(UA["chrome"], ip)))
    elif c.scenario == "blocked":
        c.hits.append((click(rng.randrange(3)), hdr(UA["chrome"], ip)))
    elif c.scenario in ("mpp-idle", "mpp-reader"):
        c.hits += [(o, hdr(UA["mpp"], f"17.58.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}"))
                   for _ in range(1 if c.scenario == "mpp-idle" else 2)]
    elif c.scenario == "scanner":
        scanner_ip = f"52.{rng.randrange(96, 111)}.{rng.randrange(0, 255)}.{rng.randrange(1, 255)}"
        ua = UA["safelinks"] if rng.random() < 0.5 else UA["chrome"]
        c.hits += [(click(i), hdr(ua, scanner_ip)) for i in range(3)]
    elif c.scenario == "prefetch":
        c.hits.append((o, hdr(UA["outlook"], ip, **{"Sec-Purpose": "prefetch"})))
    elif c.scenario == "sender":
        c.hits.append((o, hdr(UA["outlook"], SENDER_IP)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from gateway.config import Logging
    from gateway.crm.hits import StoreTracking
    from gateway.crm.reports import engagement
    from gateway.crm.store import Store
    from gateway.crm.writer import StoreWriter
    from gateway.http.tracking import HitRecorder, make_app
    from gateway.log import setup_logging
    from gateway.records import AcceptedMessage, Copy, EventRecord
    from gateway.tracking.classify import Settings
    from gateway.tracking.tokens import TokenSigner

    setup_logging(Logging(format="json", level="warning"), stream=sys.stderr)
    rng = random.Random(args.seed)
    day = plan_day(args.messages, args.recipients, rng)
    signer = TokenSigner([SECRET])
    for _, copies in day:
        for c in copies:
            make_hits(c, signer, rng)

    tmp = tempfile.TemporaryDirectory(prefix="mailgw-bench-engagement-")
    store = await Store.open(f"sqlite+aiosqlite:///{tmp.name}/crm.db")
    now = datetime.now(UTC)
    accepted, events = [], []
    for mid, copies in day:
        at = now - timedelta(seconds=max(c.delivered_ago for c in copies) + 1)
        accepted.append(AcceptedMessage(
            queue_id=copies[0].copy_id, message_id=mid, from_addr=SENDER,
            to_addrs=[c.recipient for c in copies], cc_addrs=[], subject="Our offer", date=at,
            snippet="Hello", size=12000, recipients=[c.recipient for c in copies], user=SENDER,
            account=None, at=at, client_ip=SENDER_IP, template="offer",
            copies=[Copy(c.copy_id, recipient=c.recipient, links=len(LINKS)) for c in copies]))
        events += [EventRecord(queue_id=c.copy_id, type="sent", recipient=c.recipient,
                               at=now - timedelta(seconds=c.delivered_ago), details={})
                   for c in copies]
    for i in range(0, len(accepted), 200):
        await store.record(accepted[i:i + 200], [])
    for i in range(0, len(events), 500):
        await store.record([], events[i:i + 500])

    writer = StoreWriter(store)
    await writer.start()
    sink = StoreTracking(store, writer)
    recorder = HitRecorder(sink, sink, settings=Settings())
    await recorder.start()
    import ipaddress
    app = make_app(signer, recorder, trusted_proxies=[ipaddress.ip_network("127.0.0.1/32")])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    # the copies' hits, copy by copy in a random order, the hits of one copy in sequence
    cases = [c for _, copies in day for c in copies]
    order = cases[:]
    rng.shuffle(order)
    statuses: Counter[int] = Counter()
    sem = asyncio.Semaphore(args.concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
        async def replay(c: CopyCase) -> None:
            async with sem:
                for path, headers in c.hits:
                    async with http.get(path, headers=headers, allow_redirects=False) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
        await asyncio.gather(*(replay(c) for c in order))
    elapsed = time.perf_counter() - started
    n_hits = sum(statuses.values())
    await recorder.drain(60)
    await recorder.stop()
    await writer.stop(60)
    await runner.cleanup()

    report = (await engagement(store, days=1))["total"]
    # per scenario, what the product made of the copies (from the same events)
    import sqlalchemy as sa

    from gateway.crm.models import events_table, messages_table
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(
            messages_table.c.message_id, events_table.c.recipient, events_table.c.type,
            events_table.c.machine, events_table.c.details)
            .join(messages_table, messages_table.c.id == events_table.c.message_pk)
            .where(events_table.c.type.in_(("opened", "clicked"))))).all()
    await store.close()
    tmp.cleanup()
    by_copy: dict[tuple[str, str], list[tuple[str, bool, str]]] = {}
    for mid, rcpt, type_, machine, details in rows:
        by_copy.setdefault((mid, rcpt), []).append(
            (type_, machine, (details or {}).get("category", "")))

    delivered = len(cases)
    true_open = sum(TRUTH[c.scenario][0] for c in cases)
    true_click = sum((c.clicks if TRUTH[c.scenario][1] is None else bool(TRUTH[c.scenario][1]))
                     for c in cases)
    naive_open = sum(any(p.startswith("/o/") for p, _ in c.hits) for c in cases)
    naive_click = sum(any(p.startswith("/c/") for p, _ in c.hits) for c in cases)
    verdicts: dict[str, Counter[str]] = {}
    for mid, copies in day:
        for c in copies:
            v = verdicts.setdefault(c.scenario, Counter())
            v["copies"] += 1
            evs = by_copy.get((mid, c.recipient), [])
            human_open = any(t == "opened" and (not m or cat == "proxied") for t, m, cat in evs)
            any_open = any(t == "opened" for t, _, _ in evs)
            human_click = any(t == "clicked" and not m for t, m, _ in evs)
            v["opened"] += human_open or (human_click and not any_open)
            v["clicked"] += human_click

    def rate(x: int) -> float:
        return round(100.0 * x / delivered, 2) if delivered else 0.0

    out = {
        "messages": args.messages, "recipients": args.recipients, "copies": delivered,
        "hits": n_hits, "hits_per_second": round(n_hits / elapsed, 1) if elapsed else None,
        "statuses": dict(statuses),
        "open_rate": {"true": rate(true_open), "reported": round(100 * (report["open_rate"] or 0), 2),
                      "naive": rate(naive_open)},
        "click_rate": {"true": rate(true_click),
                       "reported": round(100 * (report["click_rate"] or 0), 2),
                       "naive": rate(naive_click)},
        "report": {k: report[k] for k in ("sent", "delivered", "opened", "clicked", "proxied_opens",
                                          "machine_opens", "machine_clicks")},
        "scenarios": {k: dict(v) for k, v in sorted(verdicts.items())},
    }
    for key in ("open_rate", "click_rate"):
        r = out[key]
        r["error_points"] = round(r["reported"] - r["true"], 2)
        r["naive_error_points"] = round(r["naive"] - r["true"], 2)
    return out


def print_table(r: dict[str, Any]) -> None:
    print(f"engagement replay: {r['messages']} messages, {r['copies']} tracked copies to "
          f"{r['recipients']} recipients, {r['hits']} hits at {r['hits_per_second']}/s "
          f"(statuses {r['statuses']})")
    print(f"{'rate':<12}{'true %':>9}{'mailgw %':>10}{'error pts':>11}{'naive %':>9}{'naive err':>11}")
    for key in ("open_rate", "click_rate"):
        x = r[key]
        print(f"{key:<12}{x['true']:>9.2f}{x['reported']:>10.2f}{x['error_points']:>+11.2f}"
              f"{x['naive']:>9.2f}{x['naive_error_points']:>+11.2f}")
    print(f"report: {r['report']}")
    print(f"{'scenario':<12}{'copies':>8}{'opened':>8}{'clicked':>8}   truth")
    for name, v in r["scenarios"].items():
        o, c = TRUTH[name]
        truth = f"opened={'yes' if o else 'no'} clicked={'some' if c is None else ('yes' if c else 'no')}"
        print(f"{name:<12}{v.get('copies', 0):>8}{v.get('opened', 0):>8}"
              f"{v.get('clicked', 0):>8}   {truth}")
    print("(naive: a tracker that counts every hit as a person; opened/clicked: copies the "
          "report counts so)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--recipients", type=int, default=250)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
