"""Webhook delivery: a background dispatcher that POSTs outbox rows, signed, until each is accepted.

What a receiver gets. One POST per event and webhook, body = the event as JSON::

    {"id": "<event id>", "type": "message.opened", "created_at": "<ISO 8601>", "data": {...}}

with the headers

``Content-Type: application/json``
``X-Mailgw-Event``       the event type
``X-Mailgw-Delivery``    the event id: the same on every retry, so receivers dedupe by it
``X-Mailgw-Timestamp``   Unix seconds when this attempt was signed
``X-Mailgw-Signature``   ``sha256=`` + hex HMAC-SHA256(secret, ``"<timestamp>.<body>"``)

A receiver verifies by recomputing the HMAC over the timestamp header, a dot and the
raw body bytes with the webhook's secret (``secret_file``), comparing in constant time,
and rejecting timestamps more than 5 minutes from its clock (replay window); then it
processes each ``X-Mailgw-Delivery`` id once (delivery is at least once).

Retries. A 2xx answer marks the delivery done. 410 Gone marks it ``dead`` at once
(the receiver says it will never want it). Anything else — another status, a redirect
(never followed), a network error, a timeout (``timeout`` per webhook) — is retried
after ``retry_initial`` doubling up to ``retry_max`` with +/-20 % jitter (a
``Retry-After`` in seconds on 429/503 is honoured within that bound), until the event
is older than ``max_age``; then it is ``dead``: logged, counted in
``mailgw_webhook_deliveries_total{result="dead"}`` and listed by ``GET /api/v1/webhooks``.

Durability. Nothing is deleted before a 2xx: rows are claimed with a lease
(:mod:`gateway.crm.outbox`), so a crash or restart mid-request leaves them pending and
they are sent again; several nodes on one PostgreSQL share the work without sending a
row twice at once. Stopping waits for requests in flight up to a deadline; the rest are
handed back as pending, never marked delivered. Delivered rows are purged after
:data:`KEEP_DELIVERED`; dead ones are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import structlog

from gateway import __version__
from gateway.aio import wait_event
from gateway.config import Config, read_secret
from gateway.crm import outbox
from gateway.crm.outbox import Claimed
from gateway.crm.store import Store
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.records import WebhookTarget

#: Seconds a claimed row stays leased beyond its request timeout.
LEASE_MARGIN = 30.0
#: How often the dispatcher looks for due rows when nothing wakes it.
POLL_INTERVAL = 1.0
#: Delivered rows are deleted this long after delivery.
KEEP_DELIVERED = timedelta(days=7)
PURGE_EVERY = 3600.0
JITTER = 0.2
USER_AGENT = f"mailgw/{__version__} (webhooks)"


@dataclass(frozen=True)
class Endpoint:
    """A configured webhook with its secret read: what the dispatcher needs to POST."""

    url: str
    secret: bytes
    events: frozenset[str]
    timeout: float = 10.0
    max_age: float = 3 * 86400.0
    retry_initial: float = 10.0
    retry_max: float = 3600.0


def endpoints_from_config(cfg: Config) -> dict[str, Endpoint]:
    """The configured webhooks by id (their URL), secrets read (the config was validated)."""
    return {w.url: Endpoint(url=w.url, secret=read_secret(w.secret_file, cfg.base_dir).strip()
                            .encode(), events=frozenset(w.events), timeout=w.timeout,
                            max_age=w.max_age, retry_initial=w.retry_initial,
                            retry_max=w.retry_max)
            for w in cfg.webhooks}


def targets(endpoints: Mapping[str, Endpoint]) -> list[WebhookTarget]:
    """What :meth:`Store.configure` takes: which webhook wants which events."""
    return [WebhookTarget(id=url, events=e.events) for url, e in endpoints.items()]


def body_bytes(payload: Mapping[str, Any]) -> bytes:
    """The exact body POSTed (and signed): compact JSON, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Mailgw-Signature`` value for a body sent at `timestamp`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *,
           tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: constant-time signature check and a replay window (seconds)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff(attempts: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds before retry number `attempts` (1 after the first failure): doubling, jittered."""
    base = min(maximum, initial * float(2 ** max(0, min(attempts - 1, 40))))
    return max(0.0, base * (1.0 + rng.uniform(-JITTER, JITTER)))


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str = ""
    gone: bool = False               # 410: never retry
    retry_after: float | None = None


class WebhookDispatcher:
    """Works through the outbox: claims due rows, POSTs them with bounded concurrency."""

    def __init__(self, store: Store, endpoints: Mapping[str, Endpoint], *,
                 metrics: Metrics | None = None, log: Any = None, concurrency: int = 8,
                 poll_interval: float = POLL_INTERVAL,
                 clock: Callable[[], datetime] | None = None, seed: int | None = None) -> None:
        self.store = store
        self.endpoints = dict(endpoints)
        self.metrics = metrics
        self.log = log or structlog.get_logger("mailgw.webhooks")
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.now = clock or (lambda: datetime.now(UTC))
        self._rng = random.Random(seed)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._last_purge = 0.0
        self.delivered = 0
        self.failed = 0
        self.dead = 0

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency))
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def configure(self, endpoints: Mapping[str, Endpoint]) -> None:
        """New webhooks on reload; rows of a removed webhook stay pending (never lost)."""
        self.endpoints = dict(endpoints)
        self.notify()

    def notify(self) -> None:
        """Look for due rows now (e.g. right after a transaction that enqueued some)."""
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let POSTs in flight finish up to `timeout`, hand the rest back."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            self._task = None
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight.values()), timeout=timeout)
            left = [pk for pk, t in self._inflight.items() if t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if left:
                try:
                    await outbox.release(self.store, left)
                except StoreError as exc:  # the lease runs out instead: still not lost
                    self.log.warning("webhook_release_failed", error=str(exc), ids=left)
                self.log.info("webhook_deliveries_left_pending", count=len(left))
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def busy(self) -> int:
        return len(self._inflight)

    # -- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            free = self.concurrency - len(self._inflight)
            claimed: list[Claimed] = []
            if free > 0 and self.endpoints:
                longest = max(e.timeout for e in self.endpoints.values())
                try:
                    claimed = await outbox.claim(self.store, list(self.endpoints), limit=free,
                                                 lease=longest + LEASE_MARGIN, now=self.now())
                    failures = 0
                except StoreError as exc:
                    failures += 1
                    if failures == 1 or failures % 60 == 0:
                        self.log.error("webhook_claim_failed", error=str(exc), failures=failures)
                    if self.metrics is not None:
                        self.metrics.store_write_failed()
                if self._stopping:  # stopped while claiming: hand them back, do not start
                    await self._release_quietly([c.id for c in claimed])
                    return
                for c in claimed:
                    t = asyncio.create_task(self._deliver(c), name=f"webhook-{c.id}")
                    self._inflight[c.id] = t
                    t.add_done_callback(self._done_callback(c.id))
            await self._maybe_purge()
            if claimed and len(claimed) == free:
                continue  # more may be due: claim again as soon as a slot is free
            self._wake.clear()
            await wait_event(self._wake, self.poll_interval)

    def _done_callback(self, pk: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._inflight.pop(pk, None)
            self._wake.set()
        return done

    async def _release_quietly(self, ids: Sequence[int]) -> None:
        with contextlib.suppress(StoreError):
            await outbox.release(self.store, ids, not_attempted=True)

    async def _maybe_purge(self) -> None:
        mono = time.monotonic()
        if mono - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = mono
        try:
            n = await outbox.purge_delivered(self.store, self.now() - KEEP_DELIVERED)
        except StoreError as exc:
            self.log.warning("webhook_purge_failed", error=str(exc))
            return
        if n:
            self.log.info("webhook_outbox_purged", deleted=n)

    # -- one delivery -------------------------------------------------------------------
    async def _deliver(self, c: Claimed) -> None:
        ep = self.endpoints.get(c.webhook)
        if ep is None:  # removed by a reload after the claim
            await self._release_quietly([c.id])
            return
        outcome = await self.post(ep, c)
        now = self.now()
        log = self.log.bind(webhook=ep.url, delivery=c.event_id, event=c.event_type,
                            attempts=c.attempts)
        try:
            if outcome.ok:
                await outbox.mark_delivered(self.store, c.id, now)
                self.delivered += 1
                self._count("ok")
                log.info("webhook_delivered")
                return
            age = (now - c.created_at).total_seconds()
            if outcome.gone or age >= ep.max_age:
                await outbox.mark_dead(self.store, c.id, outcome.error)
                self.dead += 1
                self._count("dead")
                log.error("webhook_dead", error=outcome.error,
                          reason="410 Gone" if outcome.gone else "max_age exceeded",
                          age=round(age))
                return
            delay = backoff(c.attempts, ep.retry_initial, ep.retry_max, self._rng)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, ep.retry_max))
            await outbox.mark_retry(self.store, c.id, now + timedelta(seconds=delay), outcome.error)
            self.failed += 1
            self._count("failed")
            log.warning("webhook_failed", error=outcome.error, retry_in=round(delay, 1))
        except StoreError as exc:
            # the row keeps its lease and is tried again when it runs out (maybe a duplicate,
            # which receivers dedupe by X-Mailgw-Delivery; never a loss)
            log.error("webhook_mark_failed", error=str(exc), delivered=outcome.ok)
            if self.metrics is not None:
                self.metrics.store_write_failed()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_result(result)

    async def post(self, ep: Endpoint, c: Claimed) -> Outcome:
        """One signed POST; never raises for network trouble (it becomes an Outcome)."""
        assert self._session is not None
        body = body_bytes(c.payload)
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "X-Mailgw-Event": c.event_type,
                   "X-Mailgw-Delivery": c.event_id, "X-Mailgw-Timestamp": str(ts),
                   "X-Mailgw-Signature": sign(ep.secret, ts, body)}
        try:
            async with self._session.post(ep.url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=ep.timeout)) as resp:
                if 200 <= resp.status < 300:
                    return Outcome(ok=True)
                text = (await resp.content.read(300)).decode("utf-8", "replace").strip()
                error = f"HTTP {resp.status}" + (f": {text[:200]}" if text else "")
                retry_after = None
                if resp.status in (429, 503):
                    with contextlib.suppress(ValueError, TypeError):
                        retry_after = max(0.0, float(resp.headers.get("Retry-After", "")))
                return Outcome(ok=False, error=error, gone=resp.status == 410,
                               retry_after=retry_after)
        except TimeoutError:
            return Outcome(ok=False, error=f"timeout after {ep.timeout:g}s")
        except aiohttp.ClientError as exc:
            return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        except OSError as exc:
            return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
