"""Envelope address checks that close the classic open-relay tricks.

Rejected for every client, authenticated or not, because an upstream or an MX may
read them differently from us: the percent hack (`user%other@ours`), bang paths
(`other!user@ours`), source routes (`@hop:user@dest`), quoted local parts (which can
hide `@` or `%`), IP-literal domains (`user@[10.0.0.1]`, which would let a client
point delivery at any host), and addresses without a proper domain.
"""

from __future__ import annotations

import re

_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\.)+[A-Za-z\u0080-\U0010ffff][A-Za-z0-9\u0080-\U0010ffff-]*$"
)
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.\u0080-\U0010ffff-]{1,64}$")


def relay_trick(address: str) -> str | None:
    """Why `address` is refused, or None when it is a plain `local@domain`."""
    if address.startswith("@") or ":" in address:
        return "source routes are not accepted"
    if '"' in address or "\\" in address:
        return "quoted local parts are not accepted"
    if address.count("@") != 1:
        return "the address must have exactly one @ and a domain"
    local, domain = address.rsplit("@", 1)
    if domain.startswith("["):
        return "IP-literal domains are not accepted"
    if "%" in local:
        return "the percent hack is not accepted"
    if "!" in local:
        return "bang paths are not accepted"
    if not local or not _LOCAL_RE.match(local) or local.startswith(".") or local.endswith(".") \
            or ".." in local:
        return "bad local part"
    if not _DOMAIN_RE.match(domain.rstrip(".")) or domain.endswith("."):
        return "bad domain"
    return None


def domain_of(address: str) -> str:
    return address.rsplit("@", 1)[-1].lower()
