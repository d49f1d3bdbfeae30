"""A durable directory queue: an entry is one file, its state is the directory it is in.

Every on-disk queue of mailgw is one of these (the spool, the Sent-copy queue). Under
one root directory::

    tmp/        being written; never acknowledged; emptied by `recover()` / `clear_tmp()`
    <state>/    one directory per state its owner names (incoming/, deferred/, new/, ...)
    <corrupt>/  one of those states, named by the owner: files that could not be parsed,
                kept for a human and never deleted by this module

Writing is tmp/ -> write -> fsync(file) -> rename into the state directory ->
fsync(directory), so a crash at any point leaves either no entry or a whole one, and a
file still in tmp/ is never seen as queued. A rewrite follows the same steps, so a
crash leaves the old file or the new one, never half of one. The owner names entries
(names that start with "." are not entries) and decides what a file holds; this module
only knows bytes.

Directory fsyncs go through one `DirSync` per state. With ``keep_dirs_open`` (the
spool) the directory stays open and concurrent callers share one fsync (group commit);
without it each fsync opens and closes the directory.

Every method blocks on the disk except `run`, which hands one blocking call to the
queue's own small thread pool for an event loop: one hand-off per call, and the queue
never waits behind other blocking work in the default executor.
"""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from gateway.errors import NotFound

__all__ = ["DirQueue", "DirSync", "Fsync", "Pending", "RenamedNotSynced", "adopt"]

T = TypeVar("T")
#: fsync(fd): os.fsync, or a stand-in that tests inject
Fsync = Callable[[int], None]


