"""The durable spool: a message is accepted only once it is fsynced and renamed into place.

Queue state is where a file is (Postfix qmgr, Mailman's switchboard)::

    tmp/        being written; never acknowledged; removed at start-up
    incoming/   accepted (the client got 250), not yet attempted
    deferred/   a temporary failure happened; waits for `next_attempt`
    hold/       set aside by an admin (`mailgw queue hold`); not delivered until released
    corrupt/    could not be parsed; kept for a human, never deleted

A queue file is one file named by the queue id::

    MAILGW-SPOOL 1\\n
    {"id": ..., "mail_from": ..., "recipients": [...], ...}\\n      (the envelope, one JSON line)
    <the message bytes, exactly as they will be sent>

Writing is tmp -> write -> fsync -> rename -> fsync(directory). Directory fsyncs of
concurrent writers are coalesced (group commit), so many sessions share one.
Rewrites (a deferral updating recipient states) follow the same steps, so a crash
at any point leaves either the old or the new file, never half of one.

Each write, rewrite or removal is one call into the spool's own small thread pool,
its directory fsync included: the event loop never waits for the disk, pays one
thread hop per operation, and the spool never waits behind other blocking work
(password hashing uses the default executor). A small new message is written into
tmp/ on the loop itself (it only reaches the page cache), so the thread makes as few
system calls as possible: every one of them releases and retakes the GIL, which the
busy loop holds.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import NotFound, SpoolError

MAGIC = b"MAILGW-SPOOL 1\n"
#: Messages up to this size are written into tmp/ on the event loop (only the fsyncs and
#: the rename wait on a thread); larger ones are written on the spool's threads.
LOOP_WRITE_MAX = 256 * 1024
STATES = ("incoming", "deferred", "hold", "corrupt")


@dataclass
class Recipient:
    addr: str
    status: str = "pending"  # pending | sent | bounced
    attempts: int = 0
    last_reply: str | None = None
    remote: str | None = None


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

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    def to_json(self) -> bytes:
        # = json.dumps(dataclasses.asdict(self)), without asdict's recursive deep copy
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        names = Recipient.__dataclass_fields__
        d["recipients"] = [{n: getattr(r, n) for n in names} for r in self.recipients]
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d: dict[str, Any] = json.loads(raw)
        d["recipients"] = [Recipient(**r) for r in d["recipients"]]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


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


class _DirSync:
    """Coalesces fsync() of one directory: every caller returns after an fsync that began
    after its call, but concurrent callers share one fsync (group commit). Called from the
    spool's worker threads, after the rename or unlink it must make durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()      # held by the thread running an fsync
        self._counters = threading.Lock()
        self._requested = 0
        self._done = 0
        self._fd: int | None = None        # the directory, kept open between fsyncs

    def _fsync(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._fd)

    def sync(self) -> None:
        with self._counters:
            self._requested += 1
            mine = self._requested
        with self._lock:
            if self._done >= mine:
                return
            with self._counters:
                upto = self._requested
            self._fsync()  # every request up to `upto` was made before this began
            self._done = upto

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


_Job = tuple[Callable[[], None], asyncio.Future[None], asyncio.AbstractEventLoop]


