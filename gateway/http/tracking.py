"""The public tracking endpoint: open pixel, click redirect, and hits recorded off the hot path.

Routes (aiohttp, the ``listeners.tracking`` listener)::

    GET|HEAD /o/{token}   43-byte transparent GIF, never cached
    GET|HEAD /c/{token}   302 to exactly the URL inside the token (clicks and the honeypot)
    GET      /healthz     200, with the recorder's counters as JSON

A token that does not verify (forged, truncated, altered, of the wrong kind for the
route), or a click URL that is not plain http(s) or holds control characters, gets 404
with a tiny body: no redirect, nothing recorded. ``HEAD`` gets the same answer as
``GET`` and is never recorded (link checkers and previewers use it).

Recording is asynchronous: the handler answers at once and hands an observation to the
:class:`HitRecorder`, whose bounded queue feeds a few workers that look the copy up
(:class:`CopyLookup`), classify the hit (:mod:`gateway.tracking.classify`) and give it
to the :class:`HitSink` (the CRM store). A full queue drops the hit — logged and counted,
never silent — rather than hold responses or grow without bound. A failing lookup
classifies without copy information; a failing sink is logged and counted. Neither ever
turns a valid click into an error page or a pixel into anything but the GIF.

The client address is the TCP peer, or, when the peer is one of
``listeners.tracking.trusted_proxies``, the right-most address in ``X-Forwarded-For``
that is not itself a trusted proxy.

Wiring (the daemon)::

    server = TrackingServer(cfg.listeners.tracking, signer, sink=store_sink,
                            lookup=store_lookup, settings=settings_from_config(cfg))
    await server.start()          # binds host:port, starts the recorder's workers
    ...
    await server.stop(grace=5.0)  # stops accepting, drains queued hits, stops workers
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import quote, urlsplit

import structlog
from aiohttp import web

from gateway.config import Config, TrackingListener
from gateway.tracking.classify import (
    CopyInfo,
    Network,
    Observation,
    PriorHit,
    Settings,
    classify,
    in_networks,
    parse_ip,
)
from gateway.tracking.hits import CopyLookup, Hit, HitSink
from gateway.tracking.tokens import TokenData, TokenSigner

#: The smallest transparent GIF (1x1, 43 bytes).
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00"
         b"\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NO_CACHE = {"Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
            "Pragma": "no-cache", "Expires": "0"}
#: Request headers kept with a hit (lower-case), besides User-Agent and Referer.
HEADERS_OF_INTEREST = ("accept", "accept-language", "purpose", "sec-purpose", "x-purpose",
                       "x-moz", "sec-fetch-mode", "sec-fetch-site", "sec-fetch-dest",
                       "sec-fetch-user", "via", "from", "x-forwarded-for")
_MAX_HEADER = 512
_MAX_UA = 1024

log = structlog.get_logger("mailgw.tracking")


# -- the recorder -------------------------------------------------------------------------


class RecentHits:
    """Hits seen by this process per copy, for the burst and honeypot rules.

    Bounded twice: at most `max_copies` copies (least recently hit dropped first) and
    `per_copy` hits per copy (the newest honeypot hit is always kept), so replaying one
    valid token in a loop costs neither memory nor time.
    """

    def __init__(self, window: float, max_copies: int = 100_000, per_copy: int = 64) -> None:
        self.window = window
        self.max_copies = max_copies
        self.per_copy = per_copy
        self._by_copy: OrderedDict[str, list[PriorHit]] = OrderedDict()

    def add(self, copy_id: str, hit: PriorHit) -> None:
        hits = [h for h in self._by_copy.pop(copy_id, []) if hit.at - h.at <= self.window]
        hits.append(hit)
        if len(hits) > self.per_copy:
            honeypots = [h for h in hits if h.kind == "honeypot"][-1:]
            others = [h for h in hits if h.kind != "honeypot"]
            hits = sorted(honeypots + others[-(self.per_copy - len(honeypots)):], key=lambda h: h.at)
        self._by_copy[copy_id] = hits
        while len(self._by_copy) > self.max_copies:
            self._by_copy.popitem(last=False)

    def get(self, copy_id: str) -> Sequence[PriorHit]:
        return tuple(self._by_copy.get(copy_id, ()))


@dataclass
class RecorderStats:
    queued: int = 0       # accepted into the queue
    recorded: int = 0     # handed to the sink successfully
    dropped: int = 0      # queue full: not recorded
    failed: int = 0       # the sink raised
    lookup_failed: int = 0
    not_found: int = 0    # 404s (bad tokens, bad URLs)


@dataclass(frozen=True)
class _Pending:
    id: str
    token: TokenData
    obs: Observation
    headers: Mapping[str, str] = field(default_factory=dict)


class HitRecorder:
    """Bounded queue + workers: look up, classify, record. See the module docstring."""

    BATCH = 256            # hits a worker takes from the queue at once
    COPY_TTL = 30.0        # seconds a copy lookup is reused
    MISSING_TTL = 5.0      # ... and an unknown copy (the store may not have it yet)
    COPY_CACHE = 10_000    # copies cached

    def __init__(self, sink: HitSink, lookup: CopyLookup | None = None, *,
                 settings: Settings | None = None, queue_size: int = 10_000, workers: int = 4,
                 lookup_timeout: float = 5.0) -> None:
        self.sink = sink
        self.lookup = lookup
        self.settings = settings = settings or Settings()
        self.stats = RecorderStats()
        self.recent = RecentHits(window=self._window(settings))
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._n_workers = workers
        self._workers: list[asyncio.Task[None]] = []
        self._lookup_timeout = lookup_timeout
        self._copies: OrderedDict[str, tuple[float, CopyInfo | None]] = OrderedDict()
        self._in_flight = 0   # taken from the queue by a worker, not finished yet

    @staticmethod
    def _window(settings: Settings) -> float:
        """How long hits are remembered for the honeypot and burst rules."""
        return max(settings.honeypot_window, settings.burst_window) + 60

    def configure(self, settings: Settings) -> None:
        """New thresholds and networks (a reload); they apply to every hit not yet classified."""
        self.settings = settings
        self.recent.window = self._window(settings)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, token: TokenData, obs: Observation, headers: Mapping[str, str]) -> str | None:
        """Queue one GET hit; its id, or None when the queue is full (dropped, logged)."""
        hit_id = uuid.uuid4().hex
        self.recent.add(obs.copy_id, PriorHit(hit_id, obs.kind, obs.link, obs.at))
        try:
            self._queue.put_nowait(_Pending(hit_id, token, obs, headers))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log.warning("tracking_hit_dropped", reason="queue full", dropped=self.stats.dropped,
                            kind=obs.kind, copy_id=obs.copy_id)
            return None
        self.stats.queued += 1
        return hit_id

    async def start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(), name=f"tracking-recorder-{i}")
                             for i in range(self._n_workers)]

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued hit is processed (True) or `timeout` passes (False)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout: float = 5.0) -> int:
        """Drain for up to `timeout`, then stop the workers; return how many hits were lost."""
        drained = await self.drain(timeout) if self._workers else self._queue.empty()
        lost = 0 if drained else self._queue.qsize() + self._in_flight
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if lost:
            log.error("tracking_hits_lost_at_stop", lost=lost)
        return lost

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # take what is already waiting too: under load the handlers would otherwise get
            # ~50 turns of the event loop for each of the workers' one
            while len(batch) < self.BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_flight += len(batch)
            try:
                # one lookup for the batch's copies: hits on many different copies (a
                # campaign's opens) would otherwise wait on one store round trip each
                copies = await self._copy_infos([item.obs.copy_id for item in batch],
                                                time.monotonic())
            except Exception:  # never let one batch kill the worker
                log.exception("tracking_lookup_failed", copies=len(batch))
                copies = {}
            if self.lookup is not None:   # hits classified without what the store knows
                self.stats.lookup_failed += sum(item.obs.copy_id not in copies for item in batch)
            for item in batch:
                try:
                    await self._process(item, copies.get(item.obs.copy_id))
                except Exception:  # never let one hit kill the worker
                    self.stats.failed += 1
                    log.exception("tracking_record_failed", copy_id=item.obs.copy_id)
                finally:
                    self._in_flight -= 1
                    self._queue.task_done()

    async def _copy_infos(self, copy_ids: Sequence[str], now: float) -> dict[str, CopyInfo | None]:
        """The copies' lookups, cached briefly (every hit of a busy copy need not ask the
        store); those not cached are looked up in one call. A failed lookup leaves its
        copies out (their hits are classified without what the store knows)."""
        found: dict[str, CopyInfo | None] = {}
        if self.lookup is None:
            return found
        missing: list[str] = []
        for copy_id in dict.fromkeys(copy_ids):
            cached = self._copies.get(copy_id)
            if cached is not None and cached[0] > now:
                found[copy_id] = cached[1]
            else:
                missing.append(copy_id)
        if not missing:
            return found
        try:
            looked = await asyncio.wait_for(self.lookup.copy_infos(missing), self._lookup_timeout)
        except Exception as exc:
            log.warning("tracking_lookup_failed", copy_id=missing[0], copies=len(missing),
                        error=str(exc) or repr(exc))
            return found
        for copy_id in missing:
            copy = looked.get(copy_id)
            found[copy_id] = copy
            ttl = self.COPY_TTL if copy is not None else self.MISSING_TTL
            self._copies[copy_id] = (now + ttl, copy)
            self._copies.move_to_end(copy_id)
        while len(self._copies) > self.COPY_CACHE:
            self._copies.popitem(last=False)
        return found

    async def _process(self, item: _Pending, copy: CopyInfo | None) -> None:
        obs = item.obs
        prior = [p for p in self.recent.get(obs.copy_id) if p.id != item.id]
        verdict = classify(obs, copy, prior, self.settings)
        hit = Hit(id=item.id, kind=obs.kind, copy_id=obs.copy_id, link=obs.link, url=item.token.url,
                  at=obs.at, ip=obs.ip, user_agent=obs.user_agent, referer=obs.referer,
                  headers=item.headers, machine=verdict.machine, category=verdict.category,
                  reason=verdict.reason, recipient=copy.recipient if copy else None,
                  sender=copy.sender if copy else None, message_id=copy.message_id if copy else None)
        try:
            await self.sink.record_hit(hit)
        except Exception as exc:
            self.stats.failed += 1
            log.error("tracking_hit_not_recorded", copy_id=obs.copy_id, kind=obs.kind,
                      error=str(exc) or repr(exc))
            return
        self.stats.recorded += 1
        log.debug("tracking_hit", kind=hit.kind, copy_id=hit.copy_id, link=hit.link,
                  machine=hit.machine, reason=hit.reason)


# -- HTTP -----------------------------------------------------------------------------------


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a peer or an X-Forwarded-For hop writes it (``[v6]:port``, ``v4:port``)."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    return parse_ip(text)


def client_ip(peer: str | None, forwarded_for: Sequence[str],
              trusted: Sequence[Network]) -> str | None:
    """The client's address: the peer, or through X-Forwarded-For when the peer is trusted."""
    addr = _parse_ip(peer) if peer else None
    if addr is None or not trusted or not forwarded_for:
        return str(addr) if addr is not None else peer

    if not in_networks(addr, trusted):
        return str(addr)
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    current = addr
    for hop in reversed(hops):
        parsed = _parse_ip(hop)
        if parsed is None:     # garbage: believe nothing further left
            break
        current = parsed
        if not in_networks(parsed, trusted):
            break
    return str(current)


