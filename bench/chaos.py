#!/usr/bin/env python3
"""Chaos benchmark: kill -9 the daemon at random moments under load; count what was lost or duplicated.

Its one job: run ``python -m gateway run`` (SQLite store, smarthost route to the counting
sink of ``bench/relay.py`` in its own process) while a client sends N messages over a
few SMTP sessions, and SIGKILL the daemon's process group every `--kill-every` seconds
(a random moment in ``[0.5, 1.5] times kill-every``), restarting it at once. The client
behaves as a sending MTA: a message is done at its ``250`` after DATA; a connection that
breaks before that answer is retried on a new connection (so a message the daemon
fsynced whose 250 was lost is sent again: counted as a duplicate at the sink, which
SMTP allows and the gateway cannot prevent). After the last message is accepted the
killing stops and the script waits for the sink to have every accepted message, then
stops the daemon with SIGTERM and reads the CRM store.

It prints: messages accepted, kills, delivered (distinct at the sink), duplicates at
the sink (and how many of them follow a lost 250), **lost** (accepted and never
delivered: must be 0), stored (accepted messages with their relay record in the CRM
store) and the CRM records missing. Exit status 1 when anything accepted was lost.

    python3 bench/chaos.py                               # 3000 messages, a kill every 2 s
    python3 bench/chaos.py --messages 1000 --kill-every 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
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


async def send_one(port: int, msg: bytes) -> bool:
    """One SMTP transaction; True at 250 after DATA, False when it must be retried."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(rb.HOST, port), 5.0)
    except (OSError, TimeoutError):
        return False
    try:
        async def cmd(line: str | bytes) -> int:
            writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
            await writer.drain()
            code, _ = await asyncio.wait_for(rb._reply(reader), REPLY_TIMEOUT)
            return int(code)

        code, _ = await asyncio.wait_for(rb._reply(reader), REPLY_TIMEOUT)
        if code != 220 or await cmd("EHLO chaos.bench.test") != 250:
            return False
        if await cmd(f"MAIL FROM:<{rb.SENDER}>") != 250 or await cmd(f"RCPT TO:<{rb.RCPT}>") != 250:
            return False
        if await cmd("DATA") != 354:
            return False
        ok = await cmd(msg) == 250      # make_message ends with <CRLF>.<CRLF>
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
        return ok
    except (OSError, TimeoutError, asyncio.IncompleteReadError, rb.SMTPReplyError, ValueError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.passwords import hash_password

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mailgw-chaos-"))
    sink = rb.Sink("raw")
    port = rb.free_port()
    cfg = rb.gateway_config(tmp, port, sink.port, hash_password(rb.PASSWORD), False, 20)
    daemon = Daemon(cfg, tmp / "gateway.log", port)
    run_id = f"chaos{os.getpid()}"
    messages = rb.make_messages(run_id, args.messages, args.size)
    pending = list(range(args.messages))
    accepted: set[int] = set()
    attempts = 0
    resent_after_lost_reply = 0
    tried: set[int] = set()
    kills = 0
    done = asyncio.Event()
    try:
        await daemon.start()

        async def killer() -> None:
            nonlocal kills
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), args.kill_every * rng.uniform(0.5, 1.5))
                if done.is_set():
                    return
                daemon.kill()
                kills += 1
                await daemon.start()

        async def client() -> None:
            nonlocal attempts, resent_after_lost_reply
            while pending:
                i = pending.pop(0)
                attempts += 1
                if i in tried:
                    resent_after_lost_reply += 1
                tried.add(i)
                if await send_one(port, messages[i]):
                    accepted.add(i)
                else:
                    pending.append(i)
                    await asyncio.sleep(0.2)

        killing = asyncio.create_task(killer())
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(args.sessions)))
        done.set()
        await killing
        send_seconds = time.monotonic() - started
        deadline = time.monotonic() + args.deadline
        while time.monotonic() < deadline:
            st = sink.stats(run_id)
            if st["count"] >= len(accepted):
                break
            await asyncio.sleep(0.5)
        st = sink.stats(run_id)
        # let the store writer finish before the orderly stop
        await asyncio.sleep(1.0)
        exit_code = daemon.stop()
        stored = _stored(tmp / "state" / "crm.db", run_id)
    finally:
        daemon.kill()
        sink.close()
    delivered = int(st["count"])
    return {
        "messages": args.messages, "accepted": len(accepted), "attempts": attempts,
        "kills": kills, "send_seconds": round(send_seconds, 1),
        "delivered": delivered, "duplicates": int(st["dups"]),
        "retried_after_a_broken_session": resent_after_lost_reply,
        "lost": len(accepted) - min(delivered, len(accepted)),
        "stored": stored, "crm_records_missing": max(0, len(accepted) - stored),
        "daemon_exit_on_sigterm": exit_code, "temp": str(tmp),
    }


def _stored(db: Path, run_id: str) -> int:
    """Distinct benchmark messages with a relay record in the CRM store."""
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT m.id) FROM messages m JOIN message_sources s "
                "ON s.message_pk = m.id WHERE s.source = 'relay' AND m.message_id LIKE ?",
                (f"<bench.{run_id}.%",)).fetchone()
            return int(row[0])
    except sqlite3.Error:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--kill-every", type=float, default=2.0, help="seconds between kills (mean)")
    ap.add_argument("--deadline", type=float, default=120.0,
                    help="seconds to wait for the sink after the last acceptance")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-temp", action="store_true")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    if not args.keep_temp:
        import shutil

        shutil.rmtree(r["temp"], ignore_errors=True)
        r.pop("temp")
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        for k, v in r.items():
            print(f"{k:>32}: {v}")
    return 1 if r["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
