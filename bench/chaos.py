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

``kill``            SIGKILL the daemon's process group and start it again at once: first when
                    `--kill-first` of the messages are accepted (default 10 %), then whenever
                    `--kill-every` seconds passed or another `--kill-step` of the messages were
                    accepted, whichever comes first (each a random [0.5, 1.5] times it), so a
                    fast run gets its kills too
``store``           the CRM store is a private PostgreSQL (initdb + pg_ctl on its own port);
                    it is crashed (``pg_ctl stop -m immediate``) `--faults` times under load
                    and started again after `--outage` seconds
``upstream-reset``  the upstream cuts the connection (TCP RST) in the middle of DATA for a
                    random `--reset-rate` of the transactions
``full-disk``       the spool (state_dir) is a small tmpfs, filled to the last byte
                    `--faults` times for `--outage` seconds (the client sees 452 4.3.1)
``webhook``         a webhook receiver (``message.stored``) refuses connections `--faults` times
                    for `--outage` seconds under load, then comes back: every stored message's
                    webhook must arrive, exactly once
``imap``            no SMTP: the IMAP tailer's initial sync of `--messages` messages from a
                    private Dovecot, SIGKILLed `--faults` times at random moments and restarted

It prints, per scenario: accepted (250s; for ``imap`` the messages in the mailbox),
delivered (distinct at the sink), duplicated (extra copies at the sink; for ``imap`` extra
store records), **lost** (accepted and never delivered, or for ``imap`` never stored:
must be 0), stored (accepted messages with their CRM record), CRM records missing
(accepted, no record), **events missing** (delivered messages whose record lacks the
recipient's ``queued`` event or its ``sent``/``bounced`` one), events duplicated (more
``sent`` events for the recipient than the record has ``queued`` ones), the faults
injected and, for ``webhook``, the webhooks received, missing and duplicated; with more
than one scenario a ``total`` row sums them. Exit status 1 when anything accepted was
lost, a record, an event or a webhook is missing, a webhook came twice, or a scenario
that ran injected no fault at all (a warning on stderr says which).

    python3 bench/chaos.py                      # kill: 3000 messages; from 10 % on, every 2 s or 10 %
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
    config: dict[str, Any] = {}        # more top-level config keys
    faults = 0

    async def prepare(self, tmp: Path, args: argparse.Namespace) -> None: ...

    async def inject(self, ctx: Run) -> None:
        """The fault loop; runs until ctx.done is set."""

    def close(self) -> None: ...

    async def aclose(self) -> None:
        self.close()


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
        """Kills scheduled by the share of messages accepted (and by time after the first),
        never by time alone: a run faster than `--kill-every` still gets killed."""
        n = len(ctx.client.messages)
        if await ctx.accepted_fraction(ctx.args.kill_first):
            return
        while True:
            ctx.daemon.kill()
            self.faults += 1
            await ctx.daemon.start()
            step = max(1, round(n * ctx.args.kill_step * ctx.rng.uniform(0.5, 1.5)))
            target = len(ctx.client.accepted) + step
            until = (time.monotonic() + ctx.args.kill_every * ctx.rng.uniform(0.5, 1.5)
                     if ctx.args.kill_every > 0 else float("inf"))
            while len(ctx.client.accepted) < target and time.monotonic() < until:
                if await ctx.sleep(0.05):
                    return
            if ctx.done.is_set():
                return


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