def safe_redirect_url(url: str | None) -> bool:
    """Only absolute http(s) URLs without control characters are redirected to."""
    if not url or len(url) > 8000:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


_ASCII_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def _raw_token(request: web.Request) -> str:
    """The token as it was written in the request line (``/o/<token>``, ``/c/<token>``).

    Not ``match_info``: that is percent-decoded, and ``%41`` would be a second spelling of
    ``A``. A token has one spelling (:mod:`gateway.tracking.tokens`); anything else is 404.
    """
    path = request.raw_path.split("?", 1)[0].split("#", 1)[0]
    return path.rsplit("/", 1)[-1]


def location_value(url: str) -> str:
    """The URL as an ASCII `Location` value: the author's ASCII bytes exactly as written;
    a non-ASCII host in IDNA, other non-ASCII characters percent-encoded as UTF-8 (an IRI
    made a URI, RFC 3987 §3.1)."""
    if url.isascii():
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":") if hostport.count(":") == 1 \
            else (hostport, "", "")
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = quote(host, safe=_ASCII_SAFE)
        netloc = quote(userinfo, safe=_ASCII_SAFE) + at + host + colon + port
    rest = url[len(parts.scheme) + 3 + len(parts.netloc):]
    return f"{parts.scheme}://{netloc}{quote(rest, safe=_ASCII_SAFE)}"