class _Workers:
    """Up to `count` threads running the spool's blocking calls for the event loop: a
    SimpleQueue in, `call_soon_threadsafe` out. Leaner than ThreadPoolExecutor +
    run_in_executor, whose locks, semaphore and chained futures cost more than the fsync
    calls they wrap. Threads start when work finds none idle."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job
        self._idle_lock = threading.Lock()

    def _work(self) -> None:
        while True:
            with self._idle_lock:
                self._idle += 1
            job = self._queue.get()
            with self._idle_lock:
                self._idle -= 1
            if job is None:
                return
            fn, fut, loop = job
            error: BaseException | None = None
            try:
                fn()
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, fut, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, fn, fut, loop, error

    async def run(self, fn: Callable[[], None]) -> None:
        """Run `fn` on a worker; like run_in_executor, cancelling the wait does not stop it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((fn, fut, loop))
        with self._idle_lock:
            start = self._idle <= 0 and len(self._threads) < self._count
        if start:
            t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        await fut

    def close(self) -> None:
        """Finish the queued calls, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()


class Spool:
    """The queue directory; all writes are atomic and durable before they return."""

    #: Threads doing the spool's disk work (each write, rewrite or removal is one call).
    io_threads = 8

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self._dirsync: dict[str, _DirSync] = {}
        self._workers: _Workers | None = None

    async def _io(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the spool's threads."""
        if self._workers is None:
            self._workers = _Workers(self.io_threads, "spool")
        await self._workers.run(fn)

    def close(self) -> None:
        """Let the spool's threads and directory descriptors go (after the last write; a
        later write starts them again)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        for ds in self._dirsync.values():
            ds.close()

    def dir(self, state: str) -> Path:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}")
        return self.root / state

    # -- start-up -----------------------------------------------------------------
    def setup(self) -> None:
        """Create the directories (mode 0700) if they are missing."""
        for d in (self.tmp, *(self.dir(s) for s in STATES)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for ds in self._dirsync.values():
            ds.close()
        self._dirsync = {s: _DirSync(self.dir(s)) for s in STATES}

    def recover(self) -> dict[str, int]:
        """Clean up what a crash left: half-written tmp files (never acknowledged) are
        removed; unparseable queue files go to corrupt/. Returns counts per state."""
        self.setup()
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
        counts = {}
        for state in ("incoming", "deferred", "hold"):
            n = 0
            for qid in self.list_ids(state):
                try:
                    self.read_envelope(state, qid)
                    n += 1
                except CorruptQueueFile:
                    self.move(qid, state, "corrupt")
            counts[state] = n
        counts["corrupt"] = len(self.list_ids("corrupt"))
        return counts

    # -- reading ------------------------------------------------------------------
    def list_ids(self, state: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir(state)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def iter_all(self) -> Iterator[tuple[str, str]]:
        for state in STATES:
            for qid in self.list_ids(state):
                yield state, qid

    def find(self, qid: str) -> str:
        """The state a queue id is in; NotFound if it is in none."""
        for state in STATES:
            if (self.dir(state) / qid).exists():
                return state
        raise NotFound(f"no queue file with id {qid}")

    def read(self, state: str, qid: str) -> tuple[Envelope, bytes]:
        try:
            raw = (self.dir(state) / qid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no queue file {state}/{qid}") from None
        return parse_queue_file(raw)

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
    def _create_tmp(self, env: Envelope, data: bytes) -> tuple[Path, int]:
        """Write the queue file into tmp/; (its path, its still open descriptor)."""
        tmp = self.tmp / f"{env.id}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(b"".join((MAGIC, env.to_json(), b"\n", data)))
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, fd

    @staticmethod
    def _commit(tmp: Path, fd: int, final: Path, sync: _DirSync) -> None:
        """fsync the written file, rename it into place, fsync the directory (group commit).
        Blocking: runs on the spool's threads. The tmp file is gone when this raises."""
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sync.sync()

    async def put(self, env: Envelope, data: bytes, state: str = "incoming") -> None:
        """Store a new message durably; SpoolError (451 4.3.0) if that is impossible.

        The file is written into tmp/ on the loop when it is small (the page cache takes it
        at once); the fsyncs and the rename run on the spool's threads. A large message is
        written there too."""
        env.size = len(data)
        sync = self._dirsync[state]
        final = self.dir(state) / env.id
        try:
            if len(data) <= LOOP_WRITE_MAX:
                tmp, fd = self._create_tmp(env, data)
                await self._io(lambda: self._commit(tmp, fd, final, sync))
            else:
                await self._io(lambda: self._commit(*self._create_tmp(env, data), final, sync))
        except OSError as exc:
            raise SpoolError(_os_reason(exc), status="4.3.0") from exc

    def _write_all(self, items: list[tuple[Envelope, bytes]], state: str) -> None:
        """Every file written and fsynced in tmp/, then all renamed, then one directory fsync.
        A failure leaves none of them in `state` (nor in tmp/)."""
        written: list[tuple[Path, Path]] = []
        try:
            for env, data in items:
                tmp, fd = self._create_tmp(env, data)
                written.append((tmp, self.dir(state) / env.id))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        renamed: list[Path] = []
        try:
            for tmp, final in written:
                os.rename(tmp, final)
                renamed.append(final)
        except BaseException:  # e.g. ENOSPC for the directory entry: take the copies back
            for final in renamed:
                final.unlink(missing_ok=True)
            for tmp, _ in written[len(renamed):]:
                tmp.unlink(missing_ok=True)
            raise
        self._dirsync[state].sync()

    async def put_all(self, items: list[tuple[Envelope, bytes]], state: str = "incoming") -> None:
        """Store the copies of one message durably, all or none: every file is written and
        fsynced in tmp/ before the first is renamed into `state`; SpoolError (451 4.3.0) if
        that is impossible, and then nothing is queued."""
        if len(items) == 1:
            await self.put(*items[0], state=state)
            return
        for env, data in items:
            env.size = len(data)
        try:
            await self._io(lambda: self._write_all(items, state))
        except OSError as exc:
            raise SpoolError(_os_reason(exc), status="4.3.0") from exc

    async def rewrite(self, env: Envelope, data: bytes, old_state: str, new_state: str) -> bool:
        """Replace the queue file (new envelope) and move it to `new_state`.

        Returns False (and writes nothing) when the old file is gone, e.g. an admin
        deleted it while it was being delivered."""
        old = self.dir(old_state) / env.id
        done = False

        def rewrite() -> None:
            nonlocal done
            if not old.exists():
                return
            self._commit(*self._create_tmp(env, data), self.dir(new_state) / env.id,
                         self._dirsync[new_state])
            if old_state != new_state:
                old.unlink(missing_ok=True)
                self._dirsync[old_state].sync()
            done = True

        try:
            await self._io(rewrite)
        except OSError as exc:
            raise SpoolError(_os_reason(exc)) from exc
        return done

    async def remove(self, state: str, qid: str) -> None:
        path = self.dir(state) / qid
        sync = self._dirsync[state]

        def remove() -> None:
            path.unlink(missing_ok=True)
            sync.sync()

        await self._io(remove)

    def move(self, qid: str, src: str, dst: str) -> None:
        """Atomic rename between states (used by `mailgw queue` and recovery)."""
        try:
            os.rename(self.dir(src) / qid, self.dir(dst) / qid)
        except FileNotFoundError:
            raise NotFound(f"no queue file {src}/{qid}") from None
        for d in {src, dst}:
            fd = os.open(self.dir(d), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete(self, qid: str) -> str:
        """Delete a queued message wherever it is (admin action); returns its old state."""
        state = self.find(qid)
        (self.dir(state) / qid).unlink()
        return state


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Insufficient disk space in the spool, try again later"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Spool not writable, try again later"
    return "Local error writing the spool, try again later"
