"""Prometheus metrics of one App: a private registry and the counters and gauges components update.

Every App owns one :class:`Metrics` (never prometheus-client's global default
registry, so tests can run several apps in one process). Components receive the
object and call its small methods; values that are cheaper to read when scraped than
to track (queue files per state, webhook outbox backlog) are registered as collect
hooks, which the ``/metrics`` handler awaits before rendering.

With several worker processes (``workers``), each worker's Metrics is built with the
``multiprocess_dir`` the supervisor created fresh (prometheus-client's multiprocess
mode: every process writes its values to its own files there), and a scrape of any
worker renders the sum over all of them, dead workers' counters included, so a
counter never goes back when a worker is restarted. The gauges read at scrape time
are computed over the whole node by whichever worker is scraped (most recent wins).

Metric names (all prefixed ``mailgw_``)::

    messages_accepted_total                    relay: messages spooled (a 250 given)
    deliveries_total{result}                   per recipient: delivered | deferred | bounced
    queue_messages{state}                      spool files per state (scrape time)
    queue_done                                 delivered entries in done/, waiting for the
                                               store writer (scrape time)
    delivery_crashes_total                     attempts whose processing raised
    queue_poison_total                         entries moved to hold/ after delivery.max_crashes
    store_write_failures_total                 failed store batches (the writer retries)
    webhook_deliveries_total{result}           POSTs: ok | failed | dead
    webhook_outbox_backlog                     outbox rows pending (scrape time)
    tracking_hits_total{kind,machine}          open | click, machine "true" | "false"
    imap_messages_stored_total{account}        messages stored by IMAP sync
    imap_errors_total{account}                 IMAP sync errors
    api_requests_total{route,status}           read API requests
    api_request_seconds{route}                 read API latency (histogram)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: A hook run before each scrape; may be sync or async.
CollectHook = Callable[[], Awaitable[None] | None]
HOOK_TIMEOUT = 2.0


class Metrics:
    """The counters and gauges of one App, in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        #: the supervisor's directory of every worker's values (None: this process alone)
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            # prometheus-client picks its value class when imported, from
            # $PROMETHEUS_MULTIPROC_DIR; a worker is started with it set, this is the fallback
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry()
        self.messages_accepted = Counter("mailgw_messages_accepted", "Messages accepted into the spool",
                                         registry=r)
        self.deliveries = Counter("mailgw_deliveries", "Delivery outcomes per recipient",
                                  ["result"], registry=r)
        self.queue_messages = Gauge("mailgw_queue_messages", "Spool files per state", ["state"],
                                    registry=r, multiprocess_mode="mostrecent")
        self.queue_done = Gauge("mailgw_queue_done",
                                "Delivered spool entries in done/ waiting for the store writer",
                                registry=r, multiprocess_mode="mostrecent")
        self.delivery_crashes = Counter("mailgw_delivery_crashes",
                                        "Delivery attempts whose processing raised", registry=r)
        self.queue_poison = Counter("mailgw_queue_poison",
                                    "Queue entries held after crashing delivery.max_crashes times",
                                    registry=r)
        self.spool_unsynced = Counter("mailgw_spool_dir_fsync_failures",
                                      "Messages queued although the spool directory fsync "
                                      "after their rename failed twice", registry=r)
        self.store_write_failures = Counter("mailgw_store_write_failures",
                                            "Store write batches that failed (retried)", registry=r)
        self.webhook_deliveries = Counter("mailgw_webhook_deliveries", "Webhook POST outcomes",
                                          ["result"], registry=r)
        self.webhook_backlog = Gauge("mailgw_webhook_outbox_backlog",
                                     "Webhook deliveries pending in the outbox", registry=r,
                                     multiprocess_mode="mostrecent")
        self.tracking_hits = Counter("mailgw_tracking_hits", "Open pixel and click redirect hits",
                                     ["kind", "machine"], registry=r)
        self.imap_stored = Counter("mailgw_imap_messages_stored", "Messages stored by IMAP sync",
                                   ["account"], registry=r)
        self.imap_errors = Counter("mailgw_imap_errors", "IMAP sync errors", ["account"], registry=r)
        self.api_requests = Counter("mailgw_api_requests", "Read API requests", ["route", "status"],
                                    registry=r)
        self.api_latency = Histogram("mailgw_api_request_seconds", "Read API latency", ["route"],
                                     buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                     registry=r)
        for result in ("delivered", "deferred", "bounced"):
            self.deliveries.labels(result)
        for result in ("ok", "failed", "dead"):
            self.webhook_deliveries.labels(result)
        self._hooks: list[CollectHook] = []

    # -- what components call ---------------------------------------------------------
    def accepted(self, n: int = 1) -> None:
        self.messages_accepted.inc(n)

    def delivered(self, n: int = 1) -> None:
        self.deliveries.labels("delivered").inc(n)

    def deferred(self, n: int = 1) -> None:
        self.deliveries.labels("deferred").inc(n)

    def bounced(self, n: int = 1) -> None:
        self.deliveries.labels("bounced").inc(n)

    def set_queue(self, counts: Mapping[str, int]) -> None:
        for state, n in counts.items():
            self.queue_messages.labels(state).set(n)

    def set_done(self, n: int) -> None:
        self.queue_done.set(n)

    def delivery_crashed(self) -> None:
        self.delivery_crashes.inc()

    def queue_poisoned(self) -> None:
        self.queue_poison.inc()

    def spool_dir_fsync_failed(self) -> None:
        self.spool_unsynced.inc()

    def store_write_failed(self) -> None:
        self.store_write_failures.inc()

    def webhook_result(self, result: str) -> None:
        """`ok`, `failed` (will be retried) or `dead` (given up)."""
        self.webhook_deliveries.labels(result).inc()

    def tracking_hit(self, kind: str, machine: bool) -> None:
        """`kind` is ``open`` or ``click``."""
        self.tracking_hits.labels(kind, "true" if machine else "false").inc()

    def imap_stored_messages(self, account: str, n: int = 1) -> None:
        self.imap_stored.labels(account).inc(n)

    def imap_error(self, account: str) -> None:
        self.imap_errors.labels(account).inc()

    # -- scraping -----------------------------------------------------------------------
    def on_collect(self, hook: CollectHook) -> None:
        """Run `hook` before every scrape (to refresh gauges read from elsewhere)."""
        self._hooks.append(hook)

    async def collect(self) -> bytes:
        """Run the collect hooks (each bounded by a timeout; a failing hook keeps the old
        value) and render the registry in the Prometheus text format."""
        for hook in self._hooks:
            with contextlib.suppress(Exception):
                result: Any = hook()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, HOOK_TIMEOUT)
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
