#!/usr/bin/env python3
"""Nodes benchmark: many mailboxes over several nodes on one PostgreSQL.

Its one job: fill a private Dovecot (tests/support/dovecot.py) with `--mailboxes` users
(1,000 by default) of `--messages` messages each (2, from a CRM contact), start `--nodes`
node processes (2) that each run the IMAP tailers (`gateway.imap.manager.Tailers`, one
IDLE connection per mailbox) on a fresh PostgreSQL database, and print:

* **initial sync**: seconds from the first node's start until every mailbox's INBOX has
  its initial sync done, and the messages stored;
* **leases per node** once the placement has settled (they should differ by at most one);
* **RSS per node**: the resident set (VmRSS) and peak (VmHWM) of each node with all its
  mailboxes in IDLE, and the RSS per mailbox;
* **takeover**: node 0 killed with SIGKILL (its leases and heartbeat left behind), then
  the seconds until the surviving nodes hold every lease again (the promise: within
  2 x `--lease-ttl`), and the leases per surviving node.

It is a benchmark, not a test (it exits 1 only when a mailbox was never synced or never
taken over). Run it from the repository root (Dovecot and PostgreSQL needed, as for the
tests):

    python3 bench/nodes.py                        # 1,000 mailboxes, 2 nodes
    python3 bench/nodes.py --mailboxes 200 --nodes 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.imap import (  # noqa: E402  (the same config, store and process helpers)
    LEAD,
    PASSWORD,
    bench_config,
    imap_account,
    open_bench_store,
    pg_database,
    quiet_logs,
    vm_hwm_kb,
)

USER = "box{}@example.test"


def vm_rss_kb(pid: int) -> int:
    """Resident set of a live process (VmRSS), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def node_config(out: Path, url: str, port: int, n: int, ttl: float) -> Any:
    accounts = [imap_account(f"m{i:04d}", USER.format(i), port, history_days=30)
                for i in range(n)]
    return bench_config(out, url, accounts, max_connections=n + 10, poll_interval="30m",
                        lease_ttl=ttl, check_interval=0.5)


async def node_main(node: str, url: str, port: int, n: int, ttl: float, out_dir: str) -> None:
    """One node: tail until SIGTERM (a clean stop) or SIGKILL."""
    from gateway.imap.manager import Tailers

    quiet_logs()
    import structlog

    # stdout carries the one JSON line the parent reads; logs go to stderr (a file), or a
    # full pipe would block the node on its first screenful of warnings
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    out = Path(out_dir)
    cfg = node_config(out, url, port, n, ttl)
    store = await open_bench_store(cfg)
    tailers = Tailers(lambda: cfg, store, node_id=node)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"base_rss_kb": vm_rss_kb(os.getpid())}), flush=True)
    await tailers.start()
    await stop.wait()
    await tailers.stop()
    await store.close()


