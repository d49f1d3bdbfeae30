"""Build every component from one Config, start and stop them; signals and systemd readiness.

SIGTERM/SIGINT drain (listeners stop accepting, attempts in flight finish, the store
writer flushes) and `mailgw run` exits 0. SIGHUP reloads the configuration and the
policies together: if either does not validate, both are refused with every problem
logged and the old ones stay in force. Changing listener addresses, `state_dir` or
`store` needs a restart.

An App is either the whole daemon (`workers: 1`) or one worker of a supervisor
(:class:`Worker`, `gateway.supervisor`): then it has its own spool, its own node id in the
store, binds its listeners with SO_REUSEPORT and writes its metrics where every worker's
are summed; its sd_notify messages go to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway import dirqueue
from gateway.accounts.service import AccountService
from gateway.api.http import AdminAPI
from gateway.api.webhooks import WebhookDispatcher, endpoints_from_config, targets
from gateway.config import Config, generated_secret_path, load_config, read_secret
from gateway.crm import outbox
from gateway.crm.authlimit import StoreAuthLimiter
from gateway.crm.counters import SendCounts
from gateway.crm.hits import StoreTracking
from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from gateway.crm.writer import StoreWriter
from gateway.delivery.mx import MXResolver
from gateway.delivery.scheduler import LocalMessage, Scheduler
from gateway.delivery.smtp import SMTPTransport
from gateway.errors import ConfigError, SpoolError, StoreError
from gateway.http.connect import add_connect_routes
from gateway.http.tracking import TrackingServer, settings_from_config
from gateway.imap.manager import Tailers
from gateway.imap.sent import SentCopies
from gateway.ingest import Ingest, IngestSubmission
from gateway.mail.auth import make_resolver
from gateway.metrics import Metrics
from gateway.passwords import PasswordChecker
from gateway.pipeline.dkim import Signer
from gateway.pipeline.outbound import CopyPlan, Outbound
from gateway.policy import PolicySet, policies_for
from gateway.relay import Relay, Submission, record_unrecorded
from gateway.sdnotify import Notifier
from gateway.smtp.ingest import IngestHandler
from gateway.smtp.protocol import AuthLimiter
from gateway.smtp.server import SMTPListener, server_tls_context
from gateway.smtp.submission import SubmissionHandler
from gateway.spool import Spool
from gateway.spool.spool import STATES
from gateway.tracking.tokens import TokenSigner, load_or_create_secret


class IngestDelivery:
    """The scheduler's `LocalDelivery`: copies the relay spooled for the ingest addresses go
    to the ingest service as trusted submissions (the relay authenticated their sender)."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    async def accept(self, msg: LocalMessage) -> str:
        result = await self.ingest.accept(IngestSubmission(
            mail_from=msg.mail_from, data=msg.data, client_ip=msg.client_ip,
            client_helo=msg.client_helo, trusted=True, user=msg.user))
        return result.id


@dataclass(frozen=True)
class Worker:
    """Which worker of a supervisor an App is: `index` of `count` (1-based)."""

    index: int
    count: int
    #: prometheus-client's multiprocess directory, created by the supervisor
    metrics_dir: str | None = None

    def node_id(self, cfg: Config) -> str | None:
        """`sync.node_id` plus the worker index; None: the default (host:pid:random)."""
        return f"{cfg.sync.node_id}-w{self.index}" if cfg.sync.node_id else None


#: The per-worker directories of `state_dir` (worker 1's is the single process's).
WORKER_QUEUES = ("spool", "sent-copies")


def adopt_worker_queues(cfg: Config, keep: int, log: Any) -> int:
    """Hand the queues of workers above `keep` (left by a run with more `workers`) to
    worker 1's, so that nothing spooled is orphaned. Nothing may be running on them."""
    total = 0
    for name in WORKER_QUEUES:
        for d in sorted(cfg.state_path.glob(f"{name}-*")):
            suffix = d.name[len(name) + 1:]
            if not suffix.isdigit() or int(suffix) <= keep or not d.is_dir():
                continue
            n = dirqueue.adopt(d, cfg.worker_state_path(name, 1))
            if n:
                log.warning("worker_queue_adopted", queue=name, source=str(d), entries=n)
            total += n
    return total


