#!/usr/bin/env python3
"""Chaos benchmark: real faults under load; count what was accepted, delivered, stored, duplicated, lost.

Its one job: run ``python -m gateway run`` (a smarthost route to a counting sink) while a
client sends N messages over a few SMTP sessions, inject one kind of fault, and count.
The client behaves as a sending MTA: a message is done at its ``250`` after DATA;
anything else (a 4xx, a connection that breaks before the answer) is retried on a new
connection, so a message the daemon fsynced whose 250 was lost is sent again (counted
as a duplicate at the sink, which SMTP allows and the gateway cannot prevent). When the
last message is accepted the fault stops and the script waits for the sink to have
every accepted message, stops the daemon with SIGTERM and reads the CRM store.

Scenarios (``--scenario``, default ``kill``; ``all`` runs each in turn):

``kill``            SIGKILL the daemon's process group every `--kill-every` seconds (a random
                    moment in [0.5, 1.5] times it) and start it again at once
``store``           the CRM store is a private PostgreSQL (initdb + pg_ctl on its own port);
                    it is crashed (``pg_ctl stop -m immediate``) `--faults` times under load
                    and started again after `--outage` seconds
``upstream-reset``  the upstream cuts the connection (TCP RST) in the middle of DATA for a
                    random `--reset-rate` of the transactions
``full-disk``       the spool (state_dir) is a small tmpfs, filled to the last byte
                    `--faults` times for `--outage` seconds (the client sees 452 4.3.1)
``imap``            no SMTP: the IMAP tailer's initial sync of `--messages` messages from a
                    private Dovecot, SIGKILLed `--faults` times at random moments and restarted

It prints, per scenario: accepted (250s; for ``imap`` the messages in the mailbox),
delivered (distinct at the sink), duplicated (extra copies at the sink; for ``imap`` extra
store records), **lost** (accepted and never delivered, or for ``imap`` never stored:
must be 0), stored (accepted messages with their CRM record) and CRM records missing.
Exit status 1 when anything accepted was lost or a record is missing.

    python3 bench/chaos.py                               # kill: 3000 messages, a kill every 2 s
    python3 bench/chaos.py --messages 1000 --kill-every 1 --json
    python3 bench/chaos.py --scenario all --messages 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# bench/ goes last (Python put it first, as the script's directory): bench/dkim.py must not
# shadow the dkim package when the imap scenario imports the gateway's IMAP side
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]
sys.path.insert(0, str(ROOT))

#: bench/relay.py (its sink, messages, config and daemon start), a script beside this one
rb: Any = importlib.import_module("relay")

REPLY_TIMEOUT = 20.0


class Daemon:
    """The gateway as a child process group that can be killed and started again."""

    def __init__(self, cfg: Path, log: Path, port: int) -> None:
        self.cfg, self.log, self.port = cfg, log, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.env = env

    async def start(self) -> None:
        self.starts += 1
        log = self.log.with_name(f"{self.log.stem}.{self.starts}.log")
        self.proc = rb.start_gateway(self.cfg, log, self.env)
        proc = self.proc
        if not await rb.wait_port(self.port, time.monotonic() + rb.START_TIMEOUT,
                                  alive=lambda: proc.poll() is None):
            raise RuntimeError(f"the daemon did not start (see {log})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(rb.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


async def send_one(port: int, msg: bytes) -> int:
    """One SMTP transaction; the reply code to the end of DATA (or to the command that
    refused the message), 0 when the connection broke first. Only 250 is done."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(rb.HOST, port), 5.0)
    except (OSError, TimeoutError):
        return 0
    try:
        async def cmd(line: str | bytes) -> int:
            writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
            await writer.drain()
            code, _ = await asyncio.wait_for(rb._reply(reader), REPLY_TIMEOUT)
            return int(code)

        greeting, _ = await asyncio.wait_for(rb._reply(reader), REPLY_TIMEOUT)
        if int(greeting) != 220:
            return int(greeting)
        for line, want in (("EHLO chaos.bench.test", 250), (f"MAIL FROM:<{rb.SENDER}>", 250),
                           (f"RCPT TO:<{rb.RCPT}>", 250), ("DATA", 354)):
            if (code := await cmd(line)) != want:
                return code
        code = await cmd(msg)        # make_message ends with <CRLF>.<CRLF>
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
        return code
    except (OSError, TimeoutError, asyncio.IncompleteReadError, rb.SMTPReplyError, ValueError):
        return 0
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def poll(done: Callable[[], object], timeout: float, interval: float) -> bool:
    """Until `done()` (maybe awaitable) is true or `timeout` seconds passed; whether it is.
    (What it waits on is in another process or in a database: nothing to await.)"""
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if inspect.isawaitable(result):
            result = await result
        if result or time.monotonic() >= deadline:
            return bool(result)
        await asyncio.sleep(interval)


