#!/usr/bin/env python3
"""Tracking endpoint benchmark: pixel and click of the running daemon, beside nginx.

Its one job: load the open pixel (``/o/<token>``) and the click redirect (``/c/<token>``)
and print requests/s and p50/p99 latency, in two modes:

* ``--mode daemon`` (the default, the headline): ``mailgw run`` on a scratch config
  (``--workers``, SQLite or ``--backend postgresql``) with ``--copies`` relayed copies
  seeded in its store, so every hit is looked up, classified and *recorded* as an
  ``opened``/``clicked`` event, as in production. The load spreads over every copy (a
  wrk Lua script walks the token list), and after each run the bench waits until the
  store holds every hit the daemon answered, and reports the recorded/s too. Beside it,
  nginx (Debian ``nginx-light``) on the same machine with ``worker_processes auto``
  serving the same URLs (``empty_gif`` and ``return 302``): the ceiling of an HTTP
  server that records nothing.
* ``--mode endpoint``: the tracking app alone in one process (``gateway.http.tracking.
  make_app`` with a counting sink, one copy), with aiohttp's static file handler as the
  baseline: the endpoint's own cost without a store.

The load generator is ``wrk`` (Debian ``wrk``) when installed, else an aiohttp client
(``--client aiohttp``; the daemon mode needs wrk). Nothing is asserted; figures go to
stdout (``--json``).

    python3 bench/tracking.py                              # daemon, workers: auto, + nginx
    python3 bench/tracking.py --workers 1 --duration 5
    python3 bench/tracking.py --backend postgresql --json
    python3 bench/tracking.py --mode endpoint --client aiohttp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
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
    return wrk_report(out)


def wrk_report(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99, requests and non-2xx/3xx answers from wrk's `--latency` report."""
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(_wrk_figure(r"Requests/sec:\s+([\d.]+)", out)),
            "p50_ms": _ms(_wrk_figure(r"\s50%\s+(\S+)", out)),
            "p99_ms": _ms(_wrk_figure(r"\s99%\s+(\S+)", out)),
            "requests": int(_wrk_figure(r"(\d+) requests in", out)),
            "bad_status": int(errors.group(1)) if errors else 0}


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """`sig` to `proc`, then SIGKILL if it has not ended within `timeout` seconds."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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



# -- daemon mode: `mailgw run` with its store, and nginx beside it -------------------------

WRK_LUA = """
local paths = {}
for line in io.lines(os.getenv("MAILGW_BENCH_PATHS")) do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
"""

NGINX_CONF = """
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location /o/ {{ empty_gif; }}
    location /c/ {{ return 302 https://example.com/pricing; }}
  }}
}}
"""


def wrk_paths(url: str, paths: list[str], duration: float, connections: int, threads: int,
              tmp: Path) -> dict[str, Any]:
    """wrk against `url` (scheme://host:port), each request the next of `paths`."""
    lua, listing = tmp / "paths.lua", tmp / f"paths-{secrets.token_hex(4)}.txt"
    lua.write_text(WRK_LUA)
    listing.write_text("\n".join(paths) + "\n")
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency",
         "-s", str(lua), "-H", f"User-Agent: {CHROME}", url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
        env={**os.environ, "MAILGW_BENCH_PATHS": str(listing)}).stdout
    return wrk_report(out)


def daemon_config(tmp: Path, url: str, ports: dict[str, int], workers: str | None) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    text = f"""hostname: gw.bench.test
state_dir: {tmp}/var
store:
  url: "{url}"
listeners:
  submission: {{host: 127.0.0.1, port: {ports['submission']}, tls: none}}
  tracking: {{host: 127.0.0.1, port: {ports['tracking']}, base_url: "http://127.0.0.1:{ports['tracking']}"}}
  admin: {{host: 127.0.0.1, port: {ports['admin']}}}
tracking:
  secret_file: {tmp}/tracking.key
delivery:
  route: smarthost
  smarthost: {{host: 127.0.0.1, port: {ports['smarthost']}, tls: none}}
policies_dir: {tmp}/policies
logging: {{format: json, level: warning}}
"""
    if workers is not None:
        text += f"workers: {workers}\n"
    path = tmp / "gateway.yaml"
    path.write_text(text)
    return path


