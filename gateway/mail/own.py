"""Which addresses are ours: one answer, built from the configuration, that every path asks.

Ours are

* our users' logins (``users[].login``: a login is the user's address);
* each connected account's mailbox addresses: ``accounts[].email``, and the names the
  gateway opens that mailbox as: a password login's ``auth.username`` when it is an
  address, and a delegate login's ``auth.delegate_user`` (the mailbox's owner);
* the ingest addresses (``ingest.addresses``).

Every question is answered on lower-cased, stripped addresses:

========================  ==================================================  ==========================
question                  answer                                              asked by
========================  ==================================================  ==========================
``is_user_address``       one of our users' logins or connected accounts'     ingest (who may log mail,
                          addresses (README "BCC / forward ingest")           direction)
``account_addresses``     mail from these counts as sent by the account       the IMAP tailer (direction)
                          (README "Connected mailboxes")
``sender_addresses``      the envelope senders an authenticated user may use  submission (MAIL FROM)
                          (README "Submission relay")
``is_ingest``             an ingest address                                   ingest listener, relay
``is_ours``               any of the above: never linked to a contact         CRM linking
                          (README "Contacts and companies")
``is_own_domain``         the domain of one of the addresses above            CRM linking (companies)
``owner``                 (user login, account id) an address belongs to      ingest
========================  ==================================================  ==========================

`OwnAddresses.of(cfg)` builds the answer once per Config object: a reload loads a new
Config, so the answer is rebuilt with it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import NamedTuple

from gateway.config import Account, Config
from gateway.mail.addresses import domain_of

__all__ = ["OwnAddresses", "Owner"]


class Owner(NamedTuple):
    """Whose address it is: a user's login and an account id (either may be None)."""

    user: str | None
    account: str | None


def _norm(address: str) -> str:
    return address.strip().lower()


def mailbox_addresses(account: Account) -> frozenset[str]:
    """The addresses of one account's mailbox: its email and the names it is opened as."""
    out = {_norm(account.email)}
    auth = account.auth
    if auth.method == "password" and auth.username and "@" in auth.username:
        out.add(_norm(auth.username))
    if auth.delegate_user:
        out.add(_norm(auth.delegate_user))
    return frozenset(out)


class OwnAddresses:
    """Our users', accounts' and ingest addresses, and the questions every path asks of them."""

    def __init__(self, *, users: Iterable[tuple[str, str | None]] = (),
                 mailboxes: Iterable[tuple[str, Iterable[str]]] = (),
                 ingest: Iterable[str] = ()) -> None:
        """`users`: (login, account id or None) in configuration order; `mailboxes`:
        (account id, its mailbox addresses); `ingest`: the ingest addresses."""
        users = [(login, account) for login, account in users]
        self._mailbox: dict[str, frozenset[str]] = {aid: frozenset(_norm(a) for a in addrs)
                                                    for aid, addrs in mailboxes}
        self._first_user: dict[str, str] = {}
        self._logins: dict[str, Owner] = {}
        by_account: dict[str, set[str]] = {aid: set(addrs) for aid, addrs in self._mailbox.items()}
        for login, account in users:
            self._logins[_norm(login)] = Owner(login, account)
            if account is not None:
                self._first_user.setdefault(account, login)
                by_account.setdefault(account, set()).add(_norm(login))
        self._by_account = {aid: frozenset(addrs) for aid, addrs in by_account.items()}
        self._owners: dict[str, Owner] = {}
        for aid, addrs in self._mailbox.items():
            for a in addrs:
                self._owners.setdefault(a, Owner(self._first_user.get(aid), aid))
        self._owners.update(self._logins)  # a login is its user's before any account's
        self.ingest: frozenset[str] = frozenset(_norm(a) for a in ingest)
        self.user_addresses: frozenset[str] = frozenset(self._owners)
        self.ours: frozenset[str] = self.user_addresses | self.ingest
        self.domains: frozenset[str] = frozenset(domain_of(a) for a in self.ours if "@" in a)

    @classmethod
    def from_config(cls, cfg: Config) -> OwnAddresses:
        return cls(users=[(u.login, u.account) for u in cfg.users],
                   mailboxes=[(a.id, mailbox_addresses(a)) for a in cfg.accounts],
                   ingest=cfg.ingest.addresses)

    @classmethod
    def of(cls, cfg: Config) -> OwnAddresses:
        """The answer for `cfg`, built on the first call for that Config object (the last
        few Config objects are remembered: a reload brings a new one)."""
        with _MEMO_LOCK:
            for ref, own in _MEMO:
                if ref() is cfg:
                    return own
        own = cls.from_config(cfg)
        with _MEMO_LOCK:
            _MEMO[:] = [(ref, o) for ref, o in _MEMO if ref() is not None][-(_MEMO_SIZE - 1):]
            _MEMO.append((weakref.ref(cfg), own))
        return own

    def is_user_address(self, address: str) -> bool:
        """One of our users' logins or connected accounts' addresses."""
        return _norm(address) in self._owners

    def is_ingest(self, address: str) -> bool:
        """One of the ingest addresses."""
        return _norm(address) in self.ingest

    def is_ours(self, address: str) -> bool:
        """A user's, an account's or an ingest address."""
        return _norm(address) in self.ours

    def is_own_domain(self, domain: str) -> bool:
        """The domain of one of our addresses."""
        return _norm(domain) in self.domains

    def owner(self, address: str) -> Owner | None:
        """Whose address this is: a login is its user's (and their account's); a mailbox
        address is its account's (and the account's first user's); None when not ours."""
        return self._owners.get(_norm(address))

    def account_addresses(self, account_id: str) -> frozenset[str]:
        """Mail from these counts as sent by the account: its mailbox addresses and the
        logins of the users whose account it is."""
        return self._by_account.get(account_id, frozenset())

    def user_of_account(self, account_id: str) -> str | None:
        """The first user (in configuration order) whose account this is."""
        return self._first_user.get(account_id)

    def sender_addresses(self, login: str) -> frozenset[str]:
        """The envelope senders the user with this login may use: their login and their
        account's mailbox addresses (nothing for an unknown login)."""
        owner = self._logins.get(_norm(login))
        if owner is None:
            return frozenset()
        mailbox = self._mailbox.get(owner.account, frozenset()) if owner.account else frozenset()
        return frozenset({_norm(login)}) | mailbox


#: (Config, its answer) for the last few Config objects asked about, newest last
_MEMO: list[tuple[weakref.ref[Config], OwnAddresses]] = []
_MEMO_SIZE = 4
_MEMO_LOCK = threading.Lock()