class Client:
    """`sessions` senders working through the messages, each retried until it gets 250."""

    def __init__(self, port: int, messages: list[bytes]) -> None:
        self.port, self.messages = port, messages
        self.pending = list(range(len(messages)))
        self.accepted: set[int] = set()
        self.tried: set[int] = set()
        self.attempts = 0
        self.resent = 0
        self.replies: Counter[int] = Counter()     # what the retried attempts got (0: broken)

    async def _session(self) -> None:
        while self.pending:
            i = self.pending.pop(0)
            self.attempts += 1
            if i in self.tried:
                self.resent += 1
            self.tried.add(i)
            code = await send_one(self.port, self.messages[i])
            if code == 250:
                self.accepted.add(i)
            else:
                self.replies[code] += 1
                self.pending.append(i)
                await asyncio.sleep(0.2)

    async def run(self, sessions: int) -> None:
        await asyncio.gather(*(self._session() for _ in range(sessions)))


class Setup:
    """What a scenario changes around the common run: the store, the spool, the upstream,
    and the fault itself."""

    name = "?"
    store_url: str | None = None       # None: SQLite in the state_dir
    state_dir: Path | None = None      # None: tmp/state
    faults = 0

    async def prepare(self, tmp: Path, args: argparse.Namespace) -> None: ...

    async def inject(self, ctx: Run) -> None:
        """The fault loop; runs until ctx.done is set."""

    def close(self) -> None: ...


class Run:
    """One scenario's moving parts, seen by its fault loop."""

    def __init__(self, args: argparse.Namespace, daemon: Daemon, client: Client,
                 rng: random.Random) -> None:
        self.args, self.daemon, self.client, self.rng = args, daemon, client, rng
        self.done = asyncio.Event()

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True when the run finished meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), seconds)
        return self.done.is_set()

    async def accepted_fraction(self, share: float) -> bool:
        """Wait until `share` of the messages are accepted; True when the run finished first."""
        want = int(len(self.client.messages) * share)
        while len(self.client.accepted) < want:
            if await self.sleep(0.05):
                return True
        return self.done.is_set()


class Kill(Setup):
    name = "kill"

    async def inject(self, ctx: Run) -> None:
        while not await ctx.sleep(ctx.args.kill_every * ctx.rng.uniform(0.5, 1.5)):
            ctx.daemon.kill()
            self.faults += 1
            await ctx.daemon.start()


class StoreCrash(Setup):
    name = "store"

    async def prepare(self, tmp: Path, args: argparse.Namespace) -> None:
        from gateway.crm.migrate import upgrade
        from tests.support.faults import PrivatePostgres, pg_bindir

        bindir = pg_bindir()
        if bindir is None:
            raise Skip("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql "
                       "or, as root, no postgres user to run them as")
        self.pg = PrivatePostgres(bindir).start()
        self.store_url = self.pg.url
        await upgrade(self.pg.url)

    async def inject(self, ctx: Run) -> None:
        for k in range(ctx.args.faults):
            if await ctx.accepted_fraction((k + 1) / (ctx.args.faults + 2)):
                return
            await asyncio.to_thread(self.pg.crash)
            self.faults += 1
            await ctx.sleep(ctx.args.outage)
            await asyncio.to_thread(self.pg.start)

    def close(self) -> None:
        if hasattr(self, "pg"):
            self.pg.close()


class FullDisk(Setup):
    name = "full-disk"

    async def prepare(self, tmp: Path, args: argparse.Namespace) -> None:
        from tests.support.faults import Tmpfs, can_mount

        if not can_mount():
            raise Skip("cannot mount a tmpfs here (needs root)")
        self.fs = Tmpfs(tmp / "state", 32 * 1024 * 1024)
        self.state_dir = self.fs.path
        self.store_url = "sqlite+aiosqlite:///" + str(tmp / "crm.db")   # off the full disk

    async def inject(self, ctx: Run) -> None:
        for k in range(ctx.args.faults):
            if await ctx.accepted_fraction((k + 1) / (ctx.args.faults + 2)):
                return
            await asyncio.to_thread(self.fs.fill)
            self.faults += 1
            await ctx.sleep(ctx.args.outage)
            self.fs.unfill()

    def close(self) -> None:
        if hasattr(self, "fs"):
            self.fs.close()