async def seed_copies(url: str, raw_dir: Path, copies: int) -> list[str]:
    """`copies` relayed messages (one recipient, five links each) delivered an hour ago;
    their copy ids."""
    from datetime import UTC, datetime, timedelta

    from gateway.crm.migrate import upgrade
    from gateway.crm.store import Store
    from gateway.ids import new_queue_id
    from gateway.records import EventRecord, NewMessage, SourceRef

    await upgrade(url)
    store = await Store.open(url, raw_dir=raw_dir)
    at = datetime.now(UTC) - timedelta(hours=1)
    ids = [new_queue_id() for _ in range(copies)]
    try:
        for i in range(0, copies, 500):
            batch = [NewMessage(
                message_id=f"<t{i + j}@gw.bench.test>", from_addr="rep@gw.bench.test",
                to_addrs=[f"person{i + j}@customer.test"], cc_addrs=[], subject="Pricing",
                date=at, direction="outbound", user="rep@gw.bench.test",
                sources=[SourceRef("relay", cid, at, recipient=f"person{i + j}@customer.test",
                                   client_ip="192.0.2.1", links=5)])
                for j, cid in enumerate(ids[i:i + 500])]
            await store.store_messages(batch)
        events = [EventRecord(queue_id=cid, type="sent", at=at, recipient=f"person{k}@customer.test")
                  for k, cid in enumerate(ids)]
        await store.record([], events)
    finally:
        await store.close()
    return ids


async def count_hits(url: str) -> int:
    import sqlalchemy as sa

    from gateway.crm.models import events_table
    from gateway.crm.store import Store

    store = await Store.open(url)
    try:
        async with store.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(events_table)
                                           .where(events_table.c.type.in_(("opened", "clicked")))
                                           )).scalar() or 0)
    finally:
        await store.close()


