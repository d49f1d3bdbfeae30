"""The manager of this node's IMAP tailers: which accounts run here, their leases, reloads.

`Tailers` is what the App starts. Every `sync.check_interval` it reads the accounts'
statuses from the store (so `mailgw accounts disable` takes effect within seconds),
takes or renews each tailed account's lease in the store (renewed every third of
`sync.lease_ttl`; a tailer whose lease could not be renewed in time stops before
another node can take the mailbox over, README "Connected mailboxes (IMAP sync)"),
and starts and stops one `AccountTailer` (`gateway.imap.tailer`) per account it holds.
It owns what the tailers share: the connection slots (`sync.max_connections`), the
opener (TLS, password or OAuth2 tokens kept encrypted in the store), the `SentCopies`
appender, the parse workers (`gateway.imap.parsing`, `sync.parse_workers`, started at
start when the configuration tails a mailbox, else on first use; stopped last), and the
per-account metrics.

SIGHUP (`reload`) restarts tailers whose account configuration changed and retries,
once, accounts that need reconnecting. SIGTERM (`stop`) lets batches in flight commit,
interrupts IDLE and releases the leases; `abort` leaves them, as a crashed node would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.aio import wait_event
from gateway.config import Account, Config
from gateway.crm.accounts import Accounts
from gateway.crm.store import Store
from gateway.directory import SecretSource, TokenSource
from gateway.errors import StoreError
from gateway.imap.account import open_account
from gateway.imap.client import IMAPClient
from gateway.imap.parsing import Parsers, workers_for
from gateway.imap.placement import place
from gateway.imap.sent import SentCopies
from gateway.imap.slots import ConnectionSlots
from gateway.imap.tailer import AccountTailer, Opener
from gateway.records import NewMessage

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["Tailers"]

#: one look of the manager (statuses, leases) must finish within this
TICK_TIMEOUT = 60.0
#: sync runs are kept this long
RUN_HISTORY = timedelta(days=30)


@dataclasses.dataclass
class _Running:
    tailer: AccountTailer
    task: asyncio.Task[None]
    lease_until: float          # loop time: past this the lease may be someone else's
    renew_at: float


class Tailers:
    """Starts, stops and reloads the tailers of this node (see the module docstring)."""

    def __init__(self, get_config: Callable[[], Config], store: Store, *, log: Any = None,
                 opener: Opener | None = None, node_id: str | None = None,
                 tokens: TokenSource | None = None, secrets: SecretSource | None = None,
                 on_stored: Callable[[str, list[NewMessage]], None] | None = None,
                 metrics: Metrics | None = None, sent_dir: Path | None = None) -> None:
        cfg = get_config()
        self.get_config = get_config
        self.store = store
        self.log = log or structlog.get_logger("mailgw.imap")
        self.accounts = Accounts(store)
        self.slots = ConnectionSlots(cfg.sync.max_connections)
        self.node_id = node_id or cfg.sync.node_id or \
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.tokens = tokens         # OAuth access tokens (oauth2 and service accounts)
        self.secrets = secrets       # passwords the store keeps (accounts created at run time)
        self.opener: Opener = opener or self._open
        self.on_stored = on_stored   # (account id, messages) after each commit: benchmarks, tests
        self.metrics = metrics       # imap_messages_stored_total and imap_errors_total per account
        self.running: dict[str, _Running] = {}
        self._draining: dict[str, _Running] = {}   # stopping: popped from running, not ended
        self._retry: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_prune = 0.0
        self._warned_cap = False
        self.ticks = 0
        self._not_before: dict[str, float] = {}   # no lease attempt before (after a crash)
        self._elsewhere: dict[str, float] = {}    # held by another node: look again after
        #: the nodes heard from within sync.lease_ttl at the last look (this one included)
        self.live_nodes: list[str] = [self.node_id]
        self._crashes: dict[str, int] = {}
        self._warming: asyncio.Task[None] | None = None
        self.sent = SentCopies(sent_dir or cfg.state_path / "sent-copies", get_config,
                               self.opener, self.slots, self.accounts, log=self.log)
        #: MIME parsing off the event loop, shared by this node's tailers (sync.parse_workers;
        #: `auto` shares the cores among the daemon's worker processes)
        self.parsers = Parsers(workers_for(cfg.sync.parse_workers, processes=cfg.worker_count),
                               log=self.log)
        #: folders in their initial sync at once (sync.initial_syncs; read at start)
        self.initial_slots = asyncio.Semaphore(cfg.sync.initial_syncs)

    # -- connections ------------------------------------------------------------------------
    async def _open(self, account: Account) -> IMAPClient:
        cfg = self.get_config()
        s = cfg.sync
        return await open_account(account, cfg.base_dir, tokens=self.tokens, secrets=self.secrets,
                                  timeout=s.timeout,
                                  connect_timeout=s.timeout, idle_interval=s.idle_interval)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.get_config()
        try:
            await self.accounts.ensure(cfg.accounts)
        except StoreError as exc:
            self.log.error("accounts_not_recorded", error=str(exc))
        await self.sent.start()
        if any(a.tailed for a in cfg.accounts):   # the workers import while the leases are taken
            self._warming = asyncio.create_task(self._warm_parsers(), name="imap-parsers")
        self._task = asyncio.create_task(self._control(), name="imap-tailers")

    async def _warm_parsers(self) -> None:
        try:
            await self.parsers.start()
        except Exception as exc:    # the first batch starts them again, and says why it cannot
            self.log.warning("imap_parsers_not_started", error=str(exc) or type(exc).__name__)

    def wake(self) -> None:
        """Look at the accounts now (one was created, changed or deleted at run time)."""
        self._wake.set()

    def reload(self) -> None:
        """The config changed (SIGHUP): restart changed tailers, retry accounts that need
        reconnecting once, resize the connection cap."""
        cfg = self.get_config()
        self.slots.resize(cfg.sync.max_connections)
        self._retry = {a.id for a in cfg.accounts}
        self._warned_cap = False
        self._wake.set()
        self.sent.wake()

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain: batches in flight commit, IDLE ends, leases are released."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        ids = list(self.running)
        await self._stop_tailers(ids, timeout)
        for aid in ids:
            with contextlib.suppress(StoreError):
                await self.accounts.release_lease(aid, self.node_id)
        with contextlib.suppress(StoreError):   # the other nodes take its mailboxes at once
            await self.accounts.forget_node(self.node_id)
        await self.sent.stop(timeout)
        await self._close_parsers()

    async def abort(self) -> None:
        """Stop at once without releasing leases (what a crashed node leaves behind; tests)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        runs = [*self.running.values(), *self._draining.values()]
        for r in runs:
            r.task.cancel()
        for r in runs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await r.task
        self.running.clear()
        await self.sent.stop(0.1)
        await self._close_parsers()

    async def _stop_tailers(self, ids: Sequence[str], timeout: float) -> None:
        runs = [self.running.pop(i) for i in ids if i in self.running]
        for r in runs:
            r.tailer.stop()
            self._draining[r.tailer.id] = r
        if not runs:
            return
        try:
            _, late = await asyncio.wait([r.task for r in runs], timeout=timeout)
            for t in late:
                t.cancel()
            for r in runs:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await r.task
        finally:
            for r in runs:
                if self._draining.get(r.tailer.id) is r:
                    del self._draining[r.tailer.id]

    def tailing(self) -> set[str]:
        """The accounts whose tailer task is alive on this node, those stopping included
        (a mailbox is tailed until its task has ended, and only then is its lease let go)."""
        return {aid for aid, r in self.running.items() if not r.task.done()} | {
            aid for aid, r in self._draining.items() if not r.task.done()}

    # -- the control loop -------------------------------------------------------------------
    async def _control(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self.tick(), TICK_TIMEOUT)
            except TimeoutError:
                self.log.warning("tailers_check_slow", timeout=TICK_TIMEOUT)
            except StoreError as exc:
                self.log.warning("tailers_check_failed", error=str(exc))
            except Exception:
                self.log.exception("tailers_check_crashed")
            self.ticks += 1
            interval = self.get_config().sync.check_interval
            await wait_event(self._wake, interval)
            self._wake.clear()

    def _wanted(self, cfg: Config, statuses: dict[str, str]) -> dict[str, Account]:
        out = {}
        for a in cfg.accounts:
            if not a.tailed:
                continue
            status = statuses.get(a.id, "active")
            # a tailer in its one retry is wanted until its login marked the account active
            run = self.running.get(a.id)
            retrying = a.id in self._retry or (run is not None and run.tailer.retrying)
            if status == "active" or (status == "needs_reconnect" and retrying):
                out[a.id] = a
        return out

    async def tick(self) -> None:
        """One look: statuses, leases, tailers to start and stop (every check_interval)."""
        cfg = self.get_config()
        loop = asyncio.get_running_loop()
        if not cfg.accounts and not self.running:
            return
        # finished tailers (the account needs reconnecting, or something broke): forget them
        for aid, done in list(self.running.items()):
            if not done.task.done():
                continue
            self.running.pop(aid)
            exc = done.task.exception() if not done.task.cancelled() else None
            if exc is not None:
                n = self._crashes[aid] = self._crashes.get(aid, 0) + 1
                self._not_before[aid] = loop.time() + min(300.0, 5.0 * 2 ** min(n, 6))
                self.log.error("tailer_crashed", account=aid, error=repr(exc), crashes=n)
            with contextlib.suppress(StoreError):
                await self.accounts.release_lease(aid, self.node_id)
        # statuses read after that, so a tailer that just marked its account is not restarted
        known = await self.accounts.statuses()
        if any(a.id not in known for a in cfg.accounts):
            await self.accounts.ensure(cfg.accounts)
            known = await self.accounts.statuses()
        self._retry &= {aid for aid, status in known.items() if status == "needs_reconnect"}
        ttl = cfg.sync.lease_ttl
        mine = await self._placement(cfg, known, ttl)
        wanted = {aid: a for aid, a in self._wanted(cfg, known).items() if aid in mine}
        gone = [aid for aid, r in self.running.items()
                if aid not in wanted or r.tailer.account != wanted[aid]
                or loop.time() >= r.lease_until]
        if gone:
            for aid in gone:
                r = self.running[aid]
                why = ("lease expired" if loop.time() >= r.lease_until
                       else "placed on another node" if aid not in mine else "not wanted")
                self.log.info("tailer_stopping", account=aid, why=why)
            # a tailer must have ended before its lease can run out (another node may take
            # the mailbox then), and this look must go on to renew the others': a drain gets
            # at most a third of the lease, one whose lease is over none
            over = [aid for aid in gone if loop.time() >= self.running[aid].lease_until]
            await self._stop_tailers(over, 0)
            await self._stop_tailers([aid for aid in gone if aid not in over],
                                     min(cfg.drain_timeout, ttl / 3))
            for aid in gone:
                with contextlib.suppress(StoreError):
                    await self.accounts.release_lease(aid, self.node_id)
        now = loop.time()
        due = [aid for aid in wanted
               if ((cur := self.running.get(aid)) is not None and now >= cur.renew_at)
               or (cur is None and now >= max(self._not_before.get(aid, 0.0),
                                              self._elsewhere.get(aid, 0.0)))]
        try:   # every renewal and new lease of this look in one statement per chunk
            held = await self.accounts.acquire_leases(due, self.node_id, ttl)
        except StoreError as exc:
            self.log.warning("lease_failed", accounts=len(due), error=str(exc))
            due = []
        for aid in due:
            a = wanted[aid]
            cur = self.running.get(aid)
            got = aid in held
            if cur is not None:
                if got:
                    cur.lease_until, cur.renew_at = now + ttl, now + ttl / 3
                else:
                    self.log.warning("lease_lost", account=aid)
                    await self._stop_tailers([aid], 0)   # another node may be tailing it now
                continue
            if not got:
                # another node still tails it (say, the one it was placed on before a node
                # joined, until that one lets go): look again soon
                self._elsewhere[aid] = now + min(ttl / 3, max(1.0, cfg.sync.check_interval))
            elif not self._stopping:
                self._start(cfg, a, now, ttl, retrying=known.get(aid) == "needs_reconnect")
        if len(self.running) > self.slots.limit and not self._warned_cap:
            self._warned_cap = True
            self.log.warning("imap_connections_shared", accounts=len(self.running),
                             max_connections=self.slots.limit,
                             hint="raise sync.max_connections so that every account can IDLE")
        if loop.time() - self._last_prune > 3600:
            self._last_prune = loop.time()
            await self.accounts.prune_runs(RUN_HISTORY)

    async def _placement(self, cfg: Config, known: dict[str, str], ttl: float) -> set[str]:
        """The accounts this node should tail: its share of the tailed, active (or
        reconnecting) accounts over the nodes heard from within `ttl` seconds
        (:func:`gateway.imap.placement.place`). The heartbeat that says this node is alive
        is written here. With the store unreadable the last view of the nodes stands."""
        try:
            self.live_nodes = await self.accounts.heartbeat(
                self.node_id, hostname=socket.gethostname(), pid=os.getpid(), within=ttl)
        except StoreError as exc:
            self.log.warning("node_heartbeat_failed", error=str(exc))
        ids = [a.id for a in cfg.accounts
               if a.tailed and known.get(a.id, "active") in ("active", "needs_reconnect")]
        placed = place(ids, self.live_nodes)
        return {aid for aid, node in placed.items() if node == self.node_id}

    def _start(self, cfg: Config, a: Account, now: float, ttl: float, *, retrying: bool) -> None:
        self._retry.discard(a.id)
        hook = self.on_stored
        t = AccountTailer(a, get_config=self.get_config, store=self.store, accounts=self.accounts,
                          slots=self.slots, opener=self.opener, log=self.log, retrying=retrying,
                          on_stored=None if hook is None else functools.partial(hook, a.id),
                          metrics=self.metrics, parsers=self.parsers,
                          initial_slots=self.initial_slots)
        task = asyncio.create_task(t.run(), name=f"imap-tailer-{a.id}")
        self.running[a.id] = _Running(t, task, now + ttl, now + ttl / 3)
        self.log.info("tailer_started", account=a.id, node=self.node_id, retrying=retrying)

    async def _close_parsers(self) -> None:
        task, self._warming = self._warming, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.parsers.close()

    def tailer(self, account_id: str) -> AccountTailer | None:
        r = self.running.get(account_id)
        return r.tailer if r is not None else None

    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()
