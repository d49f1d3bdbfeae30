"""The delivery scheduler (the relay's `qmgr`): spool entries in, upstream attempts out.

States of one queue entry, as the scheduler moves it::

    incoming/ ──attempt──> all recipients final ──> done/ ──record and events written──> removed
        │                      │ some 5xx / expired  ──> DSN to the sender (never for a bounce)
        └──> some 4xx ──> deferred/ (next_attempt from delivery.retry.schedule)
                              └──attempt again when due, or at once after `mailgw queue retry`

The spool is the journal of the store writer (which batches and runs behind): every
recipient's last outcome is in its queue file (`Recipient.last_at` and the fields after
it), each outcome event carries an idempotency key (`gateway.spool.outcome_event`), and a
delivered entry waits in done/ until the writer has written everything it was given up
to the entry's outcome events (its sequence mark), the copy's CRM record included; then
it is removed. When the copy's record is written already (`StoreWriter.owes_record`) done/
keeps only the envelope, not the message bytes: a store outage then does not fill the
spool with copies of every delivered message. An entry whose record the writer still owes
is never removed, whatever its mark (the relay announces a copy to the writer before it
is spooled, so a delivery that wins the race with the relay's record is covered).
At start `gateway.relay.record_unrecorded` rebuilds the missing records
and adds the outcome events again (the store keeps one event per key), so a kill -9 at
any point loses neither. An entry the store keeps nothing for (a DSN, a `store: false`
copy, the ingest copy) or whose items are all written already is removed at once.
Delivery never waits for the store.

Route `account` sends as the submitting user's connected account: with its password
(from its file, or from the `SecretSource` for an account created at run time), or,
for an OAuth account (`auth.method` oauth2 or service), with XOAUTH2/OAUTHBEARER and
a token from the `TokenSource`. When the account's credentials stop a message (the
token refused even after a refresh, the grant refused, an upstream that demands AUTH
from an account without SMTP credentials) the recipients are deferred with a 4.7.x
reply, never bounced; a refused token also tells the `AccountStatusSink` that the
account needs reconnecting, and the sender gets one delayed DSN per message. DSNs
themselves never go by route `account` (the account may be the very thing that does
not work): smarthost when one is configured, else mx.

A scheduled send (`Envelope.scheduled_for`, from `X-Mailgw-Send-At`) is spooled into
`incoming/` like any message; its first look here moves it to `deferred/` with its next
attempt at that time, without counting an attempt or recording an event, and the queue
lifetime counts from then (`Envelope.started_at`).

Work comes from three places: the relay's `notify()` right after a 250, a scan of
`incoming/` once a second (which also finds what `mailgw queue retry|release` moved
there and what a crash left), and a timer heap of deferred entries. A crash at any
point redelivers at most the entries that were in flight.

An attempt that raises (a poison message: a bug meeting odd input) frees its worker at
once: the crash is counted in the entry's envelope on disk (`Envelope.crashes`, kept
across restarts), the entry is retried later on the retry schedule's backoff, and after
`delivery.max_crashes` crashes it is moved to hold/ with the error as its hold reason
(metric `mailgw_queue_poison_total`, log event `queue_poison`).

A full or failing spool disk is no poison: when the entry cannot be rewritten after an
attempt (log event `queue_rewrite_failed`), the recipients that attempt delivered are
remembered in memory, so the retries of this process never send to them again, and the
entry is tried again on the retry schedule without a crash counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import structlog

from gateway.aio import wait_event
from gateway.config import Account, Config, read_secret
from gateway.delivery.dsn import build_dsn, is_bounce
from gateway.delivery.mx import MXResolver
from gateway.delivery.transport import (
    Destination,
    RcptResult,
    TokenGetter,
    Transport,
    reply_line,
)
from gateway.directory import (
    AccountDirectory,
    AccountStatusSink,
    ConfigDirectory,
    SecretSource,
    TokenSource,
)
from gateway.errors import AccountAuthError, AccountUnavailable, MailError, NotFound, SpoolError
from gateway.ids import new_queue_id
from gateway.mail.addresses import domain_of
from gateway.mail.reports import verp_address
from gateway.metrics import Metrics
from gateway.records import EventSink
from gateway.spool import CorruptQueueFile, Envelope, Recipient, Spool, outcome_event, outcome_events


@dataclass(frozen=True)
class LocalMessage:
    """A spooled message for the gateway's own ingest addresses, as the scheduler hands it
    over to be stored (the relay accepted it from `user`, at `client_ip`)."""

    mail_from: str
    data: bytes
    client_ip: str
    client_helo: str
    user: str | None


class LocalDelivery(Protocol):
    """Where mail for the gateway's own ingest addresses goes: stored in the CRM, never
    sent anywhere (the ingest service, wired in by the app)."""

    async def accept(self, msg: LocalMessage) -> str:
        """Store the message and return the id it was logged as; a refusal raises
        MailError, whose reply then answers every recipient."""
        ...


#: seconds an entry whose crash could not even be recorded on disk is left alone
CRASH_PAUSE = 30.0
#: seconds between the done/ reaper's looks when no written batch wakes it
REAP_POLL = 1.0

#: how many submissions the scheduler remembers having sent a delay warning for
DELAY_GROUPS_KEPT = 10000


@runtime_checkable
class Journal(Protocol):
    """The store writer's sequence marks (`gateway.crm.writer.StoreWriter`): the events sink
    the scheduler keeps delivered entries in done/ for. A sink without them (tests) gets no
    done/ entries: delivered entries are removed at once."""

    flushed: int

    def mark(self) -> int: ...

    def owes_record(self, qid: str) -> bool: ...

    async def wait_flushed(self, timeout: float) -> bool: ...


@dataclass
class Stats:
    attempts: int = 0
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    dsns: int = 0
    delayed_dsns: int = 0


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Scheduler:
    """Delivers what is in the spool, retries on schedule, bounces with a DSN.

    `directory` finds the account a user sends as (default: the accounts of the
    configuration in force at each attempt); `tokens` gives OAuth accounts their access
    tokens; `secrets` the passwords the store keeps for password accounts created at run
    time; `status` hears when an account needs reconnecting."""

    def __init__(self, get_config: Callable[[], Config], spool: Spool, transport: Transport,
                 resolver: MXResolver, events: EventSink, *, log: Any = None,
                 clock: Callable[[], float] = time.time, scan_interval: float = 1.0,
                 local: LocalDelivery | None = None, metrics: Metrics | None = None,
                 directory: AccountDirectory | None = None, tokens: TokenSource | None = None,
                 status: AccountStatusSink | None = None,
                 secrets: SecretSource | None = None) -> None:
        self._get_config = get_config
        self.directory = directory
        self.tokens = tokens
        self.status = status
        self.secrets = secrets
        self.spool = spool
        self.transport = transport
        self.resolver = resolver
        self.events = events
        self.log = log or structlog.get_logger("mailgw.delivery")
        self.clock = clock
        self.scan_interval = scan_interval
        self.local = local
        self.metrics = metrics or Metrics()
        self.stats = Stats()
        self._ready: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._known: set[str] = set()        # queued in _ready or being processed
        self._heap: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._secrets: dict[str, str] = {}
        self._idle = asyncio.Event()
        self._delay_groups: dict[str, None] = {}   # submissions whose sender got a delay DSN
        self._paused: dict[str, float] = {}   # incoming/ entries left alone until (monotonic)
        #: recipients finished (sent or bounced, with their last attempt) whose queue file
        #: could not be rewritten to say so (a full disk), by queue id and address: never
        #: sent to again by this process, restored as they were
        self._sent_unrecorded: dict[str, dict[str, Recipient]] = {}
        #: the writer's sequence marks, when the sink has them (else no done/ entries)
        self.journal: Journal | None = events if isinstance(events, Journal) else None
        #: done/ entries by the writer mark they wait for (a heap); removed once written
        self._owed: list[tuple[int, str]] = []
        #: False while the app could not replay the journal at start (the store was down):
        #: done/ entries then stay until it has (`journal_replayed`)
        self.reaping = True

    @property
    def cfg(self) -> Config:
        return self._get_config()

    def config_changed(self) -> None:
        self._secrets.clear()

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        for qid in self.spool.list_ids("deferred"):
            try:
                env = self.spool.read_envelope("deferred", qid)
            except NotFound:
                continue
            except CorruptQueueFile:
                self.spool.move(qid, "deferred", "corrupt")
                self.log.error("corrupt_queue_file", queue_id=qid, moved_to="corrupt")
                continue
            heapq.heappush(self._heap, (env.next_attempt, qid))
        self._scan_incoming()
        if self.journal is None:   # nothing to wait for: what a crash left in done/ goes
            await self.spool.remove_done(self.spool.list_ids("done"))
        else:
            self._adopt_done(self.spool.list_ids("done"), [])
        workers = self.cfg.delivery.concurrency
        self._tasks = [asyncio.create_task(self._worker(), name=f"delivery-{i}")
                       for i in range(workers)]
        self._tasks.append(asyncio.create_task(self._timer(), name="delivery-timer"))
        if self.journal is not None:
            self._tasks.append(asyncio.create_task(self._reaper(), name="delivery-reaper"))

    async def stop(self, timeout: float) -> None:
        """Stop taking work, let attempts in flight finish (up to timeout), then cancel."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self._inflight:
            _done, pending = await asyncio.wait(self._inflight, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
                self.log.warning("drain_timeout", cancelled=len(pending))
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()

    # -- done/: delivered, waiting for the store writer --------------------------------------
    def _adopt_done(self, ids: list[str], envs: list[Envelope]) -> None:
        """The done/ entries `ids` are removed once what the writer holds now is written;
        the outcome events of `envs` (their envelopes, read off the loop) are handed to it
        again first (keys: added once). Entries owed already under another mark are
        re-marked."""
        journal = self.journal
        assert journal is not None
        for env in envs:
            if env.recorded:
                for e in outcome_events(env):
                    self.events.add_event(e)
        mark = journal.mark()
        adopted = set(ids)
        self._owed = [(m, q) for m, q in self._owed if q not in adopted]
        self._owed.extend((mark, qid) for qid in ids)
        heapq.heapify(self._owed)

    def _read_done(self) -> tuple[list[str], list[Envelope]]:
        """The done/ entries and their envelopes (blocking: run in a thread)."""
        ids = self.spool.list_ids("done")
        envs = []
        for qid in ids:
            try:
                envs.append(self.spool.read_envelope("done", qid))
            except (NotFound, CorruptQueueFile):
                continue
        return ids, envs

    async def journal_replayed(self) -> None:
        """The app replayed the journal late (the store was down at start): the entries
        delivered meanwhile get their events again, then done/ is reaped as usual."""
        if self.journal is not None:
            # the marks taken meanwhile cover events the store dropped (the copy's record
            # was not rebuilt yet): every done/ entry waits for the replay's mark instead.
            # The envelopes are read in a thread (after a long outage, thousands of them);
            # an entry finished meanwhile was finished after the replay: its own mark holds
            ids, envs = await asyncio.to_thread(self._read_done)
            self._adopt_done(ids, envs)
        self.reaping = True

    def _ready_to_reap(self) -> list[str]:
        journal = self.journal
        if journal is None or not self.reaping:
            return []
        ready: list[str] = []
        owing: list[str] = []
        while self._owed and self._owed[0][0] <= journal.flushed:
            qid = heapq.heappop(self._owed)[1]
            # its record is not written yet (the relay's record was added after the entry's
            # mark was taken): it waits again, for the mark now
            (owing if journal.owes_record(qid) else ready).append(qid)
        if owing:
            mark = journal.mark()
            for qid in owing:
                heapq.heappush(self._owed, (mark, qid))
        return ready

    async def _reaper(self) -> None:
        journal = self.journal
        assert journal is not None
        while True:
            ready = self._ready_to_reap()
            if ready:
                try:
                    await self.spool.remove_done(ready)
                except OSError as exc:  # left in done/: replayed (idempotently) at start
                    self.log.error("done_remove_failed", count=len(ready), error=str(exc))
                continue
            await journal.wait_flushed(REAP_POLL)

    async def reap(self) -> int:
        """Remove the done/ entries whose items are written (after the writer's stop, so
        that a clean stop leaves none it has written). Returns how many stay."""
        ready = self._ready_to_reap()
        if ready:
            with contextlib.suppress(OSError):
                await self.spool.remove_done(ready)
        return len(self._owed)

    async def _finish(self, state: str, env: Envelope, data: bytes) -> None:
        """Every recipient is done: into done/ until the writer has written the copy's
        record and these outcome events, or removed at once when nothing is owed. When the
        record is written already (and the start-up replay ran: until then a record lost
        before the start may still have to be rebuilt from the bytes) done/ gets only the
        envelope, which is all the events are rebuilt from."""
        journal = self.journal
        if journal is not None and env.recorded:
            mark = journal.mark()
            owes = journal.owes_record(env.id)
            if journal.flushed < mark or owes or not self.reaping:
                try:
                    moved = await self.spool.finish(env, data, state,
                                                    keep_data=owes or not self.reaping)
                except SpoolError as exc:   # a full disk: as before done/ existed
                    self.log.error("done_not_journaled", queue_id=env.id, error=str(exc))
                else:
                    if moved:
                        heapq.heappush(self._owed, (mark, env.id))
                    return
        await self.spool.remove(state, env.id)

    def notify(self, qid: str) -> None:
        """Called right after a message is spooled into incoming/."""
        self._enqueue("incoming", qid)

    def _enqueue(self, state: str, qid: str) -> None:
        if qid in self._known or self._stopping:
            return
        self._known.add(qid)
        self._idle.clear()
        self._ready.put_nowait((state, qid))

    def _scan_incoming(self) -> None:
        now = time.monotonic()
        if self._paused:
            self._paused = {q: t for q, t in self._paused.items() if t > now}
        for qid in self.spool.list_ids("incoming"):
            if qid not in self._paused:
                self._enqueue("incoming", qid)

    def retry_now(self) -> None:
        """Make every deferred entry due now (the daemon's side of `queue retry`)."""
        self._heap = [(0.0, qid) for _, qid in self._heap]
        heapq.heapify(self._heap)
        self._wakeup.set()

    @property
    def busy(self) -> int:
        return len(self._known)

    async def wait_idle(self) -> None:
        while self._known:
            self._idle.clear()
            await self._idle.wait()

    # -- loops ---------------------------------------------------------------------
    async def _timer(self) -> None:
        last_scan = 0.0
        while not self._stopping:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                _, qid = heapq.heappop(self._heap)
                if (self.spool.dir("deferred") / qid).exists():
                    self._enqueue("deferred", qid)
            if time.monotonic() - last_scan >= self.scan_interval:
                last_scan = time.monotonic()
                self._scan_incoming()
            delay = self.scan_interval
            if self._heap:
                delay = max(0.0, min(delay, self._heap[0][0] - now))
            self._wakeup.clear()
            await wait_event(self._wakeup, delay)

    async def _worker(self) -> None:
        while True:
            state, qid = await self._ready.get()
            task = asyncio.create_task(self._process_safely(state, qid))
            self._inflight.add(task)
            try:
                await asyncio.shield(task)
            finally:
                self._inflight.discard(task)

    async def _process_safely(self, state: str, qid: str) -> None:
        try:
            await self.process(state, qid)
        except Exception as exc:
            self.log.exception("delivery_error", queue_id=qid)
            try:
                await self._crashed(state, qid, exc)
            except Exception:
                # the crash could not be recorded (the disk is full, the envelope holds
                # nonsense): keep the entry out of the scans for a while in memory instead
                self.log.exception("delivery_crash_not_recorded", queue_id=qid)
                self._pause(state, qid)
        finally:
            self._known.discard(qid)
            if not self._known:
                self._idle.set()

    async def _crashed(self, state: str, qid: str, exc: Exception) -> None:
        """An attempt raised: count it in the entry's envelope on disk (so a restart keeps
        the count), then retry later with the retry schedule's backoff, or after
        `delivery.max_crashes` crashes move the entry to hold/ with the error as its hold
        reason. The worker is free as soon as this returns."""
        self.metrics.delivery_crashed()
        try:
            env, data = self.spool.read(state, qid)
        except (NotFound, CorruptQueueFile):
            return   # moved or deleted meanwhile (the scan or `queue` commands see to it)
        error = reply_line(f"{type(exc).__name__}: {exc}")[:500]
        env.crashes += 1
        env.last_error = error
        cfg = self.cfg
        if env.crashes >= cfg.delivery.max_crashes:
            env.hold_reason = f"delivery crashed {env.crashes} times, last: {error}"
            if await self.spool.rewrite(env, data, state, "hold"):
                self.metrics.queue_poisoned()
                self.log.error("queue_poison", queue_id=qid, crashes=env.crashes, error=error,
                               moved_to="hold")
            return
        sched = cfg.delivery.retry.schedule
        env.next_attempt = self.clock() + sched[min(env.crashes - 1, len(sched) - 1)]
        if await self.spool.rewrite(env, data, state, "deferred"):
            heapq.heappush(self._heap, (env.next_attempt, qid))
            self._wakeup.set()
            self.log.warning("delivery_crash_deferred", queue_id=qid, crashes=env.crashes,
                             error=error, next_attempt=_utc(env.next_attempt).isoformat())

    def _pause(self, state: str, qid: str, seconds: float = CRASH_PAUSE) -> None:
        """Keep an entry whose crash (or attempt) could not be recorded out of the work
        for `seconds` (in memory: not across restarts)."""
        if state == "deferred":
            heapq.heappush(self._heap, (self.clock() + seconds, qid))
            self._wakeup.set()
        else:
            self._paused[qid] = time.monotonic() + seconds

    # -- one attempt ---------------------------------------------------------------
    async def process(self, state: str, qid: str) -> None:
        try:
            env, data = self.spool.read(state, qid)
        except NotFound:
            return
        except CorruptQueueFile as exc:
            self.spool.move(qid, state, "corrupt")
            self.log.error("corrupt_queue_file", queue_id=qid, error=str(exc))
            return
        now = self.clock()
        if env.scheduled_for is not None and env.scheduled_for > now and not env.attempts:
            await self._wait_for_schedule(state, env, data)
            return
        done = self._sent_unrecorded.get(qid)
        if done:
            env.recipients = [dataclasses.replace(done[r.addr])
                              if r.status == "pending" and r.addr in done else r
                              for r in env.recipients]
        pending = env.pending
        # no recipient left but a DSN owed (it could not be spooled): only the DSN is tried
        results = await self._deliver(env, [r.addr for r in pending], data) if pending else []
        if pending:
            self.stats.attempts += 1
        env.attempts += 1
        by_rcpt = {r.rcpt: r for r in results}
        bounced: list[RcptResult] = []
        cfg = self.cfg
        expired = now - env.started_at >= cfg.delivery.retry.give_up_after
        for rcpt in pending:
            res = by_rcpt[rcpt.addr]
            rcpt.attempts += 1
            rcpt.last_reply = res.reply
            rcpt.remote = res.remote
            rcpt.last_at, rcpt.last_attempt, rcpt.last_status = now, env.attempts, res.status
            rcpt.expired = False
            if res.ok:
                rcpt.status = "sent"
                self.stats.sent += 1
                self.metrics.delivered()
            elif res.permanent or expired:
                rcpt.status = "bounced"
                rcpt.expired = not res.permanent
                bounced.append(res)
                self.stats.bounced += 1
                self.metrics.bounced()
            else:
                self.stats.deferred += 1
                self.metrics.deferred()
            event = outcome_event(env, rcpt)   # keyed: a replay from the spool adds nothing
            if event is not None:
                self.events.add_event(event)
            self.log.info("delivery", queue_id=qid, group=env.group, message_id=env.message_id,
                          rcpt=rcpt.addr, status=rcpt.status, reply=res.reply,
                          remote=res.remote, attempt=env.attempts)
        if bounced or env.dsn_owed:
            await self._final_dsn(env, data, bounced, now)
        held = [by_rcpt[r.addr] for r in pending
                if r.status == "pending" and by_rcpt[r.addr].credentials is not None]
        if held and not env.delay_notified:
            # one warning per message: the copies of one submission (per-recipient tracked
            # copies share env.group) are told about together, by whichever fails first
            if env.group is None or env.group not in self._delay_groups:
                if env.group is not None:   # before the await: copies run concurrently
                    self._delay_groups[env.group] = None
                    while len(self._delay_groups) > DELAY_GROUPS_KEPT:
                        self._delay_groups.pop(next(iter(self._delay_groups)))
                try:
                    await self._send_delay_dsn(env, data, held)
                except Exception:
                    # a warning only: the next attempt tries again; what was delivered
                    # above stays delivered (the entry is rewritten below all the same)
                    self.log.exception("dsn_not_queued", queue_id=qid, action="delayed")
                    if env.group is not None:
                        self._delay_groups.pop(env.group, None)
                else:
                    env.delay_notified = True
            else:
                env.delay_notified = True
        if env.pending or env.dsn_owed:
            sched = cfg.delivery.retry.schedule
            delay = sched[min(env.attempts - 1, len(sched) - 1)]
            env.next_attempt = now + delay
            try:
                rewritten = await self.spool.rewrite(env, data, state, "deferred")
            except SpoolError as exc:
                finished = {r.addr: dataclasses.replace(r) for r in env.recipients
                            if r.status != "pending"}
                self._sent_unrecorded[qid] = finished
                self.log.error("queue_rewrite_failed", queue_id=qid, error=str(exc),
                               done=sorted(finished), retry_in=delay)
                self._pause(state, qid, delay)
                return
            self._sent_unrecorded.pop(qid, None)
            if rewritten:
                heapq.heappush(self._heap, (env.next_attempt, qid))
                self._wakeup.set()
        else:
            await self._finish(state, env, data)
            self._sent_unrecorded.pop(qid, None)

    async def _wait_for_schedule(self, state: str, env: Envelope, data: bytes) -> None:
        """A scheduled send (`X-Mailgw-Send-At`) before its time: into deferred/ with its
        next attempt then, no attempt counted, no event. Whatever brought it here early
        (the relay's notify, `queue retry` or `release`, a restart) ends here too."""
        assert env.scheduled_for is not None
        env.next_attempt = env.scheduled_for
        if state != "deferred" and not await self.spool.rewrite(env, data, state, "deferred"):
            return   # deleted meanwhile (`queue delete` cancels a scheduled send)
        heapq.heappush(self._heap, (env.next_attempt, env.id))
        self._wakeup.set()
        self.log.info("scheduled", queue_id=env.id, send_at=_utc(env.scheduled_for).isoformat())

    async def _deliver(self, env: Envelope, rcpts: list[str], data: bytes) -> list[RcptResult]:
        groups = self._route(env, rcpts, data)
        if len(groups) == 1:  # the usual case: no task for gather() to wrap it in
            return await groups[0]()
        outs = await asyncio.gather(*(job() for job in groups))
        return [r for group in outs for r in group]

    def _route(self, env: Envelope, rcpts: list[str],
               data: bytes) -> list[Callable[[], Awaitable[list[RcptResult]]]]:
        cfg = self.cfg
        route = env.route or cfg.delivery.route
        if route == "ingest":
            return [self._local_job(env, rcpts, data)]
        if route == "account" and env.is_bounce:
            # a DSN never goes through an account: it is often about that account failing
            route = "smarthost" if cfg.delivery.smarthost is not None else "mx"
        if route == "account":
            job = self._account_job(env, rcpts, data)
            if job is not None:
                return [job]
            route = "smarthost" if cfg.delivery.smarthost is not None else "mx"
        if route == "smarthost":
            sh = cfg.delivery.smarthost
            assert sh is not None
            dest = Destination(
                host=sh.host, port=sh.port, tls=sh.tls, tls_required=sh.tls != "none",
                username=sh.username,
                password=self._secret(sh.password_file) if sh.password_file else None,
                ca_file=str(cfg.path(sh.ca_file)) if sh.ca_file else None)
            return [self._send_job(dest, env, rcpts, data)]
        by_domain: dict[str, list[str]] = defaultdict(list)
        for r in rcpts:
            by_domain[domain_of(r)].append(r)
        return [self._mx_job(domain, env, group, data) for domain, group in by_domain.items()]

    def _account_job(self, env: Envelope, rcpts: list[str],
                     data: bytes) -> Callable[[], Awaitable[list[RcptResult]]] | None:
        """The send through the user's account; None when the user has none (or it names
        no SMTP server)."""
        cfg = self.cfg
        directory = self.directory if self.directory is not None else ConfigDirectory(cfg)
        acct = directory.account_for_user(env.user) if env.user else None
        if acct is None:
            return None
        dest = self._account_destination(acct)
        if dest is None:
            return None
        if (dest.username is None and dest.mechanism is None and acct.origin == "runtime"
                and self.secrets is not None):
            return self._stored_password_job(acct, dest, env, rcpts, data)
        return self._send_job(dest, env, rcpts, data)

    def _account_destination(self, acct: Account) -> Destination | None:
        cfg = self.cfg
        ep = acct.smtp_endpoint()
        if ep is None:
            return None
        s = acct.smtp
        username = (s.username if s else None) or acct.auth.username or acct.email
        ca_file = str(cfg.path(s.ca_file)) if s and s.ca_file else None
        if acct.auth.uses_tokens:  # oauth2, service: bearer tokens from the TokenSource
            return Destination(host=ep.host, port=ep.port, tls=ep.tls,
                               tls_required=ep.tls != "none", username=username,
                               mechanism=acct.auth.mechanism, account=acct.id,
                               token=self._token_getter(acct.id), ca_file=ca_file)
        pw_ref = (s.password_file if s else None) or acct.auth.password_file
        return Destination(host=ep.host, port=ep.port, tls=ep.tls, tls_required=ep.tls != "none",
                           username=username if pw_ref else None,
                           password=self._secret(pw_ref) if pw_ref else None,
                           account=acct.id, ca_file=ca_file)

    def _stored_password_job(self, acct: Account, dest: Destination, env: Envelope,
                             rcpts: list[str],
                             data: bytes) -> Callable[[], Awaitable[list[RcptResult]]]:
        """An account created at run time: its password is in the store (SecretSource)."""
        secrets = self.secrets
        assert secrets is not None
        s = acct.smtp
        username = (s.username if s else None) or acct.auth.username or acct.email

        async def job() -> list[RcptResult]:
            try:
                password = await secrets.password(acct.id)
            except AccountAuthError as exc:
                text = reply_line(f"account {acct.id} needs reconnecting: {exc.text}")
                await self._needs_reconnect(env, acct.id, f"454 4.7.8 {text}")
                return [RcptResult(r, 454, "4.7.8", text, credentials="refused")
                        for r in rcpts]
            except Exception as exc:  # the store is down: try later
                text = reply_line(f"cannot read the password of account {acct.id} for now: "
                                  f"{exc}")
                return [RcptResult(r, 451, "4.3.0", text) for r in rcpts]
            login = dataclasses.replace(dest, username=username, password=password)
            return await self._send_job(login, env, rcpts, data)()
        return job

    def _token_getter(self, account_id: str) -> TokenGetter:
        """The account's access tokens from the TokenSource, asked at log-in time."""
        tokens = self.tokens

        async def token(*, rejected: str | None = None) -> str:
            if tokens is None:
                raise AccountUnavailable("this gateway has no OAuth token source to log in "
                                         f"as account {account_id}")
            return await tokens.access_token(account_id, rejected=rejected)
        return token

    def _secret(self, ref: str) -> str:
        if ref not in self._secrets:
            self._secrets[ref] = read_secret(ref, self.cfg.base_dir)
        return self._secrets[ref]

    def _envelope_sender(self, env: Envelope) -> str:
        """MAIL FROM for smarthost and MX delivery: the VERP bounce address of this copy when
        ``delivery.return_path`` is set (never for a DSN's null sender), else the sender's."""
        return_path = self.cfg.delivery.return_path
        if return_path is None or env.is_bounce or not env.mail_from:
            return env.mail_from
        return verp_address(return_path, env.id)

    def _local_job(self, env: Envelope, rcpts: list[str],
                   data: bytes) -> Callable[[], Awaitable[list[RcptResult]]]:
        """The gateway's own ingest addresses: stored in the CRM, never sent anywhere."""
        async def job() -> list[RcptResult]:
            if self.local is None:
                return [RcptResult(r, 451, "4.3.0", "the ingest address is not configured here",
                                   "local") for r in rcpts]
            msg = LocalMessage(mail_from=env.mail_from, data=data,
                               client_ip=env.client_ip or "unknown",
                               client_helo=env.client_helo or "", user=env.user)
            try:
                logged_as = await self.local.accept(msg)
            except MailError as exc:
                return [RcptResult(r, exc.code, exc.status, exc.text, "local") for r in rcpts]
            return [RcptResult(r, 250, "2.0.0", f"Ok: logged as {logged_as}", "local")
                    for r in rcpts]
        return job

    def _send_job(self, dest: Destination, env: Envelope, rcpts: list[str],
                  data: bytes) -> Callable[[], Awaitable[list[RcptResult]]]:
        async def job() -> list[RcptResult]:
            sender = env.mail_from if dest.account is not None else self._envelope_sender(env)
            results = await self.transport.send(dest, sender, rcpts, data)
            if dest.username is None and dest.mechanism is None:
                results = [_auth_demanded(dest, r) if r.code == 530 else r for r in results]
            refused = next((r for r in results if r.credentials == "refused"), None)
            if refused is not None and dest.account is not None:
                await self._needs_reconnect(env, dest.account, refused.reply)
            return results
        return job

    async def _needs_reconnect(self, env: Envelope, account_id: str, reason: str) -> None:
        self.log.warning("account_needs_reconnect", queue_id=env.id, account=account_id,
                         reason=reason)
        if self.status is None:
            return
        try:
            await self.status.needs_reconnect(account_id, reason)
        except Exception:  # the report is best effort; the message is deferred either way
            self.log.exception("needs_reconnect_failed", queue_id=env.id, account=account_id)

    def _mx_job(self, domain: str, env: Envelope, rcpts: list[str],
                data: bytes) -> Callable[[], Awaitable[list[RcptResult]]]:
        async def job() -> list[RcptResult]:
            cfg = self.cfg
            # send_mx never raises: DNS answers come back as results (5.1.2, 5.1.10, 4.4.3)
            return await self.transport.send_mx(
                self.resolver, domain, self._envelope_sender(env), rcpts, data,
                port=cfg.delivery.mx_port,
                tls="opportunistic" if cfg.delivery.mx_tls == "opportunistic" else "starttls",
                ca_file=str(cfg.path(cfg.delivery.mx_ca_file)) if cfg.delivery.mx_ca_file
                else None)
        return job

    # -- reporting -----------------------------------------------------------------
    async def _send_dsn(self, env: Envelope, data: bytes, failed: list[RcptResult], *,
                        final: bool = True, note: str | None = None) -> bool:
        """Queue a DSN about `failed` to the sender (a delay warning unless `final`);
        False when none may be sent (the message is itself a bounce)."""
        if env.is_bounce or not env.mail_from or is_bounce(env.mail_from, data):
            self.log.info("dsn_suppressed", queue_id=env.id, reason="message is a bounce")
            return False
        cfg = self.cfg
        dsn = build_dsn(reporting_mta=cfg.hostname, original=data, envelope_from=env.mail_from,
                        failed=failed, arrival=_utc(env.received_at), queue_id=env.id,
                        final=final, note=note)
        now = self.clock()
        bounce = Envelope(id=new_queue_id(now), mail_from="",
                          recipients=[Recipient(addr=env.mail_from)], received_at=now,
                          user=env.user, account=env.account, is_bounce=True)
        await self.spool.put(bounce, dsn)
        if final:
            self.stats.dsns += 1
        else:
            self.stats.delayed_dsns += 1
        self.log.info("dsn_queued", queue_id=env.id, dsn_id=bounce.id, to=env.mail_from,
                      action="failed" if final else "delayed")
        self.notify(bounce.id)
        return True

    async def _final_dsn(self, env: Envelope, data: bytes, bounced: list[RcptResult],
                         now: float) -> None:
        """The DSN about `bounced` and any the entry still owes (`Envelope.dsn_owed`).

        When it cannot be spooled (the disk is full, building it raised) the failure is
        logged and the DSN owed in the envelope, which the caller rewrites with the
        recipients just delivered marked sent: an exception here would leave the old
        file, and the next attempt would deliver to them again. An owed DSN is retried
        with the entry on the retry schedule and given up (logged `dsn_given_up`) after
        `delivery.retry.give_up_after`."""
        names = RcptResult.__dataclass_fields__   # owed entries are JSON from the queue file
        failed = [RcptResult(**{k: v for k, v in d.items() if k in names})
                  for d in env.dsn_owed] + bounced
        try:
            await self._send_dsn(env, data, failed)
        except Exception as exc:
            since = env.dsn_owed_since if env.dsn_owed_since is not None else now
            rcpts = [r.rcpt for r in failed]
            if now - since >= self.cfg.delivery.retry.give_up_after:
                self.log.error("dsn_given_up", queue_id=env.id, to=env.mail_from,
                               recipients=rcpts, error=f"{type(exc).__name__}: {exc}")
                env.dsn_owed, env.dsn_owed_since = [], None
                return
            self.log.exception("dsn_not_queued", queue_id=env.id, to=env.mail_from,
                               recipients=rcpts, action="failed", retried=True)
            env.dsn_owed = [dataclasses.asdict(r) for r in failed]
            env.dsn_owed_since = since
            return
        env.dsn_owed, env.dsn_owed_since = [], None

    async def _send_delay_dsn(self, env: Envelope, data: bytes,
                              held: list[RcptResult]) -> None:
        """The one delay warning for a message its account's credentials hold up."""
        refused = any(r.credentials == "refused" for r in held)
        why = ("the mailbox account it is sent through needs reconnecting: its sign-in was "
               "refused. Once the account is reconnected, delivery resumes by itself."
               if refused else
               "the mailbox account it is sent through has no working credentials for "
               "its mail server. Once an administrator fixes them, delivery resumes.")
        retry = self.cfg.delivery.retry.give_up_after
        await self._send_dsn(env, data, held, final=False,
                             note=f"Your message is held because {why} It is retried until "
                                  f"{_utc(env.started_at + retry):%Y-%m-%d %H:%M} UTC, then "
                                  f"returned to you.")


def _auth_demanded(dest: Destination, res: RcptResult) -> RcptResult:
    """A 530 from a configured upstream we did not log in to is a configuration problem
    (credentials missing), not a verdict on the message: defer it, never bounce it."""
    lack = (f"{dest.who} has no SMTP credentials configured" if dest.account
            else "no SMTP credentials are configured for it")
    return RcptResult(res.rcpt, 454, "4.7.0",
                      reply_line(f"host {res.remote or dest.where} demands authentication "
                                 f"({res.reply}), but {lack}"),
                      res.remote, credentials="missing" if dest.account else None)
