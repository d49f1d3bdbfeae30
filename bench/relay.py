#!/usr/bin/env python3
"""Relay benchmark: mailgw against Postfix, same load, same sink, figures on stdout.

Its one job: push N ~10 KB HTML messages (multipart/alternative, one recipient) over
20 concurrent SMTP sessions through the gateway (`python -m gateway run`) to a
counting sink in its own process, and print accepted/s, delivered/s end to end, p50/p99
accept latency, CPU per message (split by process, and with --profile by pipeline stage)
and the daemon's peak RSS; first with the full outbound pipeline (tracking with five
links, pixel, DKIM, CRM record), then as a plain relay; then the same load through a
private Postfix instance relaying to the same sink, and the ratios gateway/Postfix.
A third row, the client talking to the sink directly, shows the ceiling the client
and sink impose on this machine.

It is a benchmark, not a test: nothing is asserted except that every accepted
message reached the sink (the exit status is 1 when a run lost or rejected mail,
the gateway did not exit 0 on SIGTERM, or Postfix could not be run).

Run it from anywhere as root (Postfix needs root; the gateway half does not):

    python3 bench/relay.py                       # 2000 messages, gateway + Postfix
    python3 bench/relay.py --messages 5000 --json
    python3 bench/relay.py --skip-postfix --auth # gateway with AUTH PLAIN per session

Everything listens on 127.0.0.1 on free ports; state lives in a temporary directory
that is removed on exit (keep it with --keep-temp). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SENDER = "bench@example.org"
PASSWORD = "bench-password"
RCPT = "rcpt@example.net"
REPLY_TIMEOUT = 60.0          # one SMTP reply from the server under test
START_TIMEOUT = 30.0          # a daemon's port must accept connections by then
STOP_TIMEOUT = 15.0           # SIGTERM -> exit
SAMPLE_EVERY = 0.25           # memory sampling interval (seconds)
PROFILE_RATE = 199            # py-spy samples per second (--profile)


# ----------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, deadline: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll until 127.0.0.1:port accepts a connection, `alive()` turns false, or the deadline."""
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return True
    return False


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def proc_status_kb(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of `root` and its descendants, including their reaped
    children."""
    if root is None:
        return 0.0, 0.0
    user = system = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ut, st, cut, cst = (int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            continue
        user += ut + cut
        system += st + cst
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


class PeriodicSampler:
    """Calls :meth:`sample` every SAMPLE_EVERY seconds between start() and stop() (and
    once more at stop)."""

    _task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sample()


class MemorySampler(PeriodicSampler):
    """Samples the summed RSS and PSS of a process tree every SAMPLE_EVERY seconds; keeps the peaks."""

    def __init__(self, root_pid: Callable[[], int | None]) -> None:
        self._root_pid = root_pid
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        root = self._root_pid()
        if root is None:
            return
        pids = process_tree(root)
        rss = sum(proc_status_kb(p, "VmRSS") or 0 for p in pids)
        pss = sum(proc_pss_kb(p) or 0 for p in pids)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_processes = max(self.peak_processes, len(pids))



class CpuSplitSampler(PeriodicSampler):
    """CPU per process (and, within one process, per thread) of a tree, by name.

    Every thread of every process in the tree is sampled every SAMPLE_EVERY seconds;
    a thread's CPU is its last sample minus its first (0 for one born after `start`).
    Postfix's short-lived children count up to their last sample. Names are the
    process's `comm` (``smtpd``, ``cleanup``, ``qmgr`` ...) and, for threads other than
    a process's main one, ``comm/thread-comm`` (``python3/asyncio_0``)."""

    def __init__(self, root_pid: Callable[[], int | None]) -> None:
        self._root_pid = root_pid
        self._first: dict[tuple[int, int], float] = {}  # CPU seconds at the first sample
        self._last: dict[tuple[int, int], tuple[str, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = False

    @staticmethod
    def _read(path: str) -> tuple[str, float] | None:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            return None
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        try:
            return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (ValueError, IndexError):
            return None

    def sample(self) -> None:
        root = self._root_pid()
        if root is None:
            return
        for pid in process_tree(root):
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            main = self._read(f"/proc/{pid}/stat")
            for tid in tids:
                got = self._read(f"/proc/{pid}/task/{tid}/stat")
                if got is None or main is None:
                    continue
                name = main[0] if tid == pid else f"{main[0]}/{got[0]}"
                key = (pid, tid)
                if key not in self._first:
                    self._first[key] = got[1] if not self._started else 0.0
                self._last[key] = (name, got[1])

    def start(self) -> None:
        self.sample()
        self._started = True
        super().start()

    def split(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, (name, last) in self._last.items():
            out[name] = out.get(name, 0.0) + max(0.0, last - self._first.get(key, 0.0))
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Profiler:
    """`py-spy record` (collapsed stacks) of a running process until `stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        exe = shutil.which("py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        if exe is None:
            self.log.write_text("py-spy not found (pip install py-spy)")
            return
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--format", "raw",
                 "--gil", "--nonblocking", "--output", str(out)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> dict[str, int]:
        """Stop sampling; the collapsed stacks (frames root first) and their sample counts."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        stacks: dict[str, int] = {}
        with contextlib.suppress(OSError), open(self.out, encoding="utf-8", errors="replace") as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if stack and n.isdigit():
                    stacks[stack] = stacks.get(stack, 0) + int(n)
        return stacks

    def error(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace").strip()[-300:]
        return "?"


#: Stage of a sampled stack: the first (stage, markers) whose marker is in one of its
#: frames, searched from the leaf up, so a stack inside DKIM signing inside the planner is
#: DKIM's. A frame is ``function (path/to/file.py:line)``.
STAGE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dkim sign", ("gateway/pipeline/dkim.py", "dkim/__init__.py", "gateway/keys/dkim.py")),
    ("stages: tokens (HMAC)", ("tracking/tokens.py",)),
    ("stages: MIME parse+serialize", ("gateway/pipeline/mime.py",)),
    ("stages: links", ("links_stage", "gateway/pipeline/links.py")),
    ("stages: pixel", ("pixel_stage", "gateway/pipeline/pixel.py")),
    ("stages: other", ("gateway/pipeline/stages.py",)),
    ("policy", ("gateway/policy/",)),
    ("spool write+fsync", ("gateway/spool/",)),
    ("CRM record: parse", ("gateway/mail/parse.py",)),
    ("CRM record: store", ("gateway/crm/", "gateway/records.py", "sqlalchemy", "aiosqlite")),
    ("delivery (queue, SMTP client)", ("gateway/delivery/", "aiosmtplib")),
    ("relay accept (prepare, plan)", ("gateway/relay.py", "gateway/pipeline/outbound.py")),
    ("SMTP server", ("gateway/smtp/", "aiosmtpd")),
    ("logging", ("structlog", "logging/")),
)


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for stage, markers in STAGE_MARKERS:
            if any(m in frame for m in markers):
                return stage
    return "event loop, other"


def stage_shares(stacks: dict[str, int]) -> dict[str, float]:
    """Each stage's share of the samples (summing to 1), largest first."""
    total = sum(stacks.values()) or 1
    out: dict[str, int] = {}
    for stack, n in stacks.items():
        out[stage_of(stack)] = out.get(stage_of(stack), 0) + n
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# ----------------------------------------------------------------------------------
# the messages

_WORDS = ["pipeline", "quarterly", "renewal", "forecast", "onboarding", "discount", "proposal",
          "contract", "meeting", "invoice", "account", "pricing", "licence", "seats", "migration",
          "support", "upgrade", "review", "timeline", "stakeholder", "budget", "approval",
          "signature", "demo", "trial"]


def make_message(run: str, i: int, size: int, date: str, links: int = 0) -> bytes:
    """One realistic multipart/alternative (text + HTML) message of about `size` bytes,
    with `links` distinct `<a href>` links in its HTML part (and their URLs in the text).

    Returned ready for DATA: CRLF line ends, no line starting with a dot, and the
    terminating `<CRLF>.<CRLF>` appended.
    """
    boundary = f"=_bench_{uuid.uuid4().hex}"
    mid = f"<bench.{run}.{i}.{uuid.uuid4().hex[:12]}@bench.example.org>"
    words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(12)]
    subject = f"Re: {words[0].title()} {words[1]} for account #{1000 + i} ({run})"
    header = (
        f"From: \"Bench Sender\" <{SENDER}>\r\n"
        f"To: \"Recipient Example\" <{RCPT}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: {mid}\r\n"
        "MIME-Version: 1.0\r\n"
        "X-Mailer: mailgw-bench/1.0\r\n"
        "X-CRM-Deal: bench-deal-4711\r\n"
        f"Content-Type: multipart/alternative; boundary=\"{boundary}\"\r\n"
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
    )
    text_lines = ["Hello Recipient,", "",
                  f"following up on our {words[2]} call about the {words[3]} {words[4]}."]
    html_lines = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
                  f"<title>{subject}</title>",
                  "<style>table{border-collapse:collapse}td{padding:4px 8px;"
                  "border:1px solid #ddd;font-family:Arial,sans-serif}</style>",
                  "</head><body>", "<p>Hello Recipient,</p>",
                  f"<p>following up on our <b>{words[2]}</b> call about the "
                  f"<i>{words[3]} {words[4]}</i>.</p>",
                  ]
    for k in range(links):
        url = f"https://www.example.com/offer/{k + 1}?deal=4711&amp;ref=bench{i}"
        html_lines.append(f"<p><a href=\"{url}\">{words[k % 12].title()} offer {k + 1}</a></p>")
        text_lines.append(f"{words[k % 12].title()} offer {k + 1}: {url.replace('&amp;', '&')}")
    html_lines.append("<table>")
    tail_text = ["", "Best regards,", "Bench Sender", "Account Executive, Example Org"]
    tail_html = ["</table>", "<p>Best regards,<br>Bench Sender<br>"
                 "<span style=\"color:#888\">Account Executive, Example Org</span></p>",
                 "</body></html>"]

    def assemble() -> bytes:
        parts = [
            header,
            f"--{boundary}\r\n",
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n",
            "\r\n".join(text_lines + tail_text), "\r\n",
            f"--{boundary}\r\n",
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n",
            "\r\n".join(html_lines + tail_html), "\r\n",
            f"--{boundary}--\r\n",
        ]
        return "".join(parts).encode("ascii")

    row = 0
    length = len(assemble())
    while length < size:
        w = [_WORDS[(i + row * 5 + k) % len(_WORDS)] for k in range(4)]
        amount = (i * 37 + row * 101) % 90000 + 1000
        text_lines.append(f"  - {w[0]} {w[1]}: {amount} USD, next step: {w[2]} ({w[3]})")
        html_lines.append(f"<tr><td>{row + 1}</td><td>{w[0]} {w[1]}</td>"
                          f"<td style=\"text-align:right\">{amount:,} USD</td>"
                          f"<td>{w[2]} / {w[3]}</td></tr>")
        length += len(text_lines[-1]) + len(html_lines[-1]) + 4
        row += 1
    body = assemble()
    assert b"\r\n." not in body and b"\n" not in body.replace(b"\r\n", b"")
    return body + b".\r\n"


def make_messages(run: str, n: int, size: int, links: int = 0) -> list[bytes]:
    date = formatdate(usegmt=True)
    return [make_message(run, i, size, date, links) for i in range(n)]


# ----------------------------------------------------------------------------------
# the sink: a counting aiosmtpd server in its own process

_MID_RE = re.compile(rb"(?im)^Message-ID:[ \t]*<bench\.([A-Za-z0-9_-]+)\.(\d+)\.")


class _SinkCounter:
    """Counts messages per benchmark run (from the Message-ID) with their arrival times."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.other = 0
        self.total = 0

    def record(self, data: bytes) -> None:
        now = time.monotonic()
        self.total += 1
        end = data.find(b"\r\n\r\n")
        m = _MID_RE.search(data, 0, end if end >= 0 else len(data))
        if m is None:
            self.other += 1
            return
        run = self.runs.setdefault(m.group(1).decode(),
                                   {"seen": set(), "times": [], "dups": 0, "bytes": 0})
        idx = int(m.group(2))
        if idx in run["seen"]:
            run["dups"] += 1
        else:
            run["seen"].add(idx)
            run["times"].append(now)
            run["bytes"] += len(data)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """aiosmtpd handler hook (--sink aiosmtpd)."""
        self.record(envelope.content)
        return "250 2.0.0 OK"

    def stats(self, run: str, times: bool, seen: bool = False) -> dict[str, Any]:
        r = self.runs.get(run)
        out: dict[str, Any] = {"count": 0, "dups": 0, "bytes": 0, "other": self.other,
                               "total": self.total}
        if seen:
            out["seen"] = sorted(r["seen"]) if r is not None else []
        if r is not None:
            out.update(count=len(r["seen"]), dups=r["dups"], bytes=r["bytes"])
            if times:
                out["times"] = list(r["times"])
        return out


_EHLO_REPLY = (b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
               b"250 SIZE 104857600\r\n")


class _RawSinkProtocol(asyncio.Protocol):
    """A minimal SMTP receiver (--sink raw): says 250 to everything, finds the end of DATA
    with one buffer search instead of reading line by line, so it costs the relays under
    test as little CPU as possible. Commands are handled in order, so PIPELINING works."""

    def __init__(self, counter: _SinkCounter) -> None:
        self.counter = counter
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.bench.test ESMTP bench-sink\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf
        buf += data
        out: list[bytes] = []
        while buf:
            if self.in_data:
                if buf.startswith(b".\r\n"):
                    body, used = b"", 3
                else:
                    i = buf.find(b"\r\n.\r\n", self.scan)
                    if i < 0:
                        self.scan = max(0, len(buf) - 4)
                        break
                    body, used = bytes(buf[:i + 2]), i + 5
                del buf[:used]
                self.in_data, self.scan = False, 0
                self.counter.record(body)
                out.append(b"250 2.0.0 OK\r\n")
                continue
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > 8192:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    buf.clear()
                break
            verb = bytes(buf[:4]).upper()
            del buf[:i + 2]
            if verb == b"EHLO":
                out.append(_EHLO_REPLY)
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 OK\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"502 5.5.2 Command not implemented\r\n")
        if out:
            self.transport.write(b"".join(out))


async def _sink_serve(conn: Connection, kind: str) -> None:
    counter = _SinkCounter()
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.BaseProtocol]
    if kind == "aiosmtpd":
        from aiosmtpd.smtp import SMTP

        def factory() -> asyncio.BaseProtocol:
            return SMTP(counter, decode_data=False, hostname="sink.bench.test", ident="bench-sink")
    else:
        def factory() -> asyncio.BaseProtocol:
            return _RawSinkProtocol(counter)
    server = await loop.create_server(factory, host=HOST, port=0, backlog=256)
    conn.send(("port", server.sockets[0].getsockname()[1]))
    stop = asyncio.Event()

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            stop.set()
            return
        if cmd[0] == "stats":
            conn.send(counter.stats(cmd[1], cmd[2], *cmd[3:]))
        else:
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    await stop.wait()
    loop.remove_reader(conn.fileno())
    server.close()


def _sink_main(conn: Connection, kind: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    asyncio.run(_sink_serve(conn, kind))


class Sink:
    """Parent side of the sink process: start it, ask for counts, stop it."""

    def __init__(self, kind: str = "raw") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.kind = kind
        self.proc = ctx.Process(target=_sink_main, args=(child, kind), name="bench-sink",
                                daemon=True)
        self.proc.start()
        child.close()
        try:
            if not self._conn.poll(START_TIMEOUT):
                raise RuntimeError(f"the sink did not start within {START_TIMEOUT:.0f} s")
            what, port = self._conn.recv()
        except (EOFError, OSError):
            self.proc.join(5.0)
            self.close()
            raise RuntimeError(f"the sink process died at start (exit code {self.proc.exitcode})"
                               ) from None
        except BaseException:
            self.close()
            raise
        assert what == "port"
        self.port = int(port)

    def stats(self, run: str, times: bool = False, seen: bool = False) -> dict[str, Any]:
        """Counts for `run`; `times`: arrival times too, `seen`: the message numbers delivered."""
        self._conn.send(("stats", run, times, seen))
        if not self._conn.poll(10.0):
            raise RuntimeError("the sink stopped answering")
        result: dict[str, Any] = self._conn.recv()
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop",))
        self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self._conn.close()


# ----------------------------------------------------------------------------------
# the client: N messages over S persistent sessions


@dataclass
class LoadResult:
    t0: float = 0.0                       # monotonic time the first MAIL was sent
    t_last_accept: float = 0.0            # monotonic time of the last 250 after DATA
    latencies: list[float] = field(default_factory=list)   # seconds, accepted messages only
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    session_errors: list[str] = field(default_factory=list)


class SMTPReplyError(Exception):
    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code, self.text = stage, code, text


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[bytes] = []
    async with asyncio.timeout(REPLY_TIMEOUT):
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed by the server")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
    last = lines[-1]
    try:
        code = int(last[:3])
    except ValueError:
        raise ConnectionError(f"not an SMTP reply: {last[:80]!r}") from None
    text = b" | ".join(x[4:].strip() for x in lines).decode("utf-8", "replace")
    return code, text


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str,
                   expect: int, stage: str) -> None:
    writer.write(line.encode() + b"\r\n")
    code, text = await _reply(reader)
    if code != expect:
        raise SMTPReplyError(stage, code, text)


async def _session(port: int, messages: list[bytes], auth: bool, ready: asyncio.Barrier,
                   go: asyncio.Event, result: LoadResult) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), REPLY_TIMEOUT)
    try:
        code, text = await _reply(reader)
        if code != 220:
            raise SMTPReplyError("greeting", code, text)
        await _command(reader, writer, "EHLO bench-client.example.org", 250, "EHLO")
        if auth:
            token = base64.b64encode(f"\0{SENDER}\0{PASSWORD}".encode()).decode()
            await _command(reader, writer, f"AUTH PLAIN {token}", 235, "AUTH")
        await ready.wait()
        await go.wait()
        for data in messages:
            t = time.monotonic()
            try:
                await _command(reader, writer, f"MAIL FROM:<{SENDER}>", 250, "MAIL")
                await _command(reader, writer, f"RCPT TO:<{RCPT}>", 250, "RCPT")
                await _command(reader, writer, "DATA", 354, "DATA")
                writer.write(data)
                code, text = await _reply(reader)
                if code != 250:
                    raise SMTPReplyError("end of DATA", code, text)
            except SMTPReplyError as exc:
                result.rejected[f"{exc.stage}: {exc.code} {exc.text}"[:160]] += 1
                await _command(reader, writer, "RSET", 250, "RSET")
                continue
            done = time.monotonic()
            result.latencies.append(done - t)
            result.accepted += 1
            result.t_last_accept = max(result.t_last_accept, done)
        with contextlib.suppress(Exception):
            await _command(reader, writer, "QUIT", 221, "QUIT")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_load(port: int, messages: list[bytes], sessions: int, auth: bool,
                   timeout: float, on_go: Callable[[], None] | None = None) -> LoadResult:
    """Open `sessions` connections, wait until all said EHLO (and AUTH), then send everything.

    Connecting and AUTH are outside the measured window; `on_go()` runs when it opens.
    """
    result = LoadResult()
    sessions = max(1, min(sessions, len(messages)))
    ready = asyncio.Barrier(sessions + 1)
    go = asyncio.Event()
    shares = [messages[k::sessions] for k in range(sessions)]

    async def guarded(share: list[bytes]) -> None:
        try:
            await _session(port, share, auth, ready, go, result)
        except Exception as exc:
            result.session_errors.append(f"{type(exc).__name__}: {exc}"[:200])
            await ready.abort()

    tasks = [asyncio.create_task(guarded(s)) for s in shares]
    try:
        async with asyncio.timeout(timeout):
            try:
                await ready.wait()
            except asyncio.BrokenBarrierError:
                pass
            if on_go is not None:
                on_go()
            result.t0 = time.monotonic()
            go.set()
            await asyncio.gather(*tasks)
    except TimeoutError:
        result.session_errors.append(f"load did not finish within {timeout:.0f} s")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


# ----------------------------------------------------------------------------------
# one measured run


@dataclass
class RunResult:
    name: str
    ok: bool = False
    skipped: str | None = None            # why this row has no figures
    messages: int = 0
    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    rss_note: str = ""
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    session_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_summary: dict[str, int] = field(default_factory=dict)
    log_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


async def wait_delivered(sink: Sink, run: str, want: int, deadline: float) -> dict[str, Any]:
    """Poll the sink until `want` distinct messages of `run` arrived or the deadline passed."""
    while True:
        st = await asyncio.to_thread(sink.stats, run, False)
        if st["count"] >= want or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # let a late duplicate show up in the figures
    return await asyncio.to_thread(sink.stats, run, True)


async def measure(name: str, port: int, sink: Sink, args: argparse.Namespace, *,
                  auth: bool = False, links: int = 0,
                  cpu: Callable[[], tuple[float, float]] | None = None,
                  root: Callable[[], int | None] | None = None,
                  profile: Path | None = None) -> RunResult:
    """Send the load to `port` and wait for the sink; fill in everything but memory.

    `cpu()` (the relay's user and system CPU seconds so far) is read before and after,
    for CPU per message; `root()` (the relay's first process) is sampled for the split by
    process (and thread); with `profile` (a file to write), py-spy samples it meanwhile.
    """
    run = f"{name[:2]}{uuid.uuid4().hex[:8]}"
    res = RunResult(name=name, messages=args.messages)
    messages = await asyncio.to_thread(make_messages, run, args.messages, args.size, links)
    cpu0 = (0.0, 0.0)
    split = CpuSplitSampler(root) if root is not None else None
    spy: Profiler | None = None

    def on_go() -> None:
        nonlocal cpu0, spy
        cpu0 = cpu() if cpu else (0.0, 0.0)
        if split is not None:
            split.start()
        pid = root() if root is not None else None
        if profile is not None and pid is not None:
            spy = Profiler(pid, profile)

    load = await run_load(port, messages, args.sessions, auth, args.timeout, on_go)
    res.accepted = load.accepted
    res.rejected = dict(load.rejected)
    res.session_errors = load.session_errors
    if load.accepted:
        res.accept_seconds = load.t_last_accept - load.t0
        res.accepted_per_s = load.accepted / res.accept_seconds
        p50, p99 = percentile(load.latencies, 50), percentile(load.latencies, 99)
        res.p50_ms = p50 * 1000 if p50 is not None else None
        res.p99_ms = p99 * 1000 if p99 is not None else None
    st = await wait_delivered(sink, run, load.accepted, time.monotonic() + args.deadline)
    res.delivered, res.duplicates = st["count"], st["dups"]
    if split is not None:
        await split.stop()
    if spy is not None:
        stacks = await asyncio.to_thread(spy.stop)
    if cpu is not None and res.delivered:
        user, system = (b - a for a, b in zip(cpu0, cpu(), strict=True))
        res.extra["cpu_ms_per_message"] = round((user + system) * 1000 / res.delivered, 2)
        res.extra["cpu_user_ms_per_message"] = round(user * 1000 / res.delivered, 2)
        res.extra["cpu_system_ms_per_message"] = round(system * 1000 / res.delivered, 2)
        if split is not None:
            res.extra["cpu_ms_per_message_by_process"] = {
                k: round(v * 1000 / res.delivered, 3) for k, v in split.split().items()}
        if spy is not None:
            if stacks:
                total = (user + system) * 1000 / res.delivered
                res.extra["cpu_ms_per_message_by_stage"] = {
                    k: round(v * total, 3) for k, v in stage_shares(stacks).items()}
                res.extra["profile_samples"] = sum(stacks.values())
            else:
                res.problems.append(f"py-spy gave no samples: {spy.error()}")
    times = sorted(st.get("times", []))
    if times and load.t0:
        res.deliver_seconds = times[-1] - load.t0
        res.delivered_per_s = len(times) / res.deliver_seconds
    if res.accepted < res.messages:
        res.problems.append(f"{res.messages - res.accepted} of {res.messages} messages not accepted")
    if res.delivered < res.accepted:
        res.problems.append(f"{res.accepted - res.delivered} accepted messages did not reach the "
                            f"sink within {args.deadline:.0f} s")
    if res.duplicates:
        res.problems.append(f"{res.duplicates} messages reached the sink more than once")
    res.ok = not res.problems and not res.session_errors
    return res


# ----------------------------------------------------------------------------------
# the gateway under test


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def knows_workers(repo: Path) -> bool:
    """Whether the checkout at `repo` has the `workers` key (a --baseline-repo may not;
    its daemon is then one process, and the key would be refused)."""
    try:
        return "workers:" in (repo / "gateway" / "config.py").read_text(encoding="utf-8")
    except OSError:
        return False


def gateway_config(tmp: Path, port: int, sink_port: int, password_hash: str, auth: bool,
                   concurrency: int, tracking: bool = False, dkim: bool = False,
                   workers: int | None = 1) -> Path:
    """The gateway's config; `workers` None leaves the key out (a tree that predates it)."""
    trusted = "[]" if auth else "[127.0.0.0/8]"
    extra = ""
    if tracking:  # opens and clicks tracked: every recipient gets a copy with its own tokens
        tport = free_port()
        extra += (f"  tracking: {{host: 127.0.0.1, port: {tport}, "
                  f"base_url: \"http://127.0.0.1:{tport}\"}}\n")
    dkim_section = ""
    if dkim:      # rsa-sha256, 2048 bits, the last stage of every copy
        from gateway.keys import dkim as dkimkeys

        key = tmp / "dkim.pem"
        dkimkeys.write_private_key(key, dkimkeys.generate("rsa-sha256", 2048))
        dkim_section = (f"dkim:\n  {SENDER.split('@')[1]}: "
                        f"{{selector: bench, key_file: {_yaml_str(str(key))}}}\n")
    text = f"""\
# written by bench/relay.py
hostname: gw.bench.test
state_dir: {_yaml_str(str(tmp / "state"))}
store:
  url: {_yaml_str("sqlite+aiosqlite:///" + str(tmp / "state" / "crm.db"))}
listeners:
  submission:
    host: 127.0.0.1
    port: {port}
    tls: none
    trusted_networks: {trusted}
    max_connections: 200
{extra}users:
  - login: {SENDER}
    password_hash: {_yaml_str(password_hash)}
    name: Bench Sender
delivery:
  route: smarthost
  smarthost: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
  concurrency: {concurrency}
  per_destination: {concurrency}
logging: {{format: json, level: warning}}
workers: {workers}
{dkim_section}"""
    if workers is None:
        text = text.replace("workers: None\n", "", 1)
    path = tmp / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def summarize_json_log(path: Path, res: RunResult) -> None:
    """Count warning/error events in the daemon's JSON log; keep a few lines as samples."""
    counts: Counter[str] = Counter()
    samples: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = f"{obj.get('level', '?')}: {obj.get('event', '?')}"
        except (ValueError, AttributeError):
            key = "unstructured line"
        counts[key] += 1
        if counts[key] <= 2 and len(samples) < 8:
            samples.append(line[:400])
    res.log_summary = dict(counts.most_common())
    res.log_samples = samples


def _wait_ready(sock: socket.socket, deadline: float) -> bool:
    """Block until a READY=1 datagram arrives on `sock`, or the deadline passes."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if b"READY=1" in sock.recv(4096):
                return True
        except TimeoutError:
            return False
    return False


def start_gateway(cfg: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m gateway run -c cfg` in its own session, stdout and stderr into `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
                                cwd=cfg.parent, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@dataclass(frozen=True)
class GatewayRun:
    """One gateway row: its name, what the daemon does to each message, and which tree runs."""

    name: str
    tracking: bool
    dkim: bool
    links: int
    repo: Path


def gateway_runs(args: argparse.Namespace) -> list[GatewayRun]:
    """The gateway rows, in order: for each mode, this tree, then `--baseline-repo`'s."""
    runs = []
    for mode in args.modes:
        if mode == "full":
            spec = ("mailgw full", True, True, args.links)
        else:
            spec = ("mailgw" if mode == "plain" else f"mailgw {mode}", args.tracking, args.dkim,
                    args.links if args.tracking else 0)
        name, tracking, dkim, links = spec
        runs.append(GatewayRun(name, tracking, dkim, links, REPO))
        if args.baseline_repo is not None:
            runs.append(GatewayRun(f"{name} @baseline", tracking, dkim, links, args.baseline_repo))
    return runs


async def run_gateway(sink: Sink, args: argparse.Namespace, tmp: Path,
                      cleanup: list[Callable[[], None]], spec: GatewayRun | None = None) -> RunResult:
    spec = spec or GatewayRun("mailgw", args.tracking, args.dkim, 0, REPO)
    res = RunResult(name=spec.name, messages=args.messages)
    sys.path.insert(0, str(REPO))
    try:
        from gateway.passwords import hash_password
    except ImportError as exc:
        res.skipped = f"cannot import gateway.passwords from {REPO}: {exc}"
        return res
    port = free_port()
    cfg = gateway_config(tmp, port, sink.port, hash_password(PASSWORD), args.auth, args.sessions,
                         tracking=spec.tracking, dkim=spec.dkim,
                         workers=args.workers if knows_workers(spec.repo) else None)
    log_path = tmp / "gateway.log"
    # READY=1 (sd_notify) comes once every worker listens, not only the first one
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    cleanup.append(notify.close)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"), PYTHONPATH=os.pathsep.join(
        [str(spec.repo), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = await asyncio.to_thread(start_gateway, cfg, log_path, env)

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    cleanup.append(kill)
    up = await wait_port(port, time.monotonic() + START_TIMEOUT, lambda: proc.poll() is None)
    if not up:
        kill()
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        res.skipped = (f"`python -m gateway run` did not listen on 127.0.0.1:{port} within "
                       f"{START_TIMEOUT:.0f} s (exit status {proc.returncode}); last log lines:\n    "
                       + "\n    ".join(tail))
        return res
    if not await asyncio.to_thread(_wait_ready, notify, time.monotonic() + START_TIMEOUT):
        kill()
        res.skipped = f"no READY=1 from the daemon within {START_TIMEOUT:.0f} s"
        return res
    sampler = MemorySampler(lambda: proc.pid)
    sampler.start()
    try:
        measured = await measure(spec.name, port, sink, args, auth=args.auth, links=spec.links,
                                 cpu=lambda: tree_cpu_seconds(proc.pid), root=lambda: proc.pid,
                                 profile=tmp / "profile.txt" if args.profile else None)
    finally:
        await sampler.stop()
    measured.extra.update(auth=args.auth, tracking=spec.tracking, dkim=spec.dkim,
                          links=spec.links, repo=str(spec.repo), workers=args.workers)
    hwm = proc_status_kb(proc.pid, "VmHWM")
    if hwm is not None:
        measured.peak_rss_mb = hwm / 1024
        measured.rss_note = "VmHWM of the daemon"
    measured.extra["peak_pss_mb_sampled"] = round(sampler.peak_pss_kb / 1024, 1)

    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
        measured.extra["sigterm_exit"] = rc
        measured.extra["sigterm_seconds"] = round(time.monotonic() - t, 2)
        if rc != 0:
            measured.problems.append(f"the daemon exited {rc} after SIGTERM (expected 0)")
    except subprocess.TimeoutExpired:
        kill()
        measured.problems.append(f"the daemon did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM")
        measured.extra["sigterm_exit"] = None
    spool = tmp / "state" / "spool"
    left = {d.name: sum(1 for p in d.iterdir() if p.is_file())
            for d in sorted(spool.iterdir()) if d.is_dir()} if spool.is_dir() else {}
    left = {k: v for k, v in left.items() if v}
    if left:
        measured.problems.append(f"files left in the spool after the run: {left}")
    measured.extra["spool_left"] = left
    summarize_json_log(log_path, measured)
    measured.ok = not measured.problems and not measured.session_errors
    return measured


# ----------------------------------------------------------------------------------
# the Postfix reference


class PostfixUnavailable(Exception):
    pass


MASTER_CF = """\
# written by bench/relay.py: Debian's services, chroot off (the queue is a temp dir)
{listen} inet n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _postfix_bin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


class PostfixInstance:
    """A private Postfix: its own config dir, queue and data directories, log file and port."""

    def __init__(self, root: Path, sink_port: int, concurrency: int) -> None:
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.data = root / "data"
        self.log = root / "postfix.log"
        self.port = free_port()
        self.sink_port = sink_port
        self.concurrency = concurrency
        self.started = False
        self.version = ""
        self.settings: dict[str, str] = {}
        self.postfix = _postfix_bin("postfix") or ""
        self.postconf = _postfix_bin("postconf") or ""

    def _run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)

    def prepare(self) -> None:
        if not self.postfix or not self.postconf:
            raise PostfixUnavailable("postfix is not installed (Debian: apt-get install -y postfix)")
        if os.geteuid() != 0:
            raise PostfixUnavailable("Postfix must be started as root (run the benchmark as root "
                                     "or pass --skip-postfix)")
        r = self._run(self.postconf, "-dh", "mail_version")
        self.version = r.stdout.strip()
        m = re.match(r"(\d+)\.(\d+)", self.version)
        if r.returncode != 0 or m is None:
            raise PostfixUnavailable(f"`postconf -dh mail_version` failed: {r.stderr.strip()}")
        major_minor = (int(m.group(1)), int(m.group(2)))
        if major_minor < (3, 4):
            raise PostfixUnavailable(f"Postfix {self.version} is too old: maillog_file needs 3.4")
        for d in (self.root, self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=d is self.root)
        # Postfix daemons run as mail_owner and must reach the queue through the
        # benchmark's temp dir (mkdtemp makes it 0700): let others traverse it.
        os.chmod(self.root.parent, os.stat(self.root.parent).st_mode | 0o711)
        os.chmod(self.root, 0o755)
        owner = self._run(self.postconf, "-dh", "mail_owner").stdout.strip() or "postfix"
        shutil.chown(self.data, user=owner)
        self.settings = {
            "compatibility_level": "3.6" if major_minor >= (3, 6) else "2",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "myhostname": "postfix.bench.test",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "mynetworks": "127.0.0.0/8",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "default_process_limit": "100",
            "smtp_destination_concurrency_limit": str(self.concurrency),
            "maillog_file": str(self.log),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
        }
        main_cf = "# written by bench/relay.py; everything else is `postconf -d`\n" + "".join(
            f"{k} = {v}\n" for k, v in self.settings.items())
        (self.conf / "main.cf").write_text(main_cf, encoding="ascii")
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"),
                                             encoding="ascii")
        r = self._run(self.postfix, "-c", str(self.conf), "check")
        if r.returncode != 0:
            raise PostfixUnavailable(f"`postfix -c {self.conf} check` failed:\n"
                                     f"{(r.stderr or r.stdout).strip()}\n{self._log_tail()}")

    def _log_tail(self, n: int = 10) -> str:
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def start(self) -> None:
        r = await asyncio.to_thread(self._run, self.postfix, "-c", str(self.conf), "start")
        self.started = True  # even a failed start may leave a master behind: always stop
        if r.returncode != 0:
            raise PostfixUnavailable(f"`postfix -c {self.conf} start` failed (exit {r.returncode}):"
                                     f"\n{(r.stderr or r.stdout).strip()}\n{self._log_tail()}")
        if not await wait_port(self.port, time.monotonic() + START_TIMEOUT):
            raise PostfixUnavailable(f"Postfix did not listen on 127.0.0.1:{self.port} within "
                                     f"{START_TIMEOUT:.0f} s\n{self._log_tail()}")

    def stop(self) -> None:
        """`postfix stop`, wait for the master to go; `abort` and SIGKILL if it does not."""
        if not self.started:
            return
        pid = self.master_pid()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._run(self.postfix, "-c", str(self.conf), "stop", timeout=30)
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run(self.postfix, "-c", str(self.conf), "abort", timeout=30)
            for p in process_tree(pid):
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
        self.started = False

    def log_summary(self) -> tuple[dict[str, int], list[str]]:
        """Counts of delivery statuses and of warning/fatal/panic lines in maillog_file."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return {}, []
        for line in lines:
            m = re.search(r"status=(\w+)", line)
            if m:
                counts[f"status={m.group(1)}"] += 1
            m = re.search(r"postfix/(\S+?)\[\d+\]: (warning|error|fatal|panic):", line)
            if m:
                key = f"{m.group(2)}: {m.group(1)}"
                counts[key] += 1
                if counts[key] <= 2 and len(samples) < 8:
                    samples.append(line[:400])
        return dict(counts.most_common()), samples


async def run_postfix(sink: Sink, args: argparse.Namespace, tmp: Path,
                      cleanup: list[Callable[[], None]]) -> RunResult:
    pf = PostfixInstance(tmp, sink.port, args.sessions)
    cleanup.append(pf.stop)
    try:
        await asyncio.to_thread(pf.prepare)
        await pf.start()
    except (PostfixUnavailable, OSError, subprocess.SubprocessError) as exc:
        await asyncio.to_thread(pf.stop)
        return RunResult(name="postfix", messages=args.messages, skipped=f"Postfix not run: {exc}")
    sampler = MemorySampler(pf.master_pid)
    sampler.start()
    try:
        res = await measure("postfix", pf.port, sink, args,
                            cpu=lambda: tree_cpu_seconds(pf.master_pid()), root=pf.master_pid)
    finally:
        await sampler.stop()
        await asyncio.to_thread(pf.stop)
    res.peak_rss_mb = sampler.peak_pss_kb / 1024
    res.rss_note = "sum of PSS of master and children, sampled"
    res.extra.update(version=pf.version, settings=pf.settings,
                     peak_rss_sum_mb_sampled=round(sampler.peak_rss_kb / 1024, 1),
                     peak_processes=sampler.peak_processes)
    res.log_summary, res.log_samples = pf.log_summary()
    return res


async def run_direct(sink: Sink, args: argparse.Namespace) -> RunResult:
    res = await measure("client->sink", sink.port, sink, args)
    res.rss_note = "no relay in between: the ceiling of client and sink"
    return res


# ----------------------------------------------------------------------------------
# output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_table(results: list[RunResult], ratio: dict[str, dict[str, float | None]],
                 context: dict[str, Any]) -> str:
    out = [f"relay benchmark: {context['messages']} messages of ~{context['size']} bytes "
           f"(multipart/alternative HTML), {context['sessions']} sessions, 1 recipient each; "
           f"{context['cpus']} CPUs, temp dir on {context['tmp_fs']}, {context['sink']} sink"
           + (", AUTH PLAIN to the gateway" if context["auth"] else "")
           + ("; `mailgw full`: tracking of opens and clicks with "
              f"{context['links']} links, pixel, DKIM rsa-sha256 2048, fsync, CRM record"
              if "full" in context["modes"] else "")
           + ("; `mailgw`: tracking opens and clicks" if context.get("tracking") else "")
           + (", DKIM-signing (rsa-sha256 2048)" if context.get("dkim") else "")
           + (f", gateway workers: {context['workers']}" if context.get("workers", 1) > 1 else ""),
           ""]
    if context["concurrent_benchmarks"]:
        out[1:1] = [f"WARNING: other benchmark processes ran at the same time "
                    f"(pids {context['concurrent_benchmarks']}): these figures are skewed"]
    head = ("run", "accepted/s", "delivered/s", "p50 ms", "p99 ms", "peak RSS MB",
            "accepted", "delivered")
    rows = [head]
    for r in results:
        if r.skipped:
            rows.append((r.name, "-", "-", "-", "-", "-", "-", "-"))
            continue
        rows.append((r.name, _fmt(r.accepted_per_s, ".0f"), _fmt(r.delivered_per_s, ".0f"),
                     _fmt(r.p50_ms, ".1f"), _fmt(r.p99_ms, ".1f"), _fmt(r.peak_rss_mb, ".1f"),
                     f"{r.accepted}/{r.messages}", f"{r.delivered}/{r.accepted}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                         strict=True)]
        out.append("  ".join(cells))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    for name, q in ratio.items():
        if q.get("delivered_per_s") is None:
            continue
        out.append(f"ratio {name}/postfix: delivered/s {q['delivered_per_s']:.2f}, "
                   f"accepted/s {_fmt(q.get('accepted_per_s'), '.2f')}, "
                   f"p50 latency {_fmt(q.get('p50_ms'), '.2f')}")
    if not any(q.get("delivered_per_s") is not None for q in ratio.values()):
        out.append("ratio mailgw/postfix: - (needs both runs)")
    for r in results:
        notes = []
        if r.skipped:
            notes.append(r.skipped)
        if r.rss_note and not r.skipped:
            notes.append(f"memory: {r.rss_note}")
        if "cpu_ms_per_message" in r.extra:
            notes.append(f"CPU: {r.extra['cpu_ms_per_message']} ms per message (user "
                         f"{r.extra.get('cpu_user_ms_per_message', '?')} + system "
                         f"{r.extra.get('cpu_system_ms_per_message', '?')}, accept to delivery)")
        if r.extra.get("cpu_ms_per_message_by_process"):
            notes.append("CPU ms per message by process: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r.extra["cpu_ms_per_message_by_process"].items()
                if v >= 0.005))
        if r.extra.get("cpu_ms_per_message_by_stage"):
            notes.append(f"CPU ms per message by stage (py-spy, {r.extra['profile_samples']} "
                         "samples): " + ", ".join(
                             f"{k} {v:.2f}" for k, v in r.extra["cpu_ms_per_message_by_stage"].items()))
        if r.accept_seconds is not None:
            notes.append(f"all 250s after {r.accept_seconds:.2f} s, last message at the sink after "
                         f"{_fmt(r.deliver_seconds, '.2f')} s")
        notes.extend(r.problems)
        notes.extend(f"session error: {e}" for e in r.session_errors[:5])
        notes.extend(f"rejected x{n}: {why}" for why, n in r.rejected.items())
        if "sigterm_exit" in r.extra:
            notes.append(f"SIGTERM: exit {r.extra['sigterm_exit']} after "
                         f"{r.extra.get('sigterm_seconds', '?')} s")
        if r.log_summary:
            notes.append("log: " + ", ".join(f"{k} x{v}" for k, v in r.log_summary.items()))
        notes.extend(f"  {s}" for s in r.log_samples[:4])
        if notes:
            out.append(f"{r.name}:")
            out.extend(f"  {n}" for n in notes)
    return "\n".join(out)


def other_benchmarks() -> list[int]:
    """Pids of other bench/relay.py runs on this machine (they would skew the figures)."""
    mine = set(process_tree(os.getpid()))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith((b"python", b"python3", b"python3.11")) and any(
                a.endswith(b"relay.py") for a in argv[1:3]):
            found.append(int(entry))
    return sorted(found)


def fs_type(path: Path) -> str:
    """The file system type of `path`, from /proc/mounts (longest matching mount point)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        real = str(path.resolve())
        for line in f:
            parts = line.split()
            inside = real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")
            if len(parts) >= 3 and inside and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
    return kind


# ----------------------------------------------------------------------------------
# main


async def bench(args: argparse.Namespace, tmp: Path,
                cleanup: list[Callable[[], None]]) -> list[RunResult]:
    sink = await asyncio.to_thread(Sink, args.sink)
    cleanup.append(sink.close)
    results: list[RunResult] = []

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    if not args.gateway_only:
        progress(f"[bench] client -> sink (127.0.0.1:{sink.port}) ...")
        results.append(await run_direct(sink, args))
    postfix = not (args.skip_postfix or args.gateway_only)
    for rnd in range(args.rounds):
        for k, spec in enumerate(gateway_runs(args)):
            progress(f"[bench] {spec.name} ({spec.repo}) ...")
            gw_tmp = tmp / f"mailgw-{rnd}-{k}"
            gw_tmp.mkdir()
            results.append(await run_gateway(sink, args, gw_tmp, cleanup, spec))
        if postfix:
            progress("[bench] postfix ...")
            results.append(await run_postfix(sink, args, tmp / f"postfix-{rnd}", cleanup))
    return results


def ratios(results: list[RunResult], gateway: str = "mailgw") -> dict[str, float | None]:
    """`gateway` row over the Postfix row (the last of each name: with --rounds, the last round)."""
    by = {r.name: r for r in results if not r.skipped}
    gw, pf = by.get(gateway), by.get("postfix")
    out: dict[str, float | None] = {}
    for key in ("delivered_per_s", "accepted_per_s", "p50_ms", "p99_ms", "peak_rss_mb"):
        a = getattr(gw, key) if gw else None
        b = getattr(pf, key) if pf else None
        out[key] = a / b if a is not None and b else None
    return out


def all_ratios(results: list[RunResult]) -> dict[str, dict[str, float | None]]:
    """Every gateway row over the Postfix row of its round, by row name (`name #2` for the
    second round's, and so on)."""
    out: dict[str, dict[str, float | None]] = {}
    rnd: list[RunResult] = []
    for r in results:
        if r.name == "client->sink":
            continue
        rnd.append(r)
        if r.name == "postfix":
            for g in rnd[:-1]:
                ratio = ratios([g, r], g.name)
                key, n = g.name, 2
                while key in out:
                    key, n = f"{g.name} #{n}", n + 1
                out[key] = ratio
            rnd = []
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Push N ~10 KB HTML messages over S SMTP sessions through mailgw and through "
                    "Postfix to the same counting sink; print accepted/s, delivered/s, p50/p99 "
                    "accept latency, peak RSS and the ratio.")
    p.add_argument("--messages", type=int, default=2000, metavar="N", help="messages per run (2000)")
    p.add_argument("--sessions", type=int, default=20, metavar="S",
                   help="concurrent client sessions; also the relays' connections to the sink (20)")
    p.add_argument("--size", type=int, default=10240, metavar="BYTES",
                   help="approximate message size (10240)")
    p.add_argument("--auth", action="store_true",
                   help="AUTH PLAIN once per session to the gateway (default: relay by trusted "
                        "network, like Postfix mynetworks)")
    p.add_argument("--tracking", action="store_true",
                   help="the gateway tracks opens and clicks (a tokenised copy per recipient)")
    p.add_argument("--dkim", action="store_true",
                   help="the gateway DKIM-signs every copy (rsa-sha256, 2048 bits)")
    p.add_argument("--modes", default="full,plain", type=lambda v: [m for m in v.split(",") if m],
                   metavar="LIST",
                   help="gateway rows, in order (full,plain): full = tracking of opens and clicks, "
                        "DKIM, --links links per message; plain = --tracking/--dkim as given")
    p.add_argument("--links", type=int, default=5, metavar="N",
                   help="links in each message's HTML for tracked rows (5)")
    p.add_argument("--baseline-repo", type=Path, metavar="DIR",
                   help="after each gateway row, the same row with the daemon from DIR (another "
                        "checkout, e.g. a worktree of main): before/after in one run")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="repeat the gateway rows and Postfix K times, interleaved (1)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy samples each gateway during its window: CPU per message by stage")
    p.add_argument("--sink", choices=("raw", "aiosmtpd"), default="raw",
                   help="sink implementation: a minimal asyncio SMTP receiver (default, ~0.15 ms "
                        "CPU per message) or aiosmtpd (~1.3 ms, competes with the relay for CPU)")
    p.add_argument("--skip-postfix", action="store_true", help="no Postfix run")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="the gateway's `workers` (1: one process; N: a supervisor and N workers)")
    p.add_argument("--gateway-only", action="store_true",
                   help="only the gateway run (no Postfix, no direct client->sink baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="deadline for sending all messages of one run (600)")
    p.add_argument("--deadline", type=float, default=120.0, metavar="S",
                   help="deadline for the sink to receive every accepted message (120)")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir (configs, logs, spool) and print its path")
    args = p.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.size < 1024 or args.rounds < 1:
        p.error("--messages, --sessions and --rounds must be >= 1, --size >= 1024")
    if bad := [m for m in args.modes if m not in ("full", "plain")]:
        p.error(f"--modes: unknown {bad} (full, plain)")
    return args


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    others = other_benchmarks()
    tmp = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
    cleanup: list[Callable[[], None]] = []
    results: list[RunResult] = []
    try:
        with _sigterm_as_interrupt():
            results = asyncio.run(bench(args, tmp, cleanup))
    except KeyboardInterrupt:
        print("[bench] interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"[bench] failed: {type(exc).__name__}: {exc}; cleaning up", file=sys.stderr)
        return 1
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception as exc:  # clean up the rest regardless
                print(f"[bench] cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.keep_temp:
            print(f"[bench] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ratio = all_ratios(results)
    others = sorted(set(others) | set(other_benchmarks()))
    context = {"messages": args.messages, "sessions": args.sessions, "size": args.size,
               "tracking": args.tracking, "dkim": args.dkim, "modes": args.modes,
               "links": args.links, "rounds": args.rounds, "workers": args.workers,
               "baseline_repo": str(args.baseline_repo) if args.baseline_repo else None,
               "auth": args.auth, "sink": args.sink, "cpus": os.cpu_count(), "tmp_fs": fs_type(tmp.parent),
               "python": sys.version.split()[0], "concurrent_benchmarks": others}
    if args.json:
        print(json.dumps({"context": context, "runs": [asdict(r) for r in results],
                          "ratio_mailgw_over_postfix": ratio}, indent=2))
    else:
        print(render_table(results, ratio, context))
    failed = [r for r in results if r.skipped or not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