class WebhookDown(Setup):
    """A webhook receiver that refuses connections for a while, then comes back."""

    name = "webhook"
    SECRET = b"chaos-webhook-secret-0123456789"

    async def prepare(self, tmp: Path, args: argparse.Namespace) -> None:
        from tests.support.receiver import Receiver

        secret = tmp / "webhook.secret"
        secret.write_bytes(self.SECRET)
        self.receiver: Any = await Receiver(self.SECRET).start()
        self.config = {"webhooks": [{"url": self.receiver.url, "secret_file": str(secret),
                                     "events": ["message.stored"], "timeout": "5s",
                                     "retry_initial": "1s", "retry_max": "2s"}]}

    async def inject(self, ctx: Run) -> None:
        for k in range(ctx.args.faults):
            if await ctx.accepted_fraction((k + 1) / (ctx.args.faults + 2)):
                return
            await self.receiver.stop()          # connection refused from now on
            self.faults += 1
            await ctx.sleep(ctx.args.outage)
            await self.receiver.start()         # the same port again

    def counts(self) -> tuple[set[str], int]:
        """Message-IDs announced by a processed ``message.stored``, and the extra
        deliveries of an id already processed (a 2xx for a delivery seen before)."""
        mids = {str(p["data"]["message"]["message_id"]) for p in self.receiver.processed.values()}
        ok = Counter(a.delivery for a in self.receiver.attempts if a.status == 200 and a.signed_ok)
        return mids, sum(c - 1 for c in ok.values())

    async def aclose(self) -> None:
        if hasattr(self, "receiver"):
            await self.receiver.stop()


class Skip(Exception):
    """The scenario cannot run on this machine (said why)."""


SETUPS: dict[str, type[Setup]] = {"kill": Kill, "store": StoreCrash, "upstream-reset": UpstreamReset,
                                  "full-disk": FullDisk, "webhook": WebhookDown}
SCENARIOS = [*SETUPS, "imap"]


def _edit_config(cfg: Path, setup: Setup, retry: bool) -> None:
    import yaml

    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    if setup.store_url:
        data["store"] = {"url": setup.store_url}
    if setup.state_dir:
        data["state_dir"] = str(setup.state_dir)
    data.update(setup.config)
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

        def delivered_numbers() -> set[int]:
            """The message numbers the upstream received (the index in the Message-ID)."""
            if resetting is not None:
                return {n for mid in resetting.received if (n := _number(mid, run_id)) is not None}
            return {int(i) for i in sink.stats(run_id, seen=True)["seen"]}

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
        numbers = delivered_numbers()
        url = setup.store_url or "sqlite+aiosqlite:///" + str(tmp / "state" / "crm.db")
        hooks: dict[str, Any] = {}
        if isinstance(setup, WebhookDown):
            # every stored message's webhook, once the receiver is back (retry_max 2 s)
            async def announced() -> bool:
                mids = (await _records(url, run_id))[1]
                return mids <= setup.counts()[0]
            await poll(announced, args.deadline, 0.5)
        await asyncio.sleep(1.0)   # let the store writer finish before the orderly stop
        exit_code = daemon.stop()
        records = await _records(url, run_id)
        stored, events_missing, events_dup = _event_counts(records[0], numbers)
        if isinstance(setup, WebhookDown):
            got, extra = setup.counts()
            hooks = {"webhooks": len(got & records[1]),
                     "webhooks_missing": len(records[1] - got), "webhooks_duplicated": extra}
    except Skip as exc:
        return {"scenario": name, "skipped": str(exc)}
    finally:
        if daemon is not None:
            daemon.kill()
        if sink is not None:
            sink.close()
        if resetting is not None:
            await resetting.stop()
        await setup.aclose()
    accepted = len(client.accepted)
    out: dict[str, Any] = {
        "scenario": name, "messages": args.messages, "accepted": accepted,
        "delivered": count, "duplicated": dups, "lost": accepted - min(count, accepted),
        "stored": stored, "crm_records_missing": max(0, accepted - stored),
        "events_missing": events_missing, "events_duplicated": events_dup, **hooks,
        "faults": setup.faults if resetting is None else resetting.resets,
        "attempts": client.attempts, "send_seconds": round(send_seconds, 1),
        "resent": client.resent,
        "retried_replies": {str(k): v for k, v in sorted(client.replies.items())},
        "daemon_exit_on_sigterm": exit_code, "temp": str(tmp),
    }
    return out


