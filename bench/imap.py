#!/usr/bin/env python3
"""IMAP fetch benchmark: mailgw's IMAPClient against mbsync, same mailbox, same Dovecot.

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

It is a benchmark, not a test: it exits 1 only when a run read fewer messages than
there are. Run it from the repository root:

    python3 bench/imap.py                     # 10,000 messages
    python3 bench/imap.py --messages 2000 --json
    python3 bench/imap.py --skip-mbsync --keep-temp
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


def make_message(i: int, size: int, when: datetime, rng: random.Random) -> bytes:
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
    head = (f"Return-Path: <sender{i % 97}@customer{i % 13}.example>\r\n"
            f"Received: from mx.customer{i % 13}.example by mail.example.test; "
            f"{format_datetime(when)}\r\n"
            f"From: Sender {i % 97} <sender{i % 97}@customer{i % 13}.example>\r\n"
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


def messages(n: int, seed: int = 1) -> Iterator[tuple[bytes, list[str], datetime]]:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=20)
    for i in range(n):
        size = rng.randint(5 * 1024, 20 * 1024)
        when = start + timedelta(seconds=i * 150)
        yield make_message(i, size, when, rng), (["\\Seen"] if i % 3 else []), when


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--skip-mbsync", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-temp", action="store_true")
    ap.add_argument("--client", choices=["headers", "bodies", "bodies-maildir"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

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
    failed = False
    dc = Dovecot(tmp / "dovecot")
    try:
        dc.start()
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
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
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
    finally:
        dc.stop()
        if args.keep_temp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = {"messages": args.messages, "mailbox_mb": round(total_bytes / 1e6, 1),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(f"{meta['messages']} messages, {meta['mailbox_mb']} MB in the mailbox, "
              f"{meta['cpus']} CPUs, Python {meta['python']}; one IMAP connection, loopback")
        print(f"{'run':<24}{'msgs':>7}{'seconds':>9}{'msgs/s':>9}{'MB/s':>8}{'peak RSS MB':>13}{'CPU s':>8}")
        for r in rows:
            print(f"{r['run']:<24}{r['messages']:>7}{r['seconds']:>9.2f}{r['msgs_per_s']:>9.0f}"
                  f"{r['mb_per_s']:>8.1f}{r['peak_rss_mb']:>13.1f}{r['cpu_s']:>8.2f}")
        print("mailgw rows: time from connect to the last message (process start-up excluded); "
              "peak RSS of the client process (Python start-up and imports are "
              f"~{rows[0]['rss_after_imports_mb']:.0f} MB of it). mbsync: whole process.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
