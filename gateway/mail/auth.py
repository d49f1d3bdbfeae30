"""Is this message really from the domain it claims? DKIM (dkimpy) and SPF (pyspf) over our resolver.

Used by the ingest listener to tell a rep's own mail from a spoof. Both checks look
DNS up through one dnspython :class:`dns.resolver.Resolver` that the caller builds
(`delivery.nameservers` in production, a loopback server in tests), and both run in a
worker thread (:func:`authenticate`) because dkimpy and pyspf are synchronous.

Results use the RFC 8601 words: ``pass``, ``fail``, ``softfail``, ``neutral``, ``none``
(nothing published: DNS does not answer the question), ``temperror`` (DNS failed: try
again later) and ``permerror`` (a broken record). A DKIM pass counts only for a
signature whose ``d=`` is the From domain or a parent of it (relaxed alignment); an
SPF result is for the envelope sender's domain (the HELO name for a null sender).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf

from gateway.mail.addresses import domain_of

#: The resolver pyspf lookups use in the current context (see `_spf_lookup`).
_SPF_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "mailgw_spf_resolver", default=None)
_INSTALL_LOCK = threading.Lock()
DNS_TIMEOUT = 5.0


@dataclass(frozen=True)
class AuthResult:
    """What DKIM and SPF say about one message."""

    dkim: str                    # pass | fail | none | temperror | permerror
    dkim_domain: str | None      # d= of the aligned signature that decided it
    spf: str                     # pass | fail | softfail | neutral | none | temperror | permerror
    spf_domain: str | None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.dkim == "pass" or self.spf == "pass"

    @property
    def temporary(self) -> bool:
        return not self.passed and "temperror" in (self.dkim, self.spf)

    @property
    def unanswered(self) -> bool:
        """DNS publishes nothing to check against: no signature, no SPF record."""
        return self.dkim == "none" and self.spf == "none"

    def header_value(self, authserv_id: str) -> str:
        """An Authentication-Results value (RFC 8601) for logs and stored headers."""
        parts = [authserv_id, f"dkim={self.dkim}" + (f" header.d={self.dkim_domain}"
                                                     if self.dkim_domain else ""),
                 f"spf={self.spf}" + (f" smtp.mailfrom={self.spf_domain}" if self.spf_domain else "")]
        return "; ".join(parts)


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed alignment: the signing domain is the From domain or one of its parents."""
    d, f = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return bool(d) and "." in d and (f == d or f.endswith("." + d))


def _txt(resolver: dns.resolver.Resolver, name: str) -> bytes | None:
    """The TXT record (its strings joined) at `name`; None when there is none."""
    try:
        answer = resolver.resolve(name, "TXT", lifetime=DNS_TIMEOUT)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    for rdata in answer:
        return b"".join(rdata.strings)
    return None


