"""Find a mailbox's IMAP and SMTP settings from its address alone: presets, then MX, then SRV.

    discovery = await discover("alice@example.com", nameservers=cfg.delivery.nameserver_addresses())

Three ways, tried in this order, the first that answers wins:

1. ``preset``: the address domain is a provider's own (gmail.com, ymail.com, icloud.com, ...;
   `gateway.providers.by_domain`). No DNS.
2. ``mx``: the domain's mail exchangers belong to a provider that hosts custom domains
   (Google Workspace: ``aspmx.l.google.com``; Microsoft 365: ``*.mail.protection.outlook.com``;
   Zoho, iCloud+, Fastmail, Yahoo, ...; `gateway.providers.mx_provider`), best
   preference first.
3. ``srv``: RFC 6186 service records, ``_imaps._tcp`` (implicit TLS) before ``_imap._tcp``
   (STARTTLS), ``_submissions._tcp`` (implicit TLS, RFC 8314) before ``_submission._tcp``
   (STARTTLS). Of a service's records the lowest priority wins, then the highest weight.
   A single record with target ``.`` means the service is deliberately not offered.
   Unsigned DNS can be forged, so a target outside the address's domain comes with a
   warning to confirm it (RFC 6186 section 6).

Nothing found is a `Discovery` with ``how`` None (the caller asks for `provider: imap` and
a host). An address that is not one raises ValueError. When nothing was found and some
look-up failed rather than answered (timeout, SERVFAIL), `AccountUnavailable` is raised:
the same call may work later. Look-ups go through dnspython's async resolver to
`nameservers` ((address, port) pairs: `delivery.nameservers`), or the system's resolvers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.IN.SRV import SRV

from gateway.errors import AccountUnavailable
from gateway.providers import PRESETS, TLS, Server, by_domain, mail_domain, mx_provider

__all__ = ["Discovery", "discover"]

How = Literal["preset", "mx", "srv"]


@dataclass(frozen=True)
class Discovery:
    """What `discover` found for one address.

    `provider` is a preset name (`gmail`, `zoho-eu`, ...; `imap` for servers found by SRV
    that are no preset's), None when nothing was found. `imap`/`smtp` are the servers to
    use (for an MX find they may differ from the preset's: Zoho organisations use
    imappro/smtppro). `how` says which way found them, `evidence` what it rested on (for
    people), `warnings` what to confirm before trusting it.
    """

    address: str
    domain: str
    provider: str | None
    imap: Server | None
    smtp: Server | None
    how: How | None
    evidence: str
    warnings: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.how is not None


class _Failed(Exception):
    """A look-up failed rather than answered (timeout, SERVFAIL, refused)."""


def _resolver(nameservers: list[tuple[str, int]] | None, timeout: float) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
    r.timeout = timeout
    r.lifetime = timeout
    r.cache = None
    return r


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no DNS server answered (SERVFAIL or refused)"
    return str(exc) or type(exc).__name__


async def _query(r: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
    """The records of `rdtype` at `name`; [] for none (NODATA), None for NXDOMAIN;
    raise _Failed when DNS did not answer."""
    try:
        answer = await r.resolve(dns.name.from_text(name), rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return []
    except dns.exception.DNSException as exc:
        raise _Failed(f"{rdtype} {name}: {_why(exc)}") from None
    return list(answer)


def _host(name: dns.name.Name) -> str:
    """A target name as text, lower-case without the final dot; "" for the root ("." = none)."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


async def _by_mx(r: dns.asyncresolver.Resolver, domain: str) -> tuple[list[str] | None, str | None]:
    """(exchange names by preference, None for NXDOMAIN; the first one a provider owns)."""
    records = await _query(r, domain, "MX")
    if records is None:
        return None, None
    ranked = sorted((rr.preference, _host(rr.exchange)) for rr in records if isinstance(rr, MX))
    exchanges = [host for _, host in ranked if host]
    return exchanges, next((host for host in exchanges if mx_provider(host) is not None), None)


@dataclass(frozen=True)
class _SRV:
    """One service's answer: the server its best record names (None: no usable record,
    including the "." record that means "not offered here"), or why the look-up failed."""

    name: str
    server: Server | None = None
    failed: str | None = None


async def _srv(r: dns.asyncresolver.Resolver, service: str, domain: str, tls: TLS) -> _SRV:
    name = f"{service}._tcp.{domain}"
    try:
        records = await _query(r, name, "SRV") or []
    except _Failed as exc:
        return _SRV(name, failed=str(exc))
    usable = [(rr.priority, -rr.weight, _host(rr.target), rr.port) for rr in records
              if isinstance(rr, SRV) and _host(rr.target) and 0 < rr.port < 65536]
    if not usable:
        return _SRV(name)
    _, _, target, port = min(usable)
    return _SRV(name, Server(target, port, tls))


def _preset_of(imap: Server | None) -> str:
    """The preset whose IMAP server SRV pointed at (imap.gmail.com -> gmail), else `imap`."""
    if imap is not None:
        for p in PRESETS.values():
            if p.imap is not None and p.imap.host == imap.host:
                return p.name
    return "imap"


async def _by_srv(r: dns.asyncresolver.Resolver, domain: str
                  ) -> tuple[Server | None, Server | None, list[str], list[str]]:
    """(IMAP server, SMTP server, the records used, the look-ups that failed)."""
    imaps, imap, submissions, submission = await asyncio.gather(
        _srv(r, "_imaps", domain, "implicit"), _srv(r, "_imap", domain, "starttls"),
        _srv(r, "_submissions", domain, "implicit"), _srv(r, "_submission", domain, "starttls"))
    chosen = [imaps if imaps.server else imap, submissions if submissions.server else submission]
    used = [f"SRV {s.name} -> {s.server.host}:{s.server.port}" for s in chosen if s.server]
    failed = [s.failed for s in (imaps, imap, submissions, submission) if s.failed]
    return chosen[0].server, chosen[1].server, used, failed


def _outside(host: str, domain: str) -> bool:
    return not (host == domain or host.endswith("." + domain))


async def discover(address: str, *, nameservers: list[tuple[str, int]] | None = None,
                   timeout: float = 5.0) -> Discovery:
    """The IMAP and SMTP settings for `address`; see the module docstring.

    ValueError when `address` is not an e-mail address with a domain DNS can look up;
    AccountUnavailable when nothing was found and DNS failed on the way. Each DNS query
    waits at most `timeout` seconds; the SRV queries run at once, so the whole call
    takes about two timeouts at worst.
    """
    domain = mail_domain(address)
    address = address.strip()
    preset = by_domain(domain)
    if preset is not None:
        return Discovery(address, domain, preset.name, preset.imap, preset.smtp, "preset",
                         f"{domain} is a {preset.label} domain")
    r = _resolver(nameservers, timeout)
    failures: list[str] = []
    try:
        exchanges, matched = await _by_mx(r, domain)
    except _Failed as exc:
        exchanges, matched = [], None
        failures.append(str(exc))
    if exchanges is None:
        return Discovery(address, domain, None, None, None, None,
                         f"{domain} does not exist (DNS NXDOMAIN)")
    if matched is not None:
        p = mx_provider(matched)
        assert p is not None
        imap, smtp = p.mx_servers or (p.imap, p.smtp)
        return Discovery(address, domain, p.name, imap, smtp, "mx", f"MX {matched} is {p.label}'s")
    imap, smtp, used, failed = await _by_srv(r, domain)
    failures += failed
    if imap is not None or smtp is not None:
        warnings = [f"DNS look-up failed: {f}" for f in failures]
        if imap is None:
            warnings.append(f"{domain} publishes no IMAP service (_imaps._tcp, _imap._tcp): "
                            "give imap: {host, port}")
        for s in (imap, smtp):
            if s is not None and _outside(s.host, domain):
                warnings.append(f"{s.host} is outside {domain}: DNS without DNSSEC can be forged, "
                                "so confirm it is the mailbox's server (RFC 6186 section 6)")
        return Discovery(address, domain, _preset_of(imap), imap, smtp, "srv",
                         "; ".join(used), tuple(dict.fromkeys(warnings)))
    if failures:
        raise AccountUnavailable(f"could not find the mail settings of {domain}: DNS look-up "
                                 f"failed ({'; '.join(failures)}); try again later")
    mx_text = f"MX {', '.join(exchanges)} (no provider known by them)" if exchanges else "no MX"
    return Discovery(address, domain, None, None, None, None,
                     f"{domain}: not a preset domain, {mx_text}, no RFC 6186 SRV records")
