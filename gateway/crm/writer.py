"""Write to the CRM store off the delivery path: buffer items, flush them in batches, retry on failure.

Callers (the scheduler, the relay) call :meth:`StoreWriter.add_accepted` and
:meth:`StoreWriter.add_event`, which only append to a buffer and never wait. One
background task flushes the buffer in order through :meth:`Store.record`, at most
`batch` items at a time and at latest `max_delay` seconds after an item arrives.
While the store is down the items stay buffered, in order, and the flush is retried
with capped exponential backoff (0.5 s doubling to 30 s); nothing is dropped while the
writer runs, except raw message bytes beyond `max_raw_bytes` (the record stays, without
its bodies and raw copy; logged). Accepted messages handed over with their raw bytes
are parsed in a worker thread right before they are written. :meth:`StoreWriter.stop`
flushes what is left until its timeout and reports (and logs) whatever it could not write.

Sequence marks (:meth:`StoreWriter.mark`, :attr:`StoreWriter.flushed`) say how far the
writes have come: the scheduler keeps a delivered queue entry in the spool (done/) until
the writer has written everything added up to the mark taken after its outcome events.
Per copy, :meth:`StoreWriter.owes_record` says whether its relay record is still to be
written: from the relay's :meth:`StoreWriter.expect` (before the copy is spooled, so that
no delivery can finish before the writer knows) until the batch holding the record is
written. A copy whose record is written keeps only its envelope in done/.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from gateway.aio import wait_event
from gateway.crm.store import Store
from gateway.mail.headers import split_message
from gateway.mail.parse import parse_headers, parse_message
from gateway.records import AcceptedMessage, EventRecord, fill_from_parsed

Item = AcceptedMessage | EventRecord

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0


class StoreWriter:
    """Buffers store writes and flushes them in batches from one background task."""

    def __init__(self, store: Store, *, batch: int = 200, max_delay: float = 0.05,
                 log: Any = None, max_raw_bytes: int = 256 * 1024 * 1024,
                 on_failure: Callable[[], None] | None = None) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.batch = batch
        self.max_delay = max_delay
        self.log = log or structlog.get_logger("mailgw.crm")
        self.written = 0
        """Items (messages and events) written so far."""
        self.failures = 0
        """Flushes that failed (each is retried)."""
        self._items: deque[Item] = deque()
        self.max_raw_bytes = max_raw_bytes
        self.on_failure = on_failure
        """Raw message bytes held while the store is behind; beyond it they are dropped."""
        self._raw_bytes = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: sequence marks (see :meth:`mark`): items added so far, and every item added up
        #: to `flushed` is written (items are written in order); a pulse after every
        #: written batch (:meth:`wait_flushed`)
        self._added = 0
        self.flushed = 0
        self._written = asyncio.Event()
        #: queue ids of the copies whose relay record is expected or added but not written
        self._unrecorded: set[str] = set()

    @property
    def pending(self) -> int:
        """Items not yet written, including a batch being written right now."""
        return len(self._items)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- producers (synchronous, never block) ----------------------------------------
    def add_accepted(self, a: AcceptedMessage) -> None:
        if a.raw is not None:
            if self._raw_bytes + len(a.raw) > self.max_raw_bytes:
                # the store is far behind: keep the record (its header fields), let the bytes
                # (and bodies) go
                self.log.warning("store_backlog_raw_dropped", queue_id=a.queue_id,
                                 size=len(a.raw), buffered=self._raw_bytes)
                h = parse_headers(split_message(a.raw)[0])
                a.from_addr = h.from_addr or a.from_addr
                a.from_name, a.subject, a.date = h.from_name, h.subject, h.date
                a.to_addrs, a.cc_addrs = list(h.to_addrs), list(h.cc_addrs)
                a.in_reply_to, a.references = h.in_reply_to, list(h.references)
                a.raw = None
            else:
                self._raw_bytes += len(a.raw)
        self._unrecorded.update(_copy_ids(a))
        self._add(a)

    def expect(self, qids: list[str]) -> None:
        """The relay is about to spool these copies and add their record: from now until
        that record is written, :meth:`owes_record` is True for them."""
        self._unrecorded.update(qids)

    def unexpect(self, qids: list[str]) -> None:
        """The copies announced with :meth:`expect` were not spooled (or their record was
        never added): nothing is owed for them."""
        self._unrecorded.difference_update(qids)

    def owes_record(self, qid: str) -> bool:
        """Whether the relay record of copy `qid` is expected or added but not yet written."""
        return qid in self._unrecorded

    def mark(self) -> int:
        """The sequence mark of the last item added: once `flushed` reaches it, everything
        added before (the relay record of a copy, its outcome events) is written. The
        scheduler keeps a delivered entry in the spool's done/ until then."""
        return self._added

    async def wait_flushed(self, timeout: float) -> bool:
        """Wait until the next batch is written (True) or `timeout` seconds pass (False)."""
        return await wait_event(self._written, timeout)

    def add_event(self, e: EventRecord) -> None:
        self._add(e)

    def _add(self, item: Item) -> None:
        if self._stopping and self._task is None:
            self.log.error("store_item_after_stop", **_describe(item))
        self._items.append(item)
        self._added += 1
        self._wake.set()
        if len(self._items) >= self.batch:
            self._full.set()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._stop_event.clear()
            self._task = asyncio.create_task(self._run(), name="crm-store-writer")

    async def stop(self, timeout: float) -> int:
        """Flush what is buffered, retrying until `timeout` seconds; return how many items were lost.

        Items still unwritten at the deadline are logged one by one as errors.
        """
        self._stopping = True
        self._stop_event.set()
        if self._task is None:  # never started: flush anyway
            self._task = asyncio.create_task(self._run(), name="crm-store-writer")
        self._wake.set()
        self._full.set()
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif task.exception() is not None:  # pragma: no cover - _run catches everything
            self.log.error("store_writer_crashed", error=repr(task.exception()))
        self._task = None
        lost = len(self._items)
        if lost:
            self.log.error("store_items_unwritten", count=lost, timeout=timeout)
            for item in self._items:
                self.log.error("store_item_unwritten", **_describe(item))
        return lost

    # -- the flusher -------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while True:
            if not self._items:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._items) < self.batch and not self._stopping:
                # let a batch gather, but never hold an item longer than max_delay
                self._full.clear()
                await wait_event(self._full, self.max_delay)
            chunk = list(itertools.islice(self._items, self.batch))
            accepted = [x for x in chunk if isinstance(x, AcceptedMessage)]
            unparsed = [a for a in accepted if a.raw is not None and not a.parsed]
            if unparsed:  # parse once, off the event loop (the relay hands over raw bytes)
                await asyncio.to_thread(_parse_all, unparsed)
            events = [x for x in chunk if isinstance(x, EventRecord)]
            started = loop.time()
            try:
                await self.store.record(accepted, events)
            except Exception as exc:
                self.failures += 1
                if self.on_failure is not None:
                    self.on_failure()
                self.log.error("store_write_failed", error=str(exc), pending=len(self._items),
                               retry_in=BACKOFF_MIN if self._stopping else backoff,
                               failures=self.failures)
                if self._stopping:  # draining: retry often until stop()'s deadline
                    await asyncio.sleep(BACKOFF_MIN)
                    continue
                await wait_event(self._stop_event, backoff)   # a stop() cuts the wait short
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            for _ in chunk:
                item = self._items.popleft()
                if isinstance(item, AcceptedMessage):
                    if item.raw is not None:
                        self._raw_bytes -= len(item.raw)
                    self._unrecorded.difference_update(_copy_ids(item))
            self.flushed += len(chunk)
            self._written.set()     # wake the waiters of this batch, then re-arm
            self._written = asyncio.Event()
            self.written += len(chunk)
            if backoff > BACKOFF_MIN:
                self.log.info("store_write_recovered", written=len(chunk), pending=len(self._items))
            backoff = BACKOFF_MIN
            elapsed = loop.time() - started
            if elapsed > 1.0:
                self.log.warning("store_write_slow", seconds=round(elapsed, 3), items=len(chunk))


def _copy_ids(a: AcceptedMessage) -> list[str]:
    """The queue ids of a record's copies (a record without copies is its own)."""
    return [c.queue_id for c in a.copies] if a.copies else [a.queue_id]


def _parse_all(items: list[AcceptedMessage]) -> None:
    for a in items:
        if a.raw is not None:
            fill_from_parsed(a, parse_message(a.raw))


def _describe(item: Item) -> dict[str, Any]:
    if isinstance(item, AcceptedMessage):
        return {"kind": "message", "queue_id": item.queue_id, "message_id": item.message_id,
                "from_addr": item.from_addr, "recipients": item.recipients, "at": item.at.isoformat()}
    return {"kind": "event", "queue_id": item.queue_id, "type": item.type,
            "recipient": item.recipient, "at": item.at.isoformat(), "details": item.details}