def check_dkim(raw: bytes, from_domain: str, resolver: dns.resolver.Resolver) -> tuple[str, str | None,
                                                                                       str]:
    """(result, aligned signing domain, reason) for the DKIM signatures of `raw`."""
    try:
        verifier = dkim.DKIM(raw, timeout=int(DNS_TIMEOUT))
    except Exception as exc:
        return "permerror", None, f"message not parseable for DKIM: {exc}"
    headers = [(name, value) for name, value in verifier.headers
               if name.lower() == b"dkim-signature"]
    if not headers:
        return "none", None, "no DKIM signature"

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return _txt(resolver, text)

    outcome, decided, why = "fail", None, "no aligned DKIM signature verified"
    for idx, (_, value) in enumerate(headers):
        try:
            tags = dkim.util.parse_tag_value(value)
        except Exception:
            continue
        domain = tags.get(b"d", b"").decode("ascii", "replace")
        if not aligned(domain, from_domain):
            continue
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dns.exception.Timeout:
            outcome, decided, why = "temperror", domain, "DNS timeout looking up the DKIM key"
            continue
        except (dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
            outcome, decided, why = "temperror", domain, f"DNS error: {exc}"
            continue
        except Exception as exc:  # dkimpy raises its own kinds for broken signatures
            why = f"DKIM signature d={domain} unusable: {exc}"
            continue
        if ok:
            return "pass", domain, f"DKIM signature d={domain} verified"
        if outcome != "temperror":
            why = f"DKIM signature d={domain} did not verify"
    return outcome, decided, why


def _spf_lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup contract, answered by the resolver of the current context."""
    resolver = _SPF_RESOLVER.get()
    if resolver is None:
        return _ORIGINAL_LOOKUP[0](name, qtype, strict, timeout)
    out: list[Any] = []
    try:
        answer = resolver.resolve(name, qtype, lifetime=min(float(timeout), DNS_TIMEOUT))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return out
    except dns.exception.Timeout as exc:
        raise spf.TempError(f"DNS {exc}") from None
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {exc}") from None
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


_ORIGINAL_LOOKUP: list[Callable[..., list[Any]]] = []


def _install_spf_lookup() -> None:
    """Route pyspf's module-level DNSLookup through `_spf_lookup` (once, on first use).

    pyspf has no resolver parameter; its lookups go through the module function
    ``spf.DNSLookup``. The replacement asks the resolver in a context variable and,
    where none is set, the original function, so other users of pyspf are unaffected.
    """
    with _INSTALL_LOCK:
        if not _ORIGINAL_LOOKUP:
            _ORIGINAL_LOOKUP.append(spf.DNSLookup)
            spf.DNSLookup = _spf_lookup


def check_spf(client_ip: str, mail_from: str, helo: str,
              resolver: dns.resolver.Resolver) -> tuple[str, str | None, str]:
    """(result, domain checked, reason) for SPF of the envelope sender from `client_ip`."""
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        return "none", None, f"no client IP to check ({client_ip!r})"
    sender = mail_from or f"postmaster@{helo}"
    domain = domain_of(sender)
    _install_spf_lookup()
    token = _SPF_RESOLVER.set(resolver)
    try:
        result, explanation = spf.check2(i=client_ip, s=sender, h=helo or domain,
                                         timeout=DNS_TIMEOUT)
    except Exception as exc:  # pyspf raises on some malformed input
        return "permerror", domain, f"SPF check failed: {exc}"
    finally:
        _SPF_RESOLVER.reset(token)
    return str(result), domain, str(explanation)


def authenticate_sync(raw: bytes, *, from_domain: str, mail_from: str, client_ip: str, helo: str,
                      resolver: dns.resolver.Resolver) -> AuthResult:
    dkim_result, dkim_domain, dkim_why = check_dkim(raw, from_domain, resolver)
    if dkim_result == "pass":  # enough: no SPF lookups needed
        return AuthResult("pass", dkim_domain, "none", None, dkim_why)
    spf_result, spf_domain, spf_why = check_spf(client_ip, mail_from, helo, resolver)
    if spf_result == "pass" and not ((spf_domain and aligned(spf_domain, from_domain))
                                     or (spf_domain and aligned(from_domain, spf_domain))):
        spf_result, spf_why = "neutral", f"SPF passed for {spf_domain}, not aligned with From"
    return AuthResult(dkim_result, dkim_domain, spf_result, spf_domain, f"{dkim_why}; {spf_why}")


async def authenticate(raw: bytes, *, from_domain: str, mail_from: str, client_ip: str, helo: str,
                       resolver: dns.resolver.Resolver) -> AuthResult:
    """DKIM, then (unless DKIM passed) SPF, in a worker thread."""
    return await asyncio.to_thread(authenticate_sync, raw, from_domain=from_domain,
                                   mail_from=mail_from, client_ip=client_ip, helo=helo,
                                   resolver=resolver)


def make_resolver(nameservers: list[tuple[str, int]] | None = None) -> dns.resolver.Resolver:
    """A resolver on the given (address, port) nameservers (system configuration when none)."""
    if not nameservers:
        r = dns.resolver.Resolver()
    else:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [ip for ip, _ in nameservers]
        r.nameserver_ports = {ip: port for ip, port in nameservers}
    r.lifetime = DNS_TIMEOUT
    r.timeout = DNS_TIMEOUT / 2
    return r
