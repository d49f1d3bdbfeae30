"""The tracking endpoint over real HTTP on loopback: pixel, exact redirects, forged tokens,
HEAD, the honeypot, scanners, bursts, the sender's own open, failing sink and lookup."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import TrackingListener
from gateway.http.tracking import (
    PIXEL,
    HitRecorder,
    TrackingServer,
    client_ip,
    location_value,
    make_app,
)
from gateway.ids import new_queue_id
from gateway.tracking.classify import CopyInfo, Settings
from gateway.tracking.hits import MemoryCopyLookup, MemoryHitSink
from gateway.tracking.tokens import TokenSigner
from tests.conftest import free_port
from tests.integration.harness import running_app, write_config

pytestmark = pytest.mark.integration

SIGNER = TokenSigner([b"s" * 32])
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/124.0.0.0 Safari/537.36")
URLS = ["https://example.com/pricing?plan=pro&seats=10#compare",
        "https://example.com/a%20b/c?q=%E2%82%AC&x=1",
        "https://exämple.com/käse?name=Zoë&city=München#Straße",
        "http://example.org/path;params?list=a,b&empty=&amp=&"]


@dataclass
class Env:
    client: TestClient[web.Request, web.Application]
    sink: MemoryHitSink
    lookup: MemoryCopyLookup
    recorder: HitRecorder
    copy: CopyInfo

    async def settled(self, count: int, timeout: float = 5.0) -> None:
        """Wait until every queued hit went through and the sink holds `count` hits."""
        assert await self.recorder.drain(timeout)
        assert len(self.sink.hits) == count, [h.as_dict() for h in self.sink.hits]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sink, lookup = MemoryHitSink(), MemoryCopyLookup()
    copy = CopyInfo(copy_id=new_queue_id(), recipient="bob@example.org", sender="alice@example.com",
                    message_id="<m1@example.com>", submitted_at=time.time() - 3600,
                    delivered_at=time.time() - 3590, client_ip="198.51.100.7", links=len(URLS))
    lookup.add(copy)
    recorder = HitRecorder(sink, lookup, settings=Settings())
    await recorder.start()
    app = make_app(SIGNER, recorder, trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
    async with TestClient(TestServer(app)) as client:
        yield Env(client, sink, lookup, recorder, copy)
    await recorder.stop()


def headers(ua: str = CHROME, ip: str = "203.0.113.9", **extra: str) -> dict[str, str]:
    # the test client is 127.0.0.1, a trusted proxy here: X-Forwarded-For names the client
    return {"User-Agent": ua, "X-Forwarded-For": ip, **extra}


async def test_open_returns_gif_and_records_a_human_open(env: Env) -> None:
    r = await env.client.get(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers())
    assert r.status == 200
    assert await r.read() == PIXEL and len(PIXEL) == 43
    assert r.headers["Content-Type"] == "image/gif"
    assert r.headers["Cache-Control"] == "no-store, no-cache, must-revalidate, private, max-age=0"
    assert r.headers["Pragma"] == "no-cache" and r.headers["Expires"] == "0"
    await env.settled(1)
    hit = env.sink.hits[0]
    assert (hit.kind, hit.copy_id, hit.link, hit.url) == ("open", env.copy.copy_id, 0, None)
    assert (hit.machine, hit.category, hit.reason) == (False, "human", None)
    assert (hit.recipient, hit.sender, hit.message_id) == ("bob@example.org", "alice@example.com",
                                                           "<m1@example.com>")
    assert hit.ip == "203.0.113.9" and hit.user_agent == CHROME
    assert abs(hit.at - time.time()) < 60 and len(hit.id) == 32


async def test_clicks_redirect_to_the_exact_url(env: Env) -> None:
    for i, url in enumerate(URLS, start=1):
        token = SIGNER.click_token(env.copy.copy_id, i, url)
        r = await env.client.get(f"/c/{token}", headers=headers(), allow_redirects=False)
        assert r.status == 302
        # ASCII URLs go out exactly as written; an IRI as its URI (IDNA host, UTF-8 escapes)
        assert r.headers["Location"] == (url if url.isascii() else
                                         "https://xn--exmple-cua.com/k%C3%A4se?name=Zo%C3%AB"
                                         "&city=M%C3%BCnchen#Stra%C3%9Fe")
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert "no-store" in r.headers["Cache-Control"]
    await env.settled(len(URLS))
    assert [(h.link, h.url) for h in env.sink.hits] == list(enumerate(URLS, start=1))
    # four links clicked within a second by one client: a scanner, from the second burst rule
    assert env.sink.hits[0].machine is False
    assert env.sink.hits[-1].category == "burst"


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1],                       # truncated MAC
    lambda t: t[:10],                       # truncated payload
    lambda t: t.split(".")[0],              # MAC missing
    lambda t: ("A" if t[5] != "A" else "B").join((t[:5], t[6:])),   # altered payload byte
    lambda t: t + "A",                      # appended
    lambda t: "x" * 8000,                   # long (aiohttp refuses request lines over 8190 with 400)
    lambda t: "",                           # empty
    lambda t: t[:-1] + _B64[_B64.index(t[-1]) ^ 1],   # unused low bits of the MAC's last char
    lambda t: t + "=",                      # padded
    lambda t: t.split(".")[0] + "==." + t.split(".")[1],   # payload padded
], ids=["truncated-mac", "truncated-payload", "no-mac", "altered", "appended", "long", "empty",
        "last-bits", "padded", "payload-padded"])
async def test_forged_tokens_get_404_and_nothing_is_recorded(env: Env, mangle: Callable[[str], str]) -> None:
    click = SIGNER.click_token(env.copy.copy_id, 1, URLS[0])
    opened = SIGNER.open_token(env.copy.copy_id)
    for path in (f"/c/{mangle(click)}", f"/o/{mangle(opened)}"):
        r = await env.client.get(path, headers=headers(), allow_redirects=False)
        assert r.status == 404, path[:80]
        assert "Location" not in r.headers
        assert len(await r.read()) < 20
    await env.settled(0)
    assert env.recorder.stats.queued == 0


async def test_wrong_key_wrong_route_and_unsafe_urls_get_404(env: Env) -> None:
    other = TokenSigner([b"o" * 32])
    crlf = "https://example.com/x\r\nSet-Cookie: a=b"
    bad = [f"/c/{other.click_token(env.copy.copy_id, 1, URLS[0])}",   # another secret
           f"/o/{SIGNER.click_token(env.copy.copy_id, 1, URLS[0])}",  # click token as pixel
           f"/c/{SIGNER.open_token(env.copy.copy_id)}",               # open token as click
           f"/c/{SIGNER.click_token(env.copy.copy_id, 1, 'javascript:alert(1)')}",
           f"/c/{SIGNER.click_token(env.copy.copy_id, 1, crlf)}",
           f"/c/{SIGNER.click_token(env.copy.copy_id, 1, '//example.com/no-scheme')}",
           f"/c/{SIGNER.click_token(env.copy.copy_id, 1, 'ftp://example.com/f')}"]
    for path in bad:
        r = await env.client.get(path, headers=headers(), allow_redirects=False)
        assert r.status == 404, path[:80]
        assert "Location" not in r.headers and "Set-Cookie" not in r.headers
    await env.settled(0)
    assert env.recorder.stats.not_found == len(bad)


async def test_head_answers_but_never_counts(env: Env) -> None:
    r = await env.client.head(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers())
    assert r.status == 200 and r.headers["Content-Type"] == "image/gif"
    r = await env.client.head(f"/c/{SIGNER.click_token(env.copy.copy_id, 1, URLS[0])}",
                              headers=headers(), allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == URLS[0]
    await env.settled(0)
    # and a HEAD before a real click does not make the click look like a burst
    r = await env.client.get(f"/c/{SIGNER.click_token(env.copy.copy_id, 1, URLS[0])}",
                             headers=headers(), allow_redirects=False)
    await env.settled(1)
    assert env.sink.hits[0].machine is False


async def test_honeypot_marks_the_copy(env: Env) -> None:
    trap = SIGNER.make("honeypot", env.copy.copy_id, 99, "https://example.com/.well-known/trap")
    r = await env.client.get(f"/c/{trap}", headers=headers(), allow_redirects=False)
    assert r.status == 302
    await env.settled(1)
    assert (env.sink.hits[0].kind, env.sink.hits[0].machine) == ("honeypot", True)
    r = await env.client.get(f"/c/{SIGNER.click_token(env.copy.copy_id, 1, URLS[0])}",
                             headers=headers(), allow_redirects=False)
    await env.settled(2)
    assert env.sink.hits[1].category == "honeypot" and env.sink.hits[1].machine is True


async def test_safe_links_scanner_is_a_machine(env: Env) -> None:
    r = await env.client.get(
        f"/c/{SIGNER.click_token(env.copy.copy_id, 2, URLS[1])}", allow_redirects=False,
        headers=headers(Referer="https://eur02.safelinks.protection.outlook.com/?url=x&data=y"))
    assert r.status == 302 and r.headers["Location"] == URLS[1]
    await env.settled(1)
    hit = env.sink.hits[0]
    assert hit.machine is True and hit.category == "scanner"
    assert hit.reason is not None and hit.reason.startswith("microsoft-safe-links")
    assert hit.referer.startswith("https://eur02.safelinks")


async def test_click_right_after_delivery_is_a_machine(env: Env) -> None:
    fresh = CopyInfo(copy_id=new_queue_id(), recipient="carol@example.org", sender="alice@example.com",
                     delivered_at=time.time() - 1, links=3)
    env.lookup.add(fresh)
    await env.client.get(f"/c/{SIGNER.click_token(fresh.copy_id, 1, URLS[0])}", headers=headers(),
                         allow_redirects=False)
    await env.settled(1)
    assert env.sink.hits[0].category == "timing"


async def test_senders_own_open_is_not_counted(env: Env) -> None:
    await env.client.get(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers(ip="198.51.100.7"))
    await env.settled(1)
    hit = env.sink.hits[0]
    assert (hit.machine, hit.category) == (True, "sender")


async def test_failing_sink_and_lookup_never_break_responses(env: Env) -> None:
    env.sink.fail = True
    env.lookup.fail = True
    r = await env.client.get(f"/c/{SIGNER.click_token(env.copy.copy_id, 1, URLS[0])}",
                             headers=headers(), allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == URLS[0]
    r = await env.client.get(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers())
    assert r.status == 200 and await r.read() == PIXEL
    assert await env.recorder.drain(5)
    assert env.recorder.stats.failed == 2 and env.recorder.stats.lookup_failed == 2
    env.sink.fail = False
    await env.client.get(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers())
    await env.settled(1)
    assert env.sink.hits[0].recipient is None  # the lookup still fails: recorded without it


async def test_unknown_copy_is_still_recorded(env: Env) -> None:
    ghost = new_queue_id()
    r = await env.client.get(f"/o/{SIGNER.open_token(ghost)}", headers=headers())
    assert r.status == 200
    await env.settled(1)
    assert env.sink.hits[0].copy_id == ghost and env.sink.hits[0].recipient is None


async def test_full_queue_drops_are_counted_not_silent(env: Env) -> None:
    recorder = HitRecorder(env.sink, env.lookup, queue_size=2)   # no workers started
    app = make_app(SIGNER, recorder)
    async with TestClient(TestServer(app)) as client:
        for _ in range(5):
            r = await client.get(f"/o/{SIGNER.open_token(env.copy.copy_id)}", headers=headers())
            assert r.status == 200 and await r.read() == PIXEL
        health = await (await client.get("/healthz")).json()
    assert health["queued"] == 2 and health["dropped"] == 3 and health["queue"] == 2
    await recorder.start()
    assert await recorder.stop(timeout=5) == 0
    await env.settled(2)


def test_client_ip_honours_only_trusted_proxies() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_ip("203.0.113.5", ["198.51.100.1"], trusted) == "203.0.113.5"   # untrusted peer
    assert client_ip("10.0.0.2", ["198.51.100.1"], trusted) == "198.51.100.1"
    assert client_ip("10.0.0.2", ["192.0.2.66, 198.51.100.1, 10.0.0.9"], trusted) == "198.51.100.1"
    assert client_ip("10.0.0.2", ["garbage, 198.51.100.1"], trusted) == "198.51.100.1"
    assert client_ip("10.0.0.2", ["198.51.100.1, garbage"], trusted) == "10.0.0.2"
    assert client_ip("::1", ["[2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_ip("10.0.0.2", [], trusted) == "10.0.0.2"
    assert client_ip("10.0.0.2", ["198.51.100.1"], []) == "10.0.0.2"


async def _raw_get(port: int, path: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: t.example.com\r\nUser-Agent: {CHROME}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_real_listener_with_plain_http_clients() -> None:
    sink, lookup = MemoryHitSink(), MemoryCopyLookup()
    copy_id = new_queue_id()
    lookup.add(CopyInfo(copy_id=copy_id, recipient="bob@example.org", sender="alice@example.com",
                        delivered_at=time.time() - 600, links=1))
    server = TrackingServer(TrackingListener(host="127.0.0.1", port=free_port()), SIGNER, sink, lookup)
    await server.start()
    try:
        # an ASCII URL goes out byte for byte as the author wrote it; an IRI as its ASCII URI
        raw = await _raw_get(server.port, f"/c/{SIGNER.click_token(copy_id, 1, URLS[3])}")
        assert b"\r\nLocation: " + URLS[3].encode() + b"\r\n" in raw.split(b"\r\n\r\n", 1)[0]
        url = URLS[2]
        raw = await _raw_get(server.port, f"/c/{SIGNER.click_token(copy_id, 1, url)}")
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 302 ")
        assert b"\r\nLocation: " + location_value(url).encode("ascii") + b"\r\n" in head
        assert head.isascii()
        raw = await _raw_get(server.port, f"/o/{SIGNER.open_token(copy_id)}")
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(PIXEL)
        raw = await _raw_get(server.port, "/c/not-a-token")
        assert raw.startswith(b"HTTP/1.1 404 ") and b"Location" not in raw
        # a percent-encoded character is another spelling of the token: refused, not recorded
        token = SIGNER.click_token(copy_id, 1, url)
        spelled = f"%{ord(token[0]):02X}{token[1:]}"
        raw = await _raw_get(server.port, f"/c/{spelled}")
        assert raw.startswith(b"HTTP/1.1 404 ") and b"Location" not in raw
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.port}/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with session.get(f"http://127.0.0.1:{server.port}/o/{SIGNER.open_token(copy_id)}",
                                   headers={"User-Agent": CHROME}) as r:
                assert r.status == 200 and await r.read() == PIXEL
    finally:
        lost = await server.stop(grace=5)
    assert lost == 0
    assert [(h.kind, h.machine) for h in sink.hits] == [("click", False), ("click", False),
                                                        ("open", False), ("open", False)]
    assert all(h.ip == "127.0.0.1" for h in sink.hits)   # no trusted proxies: the peer


async def test_stop_reports_hits_it_could_not_record() -> None:
    class StuckSink:
        async def record_hit(self, hit: object) -> None:
            await asyncio.Event().wait()

    recorder = HitRecorder(StuckSink(), None)
    await recorder.start()
    app = make_app(SIGNER, recorder)
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            r = await client.get(f"/o/{SIGNER.open_token(new_queue_id())}", headers=headers())
            assert r.status == 200
    assert await recorder.stop(timeout=0.2) == 3


async def test_sighup_key_rotation_reaches_the_endpoint(tmp_path: Path) -> None:
    """Rotating `tracking.secret_file` (the new key first, the old one kept to verify) and
    reloading: links in mail planned after the reload are signed with the new key, so the
    running endpoint must verify them, and still the old ones."""
    secret = tmp_path / "tracking.key"
    secret.write_text("old-key-old-key-old-key-old-key\n")
    tport = free_port()
    cfg = write_config(tmp_path, upstream_port=free_port(),
                       listeners={"tracking": {"host": "127.0.0.1", "port": tport,
                                               "base_url": f"http://127.0.0.1:{tport}"}},
                       tracking={"secret_file": str(secret)})
    async with running_app(cfg) as app:
        copy_id = new_queue_id()
        url = "https://example.com/offer"
        before = app.token_signer().click_token(copy_id, 1, url)
        secret.write_text("new-key-new-key-new-key-new-key\nold-key-old-key-old-key-old-key\n")
        assert await app.reload(cfg)
        after = app.token_signer().click_token(copy_id, 1, url)   # what the planner signs now
        assert after != before
        async with aiohttp.ClientSession() as session:
            for token in (before, after):
                async with session.get(f"http://127.0.0.1:{tport}/c/{token}",
                                       allow_redirects=False) as r:
                    assert (r.status, r.headers.get("Location")) == (302, url)


async def test_sighup_reaches_the_endpoints_classification_settings(tmp_path: Path) -> None:
    """`tracking.machine_networks` (and the other `tracking:` thresholds) take effect on
    reload, like the rest of the config: a hit from a network added there is a machine."""
    tport = free_port()
    listeners = {"tracking": {"host": "127.0.0.1", "port": tport,
                              "base_url": f"http://127.0.0.1:{tport}"}}
    cfg = write_config(tmp_path, upstream_port=free_port(), listeners=listeners)
    async with running_app(cfg) as app:
        assert app.tracking is not None
        sink = MemoryHitSink()
        app.tracking.recorder.sink = sink
        write_config(tmp_path, upstream_port=free_port(), listeners=listeners,
                     tracking={"machine_networks": ["127.0.0.0/8"]})
        assert await app.reload(cfg)
        token = app.token_signer().open_token(new_queue_id())
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{tport}/o/{token}", headers={"User-Agent": CHROME}) as r:
            assert r.status == 200
        assert await app.tracking.recorder.drain(5)
        assert [(h.machine, h.category) for h in sink.hits] == [(True, "network")]
