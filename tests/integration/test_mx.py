"""MX resolution and MX delivery against a local DNS server and aiosmtpd upstreams.

Every exchanger must listen on the same port (send_mx has one port), so the
upstreams bind different loopback addresses (127.0.0.2, 127.0.0.3) on one port.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.delivery.mx import MXHost, MXResolver
from gateway.delivery.smtp import SMTPTransport
from gateway.errors import PermanentFailure, TemporaryFailure
from tests.support.dns import DNSServer
from tests.support.upstream import Upstream

pytestmark = pytest.mark.integration

FROM = "sender@gw.test"
MESSAGE = b"From: sender@gw.test\r\nTo: a@example.test\r\nSubject: mx\r\n\r\nhello\r\n"

ZONE: dict[str, dict[str, list[Any]]] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "implicit.test": {"A": ["127.0.0.2"]},
    "null.test": {"MX": [(0, ".")]},
    "nodata.test": {"TXT": ["v=spf1 -all"]},
    "dangling.test": {"MX": [(10, "gone.dangling.test")]},
    "both.test": {"MX": [(10, "dual.both.test")]},
    "dual.both.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "alias.test": {"MX": [(10, "www.alias.test")]},
    "www.alias.test": {"CNAME": ["mx2.example.test"]},
}


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    async with DNSServer(ZONE) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> MXResolver:
    return MXResolver(nameservers=[dns_server.host], port=dns_server.port, timeout=2)


@pytest.fixture
async def transport() -> AsyncIterator[SMTPTransport]:
    t = SMTPTransport("gw.test", connect_timeout=5, command_timeout=5)
    yield t
    await t.close()


@pytest.fixture
def port() -> Iterator[int]:
    """A port free on 127.0.0.2 and 127.0.0.3 (checked by binding both)."""
    for _ in range(20):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.2", 0))
            p = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.3", p))
            except OSError:
                continue
        yield p
        return
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


# -- resolution -------------------------------------------------------------------------


async def test_resolve_sorts_by_preference(resolver: MXResolver) -> None:
    assert await resolver.resolve("example.test") == [
        MXHost("mx1.example.test", 10, ("127.0.0.2",)),
        MXHost("mx2.example.test", 20, ("127.0.0.3",)),
    ]


async def test_equal_preferences_are_shuffled(dns_server: DNSServer) -> None:
    dns_server.add("tie.test", "MX", (10, "mx1.example.test"), (10, "mx2.example.test"),
                   (5, "first.tie.test"))
    dns_server.add("first.tie.test", "A", "127.0.0.4")
    firsts = set()
    for seed in range(16):
        r = MXResolver([dns_server.host], port=dns_server.port, rng=random.Random(seed))
        hosts = await r.resolve("tie.test")
        assert hosts[0].name == "first.tie.test"
        assert {h.name for h in hosts[1:]} == {"mx1.example.test", "mx2.example.test"}
        firsts.add(hosts[1].name)
    assert firsts == {"mx1.example.test", "mx2.example.test"}


async def test_implicit_mx_from_a_record(resolver: MXResolver) -> None:
    assert await resolver.resolve("implicit.test") == [
        MXHost("implicit.test", 0, ("127.0.0.2",))]


async def test_addresses_a_then_aaaa_and_cnames(resolver: MXResolver) -> None:
    assert (await resolver.resolve("both.test"))[0].addresses == ("127.0.0.2", "::1")
    assert (await resolver.resolve("alias.test"))[0] == MXHost("www.alias.test", 10,
                                                              ("127.0.0.3",))


async def test_nxdomain_is_512(resolver: MXResolver) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver.resolve("nowhere.test")
    assert (info.value.code, info.value.status) == (550, "5.1.2")


async def test_null_mx_is_5110(resolver: MXResolver) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver.resolve("null.test")
    assert (info.value.code, info.value.status) == (556, "5.1.10")


async def test_no_mx_and_no_address_is_544(resolver: MXResolver) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver.resolve("nodata.test")
    assert info.value.status == "5.4.4"


async def test_mx_target_without_address_is_544(resolver: MXResolver) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver.resolve("dangling.test")
    assert info.value.status == "5.4.4"


async def test_servfail_is_443(dns_server: DNSServer, resolver: MXResolver) -> None:
    dns_server.servfail.add("example.test")
    with pytest.raises(TemporaryFailure) as info:
        await resolver.resolve("example.test")
    assert (info.value.code, info.value.status) == (451, "4.4.3")


async def test_servfail_on_target_address_is_443(dns_server: DNSServer,
                                                 resolver: MXResolver) -> None:
    dns_server.servfail.add("gone.dangling.test")
    with pytest.raises(TemporaryFailure) as info:
        await resolver.resolve("dangling.test")
    assert info.value.status == "4.4.3"


async def test_timeout_is_443(dns_server: DNSServer) -> None:
    dns_server.silent.add("*")
    r = MXResolver([dns_server.host], port=dns_server.port, timeout=0.3)
    with pytest.raises(TemporaryFailure) as info:
        await r.resolve("example.test")
    assert info.value.status == "4.4.3"
    assert "timed out" in info.value.text


async def test_address_literal_needs_no_dns(resolver: MXResolver,
                                            dns_server: DNSServer) -> None:
    assert await resolver.resolve("[127.0.0.2]") == [MXHost("127.0.0.2", 0, ("127.0.0.2",))]
    assert dns_server.queries == []


async def test_invalid_domain_is_permanent(resolver: MXResolver) -> None:
    with pytest.raises(PermanentFailure) as info:
        await resolver.resolve("a..b")
    assert info.value.status == "5.1.2"


# -- delivery ---------------------------------------------------------------------------


async def test_send_mx_uses_the_preferred_host(resolver: MXResolver, transport: SMTPTransport,
                                               port: int) -> None:
    async with Upstream(host="127.0.0.2", port=port) as mx1, \
            Upstream(host="127.0.0.3", port=port) as mx2:
        [res] = await transport.send_mx(resolver, "example.test", FROM, ["a@example.test"],
                                        MESSAGE, port=port, tls="opportunistic", ca_file=None)
        await mx1.wait_for(1)
    assert res.ok, res
    assert res.remote == f"mx1.example.test[127.0.0.2]:{port}"
    assert mx2.connections == 0


async def test_send_mx_falls_back_when_first_host_refuses(resolver: MXResolver,
                                                          transport: SMTPTransport,
                                                          port: int) -> None:
    with socket.socket() as refusing:  # bound, not listening: connections are refused
        refusing.bind(("127.0.0.2", port))
        async with Upstream(host="127.0.0.3", port=port) as mx2:
            [res] = await transport.send_mx(resolver, "example.test", FROM,
                                            ["a@example.test"], MESSAGE, port=port,
                                            tls="opportunistic", ca_file=None)
            [got] = await mx2.wait_for(1)
    assert res.ok, res
    assert res.remote == f"mx2.example.test[127.0.0.3]:{port}"
    assert got.data == MESSAGE


async def test_send_mx_moves_on_after_4xx_to_mail(resolver: MXResolver, transport: SMTPTransport,
                                                  port: int) -> None:
    async with Upstream(host="127.0.0.2", port=port, mail_reply="451 4.3.2 try later") as mx1, \
            Upstream(host="127.0.0.3", port=port) as mx2:
        [res] = await transport.send_mx(resolver, "example.test", FROM, ["a@example.test"],
                                        MESSAGE, port=port, tls="none", ca_file=None)
        await mx2.wait_for(1)
    assert res.ok and mx1.messages == []


async def test_send_mx_stops_at_a_definite_rcpt_answer(resolver: MXResolver,
                                                       transport: SMTPTransport,
                                                       port: int) -> None:
    async with Upstream(host="127.0.0.2", port=port,
                        rcpt_reply="550 5.1.1 no such user") as mx1, \
            Upstream(host="127.0.0.3", port=port) as mx2:
        [res] = await transport.send_mx(resolver, "example.test", FROM, ["a@example.test"],
                                        MESSAGE, port=port, tls="none", ca_file=None)
    assert res.permanent and res.status == "5.1.1"
    assert mx1.connections == 1 and mx2.connections == 0


async def test_send_mx_all_hosts_down_is_temporary(resolver: MXResolver, transport: SMTPTransport,
                                                   port: int) -> None:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.2", port))
        b.bind(("127.0.0.3", port))
        res = await transport.send_mx(resolver, "example.test", FROM,
                                      ["a@example.test", "b@example.test"], MESSAGE,
                                      port=port, tls="opportunistic", ca_file=None)
    assert [r.rcpt for r in res] == ["a@example.test", "b@example.test"]
    for r in res:
        assert r.temporary and r.status == "4.4.1"
        assert f"mx2.example.test[127.0.0.3]:{port}" in r.text  # the last error


async def test_send_mx_implicit_mx(resolver: MXResolver, transport: SMTPTransport,
                                   port: int) -> None:
    async with Upstream(host="127.0.0.2", port=port) as up:
        [res] = await transport.send_mx(resolver, "implicit.test", FROM, ["a@implicit.test"],
                                        MESSAGE, port=port, tls="opportunistic", ca_file=None)
        await up.wait_for(1)
    assert res.ok and res.remote == f"implicit.test[127.0.0.2]:{port}"


@pytest.mark.parametrize(("domain", "code", "status"), [
    ("nowhere.test", 550, "5.1.2"),
    ("null.test", 556, "5.1.10"),
])
async def test_send_mx_dns_permanent_failures(resolver: MXResolver, transport: SMTPTransport,
                                              domain: str, code: int, status: str) -> None:
    res = await transport.send_mx(resolver, domain, FROM, [f"a@{domain}", f"b@{domain}"],
                                  MESSAGE, port=25, tls="opportunistic", ca_file=None)
    assert [(r.code, r.status, r.remote) for r in res] == [(code, status, None)] * 2
    assert all(r.permanent for r in res)
    assert transport.connections_opened == 0


async def test_send_mx_servfail_is_temporary(dns_server: DNSServer, resolver: MXResolver,
                                             transport: SMTPTransport) -> None:
    dns_server.servfail.add("*")
    [res] = await transport.send_mx(resolver, "example.test", FROM, ["a@example.test"],
                                    MESSAGE, port=25, tls="opportunistic", ca_file=None)
    assert res.temporary and res.status == "4.4.3"