class App:
    """The running daemon: spool, store writer, scheduler, SMTP listeners."""

    def __init__(self, cfg: Config, *, notifier: Notifier | None = None,
                 resolver: MXResolver | None = None, log: Any = None,
                 worker: Worker | None = None) -> None:
        self.cfg = cfg
        self.worker = worker
        self.notifier = notifier or Notifier()
        self.log = log or structlog.get_logger("mailgw")
        self._resolver = resolver
        self.spool = Spool(cfg.worker_spool_path(worker.index) if worker else cfg.spool_path)
        self.store: Store | None = None
        self.writer: StoreWriter | None = None
        self.scheduler: Scheduler | None = None
        self.relay: Relay | None = None
        self.submission: SMTPListener | None = None
        self.ingest: Ingest | None = None
        self.outbound: Outbound | None = None
        self.counts: SendCounts | None = None
        self.suppressions: SuppressionList | None = None
        self.ingest_listener: SMTPListener | None = None
        self.tracking: TrackingServer | None = None
        self._signer: TokenSigner | None = None
        self.tailers: Tailers | None = None
        self.policies = PolicySet.empty(cfg)
        self.metrics = Metrics(worker.metrics_dir if worker else None)
        self.spool.on_unsynced = self.metrics.spool_dir_fsync_failed
        self.admin: AdminAPI | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.accounts: AccountService | None = None
        self._stopped = asyncio.Event()
        self._spool_lock: int | None = None
        self._replay_task: asyncio.Task[None] | None = None

    def get_config(self) -> Config:
        """The configuration in force: the file's, with the accounts created at run time."""
        return self.accounts.effective(self.cfg) if self.accounts is not None else self.cfg

    def file_config(self) -> Config:
        return self.cfg

    def _accounts_changed(self) -> None:
        """Runtime accounts changed: the store links with the new own addresses, tailers look."""
        if self.store is not None:
            self._configure_store(self.get_config())
        if self.tailers is not None:
            self.tailers.wake()

    def get_policies(self) -> PolicySet:
        """The policies in force (replaced together with the config on SIGHUP)."""
        return self.policies

    def _policies_loaded(self, policies: PolicySet) -> None:
        self.log.info("policies_loaded", directory=str(policies.directory or "-"),
                      files=len(policies.files), rules=[r.name for r in policies.rules])

    async def start(self) -> None:
        cfg = self.cfg
        self.policies = policies_for(cfg)  # ConfigError before anything starts
        self._policies_loaded(self.policies)
        cfg.state_path.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.worker is None:   # a single process takes over what workers left queued
            await asyncio.to_thread(adopt_worker_queues, cfg, 1, self.log)
        else:                     # a worker of an earlier supervisor may still be draining
            await asyncio.to_thread(self._lock_spool, cfg.drain_timeout + 30.0)
        counts = self.spool.recover()
        self.log.info("spool_recovered", path=str(self.spool.root), **counts)
        self.store = await Store.from_config(cfg)
        self.accounts = AccountService(self.file_config, self.store, log=self.log,
                                       on_change=self._accounts_changed)
        await self.accounts.start()
        self._configure_store(self.get_config())
        self.writer = StoreWriter(self.store, log=self.log,
                                  on_failure=self.metrics.store_write_failed)
        await self.writer.start()
        replayed = await self._recover_store_records()
        d = cfg.delivery
        transport = SMTPTransport(cfg.hostname, connect_timeout=d.connect_timeout,
                                  command_timeout=d.command_timeout,
                                  idle_timeout=d.connection_idle,
                                  per_destination=d.per_destination,
                                  reuse_time=d.connection_reuse_time,
                                  reuse_count=d.connection_reuse_count)
        nameservers = d.nameserver_addresses()
        resolver = self._resolver or MXResolver(
            nameservers=[ip for ip, _ in nameservers] or None,
            port=nameservers[0][1] if nameservers else 53)
        self.ingest = Ingest(self.get_config, self.store,
                             make_resolver(cfg.delivery.nameserver_addresses()), log=self.log)
        self.scheduler = Scheduler(self.get_config, self.spool, transport, resolver, self.writer,
                                   log=self.log, local=IngestDelivery(self.ingest),
                                   metrics=self.metrics, tokens=self.accounts.tokens,
                                   status=self.accounts, secrets=self.accounts)
        # with several workers a sender's sessions land in any of them: read the shared
        # count at every check instead of a cache another worker's mail does not update
        worker = self.worker
        self.counts = SendCounts(self.store, log=self.log,
                                 refresh=0.0 if worker and worker.count > 1 else None)
        self.suppressions = SuppressionList(self.store)
        self.outbound = self._outbound(cfg, self.policies)
        self.relay = Relay(self.spool, cfg.hostname, on_queued=self.scheduler.notify,
                           outbound=self.get_outbound, events=self.writer,
                           is_ingest=self.ingest.is_ingest_address, counts=self.counts,
                           on_accepted=self._accepted, log=self.log)
        self.scheduler.reaping = replayed
        await self.scheduler.start()
        if not replayed:
            self._replay_task = asyncio.create_task(self._replay_later(), name="journal-replay")
        self.tailers = Tailers(self.get_config, self.store, log=self.log, metrics=self.metrics,
                               tokens=self.accounts.tokens, secrets=self.accounts,
                               node_id=worker.node_id(cfg) if worker else None,
                               sent_dir=cfg.worker_state_path("sent-copies", worker.index)
                               if worker else None)
        await self.tailers.start()
        sub = cfg.listeners.submission
        if sub is not None:
            # failed AUTH attempts are counted in the store: the lockout holds on every
            # worker and node; the local count stays in force if the store cannot answer
            limiter = StoreAuthLimiter(self.store, sub.auth_failures, sub.auth_failure_window,
                                       local=AuthLimiter(sub.auth_failures,
                                                         sub.auth_failure_window), log=self.log)
            handler = SubmissionHandler(self.get_config, self.relay, PasswordChecker(), limiter,
                                        log=self.log, policies=self.get_policies,
                                        counts=self.counts, suppressions=self.suppressions)
            self.submission = SMTPListener("submission", cfg, sub, handler,
                                           reuse_port=self.reuse_port)
            await self.submission.start()
            self.log.info("listening", listener="submission", host=sub.host,
                          port=self.submission.port, tls=sub.tls)
        await self._start_ingest()
        await self._start_tracking()
        await self._start_api(cfg)
        self.notifier.ready(status="accepting mail")
        self.notifier.start_watchdog(healthy=self._healthy)

    def _lock_spool(self, wait: float) -> None:
        """Hold `spool/.lock` (flock) for this worker's life: a worker left draining by a
        supervisor that was killed must finish before a new one works on its spool."""
        import fcntl
        import time

        self.spool.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.spool.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._spool_lock = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SpoolError(f"the spool {self.spool.root} is in use by another "
                                     f"process (still after {wait:.0f} s)") from None
                if not logged:
                    self.log.warning("spool_busy_waiting", path=str(self.spool.root))
                    logged = True
                time.sleep(0.1)

    async def _recover_store_records(self) -> bool:
        """Records lost in a crash (inside the store writer's batching delay) of messages
        still spooled or delivered (done/), rebuilt from the spool before the scheduler
        starts, and the outcome events the spool keeps added again. A store that cannot
        answer now is logged (False): the mail itself is safe and is delivered anyway,
        and `_replay_later` tries again."""
        assert self.store is not None and self.writer is not None
        try:
            n = await record_unrecorded(self.spool, self.store.known_relay_refs, self.writer,
                                        log=self.log)
        except StoreError as exc:
            self.log.error("store_records_not_recovered", error=str(exc), retried=True)
            return False
        if n:
            self.log.warning("store_records_recovered", count=n)
        return True

    async def _replay_later(self) -> None:
        """The journal replay that failed at start, tried again until the store answers;
        done/ keeps every entry delivered meanwhile until then."""
        assert self.scheduler is not None
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            if await self._recover_store_records():
                await self.scheduler.journal_replayed()
                return
            delay = min(delay * 2, 30.0)

    async def _start_ingest(self) -> None:
        """The BCC / forward address's listener (`listeners.ingest`), when configured."""
        lst = self.cfg.listeners.ingest
        if lst is None:
            return
        assert self.ingest is not None
        handler = IngestHandler(self.ingest, max_recipients=lst.max_recipients, log=self.log)
        self.ingest_listener = SMTPListener("ingest", self.cfg, lst, handler,
                                            reuse_port=self.reuse_port)
        await self.ingest_listener.start()
        self.log.info("listening", listener="ingest", host=lst.host,
                      port=self.ingest_listener.port, tls=lst.tls,
                      addresses=list(self.cfg.ingest.addresses))

    async def _accepted(self, sub: Submission, data: bytes, plans: list[CopyPlan]) -> None:
        """After a message is spooled (before the 250): metrics, and the rep's Sent copy.

        The Sent copy is the untracked message (a shared copy's bytes, else the message as
        submitted) for an account whose provider does not file mail sent through it by
        itself. It never fails the message: the mail is already safe in the spool.
        """
        self.metrics.accepted()
        sent = self.sent_copies
        acct = self.get_config().account(sub.account) if sub.account else None
        remote = [p for p in plans if p.route != "ingest"]
        if sent is None or acct is None or not remote:
            return
        via_account = any((p.route or self.cfg.delivery.route) == "account" for p in remote)
        if not SentCopies.wanted(acct, via_account_smtp=via_account):
            return
        untracked = next((p.data for p in remote if not p.tracked), data)
        try:
            await sent.enqueue(acct.id, untracked)
        except (OSError, ValueError) as exc:
            self.log.error("sent_copy_not_queued", account=acct.id, error=str(exc))

    def _outbound(self, cfg: Config, policies: PolicySet) -> Outbound:
        """The outbound planner for this config and policy set (rebuilt on reload)."""
        signer = Signer.from_config(cfg) if cfg.dkim else None
        return Outbound(cfg, policies, signer, self.token_signer)

    def get_outbound(self) -> Outbound | None:
        return self.outbound

    def token_signer(self) -> TokenSigner:
        """The tracking token signer: `tracking.secret_file`, else `state_dir/tracking.key`."""
        if self._signer is None:
            self._signer = self._load_token_signer(self.cfg)
        return self._signer

    @staticmethod
    def _load_token_signer(cfg: Config) -> TokenSigner:
        t = cfg.tracking
        if not t.secret_file:
            return TokenSigner.from_text(load_or_create_secret(cfg.state_path / "tracking.key"))
        # a plain path that does not exist yet gets a new key, as the default file does
        # (`mailgw check` says so); env: and credential: must already be there
        path = generated_secret_path(t.secret_file, cfg.base_dir)
        text = load_or_create_secret(path) if path is not None else \
            read_secret(t.secret_file, cfg.base_dir)
        return TokenSigner.from_text(text)

    async def _start_tracking(self) -> None:
        """The public tracking endpoint (`listeners.tracking`), when configured."""
        lst = self.cfg.listeners.tracking
        if lst is None:
            return
        assert self.store is not None and self.writer is not None
        sink = StoreTracking(self.store, self.writer, self.metrics)
        connect = self.accounts.connect if self.accounts is not None else None
        self.tracking = TrackingServer(
            lst, self.token_signer(), sink, sink, settings=settings_from_config(self.cfg),
            routes=(lambda app: add_connect_routes(app, connect, log=self.log)) if connect else None,
            reuse_port=self.reuse_port)
        await self.tracking.start()
        self.log.info("listening", listener="tracking", host=lst.host, port=self.tracking.port,
                      base_url=lst.base_url)

    def _healthy(self) -> bool:
        return (self.scheduler is not None and all(not t.done() for t in self.scheduler._tasks)
                and (self.tailers is None or self.tailers.healthy()))

    @property
    def sent_copies(self) -> SentCopies | None:
        """The Sent-folder appender: `await app.sent_copies.enqueue(account_id, raw)`."""
        return self.tailers.sent if self.tailers is not None else None

    # -- admin listener (read API, /metrics, /healthz) and webhook delivery ------------------
    def _configure_store(self, cfg: Config) -> None:
        """Linking rules and webhook subscriptions of the store (at start and on reload)."""
        assert self.store is not None
        self.store.configure(LinkRules.from_config(cfg), targets(endpoints_from_config(cfg)))

    @property
    def reuse_port(self) -> bool:
        """Listeners bind with SO_REUSEPORT: every worker accepts on the same ports."""
        return self.worker is not None

    def spool_counts(self) -> dict[str, int]:
        """Queue files per state on this node (a worker counts every worker's spool); not
        done/ (delivered, waiting for the store writer)."""
        return self._count_spools([s for s in STATES if s != "done"])

    def done_count(self) -> int:
        """Delivered entries in done/ on this node, waiting for the store writer."""
        return self._count_spools(["done"])["done"]

    def _count_spools(self, states: list[str]) -> dict[str, int]:
        if self.worker is None:
            return {state: len(self.spool.list_ids(state)) for state in states}
        counts = dict.fromkeys(states, 0)
        for i in range(1, self.worker.count + 1):
            root = self.cfg.worker_spool_path(i)
            for state in states:
                with contextlib.suppress(OSError):
                    counts[state] += sum(1 for p in (root / state).iterdir()
                                         if not p.name.startswith("."))
        return counts

    async def _start_api(self, cfg: Config) -> None:
        assert self.store is not None
        store = self.store
        self.metrics.on_collect(lambda: self.metrics.set_queue(self.spool_counts()))
        self.metrics.on_collect(lambda: self.metrics.set_done(self.done_count()))

        async def backlog() -> None:
            self.metrics.webhook_backlog.set(await outbox.backlog(store))

        self.metrics.on_collect(backlog)
        self.webhooks = WebhookDispatcher(store, endpoints_from_config(cfg), metrics=self.metrics,
                                          log=self.log)
        await self.webhooks.start()
        admin = cfg.listeners.admin
        if admin is not None:
            token = read_secret(admin.token_file, cfg.base_dir) if admin.token_file else None
            self.admin = AdminAPI(store, get_config=self.get_config, metrics=self.metrics,
                                  token=token, spool_counts=self.spool_counts, log=self.log,
                                  accounts=self.accounts)
            await self.admin.start(admin.host, admin.port, loopback_only=admin.loopback_only,
                                   reuse_port=self.reuse_port)
            self.log.info("listening", listener="admin", host=admin.host, port=self.admin.port,
                          auth="bearer" if token else "none (loopback only)")

    def _reload_api(self, new: Config) -> None:
        """New token and webhooks take effect at once; a moved admin listener needs a restart."""
        try:  # the files were read by validation just now; this only loses a race
            endpoints = endpoints_from_config(new)
            admin = new.listeners.admin
            token = read_secret(admin.token_file, new.base_dir) if admin and admin.token_file else None
        except (OSError, UnicodeDecodeError) as exc:
            self.log.error("reload_secrets_unreadable", error=str(exc),
                           kept="the previous webhooks and admin token")
            return
        if self.store is not None:   # own addresses include the runtime accounts'
            self.store.configure(LinkRules.from_config(self.get_config()), targets(endpoints))
        if self.webhooks is not None:
            self.webhooks.configure(endpoints)
        if self.admin is not None and admin is not None:
            self.admin.set_token(token)

    async def _stop_api(self, grace: float) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.webhooks is not None:
            await self.webhooks.stop(timeout=grace)
            self.webhooks = None

    async def reload(self, path: str | Path) -> bool:
        """Load and validate the config again; keep the old one if the new one is invalid."""
        self.notifier.reloading()
        try:
            new = await asyncio.to_thread(load_config, path)
            policies = await asyncio.to_thread(policies_for, new)
        except ConfigError as exc:
            for p in exc.problems:
                self.log.error("reload_refused", problem=str(p))
            self.notifier.ready(status="reload refused: invalid config or policies; old ones kept")
            return False
        old = self.cfg
        restart_needed = [k for k in ("state_dir", "store", "hostname", "workers")
                          if getattr(old, k) != getattr(new, k)]
        for name in ("submission", "ingest", "tracking", "admin"):
            o, n = getattr(old.listeners, name), getattr(new.listeners, name)
            bound = ("host", "port", "tls") if name in ("submission", "ingest") else ("host", "port")
            if bool(o) != bool(n) or (o and n and any(getattr(o, k) != getattr(n, k)
                                                      for k in bound)):
                restart_needed.append(f"listeners.{name}")
        if restart_needed:
            self.log.warning("reload_partial", needs_restart=restart_needed)
        try:
            outbound = self._outbound(new, policies)
        except ConfigError as exc:  # a DKIM key that changed between validation and now
            for p in exc.problems:
                self.log.error("reload_refused", problem=str(p))
            self.notifier.ready(status="reload refused: DKIM keys unreadable; old config kept")
            return False
        signer: TokenSigner | None = None  # tracking.secret_file may have changed (key rotation)
        if self.tracking is not None:      # the endpoint must verify what is signed from now on
            try:
                signer = self._load_token_signer(new)
            except (OSError, UnicodeError, ValueError) as exc:
                self.log.error("reload_refused", problem=f"tracking secret: {exc}")
                self.notifier.ready(status="reload refused: tracking secret unreadable; "
                                           "old config kept")
                return False
            self.tracking.signer = signer
            self.tracking.recorder.configure(settings_from_config(new))
        self.cfg = new
        if self.accounts is not None:   # which runtime ids the file now shadows, or frees
            try:
                await self.accounts.registry.refresh(force=True)
            except StoreError as exc:
                self.log.warning("runtime_accounts_unreadable", error=str(exc))
        self.policies = policies
        self.outbound = outbound
        self._signer = signer
        self._policies_loaded(policies)
        n_sub, o_sub = new.listeners.submission, old.listeners.submission
        if self.submission is not None and n_sub is not None and o_sub is not None:
            self.submission.cfg = new
            self.submission.lst = n_sub
            if n_sub.tls == o_sub.tls:  # new certificate files take effect for new sessions
                self.submission.tls = server_tls_context(new, n_sub)
        n_ing = new.listeners.ingest
        if self.ingest_listener is not None and n_ing is not None:
            self.ingest_listener.cfg = new
            self.ingest_listener.lst = n_ing
        if self.scheduler is not None:
            self.scheduler.config_changed()
            if isinstance(self.scheduler.transport, SMTPTransport):
                d = new.delivery
                self.scheduler.transport.set_reuse_limits(d.connection_reuse_time,
                                                          d.connection_reuse_count)
        self._reload_api(new)
        if self.tailers is not None:
            self.tailers.reload()
        self.log.info("reloaded", config=new.source)
        self.notifier.ready(status="accepting mail (reloaded)")
        return True

    async def stop(self) -> None:
        self.notifier.stopping()
        await self.notifier.stop_watchdog()
        grace = self.cfg.drain_timeout
        for listener in (self.submission, self.ingest_listener):
            if listener is not None:
                await listener.stop(grace=min(grace, 5.0))
        if self.tracking is not None:
            lost_hits = await self.tracking.stop(grace=min(grace, 5.0))
            if lost_hits:
                self.log.error("tracking_hits_unrecorded", count=lost_hits)
        await self._stop_api(grace)
        if self.tailers is not None:
            await self.tailers.stop(timeout=grace)
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        if self.scheduler is not None:
            await self.scheduler.stop(timeout=grace)
        if self.counts is not None:
            await self.counts.close()
        if self.writer is not None:
            lost = await self.writer.stop(timeout=grace)
            if lost:
                self.log.error("store_events_unwritten", count=lost)
            if self.scheduler is not None:   # what the writer wrote by now leaves done/
                left = await self.scheduler.reap()
                if left:
                    self.log.warning("done_entries_kept", count=left,
                                     reason="record or events not written; replayed at start")
        if self.accounts is not None:
            await self.accounts.stop()
        if self.store is not None:
            await self.store.close()
        await asyncio.to_thread(self.spool.close)
        if self._spool_lock is not None:
            os.close(self._spool_lock)
            self._spool_lock = None
        self.log.info("stopped")


async def run_daemon(cfg: Config, config_path: str | Path, worker: Worker | None = None) -> int:
    """`mailgw run` (or one worker of it): start, serve until SIGTERM/SIGINT, reload on SIGHUP."""
    log = structlog.get_logger("mailgw")
    if worker is not None:
        log = log.bind(worker=worker.index)
    app = App(cfg, log=log, worker=worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    started = False
    hup_while_starting = False

    def on_hup() -> None:
        nonlocal hup_while_starting
        if not started:
            hup_while_starting = True
            return
        t = loop.create_task(app.reload(config_path))
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    # SIGTERM while starting (a supervisor stopping, or systemd) stops once started: drained.
    # A worker's SIGHUP while starting (READY=1 is its last step) reloads once started.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await app.start()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await app.stop()
        raise
    started = True
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if hup_while_starting:
        on_hup()
    log.info("started", config=str(config_path))
    await stop.wait()
    log.info("stopping")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    # a reload asked for while draining (an admin, or a supervisor's reload owed to a
    # worker that just became ready) must not kill the drain: SIGHUP's default would
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    await app.stop()
    return 0
