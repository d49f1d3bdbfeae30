#!/usr/bin/env python3
"""IMAP benchmark: the IMAPClient against mbsync, and the tailer from Dovecot into the store.

Its one job: fill a private Dovecot (tests/support/dovecot.py) with N realistic messages
(multipart/alternative, 5-20 KB, default 10,000), then time how fast one connection of
`gateway.imap.client.IMAPClient` reads them, and print messages/s, MB/s and the
client process's peak RSS (VmHWM) for:

* **headers**: UID SEARCH ALL, then `fetch_headers` (header fields, size, internal date,
  flags; 200 UIDs a FETCH), newest first, as the tailer's header-first pass does;
* **bodies**: `fetch_bodies` (BODY.PEEK[], 50 UIDs a FETCH), bodies dropped;
* **bodies->maildir**: the same, each body written to a file in a local directory
  (no fsync), the closest to what mbsync does;
* **mbsync**: `mbsync` (Debian `isync`) pulling the same INBOX into an empty local
  Maildir (`Sync Pull`, `FSync no`, one connection).

Each client run is a child process (the bench itself re-run with `--client`), so the
peak RSS (VmHWM, sampled and self-reported) is the client's alone. Before the runs, one pass of
`UID FETCH 1:* (FLAGS)` and a header fetch let Dovecot build its index and cache, so
every run sees the same warm server.

Then the IMAP tailer (`gateway.imap.manager` and `gateway.imap.tailer`), end to end into the CRM store:

* **tailer initial sync**: a second mailbox of N messages, half of them from CRM
  contacts, synced by a real `Tailers` manager (history_days 30, header-first, bodies of
  the contacts' half only, parsed in the worker pool, stored with the checkpoint) into
  SQLite and into PostgreSQL (a fresh database on `--pg-admin`, dropped afterwards):
  messages stored per second, messages looked at per second, the child process's peak
  RSS, and the CPU per stored message of the tailer's process, of its parse workers and
  of the PostgreSQL backends serving it. `--parse-workers auto,0` gives a row for each
  setting; `--baseline TREE` adds rows of the mailgw checked out in TREE (a worktree of
  another commit), interleaved with this tree's (`--rounds` times), so that before and
  after share one run of a shared machine;
* **new-mail latency**: `--accounts` (50) mailboxes tailed at once by one manager, all in
  IDLE; then `--latency-messages` (200) messages APPENDed one at a time, round robin,
  timed from the start of the APPEND to the commit of the message in the store: p50,
  p90, p99, max; beside it the server's own floor (APPEND to the EXISTS ending a plain
  IDLE, no tailer: Dovecot batches change notifications for about half a second).

`store.raw` is the default (`disk`: each raw message fsynced to its own file); set
`MAILGW_BENCH_RAW=database` or `none` to see the other storage modes.

It is a benchmark, not a test: it exits 1 only when a run read or stored fewer messages
than expected. Run it from the repository root:

    python3 bench/imap.py                     # 10,000 messages, every row
    python3 bench/imap.py --messages 2000 --json
    python3 bench/imap.py --skip-fetch --skip-latency --stores sqlite
    python3 bench/imap.py --skip-mbsync --keep-temp
    python3 bench/imap.py --skip-latency --baseline ../wt-main --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
USER = "bench@example.test"
PASSWORD = "bench-password"

_WORDS = ("proposal", "pricing", "renewal", "contract", "meeting", "quarterly", "forecast",
          "pipeline", "customer", "support", "onboarding", "invoice", "discount", "schedule",
          "follow-up", "demo", "integration", "account", "manager", "webinar", "licence",
          "upgrade", "timeline", "stakeholder", "feedback", "deadline", "budget")


def make_message(i: int, size: int, when: datetime, rng: random.Random,
                 sender: str | None = None) -> bytes:
    """A multipart/alternative message of roughly `size` bytes, CRLF line ends."""
    words = max(50, (size - 1400) // 14)
    text_lines, html_rows = [], []
    line: list[str] = []
    for _ in range(words // 2):
        line.append(rng.choice(_WORDS))
        if len(line) == 12:
            text_lines.append(" ".join(line))
            html_rows.append(f"<tr><td>{' '.join(line[:6])}</td><td>{' '.join(line[6:])}</td></tr>")
            line = []
    text = "\r\n".join(text_lines)
    html = "<html><body><table>\r\n" + "\r\n".join(html_rows) + "\r\n</table></body></html>"
    boundary = f"b{i:08d}"
    sender = sender or f"sender{i % 97}@customer{i % 13}.example"
    head = (f"Return-Path: <{sender}>\r\n"
            f"Received: from mx.customer{i % 13}.example by mail.example.test; "
            f"{format_datetime(when)}\r\n"
            f"From: Sender {i % 97} <{sender}>\r\n"
            f"To: Bench User <{USER}>\r\n"
            f"Cc: colleague{i % 5}@example.test\r\n"
            f"Subject: Re: {' '.join(rng.choice(_WORDS) for _ in range(5))} #{i}\r\n"
            f"Date: {format_datetime(when)}\r\n"
            f"Message-ID: <bench.{i}@customer{i % 13}.example>\r\n"
            f"In-Reply-To: <bench.{max(i - 1, 0)}@example.test>\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n')
    body = (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
            f"--{boundary}--\r\n")
    return (head + body).encode()


def messages(n: int, seed: int = 1, *, half_from_contacts: bool = False
             ) -> Iterator[tuple[bytes, list[str], datetime]]:
    """N messages over the last ~20 days; with `half_from_contacts`, every even one is from
    one of the CONTACTS and every odd one from a stranger."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=20)
    for i in range(n):
        size = rng.randint(5 * 1024, 20 * 1024)
        when = start + timedelta(seconds=i * 150)
        sender = None
        if half_from_contacts:
            sender = CONTACTS[i % len(CONTACTS)] if i % 2 == 0 else f"stranger{i % 89}@elsewhere.example"
        yield make_message(i, size, when, rng, sender), (["\\Seen"] if i % 3 else []), when


