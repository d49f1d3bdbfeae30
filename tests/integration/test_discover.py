"""Finding a mailbox's servers from its address, against the tests' loopback DNS server.

Each test serves a zone of its own (`tests.support.dns.DNSServer`) and points `discover` at
it with `nameservers`: presets answer without DNS, MX names map to providers, RFC 6186 SRV
records are read in priority and weight order, and DNS that fails is told apart from DNS
that says no.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.accounts.discover import Discovery, discover
from gateway.errors import AccountUnavailable
from gateway.providers import Server
from tests.support.dns import DNSServer

pytestmark = pytest.mark.integration

ZONE: dict[str, dict[str, list[Any]]] = {
    "workspace.test": {"MX": [(1, "aspmx.l.google.com"), (5, "alt1.aspmx.l.google.com")]},
    "m365.test": {"MX": [(0, "m365-test.mail.protection.outlook.com")]},
    "newm365.test": {"MX": [(0, "newm365-test.a-v1.mx.microsoft")]},
    "filtered.test": {"MX": [(10, "mx.filter.example"), (20, "alt1.aspmx.l.google.com")]},
    "zohoeu.test": {"MX": [(10, "mx.zoho.eu"), (20, "mx2.zoho.eu")]},
    "aolbiz.test": {"MX": [(1, "mx-aol.mail.gm0.yahoodns.net")]},
    "icloudplus.test": {"MX": [(10, "mx01.mail.icloud.com"), (10, "mx02.mail.icloud.com")]},
    "fm.test": {"MX": [(10, "in1-smtp.messagingengine.com")]},
    "nullmx.test": {"MX": [(0, ".")]},
    "own.test": {"MX": [(10, "mx.own.test")]},
    "mx.own.test": {"A": ["127.0.0.1"]},
    # RFC 6186
    "srv.test": {"MX": [(10, "mx.srv.test")]},
    "_imaps._tcp.srv.test": {"SRV": ["0 1 993 mail.srv.test."]},
    "_imap._tcp.srv.test": {"SRV": ["0 1 143 mail.srv.test."]},
    "_submissions._tcp.srv.test": {"SRV": ["0 1 465 smtp.srv.test."]},
    "_submission._tcp.srv.test": {"SRV": ["0 1 587 smtp.srv.test."]},
    # only STARTTLS, implicit TLS refused with "."
    "starttls.test": {"TXT": ["v=spf1 -all"]},
    "_imaps._tcp.starttls.test": {"SRV": ["0 0 0 ."]},
    "_imap._tcp.starttls.test": {"SRV": ["10 0 143 imap.starttls.test."]},
    "_submission._tcp.starttls.test": {"SRV": ["10 0 587 smtp.starttls.test."]},
    # priority, then weight; a port of 0 is no server
    "ranked.test": {"TXT": ["v=spf1 -all"]},
    "_imaps._tcp.ranked.test": {"SRV": ["20 100 993 backup.ranked.test.", "10 1 993 light.ranked.test.",
                                        "10 50 993 heavy.ranked.test.", "0 100 0 broken.ranked.test."]},
    # every service declared absent
    "none.test": {"TXT": ["v=spf1 -all"]},
    "_imaps._tcp.none.test": {"SRV": ["0 0 0 ."]},
    "_imap._tcp.none.test": {"SRV": ["0 0 0 ."]},
    "_submissions._tcp.none.test": {"SRV": ["0 0 0 ."]},
    "_submission._tcp.none.test": {"SRV": ["0 0 0 ."]},
    # servers at someone else's domain: a warning to confirm them
    "hosted.test": {"TXT": ["v=spf1 -all"]},
    "_imaps._tcp.hosted.test": {"SRV": ["0 1 993 imap.gmail.com."]},
    "_submission._tcp.hosted.test": {"SRV": ["0 1 587 smtp.gmail.com."]},
    "smtponly.test": {"TXT": ["v=spf1 -all"]},
    "_submissions._tcp.smtponly.test": {"SRV": ["0 1 465 mail.smtponly.test."]},
    "plain.test": {"TXT": ["v=spf1 -all"]},
}


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    async with DNSServer(ZONE) as server:
        yield server


async def find(server: DNSServer, address: str, timeout: float = 2) -> Discovery:
    return await discover(address, nameservers=[(server.host, server.port)], timeout=timeout)


async def test_a_provider_domain_answers_from_the_table_without_dns(dns_server: DNSServer) -> None:
    d = await find(dns_server, "Alice@YMail.com")
    assert (d.provider, d.how, d.domain) == ("yahoo", "preset", "ymail.com")
    assert d.imap == Server("imap.mail.yahoo.com", 993, "implicit") and d.found
    assert dns_server.queries == []


@pytest.mark.parametrize(("address", "provider", "imap", "smtp"), [
    ("rep@workspace.test", "gmail", "imap.gmail.com", "smtp.gmail.com"),
    ("rep@m365.test", "microsoft365", "outlook.office365.com", "smtp.office365.com"),
    ("rep@newm365.test", "microsoft365", "outlook.office365.com", "smtp.office365.com"),
    ("rep@filtered.test", "gmail", "imap.gmail.com", "smtp.gmail.com"),   # behind a filter
    ("rep@zohoeu.test", "zoho-eu", "imappro.zoho.eu", "smtppro.zoho.eu"),  # an organisation
    ("rep@aolbiz.test", "aol", "imap.aol.com", "smtp.aol.com"),
    ("rep@icloudplus.test", "icloud", "imap.mail.me.com", "smtp.mail.me.com"),
    ("rep@fm.test", "fastmail", "imap.fastmail.com", "smtp.fastmail.com"),
])
async def test_mail_exchangers_name_the_provider(dns_server: DNSServer, address: str, provider: str,
                                                 imap: str, smtp: str) -> None:
    d = await find(dns_server, address)
    assert (d.provider, d.how) == (provider, "mx")
    assert d.imap is not None and d.imap.host == imap
    assert d.smtp is not None and d.smtp.host == smtp
    assert d.evidence.startswith("MX ") and d.warnings == ()
    # the MX answered: no SRV look-ups
    assert all(qtype == "MX" for _, qtype in dns_server.queries)


async def test_srv_records_prefer_implicit_tls(dns_server: DNSServer) -> None:
    d = await find(dns_server, "rep@srv.test")
    assert (d.provider, d.how) == ("imap", "srv")
    assert d.imap == Server("mail.srv.test", 993, "implicit")
    assert d.smtp == Server("smtp.srv.test", 465, "implicit")
    assert d.warnings == ()
    assert "_imaps._tcp.srv.test" in d.evidence and "_submissions._tcp.srv.test" in d.evidence
    asked = {name for name, qtype in dns_server.queries if qtype == "SRV"}
    assert asked == {f"{s}._tcp.srv.test" for s in ("_imaps", "_imap", "_submissions", "_submission")}


async def test_a_dot_target_means_not_offered_and_starttls_is_used(dns_server: DNSServer) -> None:
    d = await find(dns_server, "rep@starttls.test")
    assert d.imap == Server("imap.starttls.test", 143, "starttls")
    assert d.smtp == Server("smtp.starttls.test", 587, "starttls")
    d = await find(dns_server, "rep@none.test")
    assert not d.found and d.provider is None and d.imap is None and d.smtp is None


async def test_lowest_priority_then_highest_weight_wins(dns_server: DNSServer) -> None:
    d = await find(dns_server, "rep@ranked.test")
    assert d.imap == Server("heavy.ranked.test", 993, "implicit") and d.smtp is None
    assert d.how == "srv"


async def test_servers_outside_the_domain_come_with_a_warning(dns_server: DNSServer) -> None:
    d = await find(dns_server, "rep@hosted.test")
    assert d.provider == "gmail" and d.how == "srv"      # the preset whose server SRV names
    assert d.imap == Server("imap.gmail.com", 993, "implicit")
    assert d.smtp == Server("smtp.gmail.com", 587, "starttls")
    assert len(d.warnings) == 2 and all("RFC 6186" in w for w in d.warnings)
    d = await find(dns_server, "rep@smtponly.test")
    assert d.imap is None and d.smtp == Server("mail.smtponly.test", 465, "implicit")
    assert any("no IMAP service" in w for w in d.warnings)


@pytest.mark.parametrize("address", ["rep@own.test", "rep@plain.test", "rep@nullmx.test"])
async def test_nothing_found_says_what_was_tried(dns_server: DNSServer, address: str) -> None:
    d = await find(dns_server, address)
    assert not d.found and d.provider is None and d.imap is None and d.smtp is None
    assert "SRV" in d.evidence


async def test_a_domain_that_does_not_exist(dns_server: DNSServer) -> None:
    d = await find(dns_server, "rep@nowhere.test")
    assert not d.found and "does not exist" in d.evidence
    assert dns_server.queries == [("nowhere.test", "MX")]


async def test_garbage_is_a_value_error_before_any_query(dns_server: DNSServer) -> None:
    for address in ("", "no-at-sign", "a@", "a@localhost", "a@exa mple.test"):
        with pytest.raises(ValueError):
            await find(dns_server, address)
    assert dns_server.queries == []


async def test_failing_dns_is_not_an_answer(dns_server: DNSServer) -> None:
    dns_server.servfail.add("*")
    with pytest.raises(AccountUnavailable, match="try again later"):
        await find(dns_server, "rep@srv.test")
    # the MX look-up fails but SRV answers: that answer, with the failure noted
    dns_server.servfail.clear()
    dns_server.servfail.add("srv.test")
    d = await find(dns_server, "rep@srv.test")
    assert d.how == "srv" and d.imap == Server("mail.srv.test", 993, "implicit")
    assert any("DNS look-up failed" in w for w in d.warnings)


async def test_a_silent_server_times_out_within_the_timeout(dns_server: DNSServer) -> None:
    dns_server.silent.add("*")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AccountUnavailable, match="timed out"):
        await find(dns_server, "rep@srv.test", timeout=0.5)
    # one MX query, then the four SRV queries at once: about two timeouts, not five
    assert loop.time() - started < 0.5 * 4


# -- properties: whatever DNS says, discover answers or refuses clearly ----------------------------

_TARGETS = st.sampled_from([".", "a.prop.test.", "b.prop.test.", "imap.gmail.com.", "x.elsewhere.example."])
_SRV = st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535), _TARGETS)


def _best(records: list[tuple[int, int, int, str]]) -> tuple[str, int] | None:
    usable = [(p, -w, t.rstrip("."), port) for p, w, port, t in records if t != "." and port > 0]
    return (min(usable)[2], min(usable)[3]) if usable else None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(imaps=st.lists(_SRV, max_size=4), imap=st.lists(_SRV, max_size=4),
       mx=st.lists(st.tuples(st.integers(0, 65535), st.sampled_from(
           [".", "mx.prop.test", "aspmx.l.google.com", "mx.zoho.jp", "mx-aol.x.yahoodns.net"])),
           max_size=3))
def test_any_records_give_a_discovery(imaps: list[tuple[int, int, int, str]],
                                      imap: list[tuple[int, int, int, str]],
                                      mx: list[tuple[int, str]]) -> None:
    zone: dict[str, dict[str, list[Any]]] = {"prop.test": {"TXT": ["x"]}}
    if mx:
        zone["prop.test"]["MX"] = list(mx)
    if imaps:
        zone["_imaps._tcp.prop.test"] = {"SRV": [f"{p} {w} {port} {t}" for p, w, port, t in imaps]}
    if imap:
        zone["_imap._tcp.prop.test"] = {"SRV": [f"{p} {w} {port} {t}" for p, w, port, t in imap]}

    async def run() -> Discovery:
        async with DNSServer(zone) as server:
            return await find(server, "rep@prop.test")

    d = asyncio.run(run())
    known_mx = [host for _, host in sorted(mx) if host not in (".", "mx.prop.test")]
    if known_mx:
        assert d.how == "mx" and d.provider in ("gmail", "zoho-jp", "aol")
        return
    expected = _best(imaps) or _best(imap)
    if expected is None:
        assert d.imap is None and not d.found
    else:
        assert d.how == "srv" and d.imap is not None
        assert (d.imap.host, d.imap.port) == expected
        assert d.imap.tls == ("implicit" if _best(imaps) else "starttls")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=40), st.emails(),
                 st.from_regex(r"[a-z]{1,4}@[a-z0-9-]{1,8}\.[a-z0-9.-]{1,8}", fullmatch=True)))
def test_any_address_gives_a_discovery_or_a_value_error(text: str) -> None:
    async def run() -> Discovery:
        async with DNSServer({}) as server:      # every name: NXDOMAIN
            return await find(server, text)

    try:
        d = asyncio.run(run())
    except ValueError as exc:
        assert str(exc)
        return
    assert d.how in ("preset", None)
    assert d.found == (d.provider is not None)
