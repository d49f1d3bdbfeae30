#!/usr/bin/env python3
"""Tracking endpoint benchmark: pixel and redirect against a static file from the same server.

Its one job: start the tracking endpoint (``gateway.http.tracking.make_app`` with its
recorder, an in-memory copy lookup and a counting sink) in its own process on a free
loopback port, with one extra route that serves a 43-byte GIF file through aiohttp's
static file handler; then load three URLs one after the other and print requests/s and
p50/p99 latency for each:

* ``static``: ``/static/pixel.gif`` — the baseline: aiohttp serving a file, no token;
* ``open``: ``/o/<token>`` — verify the HMAC token, answer the GIF, queue the hit;
* ``click``: ``/c/<token>`` — verify, answer 302 with the original URL, queue the hit.

The load generator is ``wrk`` (Debian ``wrk``) when installed, else an aiohttp client
(``--client aiohttp`` forces it). After the runs the server's ``/healthz`` counters show
how many hits were queued, recorded and dropped (the recorder's bounded queue drops
rather than slowing responses). Nothing is asserted; figures go to stdout (``--json``).

    python3 bench/tracking.py                      # 10 s per URL, 50 connections, wrk
    python3 bench/tracking.py --duration 5 --connections 100 --json
    python3 bench/tracking.py --client aiohttp
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"bench-secret-" + b"x" * 32
URL = "https://example.com/pricing?plan=pro&seats=10#compare"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/124.0.0.0 Safari/537.36")


# -- the server (a child process: `bench/tracking.py --serve PORT DIR`) ---------------------


def serve(port: int, static_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from aiohttp import web

    from gateway.http.tracking import PIXEL, HitRecorder, make_app
    from gateway.tracking.classify import CopyInfo
    from gateway.tracking.hits import Hit, MemoryCopyLookup
    from gateway.tracking.tokens import TokenSigner

    class CountingSink:
        def __init__(self) -> None:
            self.count = 0
            self.machine = 0

        async def record_hit(self, hit: Hit) -> None:
            self.count += 1
            self.machine += hit.machine

    async def main() -> None:
        from gateway.config import Logging
        from gateway.log import setup_logging

        setup_logging(Logging(format="json", level="warning"), stream=sys.stderr)
        lookup = MemoryCopyLookup([CopyInfo(copy_id="01J0000000000000000000BENC", recipient="r@example.org",
                                            sender="s@example.com", delivered_at=time.time() - 3600,
                                            links=3)])
        recorder = HitRecorder(CountingSink(), lookup)
        await recorder.start()
        app = make_app(TokenSigner([SECRET]), recorder)
        app.router.add_static("/static/", static_dir)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()
        await recorder.stop(timeout=10)

    Path(static_dir, "pixel.gif").write_bytes(PIXEL)
    asyncio.run(main())


# -- load generators --------------------------------------------------------------------------


def _wrk_figure(pattern: str, out: str) -> str:
    """The first group of `pattern` in wrk's report; wrk's output format changing is an error."""
    m = re.search(pattern, out)
    if m is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{out}")
    return m.group(1)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def run_wrk(url: str, duration: float, connections: int, threads: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency",
         "-H", f"User-Agent: {CHROME}", url],
        capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = float(_wrk_figure(r"Requests/sec:\s+([\d.]+)", out))
    p50 = _ms(_wrk_figure(r"\s50%\s+(\S+)", out))
    p99 = _ms(_wrk_figure(r"\s99%\s+(\S+)", out))
    total = int(_wrk_figure(r"(\d+) requests in", out))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total,
            "bad_status": int(errors.group(1)) if errors else 0}


async def run_aiohttp(url: str, duration: float, connections: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    bad = 0
    deadline = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal bad
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.get(url, allow_redirects=False, headers={"User-Agent": CHROME}) as r:
                await r.read()
                if r.status >= 400:
                    bad += 1
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"rps": len(latencies) / elapsed, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "requests": len(latencies), "bad_status": bad}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per URL (default 10)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent connections (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "aiohttp"
    if client == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 1

    sys.path.insert(0, str(ROOT))
    from gateway.tracking.tokens import TokenSigner

    signer = TokenSigner([SECRET])
    copy_id = "01J0000000000000000000BENC"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    targets = {"static": f"{base}/static/pixel.gif",
               "open": f"{base}/o/{signer.open_token(copy_id)}",
               "click": f"{base}/c/{signer.click_token(copy_id, 1, URL)}"}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), tmp],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                print("the server did not start", file=sys.stderr)
                return 1
            results: dict[str, Any] = {}
            for name, url in targets.items():
                print(f"loading {name} for {args.duration:g} s ...", file=sys.stderr)
                if client == "wrk":
                    results[name] = run_wrk(url, args.duration, args.connections, args.threads)
                else:
                    results[name] = asyncio.run(run_aiohttp(url, args.duration, args.connections))
                time.sleep(1)
            deadline = time.time() + 60
            health: dict[str, Any] = {}
            while time.time() < deadline:  # wait for the recorder to catch up
                import urllib.request

                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                if health["queue"] == 0:
                    break
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
    report = {"client": client, "connections": args.connections, "duration_s": args.duration,
              "results": results, "server": health}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tracking endpoint, {client}, {args.connections} connections, {args.duration:g} s per URL, "
          f"one server process on 127.0.0.1")
    print(f"{'target':<8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'vs static':>11}{'non-2xx/3xx':>13}")
    base_rps = results["static"]["rps"]
    for name, r in results.items():
        print(f"{name:<8}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
              f"{r['rps'] / base_rps:>10.2f}x{r['bad_status']:>13}")
    print(f"recorder: queued {health.get('queued')}, recorded {health.get('recorded')}, "
          f"dropped {health.get('dropped')} (queue full), sink failures {health.get('failed')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
