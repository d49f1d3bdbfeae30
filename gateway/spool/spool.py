"""The durable spool: a message is accepted only once it is fsynced and renamed into place.

Queue state is where a file is (Postfix qmgr, Mailman's switchboard)::

    tmp/        being written; never acknowledged; removed at start-up
    incoming/   accepted (the client got 250), not yet attempted
    deferred/   a temporary failure happened; waits for `next_attempt`
    hold/       set aside by an admin (`mailgw queue hold`), or by the scheduler after
                `delivery.max_crashes` attempts that raised (`hold_reason` says why);
                not delivered until released
    done/       delivered (every recipient sent or bounced), but the CRM record of the copy
                or its outcome events are not written yet (the store writer runs behind
                or the store is down); never delivered again, removed once the writer has
                written them, replayed from here at start (`gateway.relay.record_unrecorded`).
                Once the copy's record is written only the envelope is kept (no message
                bytes, `Envelope.envelope_only`): the events are rebuilt from it alone
    corrupt/    could not be parsed; kept for a human, never deleted

A queue file is one file named by the queue id::

    MAILGW-SPOOL 1\\n
    {"id": ..., "mail_from": ..., "recipients": [...], ...}\\n      (the envelope, one JSON line)
    <the message bytes, exactly as they will be sent>

The directory mechanics are a `gateway.dirqueue.DirQueue`: writing is tmp -> write ->
fsync -> rename -> fsync(directory). Directory fsyncs of concurrent writers are
coalesced (group commit), so many sessions share one. Rewrites (a deferral updating
recipient states) follow the same steps, so a crash at any point leaves either the old
or the new file, never half of one.

Each write, rewrite or removal is one call into the queue's own small thread pool,
its directory fsync included: the event loop never waits for the disk, pays one
thread hop per operation, and the spool never waits behind other blocking work
(password hashing uses the default executor). A small new message is written into
tmp/ on the loop itself (it only reaches the page cache), so the thread makes as few
system calls as possible: every one of them releases and retakes the GIL, which the
busy loop holds.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gateway.dirqueue import DirQueue, DirSync, RenamedNotSynced
from gateway.errors import NotFound, SpoolError
from gateway.records import EventRecord

MAGIC = b"MAILGW-SPOOL 1\n"
#: Messages up to this size are written into tmp/ on the event loop (only the fsyncs and
#: the rename wait on a thread); larger ones are written on the spool's threads.
LOOP_WRITE_MAX = 256 * 1024
STATES = ("incoming", "deferred", "hold", "done", "corrupt")
#: the states of entries still to deliver (what `mailgw queue list` and the queue-depth
#: metrics show): not done/ (delivered) nor corrupt/
QUEUED_STATES = ("incoming", "deferred", "hold")


@dataclass
class Recipient:
    addr: str
    status: str = "pending"  # pending | sent | bounced
    attempts: int = 0
    last_reply: str | None = None
    remote: str | None = None
    #: the outcome of the last attempt, kept so that its event (`outcome_event`) can be
    #: rebuilt from the spool after a crash: when it was (None in older queue files: their
    #: events are never replayed), the envelope's attempt number then, the reply's enhanced
    #: status code, and for a bounce whether the queue lifetime ran out (a 4xx then)
    last_at: float | None = None
    last_attempt: int = 0
    last_status: str | None = None
    expired: bool = False


@dataclass
class Envelope:
    id: str
    mail_from: str
    recipients: list[Recipient]
    received_at: float = field(default_factory=time.time)
    attempts: int = 0
    next_attempt: float = 0.0
    user: str | None = None
    account: str | None = None
    client_ip: str | None = None
    client_helo: str | None = None
    message_id: str | None = None
    is_bounce: bool = False
    size: int = 0
    #: the delivery route for this copy when a policy chose one, or "ingest" for the
    #: gateway's own ingest addresses (stored, never delivered); None: delivery.route
    route: str | None = None
    #: the queue id of the message's first copy (copies of one message share it)
    group: str | None = None
    #: a delayed DSN (Action: delayed) went to the sender because the account's
    #: credentials held the message up; sent once per message. Queue files written
    #: before this field read as False; older readers ignore it.
    delay_notified: bool = False
    #: scheduled send (`X-Mailgw-Send-At`, epoch seconds): not attempted before then, and
    #: the queue lifetime counts from then. None: at once. Older files read as None.
    scheduled_for: float | None = None
    #: attempts whose processing raised (a poison message, like Mailman's replay count);
    #: kept across restarts, cleared by `mailgw queue release`. Older files read as 0.
    crashes: int = 0
    #: the error of the last attempt that raised ("ValueError: ...")
    last_error: str | None = None
    #: why the entry is in hold/ when the scheduler put it there (None: `queue hold`)
    hold_reason: str | None = None
    #: what the relay's CRM record of this copy says, kept so that a record lost in a crash
    #: can be rebuilt from the spool at start (`gateway.relay.record_unrecorded`): whether
    #: the store records the copy at all (a policy's `store: false` says no), whether it is
    #: a per-recipient tracked copy, and its tracked links. Older files read True/False/0
    #: (and None for the two fields below).
    crm_store: bool = True
    tracked: bool = False
    links: int = 0
    #: the control headers X-Mailgw-Template and X-Mailgw-Campaign the relay read (they
    #: are not in the spooled bytes), for the same rebuilt record
    template: str | None = None
    campaign: str | None = None
    #: the failed recipients (RcptResult fields) of a DSN that could not be spooled when
    #: they bounced, and since when: the entry stays (its other recipients done) and the
    #: DSN is tried again on the retry schedule, for up to `delivery.retry.give_up_after`
    dsn_owed: list[dict[str, Any]] = field(default_factory=list)
    dsn_owed_since: float | None = None
    #: a done/ entry without its message bytes (the copy's CRM record was written when it
    #: was delivered; only its outcome events were owed). Older files read as False.
    envelope_only: bool = False

    @property
    def started_at(self) -> float:
        """Where the queue lifetime (delivery.retry.give_up_after) counts from: acceptance,
        or the scheduled time when that is later."""
        if self.scheduled_for is None:
            return self.received_at
        return max(self.received_at, self.scheduled_for)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    @property
    def recorded(self) -> bool:
        """Whether the relay records this copy in the CRM store (and its outcome events
        attach to that record): not the ingest copy (ingest stores it), not a DSN the
        gateway wrote, not a copy a policy keeps out of the store."""
        return self.crm_store and self.route != "ingest" and not self.is_bounce

    def to_json(self) -> bytes:
        # = json.dumps(dataclasses.asdict(self)), without asdict's recursive deep copy
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        names = Recipient.__dataclass_fields__
        d["recipients"] = [{n: getattr(r, n) for n in names} for r in self.recipients]
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d: dict[str, Any] = json.loads(raw)
        rknown = Recipient.__dataclass_fields__   # fields of a later version are ignored
        d["recipients"] = [Recipient(**{k: v for k, v in r.items() if k in rknown})
                           for r in d["recipients"]]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


def outcome_event(env: Envelope, r: Recipient) -> EventRecord | None:
    """The event of recipient `r`'s last attempt (sent, bounced, or deferred while still
    pending), from what the queue file keeps; None when it keeps none (never attempted, or
    a queue file older than `Recipient.last_at`) or the copy is a DSN the gateway wrote.

    The scheduler records its events through this too, so a replay after a crash adds the
    same event under the same idempotency key (``sent:<queue id>:<rcpt>``,
    ``bounced:<queue id>:<rcpt>``, ``deferred:<queue id>:<rcpt>:<attempt time in ms>``), which the
    store adds once."""
    if env.is_bounce or r.last_at is None:
        return None
    details: dict[str, Any] = {"reply": r.last_reply, "remote": r.remote,
                               "attempt": r.last_attempt}
    rcpt = r.addr.lower()
    if r.status == "sent":
        key = f"sent:{env.id}:{rcpt}"
    elif r.status == "bounced":
        details["status"], details["hard"] = r.last_status, not r.expired
        if r.expired:
            details["expired"] = True  # build_dsn reports it as 4.4.7 with this reply
        key = f"bounced:{env.id}:{rcpt}"
    else:
        # by the attempt's own time, not its number: an attempt whose rewrite a crash (or a
        # raising attempt) lost is numbered again by the next one, with another reply
        key = f"deferred:{env.id}:{rcpt}:{round(r.last_at * 1000)}"
    return EventRecord(queue_id=env.id, type="deferred" if r.status == "pending" else r.status,
                       recipient=r.addr, at=datetime.fromtimestamp(r.last_at, UTC),
                       details=details, key=key)


def outcome_events(env: Envelope) -> list[EventRecord]:
    """The last attempt's event of every recipient (`outcome_event`) that has one."""
    return [e for e in (outcome_event(env, r) for r in env.recipients) if e is not None]