async def poll(url: str) -> tuple[int, Counter[str], int]:
    """(mailboxes with the initial sync done, live leases per node, messages stored)."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            done = (await conn.execute(sa.text(
                "SELECT count(*) FROM sync_state WHERE initial_done"))).scalar_one()
            rows = (await conn.execute(sa.text(
                "SELECT lease_owner, count(*) FROM accounts WHERE lease_owner IS NOT NULL "
                "AND lease_expires_at > now() GROUP BY lease_owner"))).all()
            stored = (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one()
    finally:
        await engine.dispose()
    return int(done), Counter({str(o): int(c) for o, c in rows}), int(stored)


async def wait(url: str, what: str, cond: Any, timeout: float) -> tuple[float, Any]:
    started = time.perf_counter()
    while True:
        got = await poll(url)
        if cond(*got):
            return time.perf_counter() - started, got
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s: {got}")
        await asyncio.sleep(0.25)


async def parent(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.crm.contacts import ContactInput, upsert_contacts
    from tests.support.dovecot import Dovecot, message

    tmp = Path(tempfile.mkdtemp(prefix="mailgw-bench-nodes-"))
    os.chmod(tmp, 0o755)        # Dovecot's unprivileged processes look inside
    dovecot = Dovecot(tmp / "dovecot", max_clients=args.mailboxes + 50)
    for i in range(args.mailboxes):
        dovecot.add_user(USER.format(i), PASSWORD)
    dovecot.start()
    name = await pg_database(args.pg_admin)
    base = args.pg_admin.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = contextlib.ExitStack()
    try:
        t0 = time.perf_counter()
        for i in range(args.mailboxes):
            for j in range(args.messages):
                dovecot.append(USER.format(i), "INBOX", message(
                    f"hello {j}", sender=LEAD, to=USER.format(i),
                    message_id=f"<n{i}.{j}@bench>"))
        filled = time.perf_counter() - t0
        cfg = node_config(tmp, url, dovecot.port, args.mailboxes, args.lease_ttl)
        store = await open_bench_store(cfg)
        await upsert_contacts(store, [ContactInput(email=LEAD)])
        await store.close()
        for k in range(args.nodes):
            procs.append(subprocess.Popen(  # noqa: ASYNC220 (started once, never awaited)
                [sys.executable, __file__, "--node", f"node-{k}", "--url", url,
                 "--port", str(dovecot.port), "--mailboxes", str(args.mailboxes),
                 "--lease-ttl", str(args.lease_ttl), "--out", str(tmp)],
                stdout=subprocess.PIPE, stderr=logs.enter_context((tmp / f"node-{k}.log").open("w"))))
        base_rss = [json.loads(p.stdout.readline())["base_rss_kb"] if p.stdout else 0
                    for p in procs]
        n, per = args.mailboxes, args.nodes
        synced_s, (_, _, stored) = await wait(
            url, "every initial sync", lambda d, _l, _s: d >= n, args.timeout)
        fair = sorted([n // per + (1 if k < n % per else 0) for k in range(per)])
        settle_s, (_, leases, _) = await wait(
            url, "a fair placement", lambda _d, held, _s: sorted(held.values()) == fair
            and sum(held.values()) == n, args.timeout)
        await asyncio.sleep(2)   # all in IDLE
        rss = {f"node-{k}": {"rss_kb": vm_rss_kb(p.pid), "peak_kb": vm_hwm_kb(p.pid),
                             "base_kb": base_rss[k], "mailboxes": leases.get(f"node-{k}", 0)}
               for k, p in enumerate(procs)}
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        rest = per - 1
        takeover_s, after = (None, None)
        if rest:
            fair_rest = sorted([n // rest + (1 if k < n % rest else 0) for k in range(rest)])
            takeover_s, (_, after_leases, _) = await wait(
                url, "the takeover", lambda _d, held, _s: "node-0" not in held
                and sorted(held.values()) == fair_rest, args.timeout)
            after = dict(after_leases)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()
        dovecot.stop()
        await pg_database(args.pg_admin, drop=name)
    warnings = sum(1 for k in range(per) for _ in (tmp / f"node-{k}.log").open())
    return {"mailboxes": n, "nodes": per, "messages_per_mailbox": args.messages,
            "lease_ttl": args.lease_ttl, "fill_seconds": round(filled, 1),
            "initial_sync_seconds": round(synced_s, 1), "stored": stored,
            "placement_settled_after_s": round(settle_s, 1), "leases": dict(leases),
            "rss": rss, "rss_per_mailbox_kb": round(
                sum(r["rss_kb"] - r["base_kb"] for r in rss.values()) / n, 1),
            "takeover_seconds": None if takeover_s is None else round(takeover_s, 1),
            "leases_after_kill": after, "node_log_lines": warnings, "node_logs": str(tmp)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mailboxes", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=2, help="per mailbox")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--lease-ttl", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--pg-admin", default=os.environ.get(
        "MAILGW_BENCH_PG", "postgresql://127.0.0.1:5432/test"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--node", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node:
        asyncio.run(node_main(args.node, args.url, args.port, args.mailboxes, args.lease_ttl,
                              args.out))
        return 0
    r = asyncio.run(parent(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['mailboxes']} mailboxes x {r['messages_per_mailbox']} messages, {r['nodes']} nodes, "
          f"one PostgreSQL, lease_ttl {r['lease_ttl']} s (Dovecot filled in {r['fill_seconds']} s)")
    print(f"  initial sync of every mailbox: {r['initial_sync_seconds']} s, "
          f"{r['stored']} messages stored")
    print(f"  leases per node: {r['leases']} (settled {r['placement_settled_after_s']} s after)")
    for node, m in r["rss"].items():
        print(f"  {node}: {m['mailboxes']} mailboxes in IDLE, RSS {m['rss_kb'] / 1024:.1f} MiB "
              f"(before tailing {m['base_kb'] / 1024:.1f} MiB), peak {m['peak_kb'] / 1024:.1f} MiB")
    print(f"  warnings and errors logged by the nodes: {r['node_log_lines']} (in {r['node_logs']})")
    print(f"  RSS per tailed mailbox (above each node's own start): {r['rss_per_mailbox_kb']} KiB")
    if r["takeover_seconds"] is not None:
        print(f"  node-0 killed (SIGKILL): the others hold every lease after "
              f"{r['takeover_seconds']} s (promise: within {2 * r['lease_ttl']:.0f} s): "
              f"{r['leases_after_kill']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