CONTACTS = [f"lead{k}@customer.example" for k in range(0, 400, 2)]


# -- the measured client (runs in a child process) ----------------------------------------

async def client_run(mode: str, host: str, port: int, out_dir: str | None) -> dict[str, Any]:
    from gateway.imap.client import IMAPClient

    base_rss = vm_hwm_kb("self")
    started = time.perf_counter()
    count = 0
    nbytes = 0
    async with IMAPClient(host, port, tls="none", timeout=120) as imap:
        await imap.authenticate_password(USER, PASSWORD)
        await imap.examine("INBOX")
        uids = sorted(await imap.search("ALL"), reverse=True)
        if mode == "headers":
            async for h in imap.fetch_headers(uids):
                count += 1
                nbytes += len(h.header)
        else:
            target = Path(out_dir) if out_dir else None
            async for m in imap.fetch_bodies(uids):
                count += 1
                nbytes += len(m.raw)
                if target is not None:
                    (target / f"{m.uid}.eml").write_bytes(m.raw)
    elapsed = time.perf_counter() - started
    return {"mode": mode, "messages": count, "bytes": nbytes, "seconds": elapsed,
            "base_rss_kb": base_rss, "peak_rss_kb": vm_hwm_kb("self")}


# -- the tailer (runs in a child process) --------------------------------------------------------

TAILER_USER = "tailer@example.test"
LATENCY_USER = "lat{}@example.test"
FLOOR_USER = "floor@example.test"
LEAD = "lead@customer.example"


def bench_config(out_dir: Path, url: str, accounts: list[dict[str, Any]], **sync: Any) -> Any:
    from gateway.config import Config

    (out_dir / "imap.pw").write_text(PASSWORD + "\n")
    return Config.model_validate({
        "hostname": "gw.example.test", "state_dir": str(out_dir / "state"),
        "store": {"url": url, "raw": os.environ.get("MAILGW_BENCH_RAW", "disk")},
        "accounts": accounts, "delivery": {"route": "mx"},
        "sync": {"check_interval": 0.1, "timeout": 120, **sync},
        "logging": {"level": "warning"}, "source": str(out_dir / "gateway.yaml")})


def imap_account(aid: str, user: str, port: int, **sync: Any) -> dict[str, Any]:
    return {"id": aid, "email": user, "imap": {"host": "127.0.0.1", "port": port, "tls": "none"},
            "auth": {"password_file": "imap.pw"}, "sync": {"folders": ["INBOX"], **sync}}


