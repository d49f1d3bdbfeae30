"""OAuth 2.0 access tokens for the accounts that log in with one: cached encrypted, one refresh at a time.

    tokens = TokenService(get_config, registry, DBTokenStore(store), cipher, GrantClient())
    token = await tokens.access_token("alice")                   # valid for 5 more minutes
    token = await tokens.access_token("alice", rejected=token)   # the server refused it

How a new token is obtained depends on the account (`auth.method`):

- `oauth2`: the refresh-token grant (RFC 6749 section 6) at the account's OAuth provider
  (`auth.oauth_provider`, an `oauth.providers` entry or a preset; or `auth.token_endpoint`)
  with the refresh token from `auth.refresh_token_file` or, for an account connected through
  a connect link or the device flow, the one the store keeps encrypted. A refresh token
  rotated by the provider (Microsoft does) is kept with the access token and used next
  time, unless the account's own refresh token changes (it was reconnected).
- `service` with a Google service account: the JWT-bearer grant (RFC 7523) with `sub` set
  to the mailbox (domain-wide delegation); one token per mailbox.
- `service` with a Microsoft service account: the client-credentials grant; the app-only
  token serves every mailbox of that service account, so it is cached once per service
  account (in memory: it lasts an hour and is cheap to get again).

Concurrent callers for one account (or one service account) share one grant (a lock per
key: single flight). Per-account tokens are stored through a `TokenStore`, encrypted with
the account id as associated data (`gateway.keys.tokens`). Errors are typed:
`AccountAuthError` when the grant is refused (the account needs reconnecting, or the
service account lost its delegation), `AccountUnavailable` when the provider cannot be
reached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Protocol

from gateway.accounts.grants import GrantClient, ServiceAccountKey, TokenResponse
from gateway.accounts.providers import Providers, client_credential
from gateway.config import Account, Config, ServiceAccount, read_secret
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.keys.tokens import AccessToken, TokenCipher, TokenStore
from gateway.oauth.providers import OAuthClient, microsoft

__all__ = ["GOOGLE_MAIL_SCOPE", "MICROSOFT_APP_SCOPE", "AccountLookup", "ConfigAccounts", "TokenService"]

GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"


class AccountLookup(Protocol):
    """What the token service needs of the registry: the account, and its refresh token."""

    def account(self, account_id: str) -> Account | None: ...

    async def refresh_token(self, account_id: str) -> str: ...


class ConfigAccounts:
    """An AccountLookup over the configuration alone (declared accounts; tools and tests)."""

    def __init__(self, get_config: Callable[[], Config]) -> None:
        self.get_config = get_config

    def account(self, account_id: str) -> Account | None:
        return self.get_config().account(account_id)

    async def refresh_token(self, account_id: str) -> str:
        acct = self.account(account_id)
        if acct is None or not acct.auth.refresh_token_file:
            raise AccountAuthError(f"account {account_id} has no auth.refresh_token_file")
        return read_secret(acct.auth.refresh_token_file, self.get_config().base_dir).strip()


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


class TokenService:
    """The TokenSource of the daemon (see the module docstring)."""

    def __init__(self, get_config: Callable[[], Config], registry: AccountLookup,
                 store: TokenStore, cipher: TokenCipher, grants: GrantClient, *,
                 providers: Providers | None = None, margin: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.get_config = get_config
        self.registry = registry
        self.store = store
        self.cipher = cipher
        self.grants = grants
        self.providers = providers or Providers(get_config, grants)
        self.margin = margin
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._shared: dict[str, AccessToken] = {}    # service account id -> app-only token
        self.grants_made = 0

    async def close(self) -> None:
        await self.grants.close()

    def forget(self, account_id: str) -> None:
        """Drop what is cached for an account in memory (it was reconnected or removed). The
        stored access token is dropped by the store step itself; the lock stays (a refresh
        may hold it)."""
        self._shared.pop(account_id, None)

    async def access_token(self, account_id: str, *, rejected: str | None = None) -> str:
        acct = self.registry.account(account_id)
        if acct is None:
            raise AccountAuthError(f"no account {account_id!r}")
        if acct.auth.method == "oauth2":
            return await self._refreshed(acct, rejected)
        if acct.auth.method == "service":
            sa = self.get_config().service_account(acct.auth.service_account or "")
            if sa is None:
                raise AccountAuthError(f"account {account_id}: no service account "
                                       f"{acct.auth.service_account!r} under service_accounts:")
            if sa.kind == "microsoft":
                return await self._app_only(sa, rejected)
            return await self._delegated(acct, sa, rejected)
        raise AccountAuthError(f"account {account_id} does not log in with OAuth (auth.method "
                               f"{acct.auth.method})")

    # -- per-account tokens, cached encrypted in the store -------------------------------------
    async def _cached(self, account_id: str, origin: str, rejected: str | None) -> AccessToken | None:
        stored = await self.store.load(account_id)
        if stored is None:
            return None
        got = self.cipher.decrypt(account_id, stored.ciphertext)
        if got is None or got[1] != origin:
            return None
        return got[0]

    def _fresh_enough(self, token: AccessToken, rejected: str | None) -> bool:
        return token.token != rejected and token.expires_at - self.margin > self.clock()

    async def _keep(self, account_id: str, token: AccessToken, origin: str) -> None:
        await self.store.save(account_id, self.cipher.encrypt(account_id, token, origin),
                              token.expires_at)

    async def _refreshed(self, acct: Account, rejected: str | None) -> str:
        lock = self._locks.setdefault(acct.id, asyncio.Lock())
        async with lock:
            own = await self.registry.refresh_token(acct.id)
            origin = _fingerprint(own)
            cached = await self._cached(acct.id, origin, rejected)
            if cached is not None and self._fresh_enough(cached, rejected):
                return cached.token
            refresh_token = (cached.refresh_token if cached is not None and cached.refresh_token
                             else own)
            provider, client, scope = await self.providers.for_account(acct)
            fresh = await self.grants.refresh(provider, client, refresh_token, scope=scope)
            self.grants_made += 1
            rotated = fresh.refresh_token or (refresh_token if refresh_token != own else None)
            keep = AccessToken(fresh.access_token, fresh.expires_at, rotated)
            await self._keep(acct.id, keep, origin)
            return keep.token

    async def _delegated(self, acct: Account, sa: ServiceAccount, rejected: str | None) -> str:
        """Google domain-wide delegation: a JWT-bearer grant with sub = the mailbox."""
        lock = self._locks.setdefault(acct.id, asyncio.Lock())
        async with lock:
            origin = f"service:{sa.id}"
            cached = await self._cached(acct.id, origin, rejected)
            if cached is not None and self._fresh_enough(cached, rejected):
                return cached.token
            key = self._key(sa)
            fresh = await self.grants.jwt_bearer(
                key, subject=acct.auth.username or acct.email, scope=sa.scope or GOOGLE_MAIL_SCOPE,
                token_uri=sa.token_endpoint or key.token_uri)
            self.grants_made += 1
            keep = AccessToken(fresh.access_token, fresh.expires_at)
            await self._keep(acct.id, keep, origin)
            return keep.token

    def _key(self, sa: ServiceAccount) -> ServiceAccountKey:
        assert sa.key_file is not None   # the model requires it for kind google
        try:
            text = read_secret(sa.key_file, self.get_config().base_dir)
        except OSError as exc:
            raise AccountUnavailable(f"service account {sa.id}: cannot read {sa.key_file}: "
                                     f"{exc.strerror or exc}") from None
        try:
            return ServiceAccountKey.from_json(text, f"service_accounts.{sa.id}.key_file")
        except ValueError as exc:
            raise AccountAuthError(f"service account {sa.id}: {exc}") from None

    # -- app-only tokens, one per service account ----------------------------------------------
    async def _app_only(self, sa: ServiceAccount, rejected: str | None) -> str:
        key = f"service:{sa.id}"
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._shared.get(key)
            if cached is not None and self._fresh_enough(cached, rejected):
                return cached.token
            provider = microsoft(sa.tenant or "common")
            if sa.token_endpoint:
                provider = dataclasses.replace(provider, token_endpoint=sa.token_endpoint)
            fresh: TokenResponse = await self.grants.client_credentials(
                provider, self._client(sa), scope=sa.scope or MICROSOFT_APP_SCOPE)
            self.grants_made += 1
            token = AccessToken(fresh.access_token, fresh.expires_at)
            self._shared[key] = token
            return token.token

    def _client(self, sa: ServiceAccount) -> OAuthClient:
        assert sa.client_id is not None
        return client_credential(self.get_config(), sa.client_id, secret_file=sa.client_secret_file,
                                 key_file=sa.private_key_file, certificate_file=sa.certificate_file,
                                 what=f"service account {sa.id}: cannot read its credential")