def tracking_health(base: str) -> dict[str, Any]:
    """The tracking listener's recorder counters (``/healthz``)."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
        return dict(json.loads(r.read()))


def wait_http(url: str, deadline: float, proc: subprocess.Popen[Any] | None = None) -> None:
    import urllib.error
    import urllib.request

    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url}")


def run_daemon_mode(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bench.imap import pg_database
    from gateway.tracking.tokens import TokenSigner

    if not shutil.which("wrk"):
        raise SystemExit("the daemon mode needs wrk (Debian package wrk)")
    report: dict[str, Any] = {"mode": "daemon", "workers": args.workers or "default",
                              "backend": args.backend, "copies": args.copies,
                              "connections": args.connections, "duration_s": args.duration,
                              "cores": len(os.sched_getaffinity(0)), "results": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pg_name = None
        if args.backend == "postgresql":
            pg_name = asyncio.run(pg_database(args.pg_admin))
            url = f"{args.pg_admin.rsplit('/', 1)[0]}/{pg_name}".replace(
                "postgresql://", "postgresql+asyncpg://", 1)
        else:
            (tmp / "var").mkdir()
            url = f"sqlite+aiosqlite:///{tmp}/var/crm.db"
        try:
            ids = asyncio.run(seed_copies(url, tmp / "var" / "raw", args.copies))
            secret = secrets.token_urlsafe(32)
            (tmp / "tracking.key").write_text(secret + "\n")
            (tmp / "tracking.key").chmod(0o600)
            signer = TokenSigner.from_text(secret)
            paths = {"open": [f"/o/{signer.open_token(c)}" for c in ids],
                     "click": [f"/c/{signer.click_token(c, 1 + k % 5, URL)}"
                               for k, c in enumerate(ids)]}
            ports = {k: free_port() for k in ("submission", "tracking", "admin", "smarthost")}
            cfg = daemon_config(tmp, url, ports, args.workers)
            log = (tmp / "daemon.log").open("w")
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
                                    cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.DEVNULL, stderr=log)
            base = f"http://127.0.0.1:{ports['tracking']}"
            try:
                wait_http(f"http://127.0.0.1:{ports['admin']}/healthz", time.time() + 60, proc)
                recorded = 0
                for name in ("open", "click"):
                    print(f"loading the daemon's {name} for {args.duration:g} s ...", file=sys.stderr)
                    t0 = time.perf_counter()
                    r = wrk_paths(base, paths[name], args.duration, args.connections,
                                  args.threads, tmp)
                    # every answered hit is queued or dropped (the recorder's bounded
                    # queue): wait until the queue is empty and the store count stops rising
                    before, dropped = recorded, tracking_health(base).get("dropped", 0)
                    deadline = time.time() + 300
                    last_change, stable_since = time.perf_counter(), time.perf_counter()
                    while time.time() < deadline:
                        now_count = asyncio.run(count_hits(url))
                        if now_count != recorded:
                            recorded, last_change = now_count, time.perf_counter()
                            stable_since = last_change
                        elif tracking_health(base).get("queue") == 0 \
                                and time.perf_counter() - stable_since > 2:
                            break
                        time.sleep(0.25)
                    health = tracking_health(base)
                    r["recorded"] = recorded - before
                    r["dropped"] = health.get("dropped", 0) - dropped
                    r["recorded_per_s"] = round(r["recorded"] / max(last_change - t0, 1e-9), 1)
                    report["results"][f"mailgw {name}"] = r
                report["daemon_rss_kb"] = _tree_rss_kb(proc.pid)
            finally:
                stop_process(proc, signal.SIGTERM, 60)
                log.close()
                if proc.returncode not in (0, -signal.SIGTERM):
                    print((tmp / "daemon.log").read_text()[-3000:], file=sys.stderr)
            if shutil.which("nginx") and not args.skip_nginx:
                port = free_port()
                conf = tmp / "nginx.conf"
                conf.write_text(NGINX_CONF.format(workers="auto", tmp=tmp, port=port))
                ng = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                                      stderr=subprocess.DEVNULL)
                try:
                    wait_http(f"http://127.0.0.1:{port}/o/x", time.time() + 20, ng)
                    for name in ("open", "click"):
                        print(f"loading nginx {name} for {args.duration:g} s ...", file=sys.stderr)
                        report["results"][f"nginx {name}"] = wrk_paths(
                            f"http://127.0.0.1:{port}", paths[name], args.duration,
                            args.connections, args.threads, tmp)
                finally:
                    stop_process(ng, signal.SIGQUIT, 20)
        finally:
            if pg_name:
                asyncio.run(pg_database(args.pg_admin, drop=pg_name))
    return report


def _tree_rss_kb(pid: int) -> int:
    """The resident set of `pid` and its descendants (the workers, their parse pools), KiB."""
    from bench.relay import proc_status_kb, process_tree

    return sum(proc_status_kb(p, "VmRSS") or 0 for p in process_tree(pid))


def print_daemon_report(r: dict[str, Any]) -> None:
    print(f"tracking, mailgw run (workers: {r['workers']}, {r['backend']} store, {r['copies']} copies, "
          f"every hit recorded) vs nginx (worker_processes auto, records nothing); "
          f"{r['cores']} cores, wrk {r['connections']} connections, {r['duration_s']:g} s each")
    print(f"{'target':<14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'recorded/s':>12}{'dropped':>9}"
          f"{'non-2xx/3xx':>13}")
    for name, x in r["results"].items():
        rec = f"{x['recorded_per_s']:>12.0f}{x['dropped']:>9}" if "recorded_per_s" in x \
            else f"{'-':>12}{'-':>9}"
        print(f"{name:<14}{x['rps']:>10.0f}{x['p50_ms']:>9.2f}{x['p99_ms']:>9.2f}{rec}{x['bad_status']:>13}")
    res = r["results"]
    for kind in ("open", "click"):
        if f"nginx {kind}" in res:
            print(f"mailgw / nginx, {kind}: {res[f'mailgw {kind}']['rps'] / res[f'nginx {kind}']['rps']:.3f}")
    if "daemon_rss_kb" in r:
        print(f"daemon RSS (all processes): {r['daemon_rss_kb'] / 1024:.0f} MiB")

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
    ap.add_argument("--mode", choices=["daemon", "endpoint"], default="daemon")
    ap.add_argument("--workers", help="daemon mode: the config's workers (auto, 1, 2, ...; "
                                      "default: the config default)")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--copies", type=int, default=2000, help="daemon mode: relayed copies seeded")
    ap.add_argument("--skip-nginx", action="store_true")
    ap.add_argument("--pg-admin", default=os.environ.get(
        "MAILGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()
    if args.mode == "daemon":
        report = run_daemon_mode(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_daemon_report(report)
        return 0
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
            stop_process(proc, signal.SIGTERM, 20)
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