async def open_bench_store(cfg: Any) -> Any:
    from gateway.crm.migrate import upgrade
    from gateway.crm.store import Store

    if cfg.store_url.startswith("postgresql"):
        await upgrade(cfg.store_url)
    return await Store.from_config(cfg)


def quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def tailer_run(port: int, url: str, out_dir: str, parse_workers: str = "") -> dict[str, Any]:
    """The initial sync of TAILER_USER's INBOX through the real tailer into the store."""
    from gateway.crm.contacts import ContactInput, upsert_contacts
    from gateway.imap.manager import Tailers

    quiet_logs()
    out = Path(out_dir)
    sync: dict[str, Any] = {"parse_workers": parse_workers} if parse_workers else {}
    cfg = bench_config(out, url, [imap_account("bench", TAILER_USER, port, history_days=30)], **sync)
    store = await open_bench_store(cfg)
    await upsert_contacts(store, [ContactInput(email=e) for e in CONTACTS])
    base_rss = vm_hwm_kb("self")
    started = time.perf_counter()
    tailers = Tailers(lambda: cfg, store)
    await tailers.start()
    try:
        while True:
            cp = await tailers.accounts.checkpoint("bench", "INBOX")
            if cp is not None and cp.initial_done:
                break
            t = tailers.tailer("bench")
            if t is not None and t.stats.last_error:
                raise RuntimeError(t.stats.last_error)
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        info = await tailers.accounts.sync_info("bench")
        t = tailers.tailer("bench")
        bodies = t.stats.bodies_fetched if t is not None else -1
        server_cpu = await pg_backends_cpu(store) if url.startswith("postgresql") else 0.0
    finally:
        await tailers.stop()
        await store.close()
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"stored": info["totals"]["messages"], "looked_at": info["totals"]["fetched"],
            "skipped": info["totals"]["skipped"], "bodies_fetched": bodies, "seconds": elapsed,
            "base_rss_kb": base_rss, "peak_rss_kb": vm_hwm_kb("self"),
            "cpu_main_s": me.ru_utime + me.ru_stime, "cpu_workers_s": kids.ru_utime + kids.ru_stime,
            "cpu_server_s": server_cpu}


async def pg_backends_cpu(store: Any) -> float:
    """CPU seconds the PostgreSQL backends serving this bench's database have used so far
    (their /proc stat: the server is local)."""
    import sqlalchemy as sa

    async with store.engine.connect() as conn:
        pids = (await conn.execute(sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))).scalars().all()
    return sum(proc_cpu_s(pid) for pid in pids)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc/<pid>/stat; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def latency_run(port: int, url: str, out_dir: str, n_accounts: int, n_messages: int
                      ) -> dict[str, Any]:
    """n_accounts tailed at once, all in IDLE; then APPEND one message at a time to them in
    turn and time APPEND -> committed in the store."""
    import imaplib

    from gateway.crm.contacts import ContactInput, upsert_contacts
    from gateway.imap.manager import Tailers
    from gateway.imap.tailer import TailState

    quiet_logs()
    out = Path(out_dir)
    accounts = [imap_account(f"a{i}", LATENCY_USER.format(i), port, history_days=0)
                for i in range(n_accounts)]
    cfg = bench_config(out, url, accounts, max_connections=n_accounts + 10, poll_interval="30m",
                       lease_ttl="10m")
    store = await open_bench_store(cfg)
    await upsert_contacts(store, [ContactInput(email=LEAD)])
    stored_at: dict[str, float] = {}
    arrived = asyncio.Event()

    def on_stored(_account: str, items: list[Any]) -> None:
        now = time.perf_counter()
        for m in items:
            stored_at.setdefault(m.message_id, now)
        arrived.set()

    tailers = Tailers(lambda: cfg, store, on_stored=on_stored)
    await tailers.start()
    conns: list[imaplib.IMAP4] = []
    latencies: list[float] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            idle = [t for i in range(n_accounts) if (t := tailers.tailer(f"a{i}")) is not None
                    and t.state == TailState.TAIL and t.stats.idles > 0]
            if len(idle) == n_accounts:
                break
            if loop.time() > deadline:
                raise RuntimeError(f"only {len(idle)} of {n_accounts} accounts reached IDLE")
            await asyncio.sleep(0.05)
        for i in range(n_accounts):
            c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
            c.login(LATENCY_USER.format(i), PASSWORD)
            conns.append(c)
        rng = random.Random(3)
        for k in range(n_messages):
            i = k % n_accounts
            mid = f"<lat{k}@bench.example>"
            raw = (f"From: Lead <{LEAD}>\r\nTo: {LATENCY_USER.format(i)}\r\nSubject: ping {k}\r\n"
                   f"Message-ID: {mid}\r\nDate: {format_datetime(datetime.now(UTC))}\r\n"
                   "Content-Type: text/plain\r\n\r\nhello\r\n").encode()
            arrived.clear()
            t0 = time.perf_counter()
            await asyncio.to_thread(conns[i].append, "INBOX", None, None, raw)
            while mid not in stored_at:
                await asyncio.wait_for(arrived.wait(), 30)
                arrived.clear()
            latencies.append(stored_at[mid] - t0)
            await asyncio.sleep(rng.uniform(0.005, 0.03))
    finally:
        for c in conns:
            try:
                c.logout()
            except Exception:
                pass
        await tailers.stop()
        await store.close()
    latencies.sort()
    floor = await idle_floor(port, 20)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p / 100 * (len(latencies) - 1)))]

    return {"accounts": n_accounts, "messages": len(latencies), "p50_ms": pct(50) * 1000,
            "p90_ms": pct(90) * 1000, "p99_ms": pct(99) * 1000, "max_ms": latencies[-1] * 1000,
            "idle_floor_p50_ms": floor * 1000, "peak_rss_kb": vm_hwm_kb("self")}


