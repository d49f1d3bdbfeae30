"""Build every component from one Config, start and stop them; signals and systemd readiness.

SIGTERM/SIGINT drain (listeners stop accepting, attempts in flight finish, the store
writer flushes) and `mailgw run` exits 0. SIGHUP reloads the configuration: a new
config that does not validate is refused with its problems logged and the old one
stays in force. Changing listener addresses, `state_dir` or `store` needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config, load_config
from gateway.crm.store import Store
from gateway.crm.writer import StoreWriter
from gateway.delivery.mx import MXResolver
from gateway.delivery.scheduler import Scheduler
from gateway.delivery.transport import Transport
from gateway.errors import ConfigError
from gateway.passwords import PasswordChecker
from gateway.relay import Relay
from gateway.sdnotify import Notifier
from gateway.smtp.protocol import AuthLimiter
from gateway.smtp.server import SMTPListener, server_tls_context
from gateway.smtp.submission import SubmissionHandler
from gateway.spool import Spool


class App:
    """The running daemon: spool, store writer, scheduler, SMTP listeners."""

    def __init__(self, cfg: Config, *, notifier: Notifier | None = None,
                 resolver: MXResolver | None = None, log: Any = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.log = log or structlog.get_logger("mailgw")
        self._resolver = resolver
        self.spool = Spool(cfg.spool_path)
        self.store: Store | None = None
        self.writer: StoreWriter | None = None
        self.scheduler: Scheduler | None = None
        self.relay: Relay | None = None
        self.submission: SMTPListener | None = None
        self._stopped = asyncio.Event()

    def get_config(self) -> Config:
        return self.cfg

    async def start(self) -> None:
        cfg = self.cfg
        cfg.state_path.mkdir(parents=True, exist_ok=True, mode=0o750)
        counts = self.spool.recover()
        self.log.info("spool_recovered", path=str(self.spool.root), **counts)
        self.store = await Store.open(cfg.store_url, auto_upgrade=True)
        self.writer = StoreWriter(self.store, log=self.log)
        await self.writer.start()
        d = cfg.delivery
        transport = Transport(cfg.hostname, connect_timeout=d.connect_timeout,
                              command_timeout=d.command_timeout,
                              idle_timeout=d.connection_idle, per_destination=d.per_destination)
        resolver = self._resolver or MXResolver(nameservers=d.nameservers or None)
        self.scheduler = Scheduler(self.get_config, self.spool, transport, resolver, self.writer,
                                   log=self.log)
        self.relay = Relay(self.spool, cfg.hostname, on_queued=self.scheduler.notify)
        await self.scheduler.start()
        sub = cfg.listeners.submission
        if sub is not None:
            handler = SubmissionHandler(self.get_config, self.relay, PasswordChecker(),
                                        AuthLimiter(sub.auth_failures, sub.auth_failure_window),
                                        log=self.log)
            self.submission = SMTPListener("submission", cfg, sub, handler)
            await self.submission.start()
            self.log.info("listening", listener="submission", host=sub.host,
                          port=self.submission.port, tls=sub.tls)
        self.notifier.ready(status="accepting mail")
        self.notifier.start_watchdog(healthy=self._healthy)

    def _healthy(self) -> bool:
        return self.scheduler is not None and all(not t.done() for t in self.scheduler._tasks)

    async def reload(self, path: str | Path) -> bool:
        """Load and validate the config again; keep the old one if the new one is invalid."""
        self.notifier.reloading()
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            for p in exc.problems:
                self.log.error("reload_refused", problem=str(p))
            self.notifier.ready(status="reload refused: invalid config; old config kept")
            return False
        old = self.cfg
        restart_needed = [k for k in ("state_dir", "store", "hostname")
                          if getattr(old, k) != getattr(new, k)]
        if old.listeners != new.listeners:
            o, n = old.listeners.submission, new.listeners.submission
            if (o and n and (o.host, o.port, o.tls) != (n.host, n.port, n.tls)) or bool(o) != bool(n):
                restart_needed.append("listeners.submission")
        if restart_needed:
            self.log.warning("reload_partial", needs_restart=restart_needed)
        self.cfg = new
        n_sub, o_sub = new.listeners.submission, old.listeners.submission
        if self.submission is not None and n_sub is not None and o_sub is not None:
            self.submission.cfg = new
            self.submission.lst = n_sub
            if n_sub.tls == o_sub.tls:  # new certificate files take effect for new sessions
                self.submission.tls = server_tls_context(new, n_sub)
        if self.scheduler is not None:
            self.scheduler.config_changed()
        self.log.info("reloaded", config=new.source)
        self.notifier.ready(status="accepting mail (reloaded)")
        return True

    async def stop(self) -> None:
        self.notifier.stopping()
        await self.notifier.stop_watchdog()
        grace = self.cfg.drain_timeout
        if self.submission is not None:
            await self.submission.stop(grace=min(grace, 5.0))
        if self.scheduler is not None:
            await self.scheduler.stop(timeout=grace)
        if self.writer is not None:
            lost = await self.writer.stop(timeout=grace)
            if lost:
                self.log.error("store_events_unwritten", count=lost)
        if self.store is not None:
            await self.store.close()
        await asyncio.to_thread(self.spool.close)
        self.log.info("stopped")


async def run_daemon(cfg: Config, config_path: str | Path) -> int:
    """`mailgw run`: start, serve until SIGTERM/SIGINT, reload on SIGHUP."""
    log = structlog.get_logger("mailgw")
    app = App(cfg, log=log)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        t = loop.create_task(app.reload(config_path))
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    try:
        await app.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await app.stop()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    log.info("started", config=str(config_path))
    await stop.wait()
    log.info("stopping")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await app.stop()
    return 0
