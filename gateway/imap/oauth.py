"""OAuth2 access tokens for mailboxes: refresh-token grant, encrypted at rest, one refresh at a time.

    cipher = TokenCipher.from_key_file(state_dir / "token.key")     # created 0600 if missing
    tokens = TokenManager(MemoryTokenStore(), cipher)               # the store is a Protocol
    creds = credentials_from_config(account, config.base_dir)
    token = await tokens.access_token(account.id, creds)            # refreshed 5 min before expiry
    ...server refused it anyway...
    token = await tokens.access_token(account.id, creds, rejected=token)   # refresh once more

The refresh-token grant (RFC 6749 section 6) is POSTed to the account's token endpoint
(presets: Google `https://oauth2.googleapis.com/token`, Microsoft
`https://login.microsoftonline.com/common/oauth2/v2.0/token`). Concurrent callers for one
account share one refresh (a lock per account: single flight). A refresh token rotated
by the endpoint (Microsoft does) is kept with the access token and used next time,
unless the configured refresh token changes (the account was reconnected).

At rest, the access token (and any rotated refresh token) is encrypted with AES-256-GCM,
bound to the account id as associated data; the 32-byte key comes from a secret
(`token_key_file`) or a key file created with mode 0600. The `TokenStore` only ever sees
ciphertext and the expiry time.

Errors are typed: `invalid_grant` and other refusals of the client or grant raise
`AccountAuthError` (the account needs reconnecting; the endpoint's words in
`server_text`); 5xx, 429, timeouts, network errors and unreadable answers raise
`AccountUnavailable` (try again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import Account, read_secret
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.keys.tokens import AccessToken, EncryptedToken, MemoryTokenStore, TokenCipher, TokenStore

__all__ = [
    "AccessToken",
    "EncryptedToken",
    "MemoryTokenStore",
    "OAuthCredentials",
    "TokenCipher",
    "TokenManager",
    "TokenStore",
    "credentials_from_config",
]

# error codes of RFC 6749 5.2 (and common extensions) that no retry will fix
_REFUSALS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                       "unsupported_grant_type", "invalid_request", "access_denied",
                       "interaction_required", "consent_required"})


@dataclass(frozen=True)
class OAuthCredentials:
    """What the refresh-token grant needs for one account."""

    token_endpoint: str
    client_id: str
    refresh_token: str
    client_secret: str | None = None
    scope: str | None = None

    def __repr__(self) -> str:  # never print the secrets
        return f"OAuthCredentials(token_endpoint={self.token_endpoint!r}, client_id={self.client_id!r})"


def _fingerprint(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:32]


class TokenManager:
    """Access tokens per account: cached encrypted in a TokenStore, refreshed before expiry."""

    def __init__(self, store: TokenStore, cipher: TokenCipher, *,
                 session: aiohttp.ClientSession | None = None, margin: float = 300.0,
                 timeout: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cipher = cipher
        self.margin = margin
        self.timeout = timeout
        self.clock = clock
        self._session = session
        self._own_session = session is None
        self._locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def access_token(self, account_id: str, creds: OAuthCredentials, *,
                           rejected: str | None = None) -> str:
        """A token valid for at least `margin` more seconds. Pass `rejected` (the token the
        server just refused) to force one refresh; concurrent callers share it."""
        lock = self._locks.setdefault(account_id, asyncio.Lock())
        async with lock:
            origin = _fingerprint(creds.refresh_token)
            cached = await self._cached(account_id)
            refresh_token = creds.refresh_token
            if cached is not None:
                token, cached_origin = cached
                if cached_origin == origin:
                    if token.token != rejected and token.expires_at - self.margin > self.clock():
                        return token.token
                    refresh_token = token.refresh_token or creds.refresh_token
            fresh = await self._grant(creds, refresh_token)
            keep = AccessToken(fresh.token, fresh.expires_at,
                               fresh.refresh_token or (refresh_token if refresh_token != creds.refresh_token
                                                       else None))
            await self.store.save(account_id, self.cipher.encrypt(account_id, keep, origin),
                                  keep.expires_at)
            return keep.token

    async def _cached(self, account_id: str) -> tuple[AccessToken, str] | None:
        stored = await self.store.load(account_id)
        if stored is None:
            return None
        return self.cipher.decrypt(account_id, stored.ciphertext)

    async def _grant(self, creds: OAuthCredentials, refresh_token: str) -> AccessToken:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "client_id": creds.client_id}
        if creds.client_secret:
            form["client_secret"] = creds.client_secret
        if creds.scope:
            form["scope"] = creds.scope
        where = creds.token_endpoint
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout), self._session.post(
                    where, data=form, headers={"Accept": "application/json"}) as resp:
                status = resp.status
                text = await resp.text()
        except TimeoutError:
            raise AccountUnavailable(f"token endpoint {where} did not answer within "
                                     f"{self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AccountUnavailable(f"token endpoint {where} unreachable: {exc}") from None
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                body = parsed
        if status == 200 and isinstance(body.get("access_token"), str) and body["access_token"]:
            try:
                lifetime = float(body.get("expires_in", 3600))
            except (TypeError, ValueError):
                lifetime = 3600.0
            rotated = body.get("refresh_token")
            return AccessToken(body["access_token"], self.clock() + lifetime,
                               rotated if isinstance(rotated, str) and rotated else None)
        error = str(body.get("error", "")) if body else ""
        words = error + (f": {body['error_description']}" if body.get("error_description") else "")
        words = words or f"HTTP {status}: {text[:200].strip()}"
        if status >= 500 or status == 429 or (status == 200):
            raise AccountUnavailable(f"token endpoint {where} failed: {words}", server_text=words)
        if error in _REFUSALS or 400 <= status < 500:
            raise AccountAuthError(f"token endpoint {where} refused the grant: {words}",
                                   server_text=words)
        raise AccountUnavailable(f"token endpoint {where} answered HTTP {status}: {words}",
                                 server_text=words)


def credentials_from_config(account: Account, base_dir: Path) -> OAuthCredentials:
    """Read an oauth2 account's secrets (client secret, refresh token) into credentials."""
    auth = account.auth
    if auth.method != "oauth2" or not auth.client_id or not auth.refresh_token_file:
        raise ValueError(f"account {account.id} does not use auth.method oauth2")
    url, scope = account.oauth_endpoint()
    secret = read_secret(auth.client_secret_file, base_dir) if auth.client_secret_file else None
    return OAuthCredentials(token_endpoint=url, client_id=auth.client_id,
                            refresh_token=read_secret(auth.refresh_token_file, base_dir).strip(),
                            client_secret=secret.strip() if secret else None, scope=scope)