async def idle_floor(port: int, n: int) -> float:
    """The server's own part: median time from APPEND to the EXISTS that ends a plain IDLE
    (Dovecot batches change notifications for about half a second)."""
    import imaplib

    from gateway.imap.client import IMAPClient

    user = FLOOR_USER
    appender = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    appender.login(user, PASSWORD)
    times: list[float] = []
    async with IMAPClient("127.0.0.1", port, tls="none", timeout=30) as c:
        await c.authenticate_password(user, PASSWORD)
        await c.examine("INBOX")
        for k in range(n):
            task = asyncio.create_task(c.idle(interval=30))
            while not c.idling:  # noqa: ASYNC110 - the client has no "IDLE started" event
                await asyncio.sleep(0.002)
            t0 = time.perf_counter()
            raw = f"From: {LEAD}\r\nSubject: floor {k}\r\n\r\nx\r\n".encode()
            await asyncio.to_thread(appender.append, "INBOX", None, None, raw)
            await task
            times.append(time.perf_counter() - t0)
    appender.logout()
    return sorted(times)[len(times) // 2]


async def pg_database(admin: str, drop: str | None = None) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        if drop:
            await conn.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')
            return drop
        name = f"mailgw_bench_{os.getpid()}_{random.randrange(1 << 30):x}"
        await conn.execute(f'CREATE DATABASE "{name}"')
        return name
    finally:
        await conn.close()



def vm_hwm_kb(pid: int | str) -> int:
    """Peak resident set of a live process (VmHWM in /proc/<pid>/status), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[str, float, int, float]:
    """Run a command; return (stdout, wall seconds, peak RSS kB, CPU seconds).

    The peak is VmHWM sampled every 10 ms (wait4's ru_maxrss would include the RSS this
    parent had when it forked). The mailgw client also reports its own VmHWM at exit.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        peak = 0
        while True:
            peak = max(peak, vm_hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}: {stderr.strip()[-2000:]}")
    return stdout, wall, peak, usage.ru_utime + usage.ru_stime


def mbsync_config(tmp: Path, port: int) -> Path:
    maildir = tmp / "mbsync-maildir"
    maildir.mkdir()
    conf = tmp / "mbsyncrc"
    conf.write_text(f"""FSync no

IMAPAccount bench
Host 127.0.0.1
Port {port}
User {USER}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN
PipelineDepth 50

IMAPStore remote
Account bench

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
Expunge None
SyncState *
CopyArrivalDate yes
""")
    conf.chmod(0o600)
    return conf


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file() and p.parent.name in ("cur", "new"))


