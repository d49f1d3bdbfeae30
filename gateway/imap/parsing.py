"""Parsing fetched mail off the event loop: a bounded pool of worker processes shared by a node's tailers.

Parsing MIME is pure-Python CPU work (about 0.6 ms for a 12 KB multipart message, the
header block of each message looked at another 0.08 ms), so a thread does not take it
off the event loop's core: the GIL keeps it there. `Parsers` runs it in a
`concurrent.futures.ProcessPoolExecutor` of `sync.parse_workers` processes (``auto``:
one per core, at most 4; ``0``: in a thread of this process, as before). The jobs are
plain values and the functions are module-level, so both cross the process boundary
as pickles:

- `parse_header_blocks`: header blocks -> `HeaderInfo`s (the header-first pass);
- `parse_bodies`: a `BodyJob` (whole messages of one folder and what the direction and
  source of each need) -> `NewMessage`s, exactly as the tailer built them in-process.
  With ``store.raw: disk`` the worker also writes each raw message to its
  content-addressed file (tmp, fsync, rename: :mod:`gateway.crm.rawfiles`) and
  hands back the message without its bytes (its ``raw_sha256`` kept): the file exists
  before the transaction that names it, as when the store writes it, and 12 KB a
  message less travel back. With ``none`` the bytes are dropped; with ``database`` they
  come back for the row.

Small jobs (under `POOL_MIN` messages: new mail while tailing) run in a thread, where a
round trip to a worker would only add latency. What a parse raises in a worker is
raised to the caller as it would have been in-process (the pool pickles the exception);
a worker that dies (killed, out of memory) breaks the pool: the caller gets
`BrokenProcessPool` (the tailer's batch fails, nothing of it is committed) and the next
job starts a new pool. The pool starts on first use, not at import.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import usable_cores
from gateway.crm import rawfiles
from gateway.errors import StoreError
from gateway.mail.parse import HeaderInfo, parse_headers, parse_message
from gateway.procs import die_with_parent
from gateway.records import NewMessage, SourceRef

__all__ = [
    "MAX_AUTO_WORKERS",
    "POOL_MIN",
    "BodyJob",
    "Parsers",
    "parse_bodies",
    "parse_header_blocks",
    "workers_for",
]

T = TypeVar("T")

#: jobs with fewer messages than this are parsed in a thread (no round trip to a worker)
POOL_MIN = 8
#: `parse_workers: auto` takes one worker per core, at most this many
MAX_AUTO_WORKERS = 4


def workers_for(setting: int | str, processes: int = 1) -> int:
    """The number of parse processes `sync.parse_workers` asks for (0: parse in a thread),
    for each of the daemon's `processes` (`workers`): `auto` shares the usable cores
    among them, one each at least."""
    if setting == "auto":
        return max(1, min(MAX_AUTO_WORKERS, usable_cores() // max(1, processes)))
    return int(setting)


@dataclasses.dataclass(frozen=True)
class BodyJob:
    """Whole messages of one folder, with what their direction and source need: plain values."""

    account: str
    folder: str
    sent_folder: bool                  # the folder is the \\Sent one: everything is outbound
    own: frozenset[str]                # the account's addresses (lower case): From one is outbound
    user: str | None                   # the user whose account it is
    uidvalidity: int
    bodies: list[tuple[int, bytes, datetime | None]]   # (uid, raw, internal date)
    raw_dir: str | None = None         # store.raw: disk: write each raw message here, drop the bytes
    keep_raw: bool = True              # hand the bytes back (store.raw: database)


def parse_header_blocks(blocks: Sequence[bytes]) -> list[HeaderInfo]:
    """Header blocks (`BODY.PEEK[HEADER.FIELDS (...)]`) -> what each says."""
    return [parse_headers(b) for b in blocks]


def parse_bodies(job: BodyJob) -> list[NewMessage]:
    """A job's messages -> NewMessages (outbound when From is one of `own`, or in Sent).

    Runs in a worker process (or a thread); with `raw_dir` the raw files are written
    before this returns, so the messages come back without their bytes."""
    out: list[NewMessage] = []
    for uid, raw, internaldate in job.bodies:
        p = parse_message(raw)
        outbound = p.from_addr.strip().lower() in job.own or job.sent_folder
        source = SourceRef(source="imap", ref=f"{job.account}/{job.folder}/{job.uidvalidity}/{uid}",
                           at=datetime.now(UTC), account=job.account, folder=job.folder,
                           uidvalidity=job.uidvalidity, uid=uid)
        m = NewMessage.from_parsed(p, raw, direction="outbound" if outbound else "inbound",
                                   sources=[source], account=job.account, user=job.user)
        if m.date is None:   # no readable Date header: when the server received it
            m.date = internaldate
        out.append(m)
    if job.raw_dir is not None:
        blobs = {m.raw_sha256: m.raw for m in out if m.raw_sha256 is not None and m.raw is not None}
        rawfiles.write_files(Path(job.raw_dir), blobs)
    if not job.keep_raw:
        for m in out:
            _ = m.raw_sha256        # computed (and kept: a cached attribute) before the bytes go
            m.raw = None
    return out


def _warm() -> int:
    return os.getpid()


class Parsers:
    """A node's parsing pool (see the module docstring); `workers` 0: a thread instead."""

    def __init__(self, workers: int, *, log: Any = None, pool_min: int = POOL_MIN) -> None:
        if workers < 0:
            raise ValueError("workers must be 0 or more")
        self.workers = workers
        self.pool_min = pool_min
        self.log = log
        self._pool: ProcessPoolExecutor | None = None
        self.jobs = 0               # jobs run in the pool (tests, benchmarks)

    def _executor(self) -> Executor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of a process with an event loop and threads
            # initializer: a worker dies with this process, even when it is killed -9
            # (they would otherwise be left running, one pool per killed daemon)
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        return self._pool

    async def start(self) -> None:
        """Start the workers now (they take a moment to import), so the first batch need not wait."""
        if self.workers:
            loop = asyncio.get_running_loop()
            pool = self._executor()
            await asyncio.gather(*(loop.run_in_executor(pool, _warm) for _ in range(self.workers)))

    async def run(self, fn: Callable[[Any], T], arg: Any, size: int) -> T:
        """`fn(arg)` in a worker (a job of `size` messages; small ones in a thread)."""
        if not self.workers or size < self.pool_min:
            return await asyncio.to_thread(fn, arg)
        loop = asyncio.get_running_loop()
        pool = self._executor()
        self.jobs += 1
        try:
            return await loop.run_in_executor(pool, fn, arg)
        except BrokenProcessPool:
            # a worker died: this job fails (the caller's batch with it); the next starts anew
            if self.log is not None:
                self.log.error("imap_parse_pool_broken", workers=self.workers)
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    async def headers(self, blocks: Sequence[bytes]) -> list[HeaderInfo]:
        return await self.run(parse_header_blocks, list(blocks), len(blocks))

    async def bodies(self, job: BodyJob) -> list[NewMessage]:
        try:
            return await self.run(parse_bodies, job, len(job.bodies))
        except OSError as exc:      # the raw files (store.raw: disk): as when the store writes them
            raise StoreError(f"cannot write raw messages to {job.raw_dir}: "
                             f"{exc.strerror or exc}") from exc

    async def close(self) -> None:
        """Stop the workers: queued jobs are dropped, the ones running finish (nothing they
        did is committed), the processes are waited for."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