def _number(message_id: str, run_id: str) -> int | None:
    """The message number in a benchmark Message-ID ``<bench.RUN.N.HEX@...>``."""
    prefix = f"<bench.{run_id}."
    if not message_id.startswith(prefix):
        return None
    head = message_id[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


Records = dict[int, Counter[str]]
"""Per message number with a relay record: how many ``queued``, ``sent`` and ``bounced``
events its record has for the benchmark's envelope recipient (key ``type``)."""


async def _records(url: str, run_id: str) -> tuple[Records, set[str]]:
    """The benchmark messages with a relay record in the CRM store and their delivery
    events for the recipient, and their Message-IDs."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    out: Records = {}
    mids: set[str] = set()
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text(
                "SELECT m.message_id, e.type, e.recipient FROM messages m "
                "LEFT JOIN events e ON e.message_pk = m.id "
                "AND e.type IN ('queued', 'sent', 'bounced') "
                "WHERE m.message_id LIKE :p AND EXISTS (SELECT 1 FROM message_sources s "
                "WHERE s.message_pk = m.id AND s.source = 'relay')"),
                {"p": f"<bench.{run_id}.%"})).all()
    except (sa.exc.SQLAlchemyError, OSError):
        return out, mids
    finally:
        await engine.dispose()
    for mid, kind, rcpt in rows:
        n = _number(mid, run_id)
        if n is None:
            continue
        mids.add(mid)
        counts = out.setdefault(n, Counter())
        if kind is not None and (rcpt or "").lower() == rb.RCPT:
            counts[kind] += 1
    return out, mids


def _event_counts(records: Records, delivered: set[int]) -> tuple[int, int, int]:
    """Records stored; delivered messages whose record lacks the recipient's ``queued`` or
    both its ``sent`` and ``bounced`` events (events missing); records with more ``sent``
    events than ``queued`` ones (events duplicated: one per copy the client sent)."""
    missing = sum(1 for n in delivered if n in records
                  and (not records[n]["queued"] or not (records[n]["sent"] or records[n]["bounced"])))
    duplicated = sum(1 for c in records.values() if c["sent"] > max(1, c["queued"]))
    return len(records), missing, duplicated


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
            "stored": stored, "crm_records_missing": n - stored, "events_missing": None,
            "events_duplicated": None, "faults": kills,
            "sync_seconds": round(seconds, 1), "temp": str(tmp)}


#: a non-zero count of any of these fails the run
FAILING = ("lost", "crm_records_missing", "events_missing", "webhooks_missing",
           "webhooks_duplicated")
#: summed over the scenarios that ran in the ``total`` row
SUMMED = ("accepted", "delivered", "duplicated", "lost", "stored", "crm_records_missing",
          "events_missing", "events_duplicated", "webhooks", "webhooks_missing",
          "webhooks_duplicated", "faults")


def total(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``total`` row: each count summed over the scenarios that ran (None: not counted)."""
    ran = [r for r in results if "skipped" not in r]
    return {"scenario": "total", "ran": len(ran), "skipped": len(results) - len(ran),
            **{k: sum(int(r.get(k) or 0) for r in ran) for k in SUMMED}}


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
    ap.add_argument("--kill-first", type=float, default=0.1,
                    help="kill: the first kill once this share of the messages is accepted")
    ap.add_argument("--kill-every", type=float, default=2.0,
                    help="kill: then a kill after this many seconds (mean; 0: by share only) ...")
    ap.add_argument("--kill-step", type=float, default=0.1,
                    help="kill: ... or once another this share of the messages is accepted (mean)")
    ap.add_argument("--faults", type=int, default=3,
                    help="store, full-disk, webhook, imap: how many times the fault is injected")
    ap.add_argument("--outage", type=float, default=2.0,
                    help="store, full-disk, webhook, imap: seconds each fault lasts")
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
    if not 0 < args.kill_first < 1 or not 0 < args.kill_step <= 1 or args.kill_every < 0:
        ap.error("--kill-first must be in (0, 1), --kill-step in (0, 1], --kill-every at least 0")
    results = asyncio.run(run(args))
    bad = False
    for r in results:
        if not args.keep_temp and "temp" in r:
            import shutil

            shutil.rmtree(r.pop("temp"), ignore_errors=True)
        bad = bad or any(bool(r.get(k)) for k in FAILING)
        if "skipped" not in r and not r.get("faults"):
            print(f"chaos: WARNING: scenario {r['scenario']} injected no fault: it proves nothing",
                  file=sys.stderr)
            bad = True
    if len(results) > 1:
        results.append(total(results))
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
