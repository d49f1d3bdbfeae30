"""pyspf still looks names up through its module-level DNSLookup, which gateway.mail.auth replaces.

pyspf has no resolver parameter: `gateway.mail.auth` swaps ``spf.DNSLookup`` for a
function that asks the gateway's resolver. This fails, naming it, when pyspf stops calling
that module global or calls it with other arguments.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import dns.resolver
import spf

from gateway.mail.auth import check_spf

WHERE = f"pyspf {spf.__version__}: spf.DNSLookup changed; gateway/mail/auth.py relies on it"


@dataclass
class TXT:
    strings: tuple[bytes, ...]


class FakeResolver:
    """Answers one TXT record, and records every question."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.records = records
        self.asked: list[tuple[str, str]] = []

    def resolve(self, name: str, qtype: str, lifetime: float | None = None) -> list[Any]:
        self.asked.append((name, qtype))
        if qtype == "TXT" and name in self.records:
            return [TXT((self.records[name],))]
        raise dns.resolver.NoAnswer


def test_dns_lookup_is_a_module_function_taking_name_and_qtype_first() -> None:
    assert callable(getattr(spf, "DNSLookup", None)), WHERE
    params = list(inspect.signature(spf.DNSLookup).parameters)
    assert params[:2] == ["name", "qtype"] and len(params) == 4, f"{WHERE}: {params}"


def test_spf_lookups_go_through_the_gateways_resolver() -> None:
    resolver = FakeResolver({"sender.example": b"v=spf1 ip4:192.0.2.7 -all"})
    result, domain, _ = check_spf("192.0.2.7", "rep@sender.example", "mx.sender.example",
                                  resolver)  # type: ignore[arg-type]
    assert ("sender.example", "TXT") in resolver.asked, WHERE
    assert (result, domain) == ("pass", "sender.example"), WHERE
    result, _, _ = check_spf("198.51.100.1", "rep@sender.example", "mx.sender.example",
                             resolver)  # type: ignore[arg-type]
    assert result == "fail", WHERE
