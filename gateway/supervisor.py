"""`mailgw run` with `workers` > 1: start the worker processes, restart the dead, signal them all.

Each worker is `mailgw run --worker I/N`: the whole daemon (gateway.app.App) on its own
event loop, a node of the multi-node design (its own spool `state_dir/spool-I`, worker
1 keeping `state_dir/spool`; its own node id; the store and the mailbox leases shared),
with every listener bound with SO_REUSEPORT so the kernel spreads connections over
the workers. The supervisor itself serves no mail:

- before any worker starts it does what must happen once: validates the policies,
  migrates the store, creates the key files made on first use, hands the queues of
  workers no longer configured to worker 1, and creates the metrics directory afresh
  (prometheus-client's multiprocess mode; every worker's `/metrics` sums all of them);
- each worker talks sd_notify to its own socket of the supervisor: the supervisor tells
  systemd READY=1 once every worker is ready, and feeds systemd's watchdog only while
  every worker is alive, ready and pinging its own watchdog (which it does only while
  its scheduler and tailers are healthy);
- a worker that dies (even kill -9) is started again after a backoff (0.5 s doubling
  to 30 s while it keeps dying young); the new one recovers its spool and delivers
  what it holds. Workers failing before any of them is ready fail `mailgw run`;
- SIGTERM/SIGINT: SIGTERM to every worker, which drain as a single process does;
- SIGHUP: the new config and policies are validated here first; when invalid, no
  worker is told and every problem is logged (`reload_refused`); else every worker
  reloads, and the supervisor logs `reloaded` once all of them are ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import multiprocess

from gateway.accounts.registry import token_cipher
from gateway.app import App, adopt_worker_queues
from gateway.config import Config, load_config
from gateway.crm.store import Store
from gateway.errors import ConfigError
from gateway.policy import policies_for
from gateway.sdnotify import Notifier

#: A worker pings its supervisor this often while healthy (its WATCHDOG_USEC is twice it).
WORKER_PING = 1.0
#: A worker not heard from for this long is not healthy (systemd's watchdog starves).
WORKER_SILENCE = 4 * WORKER_PING
#: Restart backoff: first delay, cap, and how long a worker must live to reset it.
BACKOFF_MIN, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 60.0
#: How long to wait for every worker's READY after a SIGHUP.
RELOAD_TIMEOUT = 60.0


@dataclass
class _Child:
    index: int
    sock: socket.socket
    address: str                      # NOTIFY_SOCKET value for the worker ("@...")
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    up: bool = False                  # READY=1 seen since this process was started
    ever_ready: bool = False
    last_ping: float = 0.0
    status: str = ""
    failures: int = 0
    #: a SIGHUP came while this worker was starting: sent to it once it is ready
    reload_pending: bool = False
    #: still starting when the supervisor stopped (a SIGTERM may end it before its loop runs)
    killed_starting: bool = False
    #: alive when the supervisor stopped: its exit status is the drain's
    draining: bool = False
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """Runs `cfg.worker_count` workers of the config at `config_path` until told to stop."""

    def __init__(self, cfg: Config, config_path: str | Path, *, count: int | None = None,
                 notifier: Notifier | None = None, log: Any = None) -> None:
        self.cfg = cfg
        self.config_path = str(config_path)
        self.count = count or cfg.worker_count
        self.notifier = notifier or Notifier()
        self.log = log or structlog.get_logger("mailgw")
        self.metrics_dir = cfg.state_path / "metrics"
        self.children: list[_Child] = []
        self._stopping = asyncio.Event()
        self._failed: int | None = None      # exit code when a worker failed to start
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- once, before the workers ---------------------------------------------------------
    async def prepare(self) -> None:
        """What must happen once per node, not once per worker (ConfigError, StoreError)."""
        cfg = self.cfg
        policies_for(cfg)
        cfg.state_path.mkdir(parents=True, exist_ok=True, mode=0o750)
        await asyncio.to_thread(adopt_worker_queues, cfg, self.count, self.log)
        store = await Store.from_config(cfg)   # migrations run here, not in N racing workers
        await store.close()
        if cfg.listeners.tracking is not None:
            App._load_token_signer(cfg)          # the key file every worker must share
        token_cipher(cfg)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(mode=0o700)

    # -- the workers --------------------------------------------------------------------
    def _child(self, index: int) -> _Child:
        name = f"mailgw-{os.getpid()}-{index}-{secrets.token_hex(4)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("\0" + name)
        sock.setblocking(False)
        child = _Child(index, sock, "@" + name)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify, child)
        return child

    def _on_notify(self, child: _Child) -> None:
        while True:
            try:
                data = child.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n")
                          if "=" in line)
            if "STATUS" in fields:
                child.status = fields["STATUS"]
            if fields.get("WATCHDOG") == "1":
                child.last_ping = time.monotonic()
            if fields.get("READY") == "1":
                child.ready = True
                child.last_ping = time.monotonic()
                if not child.up:
                    child.up = True
                    self.log.info("worker_ready", worker=child.index,
                                  pid=child.proc.pid if child.proc else None,
                                  restarted=child.ever_ready)
                    child.ever_ready = True
                    if child.reload_pending and child.proc is not None \
                            and not self._stopping.is_set():
                        # it may have read the file before the reload: it reloads now
                        child.reload_pending = False
                        with contextlib.suppress(ProcessLookupError):
                            child.proc.send_signal(signal.SIGHUP)
                child.ready_event.set()
                self._maybe_ready()
            if fields.get("STOPPING") == "1":
                child.ready = False

    def _env(self, child: _Child) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID")}
        env["NOTIFY_SOCKET"] = child.address
        env["WATCHDOG_USEC"] = str(int(WORKER_PING * 2_000_000))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        return env

    async def _spawn(self, child: _Child) -> None:
        child.ready = child.up = False
        child.ready_event.clear()
        child.started = time.monotonic()
        child.reload_pending = False
        # started with SIGHUP ignored (inherited through exec) until its event loop takes
        # it over: a reload while it starts must not kill it (it is sent again when ready)
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "-c", self.config_path,
            "--worker", f"{child.index}/{self.count}", env=self._env(child),
            preexec_fn=_ignore_sighup)
        self.log.info("worker_started", worker=child.index, pid=child.proc.pid)

    async def _keep(self, child: _Child) -> None:
        """Run one worker; start it again whenever it dies, until stopping."""
        while not self._stopping.is_set():
            await self._spawn(child)
            assert child.proc is not None
            if self._stopping.is_set():   # stopped while it was being started: drain it too
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            code = await child.proc.wait()
            pid = child.proc.pid
            child.ready = False
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    pid, str(self.metrics_dir))
            if self._stopping.is_set():
                return
            lived = time.monotonic() - child.started
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            self.log.error("worker_died", worker=child.index, pid=pid, status=how,
                           lived=round(lived, 1))
            if not any(c.ever_ready for c in self.children):
                # failing before any worker serves (a port taken, the store down):
                # `mailgw run` fails; once one serves, a failing worker is retried
                self._failed = code if code > 0 else 1
                self._stopping.set()
                return
            self.notifier.status(f"worker {child.index} restarting")
            if lived >= BACKOFF_RESET:
                child.failures = 0
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** child.failures)
            child.failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _maybe_ready(self) -> None:
        if all(c.ready for c in self.children) and not self._stopping.is_set():
            self.notifier.ready(status=f"accepting mail ({self.count} workers)")

    def healthy(self) -> bool:
        """Every worker alive, ready and pinging: what feeds systemd's watchdog."""
        now = time.monotonic()
        return all(c.alive and c.ready and now - c.last_ping < WORKER_SILENCE
                   for c in self.children)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            if self.healthy():
                self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _signal_all(self, sig: int) -> None:
        for c in self.children:
            if c.alive and c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)

    # -- SIGHUP ---------------------------------------------------------------------------
    async def reload(self) -> bool:
        """Validate the new config here; reload every worker, or none when it is invalid."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
                await asyncio.to_thread(policies_for, new)
            except ConfigError as exc:
                for p in exc.problems:
                    self.log.error("reload_refused", problem=str(p), workers_reloaded=0)
                self.notifier.ready(status="reload refused: invalid config or policies; "
                                           "old ones kept")
                return False
            if new.worker_count != self.count or new.state_dir != self.cfg.state_dir:
                self.log.warning("reload_partial", needs_restart=["workers"],
                                 running=self.count, configured=new.worker_count)
            live = [c for c in self.children if c.alive and c.up]
            for c in self.children:
                if c.alive and not c.up:     # still starting: told once it is ready
                    c.reload_pending = True
            for c in live:
                c.ready_event.clear()
                assert c.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGHUP)
            waits = [asyncio.create_task(c.ready_event.wait()) for c in live]
            _, pending = await asyncio.wait(waits, timeout=RELOAD_TIMEOUT) if waits else ((), ())
            for t in pending:
                t.cancel()
            refused = [c.index for c in live if "refused" in c.status]
            late = [c.index for c, t in zip(live, waits, strict=True) if t in pending]
            self.cfg = new
            if refused or late:
                self.log.error("reload_incomplete", refused=refused, not_answered=late)
            else:
                self.log.info("reloaded", config=new.source, workers=len(live))
            self.notifier.ready(status=f"accepting mail ({self.count} workers, reloaded)")
            return not refused and not late

    # -- the whole run ----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.prepare()
        self.children = [self._child(i) for i in range(1, self.count + 1)]
        keepers = [asyncio.create_task(self._keep(c), name=f"worker-{c.index}")
                   for c in self.children]
        watchdog = asyncio.create_task(self._watchdog()) \
            if self.notifier.watchdog_interval is not None and self.notifier.enabled else None

        def on_hup() -> None:
            t = loop.create_task(self.reload())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        self.log.info("supervisor_started", config=self.config_path, workers=self.count)
        try:
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)   # a reload while draining: ignored
            self.notifier.stopping()
            self.log.info("stopping", workers=self.count)
            for c in self.children:       # not started yet: its interpreter may still be
                c.killed_starting = c.alive and not c.up   # loading, SIGTERM ends it
                c.draining = c.alive      # one dead (waiting to be restarted) has no say

            self._signal_all(signal.SIGTERM)
            code = await self._wait_workers(keepers)
            if watchdog is not None:
                watchdog.cancel()
            for t in list(self._tasks):
                t.cancel()
            for c in self.children:
                loop.remove_reader(c.sock.fileno())
                c.sock.close()
        if self._failed is not None:
            return self._failed
        self.log.info("stopped", workers=self.count)
        return code

    async def _wait_workers(self, keepers: list[asyncio.Task[None]]) -> int:
        """Wait for every worker to drain (SIGKILL after drain_timeout and a margin)."""
        grace = self.cfg.drain_timeout + 30.0
        _, pending = await asyncio.wait(keepers, timeout=grace)
        if pending:
            self.log.error("workers_killed", workers=[c.index for c in self.children if c.alive],
                           after=grace)
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending, timeout=10)
        ok = [c.proc.returncode == 0 or
              (c.killed_starting and c.proc.returncode == -signal.SIGTERM)
              for c in self.children if c.proc is not None and c.draining]
        return 0 if all(ok) else 1


def _ignore_sighup() -> None:
    """In the forked child before exec: SIGHUP ignored (exec keeps an ignored signal)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def run_supervisor(cfg: Config, config_path: str | Path) -> int:
    """`mailgw run` with several workers."""
    return await Supervisor(cfg, config_path).run()
