"""Who a message concerns: the linking rules (own addresses, `crm.exclude`, `link_by`) as pure code.

The store asks these rules, inside its transaction, which addresses of a new message
may become or match contacts and which domains may match companies. They are built
from the configuration (`crm:`, `users:`, `accounts:`, `ingest.addresses`) and
replaced on reload; nothing here touches the database.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.crm.assign import SharedPolicy, policies_from_config
from gateway.mail.addresses import domain_of
from gateway.mail.own import OwnAddresses

#: Domains of free mail providers: a person there is no company (no company by domain).
FREEMAIL_DOMAINS: frozenset[str] = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.de", "ymail.com",
    "outlook.com", "hotmail.com", "hotmail.co.uk", "hotmail.fr", "live.com", "msn.com",
    "icloud.com", "me.com", "mac.com", "aol.com", "gmx.com", "gmx.de", "gmx.net", "web.de",
    "mail.com", "proton.me", "protonmail.com", "pm.me", "zoho.com", "yandex.ru", "yandex.com",
    "mail.ru", "qq.com", "163.com", "126.com", "fastmail.com", "hey.com", "tutanota.com",
})


@dataclass(frozen=True)
class LinkRules:
    """How the store links messages to contacts and companies."""

    auto_create_contacts: bool = False
    link_by_address: bool = True
    link_by_domain: bool = True
    #: `link_by: name`: an unknown address whose display name is exactly one contact's
    #: full name is linked to that contact (gateway.crm.identify)
    link_by_name: bool = False
    exclude: tuple[str, ...] = ()
    own_addresses: frozenset[str] = frozenset()
    own_domains: frozenset[str] = frozenset()
    #: the shared mailboxes (`shared: true`) and how they assign inbound mail
    shared: tuple[SharedPolicy, ...] = ()
    _exclude_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.exclude:
            pattern = "|".join(f"(?:{fnmatch.translate(g.lower())})" for g in self.exclude)
            object.__setattr__(self, "_exclude_re", re.compile(pattern))

    @classmethod
    def from_config(cls, cfg: Config) -> LinkRules:
        own = OwnAddresses.of(cfg)
        return cls(
            auto_create_contacts=cfg.crm.auto_create_contacts,
            link_by_address="address" in cfg.crm.link_by,
            link_by_domain="domain" in cfg.crm.link_by,
            link_by_name="name" in cfg.crm.link_by,
            exclude=tuple(cfg.crm.exclude),
            own_addresses=own.ours,
            own_domains=own.domains,
            shared=policies_from_config(cfg),
        )

    @property
    def links_contacts(self) -> bool:
        """Are messages linked to contacts by address (`link_by: address` or `name`, or
        contacts are made automatically)? The same answer for new mail and for history
        at import."""
        return self.link_by_address or self.link_by_name or self.auto_create_contacts

    def excluded(self, address: str) -> bool:
        """True for an address matching a `crm.exclude` glob (never linked, never stored)."""
        return self._exclude_re is not None and self._exclude_re.fullmatch(address.lower()) is not None

    def is_own(self, address: str) -> bool:
        """One of our users, connected accounts or ingest addresses."""
        return address.lower() in self.own_addresses

    def linkable(self, address: str) -> bool:
        """May this address be linked to (or become) a contact?"""
        a = address.strip().lower()
        return bool(a) and "@" in a and not self.is_own(a) and not self.excluded(a)

    def company_domain(self, address: str) -> str | None:
        """The domain to link a company by, or None (our own, free-mail or excluded)."""
        if not self.link_by_domain or not self.linkable(address):
            return None
        d = domain_of(address.strip())
        if not d or d in FREEMAIL_DOMAINS or d in self.own_domains:
            return None
        return d
