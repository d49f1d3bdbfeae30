"""The OAuth providers in force: presets with the configured overrides, discovery documents fetched once.

    providers = Providers(get_config, grants)
    provider, client = await providers.get("google")          # endpoints + the app's client
    provider, client, scope = await providers.for_account(acct)

An `oauth.providers` entry starts from its preset (google, microsoft; the entry's name
when it names one), then the issuer's discovery document when `discovery: true`, then
the endpoints set explicitly, each overriding what came before. The client id and
secret (or certificate) of the gateway's app registration come from the entry; an
account's own `auth.client_id` / `auth.client_secret_file` / `auth.token_endpoint` take
precedence for that account (as in configurations written before `oauth.providers`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.accounts.grants import GrantClient
from gateway.config import Account, Config, OAuthProviderSettings, read_secret
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.oauth.providers import PRESETS, OAuthClient, OAuthProvider, from_discovery

__all__ = ["Providers", "client_credential"]

_OVERRIDES = ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint",
              "jwks_uri", "userinfo_endpoint", "revocation_endpoint", "issuer")


class Providers:
    """Resolves provider names to endpoints and clients (see the module docstring)."""

    def __init__(self, get_config: Callable[[], Config], grants: GrantClient, *,
                 timeout: float = 15.0) -> None:
        self.get_config = get_config
        self.grants = grants
        self.timeout = timeout
        self._discovered: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> tuple[OAuthProvider, OAuthClient]:
        cfg = self.get_config()
        settings = cfg.oauth.settings(name)
        if settings is None:
            raise AccountAuthError(f"no OAuth provider {name!r} (oauth.providers, or a preset: "
                                   "google, microsoft)")
        provider = await self._provider(name, settings, cfg)
        if not settings.client_id:
            raise AccountAuthError(f"oauth.providers.{name} has no client_id (the gateway's app "
                                   "registration at the provider)")
        return provider, self._client(settings, cfg, name)

    async def for_account(self, acct: Account) -> tuple[OAuthProvider, OAuthClient, str | None]:
        """Provider, client and scope of the refresh-token grant for an oauth2 account."""
        cfg = self.get_config()
        auth = acct.auth
        name = acct.oauth_provider_name
        settings = cfg.oauth.settings(name) if name else None
        if settings is not None and name is not None:
            provider = await self._provider(name, settings, cfg)
        elif auth.token_endpoint:
            provider = OAuthProvider(name="custom", token_endpoint=auth.token_endpoint)
        else:
            raise AccountAuthError(f"account {acct.id}: no OAuth provider (auth.oauth_provider or "
                                   "auth.token_endpoint)")
        if auth.token_endpoint:
            provider = dataclasses.replace(provider, token_endpoint=auth.token_endpoint)
        client_id = auth.client_id or (settings.client_id if settings else None)
        if not client_id:
            raise AccountAuthError(f"account {acct.id}: no client_id (auth.client_id or "
                                   f"oauth.providers.{name}.client_id)")
        if auth.client_id or settings is None:
            secret = read_secret(auth.client_secret_file, cfg.base_dir).strip() \
                if auth.client_secret_file else None
            client = OAuthClient(client_id=client_id, client_secret=secret)
        else:
            client = self._client(settings, cfg, name or "")
        scope = auth.scope or (provider.scope() if provider.scopes and not auth.token_endpoint else None)
        return provider, client, scope

    async def _provider(self, name: str, s: OAuthProviderSettings, cfg: Config) -> OAuthProvider:
        preset = cfg.oauth.preset_of(name)
        if preset is not None:
            make = PRESETS[preset]
            base = make(s.tenant) if preset == "microsoft" else make()
            provider = dataclasses.replace(base, name=name)
        elif s.discovery:
            provider = from_discovery(name, await self._discover(name, s), s.scopes or ())
        else:
            if not s.token_endpoint:
                raise AccountAuthError(f"oauth.providers.{name} has no token_endpoint")
            provider = OAuthProvider(name=name, token_endpoint=s.token_endpoint)
        if preset is not None and s.discovery:
            provider = from_discovery(name, await self._discover(name, s),
                                      s.scopes or provider.scopes)
        changes: dict[str, Any] = {k: getattr(s, k) for k in _OVERRIDES if getattr(s, k)}
        if s.scopes:
            changes["scopes"] = tuple(s.scopes)
        return dataclasses.replace(provider, **changes) if changes else provider

    async def _discover(self, name: str, s: OAuthProviderSettings) -> dict[str, Any]:
        async with self._lock:
            if name in self._discovered:
                return self._discovered[name]
            assert s.issuer is not None
            url = s.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                async with aiohttp.ClientSession() as session, asyncio.timeout(self.timeout), \
                        session.get(url, headers={"Accept": "application/json"}) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise AccountUnavailable(f"discovery {url} answered HTTP {resp.status}")
            except TimeoutError:
                raise AccountUnavailable(f"discovery {url} did not answer in {self.timeout:g}s") from None
            except aiohttp.ClientError as exc:
                raise AccountUnavailable(f"discovery {url} unreachable: {exc}") from None
            try:
                doc = json.loads(text)
            except ValueError:
                raise AccountUnavailable(f"discovery {url} did not answer JSON") from None
            if not isinstance(doc, dict):
                raise AccountUnavailable(f"discovery {url} did not answer a JSON object")
            self._discovered[name] = doc
            return doc

    @staticmethod
    def _client(s: OAuthProviderSettings, cfg: Config, name: str) -> OAuthClient:
        assert s.client_id is not None
        return client_credential(cfg, s.client_id, secret_file=s.client_secret_file,
                                 key_file=s.private_key_file, certificate_file=s.certificate_file,
                                 what=f"oauth.providers.{name}: cannot read the client credential")


def client_credential(cfg: Config, client_id: str, *, secret_file: str | None,
                      key_file: str | None, certificate_file: str | None,
                      what: str) -> OAuthClient:
    """An app registration's client: its secret, or its private key and certificate, read
    from the files the configuration names; AccountUnavailable (`what`) if one is unreadable."""
    try:
        secret = read_secret(secret_file, cfg.base_dir).strip() if secret_file else None
        pem = read_secret(key_file, cfg.base_dir) if key_file else None
        cert = cfg.path(certificate_file).read_text() if certificate_file else None
    except OSError as exc:
        raise AccountUnavailable(f"{what}: {exc.strerror or exc}") from None
    return OAuthClient(client_id=client_id, client_secret=secret, private_key_pem=pem,
                       certificate_pem=cert)