def _not_found() -> web.Response:
    return web.Response(status=404, body=b"not found\n", content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


def make_app(signer: TokenSigner | Callable[[], TokenSigner], recorder: HitRecorder, *,
             trusted_proxies: Sequence[Network] = (),
             clock: Callable[[], float] = time.time) -> web.Application:
    """The aiohttp application of the public tracking listener (see the module docstring).

    `signer` is the token signer, or a function returning the one in force (keys rotate
    on reload)."""
    trusted = tuple(trusted_proxies)
    current = signer if callable(signer) else (lambda: signer)

    def observe(request: web.Request, token: TokenData) -> None:
        if request.method != "GET":
            return  # HEAD never counts
        headers = {name: request.headers[name][:_MAX_HEADER]
                   for name in HEADERS_OF_INTEREST if name in request.headers}
        obs = Observation(
            kind=token.kind, copy_id=token.copy_id, link=token.link, at=clock(),
            method=request.method,
            ip=client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), trusted),
            user_agent=request.headers.get("User-Agent", "")[:_MAX_UA],
            referer=request.headers.get("Referer", "")[:_MAX_HEADER], headers=headers)
        recorder.submit(token, obs, headers)

    async def pixel(request: web.Request) -> web.StreamResponse:
        token = current().verify(_raw_token(request))
        if token is None or token.kind != "open":
            recorder.stats.not_found += 1
            return _not_found()
        observe(request, token)
        return web.Response(body=PIXEL, content_type="image/gif", headers=NO_CACHE)

    async def click(request: web.Request) -> web.StreamResponse:
        token = current().verify(_raw_token(request))
        if token is None or token.kind not in ("click", "honeypot") or not safe_redirect_url(token.url):
            recorder.stats.not_found += 1
            return _not_found()
        observe(request, token)
        # not web.HTTPFound: it would re-encode the URL through yarl; the author's bytes go out
        assert token.url is not None
        return web.Response(status=302, headers={
            "Location": location_value(token.url), "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store, private, max-age=0", "Content-Type": "text/plain"})

    async def healthz(request: web.Request) -> web.StreamResponse:
        body = {"status": "ok", "queue": recorder.pending, **asdict(recorder.stats)}
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    app = web.Application(client_max_size=1024)
    app.router.add_get("/o/{token}", pixel)     # allow_head: HEAD gets the same answer
    app.router.add_get("/c/{token}", click)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app