class CorruptQueueFile(Exception):
    """A queue file that cannot be parsed."""


def parse_queue_file(raw: bytes) -> tuple[Envelope, bytes]:
    if not raw.startswith(MAGIC):
        raise CorruptQueueFile("bad magic")
    end = raw.find(b"\n", len(MAGIC))
    if end < 0:
        raise CorruptQueueFile("no envelope line")
    try:
        env = Envelope.from_json(raw[len(MAGIC):end])
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptQueueFile(f"bad envelope: {exc}") from None
    return env, raw[end + 1:]


class Spool:
    """The queue directory; all writes are atomic and durable before they return."""

    #: Threads doing the spool's disk work (each write, rewrite or removal is one call).
    io_threads = 8

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._queue = DirQueue(self.root, STATES, corrupt="corrupt", dir_mode=0o700,
                               keep_dirs_open=True, threads=self.io_threads,
                               thread_name="spool")
        self.tmp = self._queue.tmp
        self.log = structlog.get_logger("mailgw.spool")
        #: new messages queued although the directory fsync after their rename failed
        #: (`_renamed_not_synced`)
        self.unsynced = 0
        #: called for each of them (the daemon counts them in a metric)
        self.on_unsynced: Callable[[], None] | None = None

    @property
    def _dirsync(self) -> dict[str, DirSync]:
        """The directory fsync (group commit) of each state."""
        return self._queue.syncs

    def close(self) -> None:
        """Let the spool's threads and directory descriptors go (after the last write; a
        later write starts them again)."""
        self._queue.close()

    def dir(self, state: str) -> Path:
        return self._queue.dir(state)

    # -- start-up -----------------------------------------------------------------
    def setup(self) -> None:
        """Create the directories (mode 0700) if they are missing."""
        self._queue.setup()

    def recover(self) -> dict[str, int]:
        """Clean up what a crash left: half-written tmp files (never acknowledged) are
        removed; unparseable queue files go to corrupt/. Returns counts per state."""

        def valid(state: str, qid: str) -> bool:
            try:
                self.read_envelope(state, qid)
            except CorruptQueueFile:
                return False
            return True

        counts = self._queue.recover(valid)
        # the move into done/ writes the new file before it unlinks the old one: a crash in
        # between leaves both, and the entry is delivered (done/ is the truth)
        for qid in self.list_ids("done"):
            for state in QUEUED_STATES:
                if (self.dir(state) / qid).exists():
                    self._queue.remove(state, qid)
                    counts[state] -= 1
        return counts

    # -- reading ------------------------------------------------------------------
    def list_ids(self, state: str) -> list[str]:
        return self._queue.names(state)

    def iter_all(self, states: tuple[str, ...] = STATES) -> Iterator[tuple[str, str]]:
        for state in states:
            for qid in self.list_ids(state):
                yield state, qid

    def find(self, qid: str) -> str:
        """The state a queue id is in; NotFound if it is in none."""
        state = self._queue.find(qid)
        if state is None:
            raise NotFound(f"no queue file with id {qid}")
        return state

    def read(self, state: str, qid: str) -> tuple[Envelope, bytes]:
        return parse_queue_file(self._queue.read(state, qid))

    def read_envelope(self, state: str, qid: str) -> Envelope:
        """Read only the envelope line (cheap for big messages)."""
        try:
            with open(self.dir(state) / qid, "rb") as f:
                head = f.readline()
                if head != MAGIC:
                    raise CorruptQueueFile("bad magic")
                line = f.readline()
        except FileNotFoundError:
            raise NotFound(f"no queue file {state}/{qid}") from None
        if not line.endswith(b"\n"):
            raise CorruptQueueFile("truncated envelope")
        try:
            return Envelope.from_json(line[:-1])
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptQueueFile(f"bad envelope: {exc}") from None

    # -- writing ------------------------------------------------------------------
    @staticmethod
    def _file(env: Envelope, data: bytes) -> bytes:
        """The queue file of a message: magic line, envelope line, message bytes."""
        return b"".join((MAGIC, env.to_json(), b"\n", data))

    async def put(self, env: Envelope, data: bytes, state: str = "incoming") -> None:
        """Store a new message durably; SpoolError (:func:`spool_error`) if that is impossible.

        The file is written into tmp/ on the loop when it is small (the page cache takes it
        at once); the fsyncs and the rename run on the spool's threads. A large message is
        written there too."""
        env.size = len(data)
        q = self._queue
        try:
            if len(data) <= LOOP_WRITE_MAX:
                pending = q.create_tmp(env.id, self._file(env, data))
                await q.run(lambda: q.commit(pending, state))
            else:
                await q.run(lambda: q.write(state, env.id, self._file(env, data)))
        except RenamedNotSynced as exc:
            await self._renamed_not_synced(state, [env.id], exc)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    async def put_all(self, items: list[tuple[Envelope, bytes]], state: str = "incoming") -> None:
        """Store the copies of one message durably, all or none: every file is written and
        fsynced in tmp/ before the first is renamed into `state`; SpoolError (:func:`spool_error`)
        if that is impossible, and then nothing is queued."""
        if len(items) == 1:
            await self.put(*items[0], state=state)
            return
        for env, data in items:
            env.size = len(data)
        q = self._queue
        files = ((env.id, self._file(env, data)) for env, data in items)  # built one by one
        try:
            await q.run(lambda: q.write_all(state, files))
        except RenamedNotSynced as exc:
            await self._renamed_not_synced(state, [env.id for env, _ in items], exc)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def _write_failed(self, exc: OSError) -> SpoolError:
        """The SpoolError for a failed write, logged with its cause (the client sees 45x)."""
        self.log.error("spool_write_failed", path=str(self.root), error=str(exc),
                       errno=errno.errorcode.get(exc.errno or 0, exc.errno))
        return spool_error(exc)

    async def _renamed_not_synced(self, state: str, ids: list[str], exc: OSError) -> None:
        """New files are renamed into `state` but the directory fsync after it failed.

        They are queued all the same: the scheduler sees them and delivers them, so a 451
        now would make the client send the message again and the recipients get it
        twice. The fsync is tried once more; if it fails again the put still succeeds
        (250), logged as an error and counted in `unsynced`: only a crash of the machine
        before the directory reaches the disk could lose these entries."""
        q = self._queue
        try:
            await q.run(self._dirsync[state].sync)
        except OSError as again:
            self.unsynced += 1
            if self.on_unsynced is not None:
                self.on_unsynced()
            self.log.error("spool_dir_fsync_failed", state=state, queue_ids=ids,
                           error=str(exc), retry_error=str(again), queued=True)
            return
        self.log.warning("spool_dir_fsync_retried", state=state, queue_ids=ids, error=str(exc))

    async def rewrite(self, env: Envelope, data: bytes, old_state: str, new_state: str) -> bool:
        """Replace the queue file (new envelope) and move it to `new_state`.

        Returns False (and writes nothing) when the old file is gone, e.g. an admin
        deleted it while it was being delivered."""
        q = self._queue
        try:
            return await q.run(lambda: q.replace(env.id, self._file(env, data),
                                                 old_state, new_state))
        except OSError as exc:
            raise self._write_failed(exc) from exc

    async def finish(self, env: Envelope, data: bytes, old_state: str,
                     keep_data: bool = True) -> bool:
        """Move a delivered entry into done/ with its final envelope (the recipients' outcomes,
        for the events to be replayed from), until its record and events are written.
        Without `keep_data` (the copy's record is written already) the message bytes are
        left out and the envelope says so (`Envelope.envelope_only`).

        Cheaper than a rewrite: the new file is neither fsynced nor its directories (one
        write into the page cache, a rename, an unlink, one thread hop). A kill -9 keeps
        the page cache, so the entry survives any process crash. A power cut (or kernel
        crash) within the kernel's writeback delay (about 30 s) can cost: the rename, and
        the entry is back in its old state and delivered again (as when the removal of a
        delivered entry is lost); or the file's contents, and a zero-length done/ file goes
        to corrupt/ and the copy's record or outcome events not yet written are lost. Mail
        not yet delivered is never lost this way. Returns False (and writes nothing) when
        the old file is gone."""
        q = self._queue
        if not keep_data:
            env.envelope_only, data = True, b""

        def move() -> bool:
            if not q.path(old_state, env.id).exists():
                return False
            q.commit(q.create_tmp(env.id, self._file(env, data)), "done", sync=False)
            q.remove(old_state, env.id, sync=False)
            return True

        try:
            return await q.run(move)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    async def remove_done(self, qids: list[str]) -> None:
        """Unlink done/ entries whose record and events are written (no directory fsync: an
        unlink a power cut loses only replays the entry's events, which the store ignores
        by their keys)."""
        q = self._queue

        def unlink() -> None:
            for qid in qids:
                q.remove("done", qid, sync=False)
        await q.run(unlink)

    async def remove(self, state: str, qid: str) -> None:
        q = self._queue
        await q.run(lambda: q.remove(state, qid))

    def move(self, qid: str, src: str, dst: str) -> None:
        """Atomic rename between states (used by `mailgw queue` and recovery)."""
        self._queue.move(qid, src, dst)

    def release(self, qid: str) -> None:
        """Put a held entry back into incoming/ (admin action). An entry the scheduler
        held after crashes gets its crash count cleared, so it has its full number of
        attempts again; others are only renamed. NotFound if it is not in hold/."""
        try:
            env, data = self.read("hold", qid)
        except CorruptQueueFile:
            env = None
        if env is None or not (env.crashes or env.hold_reason or env.last_error):
            self._queue.move(qid, "hold", "incoming")
            return
        env.crashes, env.last_error, env.hold_reason = 0, None, None
        if not self._queue.replace(qid, self._file(env, data), "hold", "incoming"):
            raise NotFound(f"no queue file hold/{qid}")

    def delete(self, qid: str) -> str:
        """Delete a queued message wherever it is (admin action); returns its old state."""
        state = self.find(qid)
        self._queue.remove(state, qid, sync=False, missing_ok=False)
        return state


def spool_error(exc: OSError) -> SpoolError:
    """The reply for a spool write that failed: a full disk or quota is ``452 4.3.1``
    (RFC 5321 4.2.2 "insufficient system storage", RFC 3463 X.3.1 "mail system full",
    as Postfix answers), anything else ``451 4.3.0`` (RFC 3463 X.3.0, other mail system
    status). Both are temporary: the client keeps the message and tries again."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolError("Insufficient system storage in the spool, try again later",
                          code=452, status="4.3.1")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SpoolError("Spool not writable, try again later", code=451, status="4.3.0")
    return SpoolError("Local error writing the spool, try again later", code=451, status="4.3.0")
