"""The protocols through which services reach connected accounts: who they are, their tokens, their state.

Accounts come from two places (``accounts:`` in gateway.yaml, and the CRM store for
accounts created at run time through the API, the CLI or a connect link); the
account service (`gateway.accounts`) merges them and implements these protocols.
Delivery and the IMAP tailers depend only on this module, so neither imports the
other nor the account service::

    acct = directory.account_for_user("alice@example.com")   # the mailbox alice sends as
    token = await tokens.access_token(acct.id)                 # OAuth 2.0 bearer token
    token = await tokens.access_token(acct.id, rejected=token) # the server refused it: refresh once
    await status.needs_reconnect(acct.id, "535 5.7.8 token refused")

`access_token` raises `gateway.errors.AccountAuthError` when the grant is refused (the
account needs reconnecting) and `AccountUnavailable` when the provider cannot be
reached (try later).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.config import Account, Config

__all__ = ["AccountDirectory", "AccountStatusSink", "ConfigDirectory", "SecretSource", "TokenSource"]


class AccountDirectory(Protocol):
    """The accounts in force now (declared and stored), read without I/O."""

    def account(self, account_id: str) -> Account | None: ...

    def accounts(self) -> Sequence[Account]: ...

    def account_for_user(self, login: str) -> Account | None:
        """The account a submission user sends as (`users[].account`, or a stored
        account that lists the login among its send-as users)."""
        ...


class TokenSource(Protocol):
    """OAuth 2.0 access tokens for accounts whose `auth.method` is oauth2 or service."""

    async def access_token(self, account_id: str, *, rejected: str | None = None) -> str: ...


class SecretSource(Protocol):
    """Passwords of accounts whose secret the store keeps (accounts created at run time)."""

    async def password(self, account_id: str) -> str: ...


class AccountStatusSink(Protocol):
    """Where a service reports that an account's credentials stopped working."""

    async def needs_reconnect(self, account_id: str, reason: str) -> None: ...


class ConfigDirectory:
    """An AccountDirectory over the configuration alone (tests, and a gateway with no store)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def account(self, account_id: str) -> Account | None:
        return self.cfg.account(account_id)

    def accounts(self) -> Sequence[Account]:
        return self.cfg.accounts

    def account_for_user(self, login: str) -> Account | None:
        user = self.cfg.user(login)
        return self.cfg.account(user.account) if user is not None and user.account else None