def settings_from_config(cfg: Config) -> Settings:
    t = cfg.tracking
    return Settings(click_after_delivery=t.click_after_delivery,
                    open_after_delivery=t.open_after_delivery, burst_window=t.burst_window,
                    honeypot_window=t.honeypot_window,
                    internal_networks=tuple(t.internal_networks),
                    machine_networks=tuple(t.machine_networks))


class TrackingServer:
    """Binds `listeners.tracking` and serves :func:`make_app`; start/stop like the SMTP listener."""

    def __init__(self, listener: TrackingListener, signer: TokenSigner, sink: HitSink,
                 lookup: CopyLookup | None = None, *, settings: Settings | None = None,
                 clock: Callable[[], float] = time.time,
                 routes: Callable[[web.Application], None] | None = None,
                 reuse_port: bool = False) -> None:
        self.listener = listener
        self.reuse_port = reuse_port  # SO_REUSEPORT: one listener per worker process
        self.signer = signer      # replaced on reload (key rotation)
        self.recorder = HitRecorder(sink, lookup, settings=settings, queue_size=listener.queue_size)
        self.app = make_app(lambda: self.signer, self.recorder,
                            trusted_proxies=listener.trusted_proxies, clock=clock)
        if routes is not None:   # more pages on the public listener (the connect flow)
            routes(self.app)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        await self.recorder.start()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.listener.host, self.listener.port,
                                 reuse_address=True, reuse_port=self.reuse_port or None,
                                 backlog=1024)
        await self._site.start()

    @property
    def port(self) -> int:
        """The port actually bound."""
        assert self._runner is not None
        for addr in self._runner.addresses:
            return int(addr[1])
        raise RuntimeError("not listening")

    async def stop(self, grace: float = 5.0) -> int:
        """Stop accepting, finish requests, record what is queued; hits lost (0 normally)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        return await self.recorder.stop(timeout=grace)