class UpstreamReset(Setup):
    name = "upstream-reset"


class Skip(Exception):
    """The scenario cannot run on this machine (said why)."""


SETUPS: dict[str, type[Setup]] = {"kill": Kill, "store": StoreCrash, "upstream-reset": UpstreamReset,
                                  "full-disk": FullDisk}
SCENARIOS = [*SETUPS, "imap"]


def _edit_config(cfg: Path, setup: Setup, retry: bool) -> None:
    import yaml

    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    if setup.store_url:
        data["store"] = {"url": setup.store_url}
    if setup.state_dir:
        data["state_dir"] = str(setup.state_dir)
    if retry:   # the reset scenario retries at once rather than on the default schedule
        data.setdefault("delivery", {})["retry"] = {"schedule": ["1s"], "give_up_after": "1h"}
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")


async def run_smtp(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from gateway.passwords import hash_password
    from tests.support.faults import ResettingUpstream

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix=f"mailgw-chaos-{name}-"))
    setup = SETUPS[name]()
    run_id = f"chaos{os.getpid()}{name.replace('-', '')}"
    messages = rb.make_messages(run_id, args.messages, args.size)
    sink: Any = None
    resetting: ResettingUpstream | None = None
    daemon: Daemon | None = None
    try:
        await setup.prepare(tmp, args)
        if name == "upstream-reset":
            resetting = await ResettingUpstream(
                should_reset=lambda: rng.random() < args.reset_rate).start()
            upstream_port = resetting.port
        else:
            sink = rb.Sink("raw")
            upstream_port = sink.port

        def delivered() -> tuple[int, int]:
            if resetting is not None:
                return resetting.distinct, resetting.duplicates
            st = sink.stats(run_id)
            return int(st["count"]), int(st["dups"])

        port = rb.free_port()
        cfg = rb.gateway_config(tmp, port, upstream_port, hash_password(rb.PASSWORD), False, 20)
        _edit_config(cfg, setup, retry=resetting is not None)
        daemon = Daemon(cfg, tmp / "gateway.log", port)
        await daemon.start()
        client = Client(port, messages)
        ctx = Run(args, daemon, client, rng)
        fault = asyncio.create_task(setup.inject(ctx))
        started = time.monotonic()
        await client.run(args.sessions)
        ctx.done.set()
        await fault
        send_seconds = time.monotonic() - started
        await poll(lambda: delivered()[0] >= len(client.accepted), args.deadline, 0.5)
        count, dups = delivered()
        await asyncio.sleep(1.0)   # let the store writer finish before the orderly stop
        exit_code = daemon.stop()
        stored = await _stored(setup.store_url or "sqlite+aiosqlite:///"
                               + str(tmp / "state" / "crm.db"), run_id)
    except Skip as exc:
        return {"scenario": name, "skipped": str(exc)}
    finally:
        if daemon is not None:
            daemon.kill()
        if sink is not None:
            sink.close()
        if resetting is not None:
            await resetting.stop()
        setup.close()
    accepted = len(client.accepted)
    out: dict[str, Any] = {
        "scenario": name, "messages": args.messages, "accepted": accepted,
        "delivered": count, "duplicated": dups, "lost": accepted - min(count, accepted),
        "stored": stored, "crm_records_missing": max(0, accepted - stored),
        "faults": setup.faults if resetting is None else resetting.resets,
        "attempts": client.attempts, "send_seconds": round(send_seconds, 1),
        "resent": client.resent,
        "retried_replies": {str(k): v for k, v in sorted(client.replies.items())},
        "daemon_exit_on_sigterm": exit_code, "temp": str(tmp),
    }
    return out