class DirSync:
    """Makes renames and unlinks in one directory durable: every `sync()` returns after
    an fsync of the directory that began after the call. Concurrent callers share one
    fsync (group commit). With `keep_open` the directory's descriptor is kept between
    fsyncs (until `close()`); otherwise each fsync opens and closes it. Thread-safe."""

    def __init__(self, path: Path, fsync: Fsync = os.fsync, *, keep_open: bool = True) -> None:
        self.path = path
        self._fsync_fd = fsync
        self._keep_open = keep_open
        self._lock = threading.Lock()      # held by the thread running an fsync
        self._counters = threading.Lock()
        self._requested = 0
        self._done = 0
        self._fd: int | None = None        # the directory, kept open between fsyncs

    def _fsync(self) -> None:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            if not self._keep_open:
                try:
                    self._fsync_fd(fd)
                finally:
                    os.close(fd)
                return
            self._fd = fd
        self._fsync_fd(self._fd)

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
        """Let the kept descriptor go; the next `sync()` opens the directory again."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class RenamedNotSynced(OSError):
    """The new entries are renamed into their state directory (they are queued: every
    reader sees them), but the directory fsync after the rename failed, so a crash of the
    machine now could still lose the directory entry. The owner decides what that means."""


class Pending(NamedTuple):
    """A file written into tmp/ but not yet committed: invisible to every reader."""

    name: str        # the entry's name once committed
    path: Path       # its file in tmp/
    fd: int          # still open, not yet fsynced


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


class _Workers:
    """Up to `count` threads running a queue's blocking calls for the event loop: a
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
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, fn, fut, loop, result, error

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a worker; like run_in_executor, cancelling the wait does not stop it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        with self._idle_lock:
            start = self._idle <= 0 and len(self._threads) < self._count
        if start:
            t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return await fut

    def close(self) -> None:
        """Finish the queued calls, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()


class DirQueue:
    """One queue directory: `root`/tmp plus one directory per state (see the module
    docstring). `corrupt` names the state unparseable files are moved to by `recover`."""

    def __init__(self, root: Path, states: Sequence[str], *, corrupt: str,
                 dir_mode: int = 0o700, keep_dirs_open: bool = True,
                 fsync: Fsync = os.fsync, threads: int = 8, thread_name: str = "dirqueue") -> None:
        if corrupt not in states:
            raise ValueError(f"the corrupt state {corrupt!r} is not one of {states!r}")
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.states = tuple(states)
        self.corrupt = corrupt
        self.dir_mode = dir_mode
        self._fsync = fsync
        self._threads = threads
        self._thread_name = thread_name
        self._workers: _Workers | None = None
        #: one DirSync per state; they open their directory on first use
        self.syncs = {s: DirSync(self.root / s, fsync, keep_open=keep_dirs_open)
                      for s in self.states}

    def dir(self, state: str) -> Path:
        """The directory of a state; ValueError for a state this queue does not have."""
        if state not in self.syncs:
            raise ValueError(f"unknown queue state {state!r}")
        return self.root / state

    def path(self, state: str, name: str) -> Path:
        return self.dir(state) / name

    # -- start-up and shutdown ----------------------------------------------------------------
    def setup(self) -> None:
        """Create the directories (mode `dir_mode`) if they are missing. Kept directory
        descriptors are let go, so a directory made again is the one fsynced."""
        for d in (self.tmp, *(self.dir(s) for s in self.states)):
            d.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        for ds in self.syncs.values():
            ds.close()

    def clear_tmp(self) -> None:
        """Remove what is in tmp/: files whose writing never finished (nor was acknowledged)."""
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return
        for name in names:
            (self.tmp / name).unlink(missing_ok=True)

    def recover(self, valid: Callable[[str, str], bool]) -> dict[str, int]:
        """Clean up what a crash left: create missing directories, empty tmp/, and move
        every entry for which `valid(state, name)` is False to the corrupt state (the
        corrupt state itself is not checked). Returns the count of entries per state,
        the corrupt state last."""
        self.setup()
        self.clear_tmp()
        counts: dict[str, int] = {}
        for state in self.states:
            if state == self.corrupt:
                continue
            n = 0
            for name in self.names(state):
                if valid(state, name):
                    n += 1
                else:
                    self.quarantine(state, name)
            counts[state] = n
        counts[self.corrupt] = len(self.names(self.corrupt))
        return counts

    def close(self) -> None:
        """Let the threads and the kept directory descriptors go (after the last call;
        a later call starts them again)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        for ds in self.syncs.values():
            ds.close()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run the blocking `fn` on the queue's own threads and return its result."""
        if self._workers is None:
            self._workers = _Workers(self._threads, self._thread_name)
        return await self._workers.run(fn)

    # -- reading ------------------------------------------------------------------------------
    def names(self, state: str) -> list[str]:
        """The entries in a state, sorted; [] when its directory is missing."""
        try:
            return sorted(n for n in os.listdir(self.dir(state)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def find(self, name: str) -> str | None:
        """The first state (in `states` order) holding an entry of that name, or None."""
        for state in self.states:
            if (self.root / state / name).exists():
                return state
        return None

    def read(self, state: str, name: str) -> bytes:
        """The whole file of an entry; NotFound when there is none."""
        try:
            return self.path(state, name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no queue file {state}/{name}") from None

    # -- writing ------------------------------------------------------------------------------
    def create_tmp(self, name: str, data: bytes) -> Pending:
        """Write a file into tmp/ (not fsynced, the descriptor left open): cheap enough to
        run on an event loop for small files, since it only reaches the page cache. Nothing
        is left in tmp/ when this raises."""
        tmp = self.tmp / f"{name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Pending(name, tmp, fd)

    def commit(self, pending: Pending, state: str, *, sync: bool = True) -> None:
        """fsync a file written by `create_tmp`, rename it into `state`, fsync that
        directory; without `sync`, only the rename (the file and its name reach the disk
        when the kernel writes them back: a process crash keeps them, a power cut may not).
        The tmp file is gone when this raises."""
        try:
            try:
                final = self.path(state, pending.name)
                if sync:
                    self._fsync(pending.fd)
            finally:
                os.close(pending.fd)
            os.rename(pending.path, final)
        except BaseException:
            pending.path.unlink(missing_ok=True)
            raise
        if sync:
            self._sync_renamed(state)

    def write(self, state: str, name: str, data: bytes) -> None:
        """Store one entry durably (`create_tmp` + `commit`), replacing any of that name."""
        self.commit(self.create_tmp(name, data), state)

    def write_all(self, state: str, items: Iterable[tuple[str, bytes]]) -> None:
        """Store several entries, all or none: every file is written and fsynced in tmp/,
        then all are renamed, then one directory fsync. A failure leaves none of them in
        `state` (nor in tmp/). `items` is consumed once, so it may be a generator that
        builds each file's bytes only when it is written."""
        written: list[tuple[Path, Path]] = []
        try:
            for name, data in items:
                pending = self.create_tmp(name, data)
                written.append((pending.path, self.path(state, name)))
                try:
                    self._fsync(pending.fd)
                finally:
                    os.close(pending.fd)
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        renamed: list[Path] = []
        try:
            for tmp, final in written:
                os.rename(tmp, final)
                renamed.append(final)
        except BaseException:  # e.g. ENOSPC for the directory entry: take them back
            for final in renamed:
                final.unlink(missing_ok=True)
            for tmp, _ in written[len(renamed):]:
                tmp.unlink(missing_ok=True)
            raise
        self._sync_renamed(state)

    def _sync_renamed(self, state: str) -> None:
        """The directory fsync after new entries were renamed into `state`; its failure is
        a RenamedNotSynced (the entries stay: taking them back could race a reader that
        has already seen them)."""
        try:
            self.syncs[state].sync()
        except OSError as exc:
            raise RenamedNotSynced(exc.errno, f"fsync of {state}/ after the rename failed: "
                                   f"{exc.strerror or exc}") from exc

    def replace(self, name: str, data: bytes, old_state: str, new_state: str) -> bool:
        """Replace an entry's file with `data` and move it to `new_state`, as one durable
        step (the new file is committed before the old one is unlinked). Returns False,
        writing nothing, when the entry is no longer in `old_state`."""
        old = self.path(old_state, name)
        if not old.exists():
            return False
        self.commit(self.create_tmp(name, data), new_state)
        if old_state != new_state:
            old.unlink(missing_ok=True)
            self.syncs[old_state].sync()
        return True

    def remove(self, state: str, name: str, *, sync: bool = True,
               missing_ok: bool = True) -> None:
        """Unlink an entry; with `sync`, fsync its directory afterwards. FileNotFoundError
        for a missing entry only without `missing_ok`."""
        self.path(state, name).unlink(missing_ok=missing_ok)
        if sync:
            self.syncs[state].sync()

    def move(self, name: str, src: str, dst: str, *, sync: bool = True) -> None:
        """Atomic rename between states; with `sync`, fsync both directories afterwards.
        NotFound when the entry is not in `src`."""
        try:
            os.rename(self.path(src, name), self.path(dst, name))
        except FileNotFoundError:
            raise NotFound(f"no queue file {src}/{name}") from None
        if sync:
            for state in dict.fromkeys((src, dst)):
                self.syncs[state].sync()

    def quarantine(self, state: str, name: str) -> None:
        """Move an entry that cannot be parsed to the corrupt state (durably)."""
        self.move(name, state, self.corrupt)


def adopt(src: Path, dst: Path) -> int:
    """Move every entry of the queue at `src` into the same state of the queue at `dst`
    (neither may be in use): how a worker's queue is handed on when `workers` is lowered.

    tmp/ is left (never acknowledged); an entry whose name `dst` already has stays in `src`.
    Each destination directory is fsynced, then each source directory, so a crash leaves
    every entry in one queue or the other. Returns the number moved.
    """
    moved = 0
    try:
        states = sorted(p.name for p in src.iterdir() if p.is_dir() and p.name != "tmp")
    except FileNotFoundError:
        return 0
    for state in states:
        names = [n for n in os.listdir(src / state) if not n.startswith(".")]
        if not names:
            continue
        (dst / state).mkdir(parents=True, exist_ok=True, mode=0o700)
        n = 0
        for name in names:
            target = dst / state / name
            if target.exists():
                continue
            os.rename(src / state / name, target)
            n += 1
        if n:
            for d in (dst / state, src / state):
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        moved += n
    return moved
