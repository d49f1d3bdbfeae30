"""Find where mail for a domain goes: MX hosts in preference order, with their addresses.

RFC 5321 section 5.1 and RFC 7505, as DNS answers map to outcomes::

    MX records ................... hosts by preference, equal preferences shuffled
    no MX, domain has A/AAAA ..... the implicit MX: the domain itself, preference 0
    no MX, no A/AAAA ............. PermanentFailure 550 5.4.4
    NXDOMAIN ..................... PermanentFailure 550 5.1.2
    null MX (a single MX ".") .... PermanentFailure 556 5.1.10
    timeout, SERVFAIL ............ TemporaryFailure 451 4.4.3

Every MX target is resolved to addresses (A first, then AAAA) through the same
resolver, so that `Transport.send_mx` connects to addresses this resolver chose and
tests can point it at a local DNS server. Targets without any address are
dropped; when none is left the failure is temporary if some lookup failed
temporarily, otherwise permanent (5.4.4).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from gateway.errors import PermanentFailure, TemporaryFailure

__all__ = ["MXHost", "MXResolver"]


@dataclass(frozen=True)
class MXHost:
    """One mail exchanger: its name (for TLS and logs), preference and addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]


class _Lookup:
    """Addresses of one name; `temporary` is set when DNS failed rather than said no."""

    def __init__(self, addresses: list[str], temporary: str | None) -> None:
        self.addresses = addresses
        self.temporary = temporary


class MXResolver:
    """Resolve a mail domain to its exchangers through dnspython's async resolver.

    `nameservers` (addresses) and `port` select the DNS servers; without them the
    system configuration (/etc/resolv.conf) is read, lazily on first use.
    """

    def __init__(self, nameservers: list[str] | None = None, port: int = 53,
                 timeout: float = 10, *, rng: random.Random | None = None) -> None:
        self.nameservers = list(nameservers) if nameservers else None
        self.port = port
        self.timeout = timeout
        self._rng = rng or random.Random()
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            r = dns.asyncresolver.Resolver(configure=not self.nameservers)
            if self.nameservers:
                r.port = self.port
                r.nameservers = list(self.nameservers)
            r.timeout = self.timeout
            r.lifetime = self.timeout
            r.cache = None
            self._resolver = r
        return self._resolver

    async def resolve(self, domain: str) -> list[MXHost]:
        """The exchangers for `domain`, best first; raise PermanentFailure/TemporaryFailure."""
        domain = domain.strip().rstrip(".")
        literal = _address_literal(domain)
        if literal is not None:
            return [MXHost(name=literal, preference=0, addresses=(literal,))]
        try:
            if not domain:
                raise dns.name.EmptyLabel
            qname = dns.name.from_text(domain)
        except dns.exception.DNSException as exc:
            raise PermanentFailure(f"{domain!r} is not a valid domain name ({_why(exc)})",
                                   code=550, status="5.1.2") from None
        records: list[tuple[int, str]] = []
        try:
            answer = await self._get().resolve(qname, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure(f"domain {domain} does not exist (DNS NXDOMAIN)",
                                   code=550, status="5.1.2") from None
        except dns.resolver.NoAnswer:
            pass
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(f"DNS lookup of MX for {domain} failed: {_why(exc)}",
                                   code=451, status="4.4.3") from None
        else:
            for rr in answer:
                records.append((int(rr.preference), rr.exchange.to_text(omit_final_dot=True)))
        if not records:
            return [await self._implicit_mx(domain, qname)]
        real = [(pref, name) for pref, name in records if name not in ("", ".")]
        if not real:
            raise PermanentFailure(f"domain {domain} does not accept mail (null MX, RFC 7505)",
                                   code=556, status="5.1.10")
        by_pref: dict[int, list[str]] = {}
        for pref, name in real:
            names = by_pref.setdefault(pref, [])
            if name.lower() not in (n.lower() for n in names):
                names.append(name)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            names = by_pref[pref]
            self._rng.shuffle(names)
            ordered.extend((pref, n) for n in names)
        lookups = await asyncio.gather(*(self._addresses(n) for _, n in ordered))
        hosts = [MXHost(name=n, preference=p, addresses=tuple(lk.addresses))
                 for (p, n), lk in zip(ordered, lookups, strict=True) if lk.addresses]
        if hosts:
            return hosts
        temporary = [lk.temporary for lk in lookups if lk.temporary]
        if temporary:
            raise TemporaryFailure(f"no address for any MX host of {domain}: {temporary[0]}",
                                   code=451, status="4.4.3")
        raise PermanentFailure(f"no MX host of {domain} has an address "
                               f"({', '.join(n for _, n in ordered)})", code=550, status="5.4.4")

    async def _implicit_mx(self, domain: str, qname: dns.name.Name) -> MXHost:
        lk = await self._addresses(qname)
        if lk.addresses:
            return MXHost(name=domain, preference=0, addresses=tuple(lk.addresses))
        if lk.temporary:
            raise TemporaryFailure(f"DNS lookup of {domain} failed: {lk.temporary}",
                                   code=451, status="4.4.3")
        raise PermanentFailure(f"domain {domain} has no MX and no A/AAAA record",
                               code=550, status="5.4.4")

    async def _addresses(self, name: str | dns.name.Name) -> _Lookup:
        if isinstance(name, str):
            literal = _address_literal(name) or _ip(name)
            if literal is not None:
                return _Lookup([literal], None)
            try:
                name = dns.name.from_text(name)
            except dns.exception.DNSException:
                return _Lookup([], None)
        a, aaaa = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        return _Lookup(a.addresses + aaaa.addresses, a.temporary or aaaa.temporary)

    async def _query(self, name: dns.name.Name, rdtype: str) -> _Lookup:
        try:
            answer = await self._get().resolve(name, rdtype, search=False,
                                               raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return _Lookup([], None)
        except dns.exception.DNSException as exc:
            return _Lookup([], f"{rdtype} lookup of {name.to_text(omit_final_dot=True)} "
                               f"failed: {_why(exc)}")
        if answer.rrset is None:
            return _Lookup([], None)
        return _Lookup([rr.address for rr in answer.rrset], None)


def _why(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or REFUSED)"
    return str(exc) or type(exc).__name__


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _address_literal(domain: str) -> str | None:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` -> the address; anything else -> None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    return _ip(inner)