def new_store_url(kind: str, tmp: Path, admin: str, created: list[str]) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp}/store-{len(created)}-{random.randrange(1 << 30):x}.db"
    name = asyncio.run(pg_database(admin))
    created.append(name)
    user_host = admin.split("//", 1)[1].rsplit("/", 1)[0]
    return f"postgresql+asyncpg://{user_host}/{name}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--skip-fetch", action="store_true", help="no raw client / mbsync rows")
    ap.add_argument("--skip-mbsync", action="store_true")
    ap.add_argument("--skip-tailer", action="store_true", help="no initial-sync-into-the-store rows")
    ap.add_argument("--skip-latency", action="store_true", help="no new-mail latency rows")
    ap.add_argument("--stores", default="sqlite,postgresql",
                    help="stores for the tailer rows (default: sqlite,postgresql)")
    ap.add_argument("--pg-admin", default=os.environ.get("MAILGW_TEST_PG",
                                                        "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--accounts", type=int, default=50, help="accounts tailed at once (latency)")
    ap.add_argument("--latency-messages", type=int, default=200)
    ap.add_argument("--parse-workers", default="auto",
                    help="sync.parse_workers of the tailer rows; a comma list gives a row for each "
                         "(default: auto)")
    ap.add_argument("--baseline", metavar="TREE",
                    help="also run the tailer rows with the mailgw in TREE (a worktree of another "
                         "commit), interleaved with this one's: before/after in one run")
    ap.add_argument("--rounds", type=int, default=1, help="tailer rows: runs of each, interleaved")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-temp", action="store_true")
    ap.add_argument("--client", choices=["headers", "bodies", "bodies-maildir", "tailer", "latency"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.client in ("tailer", "latency"):
        sys.path.insert(0, args.repo or str(REPO))
        if args.client == "tailer":
            res = asyncio.run(tailer_run(args.port, args.url, args.out,
                                         "" if args.repo else args.parse_workers))
        else:
            res = asyncio.run(latency_run(args.port, args.url, args.out, args.accounts,
                                          args.latency_messages))
        print(json.dumps(res))
        return 0
    if args.client:
        print(json.dumps(asyncio.run(client_run(args.client, "127.0.0.1", args.port, args.out))))
        return 0

    sys.path.insert(0, str(REPO))
    from tests.support.dovecot import Dovecot

    if shutil.which("dovecot") is None:
        print("dovecot is not installed (Debian: dovecot-imapd)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="mailgw-bench-imap-"))
    tmp.chmod(0o755)
    rows: list[dict[str, Any]] = []
    tailer_rows: list[dict[str, Any]] = []
    latency_rows: list[dict[str, Any]] = []
    failed = False
    total_bytes = 0
    databases: list[str] = []
    stores = [x.strip() for x in args.stores.split(",") if x.strip()]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    dc = Dovecot(tmp / "dovecot")
    try:
        dc.start()
        if not args.skip_fetch:
            dc.add_user(USER, PASSWORD)
            t = time.perf_counter()
            n = dc.fill(USER, messages(args.messages))
            total_bytes = sum(p.stat().st_size for p in (dc.mail_dir / USER / "cur").iterdir())
            print(f"filled {n} messages ({total_bytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
            # warm Dovecot's index and header cache, so every run sees the same server
            conn = dc.imap(USER)
            conn.select("INBOX", readonly=True)
            conn.uid("FETCH", "1:*", "(FLAGS)")
            conn.logout()
            warm = [sys.executable, __file__, "--client", "headers", "--port", str(dc.port)]
            run_child(warm, env)

            for mode in ("headers", "bodies", "bodies-maildir"):
                out_dir = None
                if mode == "bodies-maildir":
                    out_dir = tmp / "client-maildir"
                    out_dir.mkdir()
                cmd = [sys.executable, __file__, "--client", mode, "--port", str(dc.port)]
                if out_dir:
                    cmd += ["--out", str(out_dir)]
                print(f"running mailgw {mode} ...", file=sys.stderr)
                out, wall, rss_kb, cpu = run_child(cmd, env)
                res = json.loads(out)
                rows.append({"run": f"mailgw {mode}", "messages": res["messages"],
                             "seconds": res["seconds"], "msgs_per_s": res["messages"] / res["seconds"],
                             "mb_per_s": res["bytes"] / 1e6 / res["seconds"],
                             "peak_rss_mb": max(rss_kb, res["peak_rss_kb"]) / 1024,
                             "rss_after_imports_mb": res["base_rss_kb"] / 1024,
                             "cpu_s": cpu, "process_wall_s": wall})
                failed |= res["messages"] != n

            if not args.skip_mbsync:
                if shutil.which("mbsync") is None:
                    print("mbsync is not installed (Debian: isync)", file=sys.stderr)
                    failed = True
                else:
                    conf = mbsync_config(tmp, dc.port)
                    print("running mbsync ...", file=sys.stderr)
                    _, wall, rss_kb, cpu = run_child(["mbsync", "-q", "-c", str(conf), "bench"],
                                                     {**os.environ, "HOME": str(tmp)})
                    got = count_files(tmp / "mbsync-maildir")
                    rows.append({"run": "mbsync (isync) pull", "messages": got, "seconds": wall,
                                 "msgs_per_s": got / wall, "mb_per_s": total_bytes / 1e6 / wall,
                                 "peak_rss_mb": rss_kb / 1024, "rss_after_imports_mb": None,
                                 "cpu_s": cpu, "process_wall_s": wall})
                    failed |= got != n

        if not args.skip_tailer:
            dc.add_user(TAILER_USER, PASSWORD)
            n = dc.fill(TAILER_USER, messages(args.messages, seed=2, half_from_contacts=True))
            conn = dc.imap(TAILER_USER)               # let Dovecot index it before the clock runs
            conn.select("INBOX", readonly=True)
            conn.uid("FETCH", "1:*", "(FLAGS)")
            conn.logout()
            variants: list[tuple[str, str | None, str]] = [
                (f"mailgw, parse_workers {w}", None, w)
                for w in (x.strip() for x in args.parse_workers.split(",")) if w]
            if args.baseline:
                variants.append((f"baseline {Path(args.baseline).name}", args.baseline, ""))
            for round_ in range(args.rounds):
                for kind in stores:
                    for label, repo, workers in variants:   # interleaved: the machine is shared
                        url = new_store_url(kind, tmp, args.pg_admin, databases)
                        out_dir = tmp / f"tailer-{kind}-{len(tailer_rows)}"
                        out_dir.mkdir()
                        print(f"running the tailer's initial sync into {kind} ({label}, round "
                              f"{round_ + 1}) ...", file=sys.stderr)
                        cmd = [sys.executable, __file__, "--client", "tailer", "--port", str(dc.port),
                               "--url", url, "--out", str(out_dir), "--parse-workers", workers]
                        child_env = env
                        if repo:
                            cmd += ["--repo", repo]
                            child_env = {**env, "PYTHONPATH": repo}
                        out, wall, rss_kb, cpu = run_child(cmd, child_env)
                        res = json.loads(out)
                        stored = max(1, res["stored"])
                        tailer_rows.append({
                            "store": kind, "run": label, "mailbox": n, "stored": res["stored"],
                            "looked_at": res["looked_at"], "bodies": res["bodies_fetched"],
                            "seconds": res["seconds"], "stored_per_s": res["stored"] / res["seconds"],
                            "looked_at_per_s": res["looked_at"] / res["seconds"],
                            "peak_rss_mb": max(rss_kb, res["peak_rss_kb"]) / 1024,
                            "rss_after_imports_mb": res["base_rss_kb"] / 1024, "cpu_s": cpu,
                            "cpu_ms_main": res.get("cpu_main_s", cpu) * 1000 / stored,
                            "cpu_ms_workers": res.get("cpu_workers_s", 0.0) * 1000 / stored,
                            "cpu_ms_server": res.get("cpu_server_s", 0.0) * 1000 / stored})
                        failed |= res["stored"] != (n + 1) // 2 or res["bodies_fetched"] != (n + 1) // 2

        if not args.skip_latency:
            for i in range(args.accounts):
                dc.add_user(LATENCY_USER.format(i), PASSWORD)
            dc.add_user(FLOOR_USER, PASSWORD)
            for kind in stores:
                url = new_store_url(kind, tmp, args.pg_admin, databases)
                out_dir = tmp / f"latency-{kind}"
                out_dir.mkdir()
                print(f"running new-mail latency with {args.accounts} accounts into {kind} ...",
                      file=sys.stderr)
                out, wall, rss_kb, cpu = run_child(
                    [sys.executable, __file__, "--client", "latency", "--port", str(dc.port),
                     "--url", url, "--out", str(out_dir), "--accounts", str(args.accounts),
                     "--latency-messages", str(args.latency_messages)], env)
                res = json.loads(out)
                latency_rows.append({"store": kind, **res,
                                     "peak_rss_mb": max(rss_kb, res["peak_rss_kb"]) / 1024,
                                     "cpu_s": cpu})
                failed |= res["messages"] != args.latency_messages
    finally:
        dc.stop()
        for name in databases:
            try:
                asyncio.run(pg_database(args.pg_admin, drop=name))
            except Exception as exc:
                print(f"could not drop {name}: {exc}", file=sys.stderr)
        if args.keep_temp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = {"messages": args.messages, "mailbox_mb": round(total_bytes / 1e6, 1),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "tailer": tailer_rows,
                          "latency": latency_rows}, indent=2))
        return 1 if failed else 0
    print(f"{meta['messages']} messages ({meta['mailbox_mb']} MB for the fetch rows), "
          f"{meta['cpus']} CPUs, Python {meta['python']}; Dovecot on loopback")
    if rows:
        print(f"{'run':<24}{'msgs':>7}{'seconds':>9}{'msgs/s':>9}{'MB/s':>8}{'peak RSS MB':>13}{'CPU s':>8}")
        for r in rows:
            print(f"{r['run']:<24}{r['messages']:>7}{r['seconds']:>9.2f}{r['msgs_per_s']:>9.0f}"
                  f"{r['mb_per_s']:>8.1f}{r['peak_rss_mb']:>13.1f}{r['cpu_s']:>8.2f}")
        print("mailgw rows: time from connect to the last message (process start-up excluded); "
              "peak RSS of the client process (Python start-up and imports are "
              f"~{rows[0]['rss_after_imports_mb']:.0f} MB of it). mbsync: whole process.")
    if tailer_rows:
        print("\ninitial sync through the tailer into the store (half of the mailbox from contacts; "
              "header-first, bodies only of what is stored):")
        print(f"{'store':<12}{'run':<30}{'mailbox':>8}{'stored':>7}{'seconds':>8}{'stored/s':>9}"
              f"{'looked at/s':>12}{'peak RSS MB':>12}  CPU ms per stored: main workers server")
        for r in tailer_rows:
            print(f"{r['store']:<12}{r['run']:<30}{r['mailbox']:>8}{r['stored']:>7}{r['seconds']:>8.2f}"
                  f"{r['stored_per_s']:>9.0f}{r['looked_at_per_s']:>12.0f}{r['peak_rss_mb']:>12.1f}"
                  f"{r['cpu_ms_main']:>26.2f}{r['cpu_ms_workers']:>8.2f}{r['cpu_ms_server']:>7.2f}")
        print("CPU per stored message: main = the tailer's process (start-up and imports "
              "included), workers = its parse workers, server = the PostgreSQL backends of its "
              "connections; peak RSS: the tailer's process alone")
        fetch = {r["run"]: r["msgs_per_s"] for r in rows}
        if fetch:
            beside = ", ".join(f"{k} {v:,.0f} msg/s" for k, v in fetch.items()
                               if k in ("mailgw bodies", "mbsync (isync) pull"))
            print(f"beside it, the same client's raw fetch and mbsync of a mailbox of the same "
                  f"size: {beside}")
    if latency_rows:
        print(f"\nnew mail, APPEND to committed in the store, {args.accounts} accounts in IDLE at once "
              "(one message at a time, round robin):")
        print(f"{'store':<12}{'msgs':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'peak RSS MB':>13}{'server floor p50 ms':>21}")
        for r in latency_rows:
            print(f"{r['store']:<12}{r['messages']:>6}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{r['peak_rss_mb']:>13.1f}"
                  f"{r['idle_floor_p50_ms']:>21.1f}")
        print("server floor: APPEND to the EXISTS ending a plain IDLE, no tailer (Dovecot batches "
              "its change notifications for ~0.5 s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