async def _stored(url: str, run_id: str) -> int:
    """Distinct benchmark messages with a relay record in the CRM store."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.text(
                "SELECT count(DISTINCT m.id) FROM messages m JOIN message_sources s "
                "ON s.message_pk = m.id WHERE s.source = 'relay' AND m.message_id LIKE :p"),
                {"p": f"<bench.{run_id}.%"})).one()
            return int(row[0])
    except (sa.exc.SQLAlchemyError, OSError):
        return 0
    finally:
        await engine.dispose()


async def run_imap(args: argparse.Namespace) -> dict[str, Any]:
    """The tailer's initial sync from a private Dovecot killed `--faults` times."""
    import shutil as _shutil
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from gateway.config import Logging
    from gateway.crm.store import Store
    from gateway.log import setup_logging
    from tests.integration.tailer_support import (
        LEAD,
        account_dict,
        add_contacts,
        make_config,
        new_user,
        stored_ids,
        tailers_for,
    )
    from tests.support.dovecot import Dovecot
    from tests.support.dovecot import message as imap_message

    if _shutil.which("dovecot") is None:
        return {"scenario": "imap", "skipped": "no dovecot binary"}
    setup_logging(Logging(format="console", level="warning"))   # stderr: stdout is the figures
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mailgw-chaos-imap-"))
    n = args.messages
    body = ("lorem ipsum dolor sit amet " * (max(1, args.size // 27)))[:args.size] + "\r\n"
    mids = [f"<chaos-imap-{i}@bench.test>" for i in range(n)]
    kills = 0
    with Dovecot() as dovecot:     # its own directory, readable by the dovecot user
        user = new_user(dovecot)
        now = datetime.now(UTC)
        await asyncio.to_thread(dovecot.fill, user, [
            (imap_message(f"m{i}", sender=LEAD, to=user, message_id=mid, body=body,
                          date=now - timedelta(minutes=n - i)), [], now - timedelta(minutes=n - i))
            for i, mid in enumerate(mids)])
        store = await Store.open(f"sqlite+aiosqlite:///{tmp}/crm.db")
        try:
            await add_contacts(store, LEAD)
            cfg = make_config(tmp, [account_dict(dovecot, user, tmp, sync={"folders": ["INBOX"]})])
            tailers, _ = tailers_for(cfg, store)
            started = time.monotonic()
            await tailers.start()

            async def synced() -> bool:
                cp = await tailers.accounts.checkpoint("rep", "INBOX")
                return cp is not None and cp.initial_done

            try:
                for _ in range(args.faults):
                    await asyncio.sleep(rng.uniform(0.3, 1.5))
                    if await synced():
                        break
                    await asyncio.to_thread(dovecot.kill)
                    kills += 1
                    await asyncio.sleep(args.outage)
                    await asyncio.to_thread(dovecot.start)
                await poll(synced, args.deadline, 0.2)
                seconds = time.monotonic() - started
            finally:
                await tailers.stop()
            got = await stored_ids(store)
            async with store.engine.connect() as conn:
                rows = int((await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar()
                           or 0)
                sightings = int((await conn.execute(sa.text(
                    "SELECT count(*) FROM message_sources WHERE source = 'imap'"))).scalar() or 0)
        finally:
            await store.close()
    stored = len(got & set(mids))
    return {"scenario": "imap", "messages": n, "accepted": n, "delivered": None,
            "duplicated": (rows - len(got)) + (sightings - len(got)), "lost": n - stored,
            "stored": stored, "crm_records_missing": n - stored, "faults": kills,
            "sync_seconds": round(seconds, 1), "temp": str(tmp)}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = SCENARIOS if args.scenario == "all" else [args.scenario]
    out = []
    for name in names:
        r = await (run_imap(args) if name == "imap" else run_smtp(name, args))
        out.append(r)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="kill")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--kill-every", type=float, default=2.0, help="kill: seconds between kills (mean)")
    ap.add_argument("--faults", type=int, default=3,
                    help="store, full-disk, imap: how many times the fault is injected")
    ap.add_argument("--outage", type=float, default=2.0,
                    help="store, full-disk, imap: seconds each fault lasts")
    ap.add_argument("--reset-rate", type=float, default=0.3,
                    help="upstream-reset: share of DATA transactions cut")
    ap.add_argument("--deadline", type=float, default=120.0,
                    help="seconds to wait for the sink after the last acceptance")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-temp", action="store_true")
    args = ap.parse_args()
    if args.messages < 1 or args.faults < 0 or not 0 <= args.reset_rate < 1:
        ap.error("--messages must be at least 1, --faults at least 0, --reset-rate in [0, 1)")
    results = asyncio.run(run(args))
    bad = False
    for r in results:
        if not args.keep_temp and "temp" in r:
            import shutil

            shutil.rmtree(r.pop("temp"), ignore_errors=True)
        bad = bad or bool(r.get("lost")) or bool(r.get("crm_records_missing"))
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        for r in results:
            for k, v in r.items():
                print(f"{k:>32}: {v}")
            print()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
