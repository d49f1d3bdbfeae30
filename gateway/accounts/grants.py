"""The OAuth 2.0 / OpenID Connect grants of connected accounts, over HTTP (aiohttp).

    grants = GrantClient()
    url = grants.authorization_url(provider, client, redirect_uri=…, state=…,
                                   code_challenge=pkce.challenge(v), nonce=n)
    tokens = await grants.exchange_code(provider, client, code=…, redirect_uri=…, code_verifier=v)
    who = await grants.verify_id_token(provider, client.client_id, tokens.id_token, nonce=n)
    tokens = await grants.refresh(provider, client, refresh_token)
    device = await grants.start_device(provider, client); tokens = await grants.poll_device(…)
    tokens = await grants.jwt_bearer(ServiceAccountKey.from_json(text, path), subject=mailbox,
                                     scope="https://mail.google.com/")
    tokens = await grants.client_credentials(provider, client, scope=provider.app_scope)
    await grants.close()

Grants: refresh token (RFC 6749 §6), authorization code with PKCE (§4.1, RFC 7636), device
authorization (RFC 8628), JWT bearer (RFC 7523 §2.1, Google domain-wide delegation) and
client credentials (§4.4, Microsoft app-only access, with a secret or a certificate's
private-key JWT, RFC 7523 §2.2). A confidential client authenticates with
`client_secret_post` (its id and secret in the form) or that JWT; a public client sends
only its id. ID tokens are verified against the provider's JWK Set, fetched once, kept,
and fetched again (once per token) when a token names a key the set does not hold.

Errors are typed as gateway.imap.oauth's refresh always did: a refusal by the endpoint (an
RFC 6749 §5.2 error such as `invalid_grant`, any other 4xx) raises AccountAuthError (the
account needs reconnecting; the endpoint's words in `server_text`); 5xx, 408, 429,
`temporarily_unavailable`, timeouts, network errors and unreadable answers raise
AccountUnavailable (try again later); an ID token that fails verification raises
AccountAuthError saying why. Messages and reprs never hold a secret or a token.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from gateway.errors import AccountAuthError, AccountError, AccountTimeout, AccountUnavailable
from gateway.oauth import jwt as oauth_jwt
from gateway.oauth.providers import OAuthClient, OAuthProvider, authorization_url, from_discovery

__all__ = [
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_CODE",
    "GRANT_DEVICE",
    "GRANT_JWT_BEARER",
    "GRANT_REFRESH",
    "DeviceAuthorization",
    "GrantClient",
    "Identity",
    "ServiceAccountKey",
    "TokenResponse",
]

GRANT_REFRESH = "refresh_token"
GRANT_CODE = "authorization_code"
GRANT_DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

# Every 4xx answer is a refusal (RFC 6749 §5.2: invalid_grant, invalid_client,
# unauthorized_client, invalid_scope, access_denied, ...) except these, which say "later"
_TRANSIENT = frozenset({"temporarily_unavailable", "server_error"})
_TOKEN_WORDS = ("access_token", "refresh_token", "id_token", "device_code")
_MAX_BODY = 1 << 20           # bytes read from any endpoint's answer
_MAX_WORDS = 300              # characters of the endpoint's words kept in an error
_DEFAULT_LIFETIME = 3600.0    # expires_in is RECOMMENDED, not required (RFC 6749 §5.1)
_DEVICE_INTERVAL = 5.0        # RFC 8628 §3.2: the default polling interval
_SLOW_DOWN = 5.0              # RFC 8628 §3.5: seconds added on each slow_down
_JWKS_MAX_AGE = 86400.0       # a kept JWK Set is fetched again after a day


@dataclass(frozen=True)
class TokenResponse:
    """A token endpoint's successful answer (RFC 6749 §5.1), its expiry as a clock time."""

    access_token: str
    expires_at: float
    refresh_token: str | None = None      # a new one when the endpoint rotates them
    id_token: str | None = None
    scope: str | None = None

    def __repr__(self) -> str:  # never print the tokens
        return (f"TokenResponse(expires_at={self.expires_at!r}, "
                f"refresh_token={'<hidden>' if self.refresh_token else None}, "
                f"id_token={'<hidden>' if self.id_token else None}, scope={self.scope!r})")


@dataclass(frozen=True)
class DeviceAuthorization:
    """A started device authorization (RFC 8628 §3.2): show `user_code` and
    `verification_uri` to the user, then poll with it."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float

    def __repr__(self) -> str:  # the device code is a bearer credential until used
        return (f"DeviceAuthorization(user_code={self.user_code!r}, "
                f"verification_uri={self.verification_uri!r}, expires_at={self.expires_at!r})")


def _truthy(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


@dataclass(frozen=True)
class Identity:
    """Who signed in, as the provider vouches for it (a verified ID token, or userinfo).

    `email_verified` is true only when the provider says so: OpenID's `email_verified`,
    or Microsoft's `xms_edov` (the e-mail domain's owner verified it). Without an `email`
    claim, Microsoft's `preferred_username` (when it is an address) fills `email`,
    unverified; `email` is empty when there is neither."""

    email: str
    email_verified: bool
    subject: str
    name: str

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Identity:
        email = claims.get("email")
        verified = _truthy(claims.get("email_verified")) or _truthy(claims.get("xms_edov"))
        if not isinstance(email, str) or "@" not in email:
            username = claims.get("preferred_username")
            email = username if isinstance(username, str) and "@" in username else ""
            verified = False
        name = claims.get("name")
        return cls(email=email.strip(), email_verified=verified and bool(email),
                   subject=str(claims.get("sub") or ""), name=name if isinstance(name, str) else "")


@dataclass(frozen=True)
class ServiceAccountKey:
    """A Google service account's key (the JSON file the console downloads)."""

    client_email: str
    private_key_pem: str
    private_key_id: str | None = None
    token_uri: str = GOOGLE_TOKEN_URI

    def __repr__(self) -> str:  # never print the key
        return (f"ServiceAccountKey(client_email={self.client_email!r}, "
                f"private_key_id={self.private_key_id!r})")

    @classmethod
    def from_json(cls, text: str, where: str) -> ServiceAccountKey:
        """Read a key file's text; ValueError naming `where` and the field at fault."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            line = getattr(exc, "lineno", None)
            raise ValueError(f"{where}: not a JSON document" + (f" (line {line})" if line else "")) from None
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: a service-account key is a JSON object")
        kind = doc.get("type", "service_account")
        if kind != "service_account":
            raise ValueError(f"{where}: 'type' is {kind!r}, not 'service_account' "
                             "(an OAuth client file is not a service-account key)")
        for name in ("client_email", "private_key"):
            value = doc.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: the service-account key has no {name!r}")
        email = doc["client_email"].strip()
        if "@" not in email:
            raise ValueError(f"{where}: 'client_email' {email!r} is not an address")
        pem = doc["private_key"]
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        try:
            key = load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: 'private_key' is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{where}: 'private_key' is not an RSA key (RS256 signs the assertion)")
        key_id = doc.get("private_key_id")
        if key_id is not None and not isinstance(key_id, str):
            raise ValueError(f"{where}: 'private_key_id' is not a string")
        token_uri = doc.get("token_uri", GOOGLE_TOKEN_URI)
        if not isinstance(token_uri, str) or not token_uri.startswith(("https://", "http://")):
            raise ValueError(f"{where}: 'token_uri' is not an http(s) URL")
        return cls(client_email=email, private_key_pem=pem, private_key_id=key_id or None,
                   token_uri=token_uri)


def _words(status: int, text: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """(the error code, the endpoint's words) of a failed answer."""
    error = str(body.get("error") or "")
    description = body.get("error_description")
    words = error + (f": {description}" if description else "")
    if not words and body:        # JSON, but not an error: its keys only (it may hold tokens)
        words = f"HTTP {status}: an answer without access_token or error (keys: {', '.join(sorted(body))})"
    elif not words and any(name in text for name in _TOKEN_WORDS):
        words = f"HTTP {status}: an answer that is not JSON"
    elif not words:
        words = f"HTTP {status}: {text[:200]}"
    words = " ".join("".join(c if c.isprintable() else " " for c in words).split())
    return error, words[:_MAX_WORDS]


def _failure(status: int, text: str, body: Mapping[str, Any], what: str) -> AccountError:
    """The error for an endpoint's answer that is not a success (see the module docstring)."""
    error, words = _words(status, text, body)
    if status >= 500 or status in (408, 429) or status < 400 or error in _TRANSIENT:
        return AccountUnavailable(f"{what} failed: {words}", server_text=words)
    return AccountAuthError(f"{what} refused: {words}", server_text=words)


class GrantClient:
    """The OAuth grants over one aiohttp session (see the module docstring)."""

    def __init__(self, *, session: aiohttp.ClientSession | None = None, timeout: float = 30.0,
                 clock: Callable[[], float] = time.time, log: Any = None) -> None:
        self.timeout = timeout
        self.clock = clock
        self.log = log or structlog.get_logger("mailgw.accounts")
        self._session = session
        self._own_session = session is None
        self._jwks: dict[str, tuple[float, dict[str, Any]]] = {}   # jwks_uri -> (fetched, set)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    # -- HTTP ---------------------------------------------------------------------------
    async def _call(self, method: str, url: str, what: str, *, data: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None) -> tuple[int, str, dict[str, Any]]:
        """(status, text, JSON object or {}) of one request; AccountUnavailable if none came."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout), self._session.request(
                    method, url, data=dict(data) if data is not None else None,
                    headers={"Accept": "application/json", **(headers or {})},
                    allow_redirects=method == "GET") as resp:
                status = resp.status
                raw = bytearray()
                while chunk := await resp.content.read(65536):
                    raw += chunk
                    if len(raw) > _MAX_BODY:
                        raise AccountUnavailable(f"{what} {url} answered more than {_MAX_BODY} bytes")
        except TimeoutError:
            raise AccountTimeout(f"{what} {url} did not answer within {self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AccountUnavailable(f"{what} {url} unreachable: {type(exc).__name__}: {exc}") from None
        text = raw.decode("utf-8", "replace")
        body: dict[str, Any] = {}
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            body = parsed
        return status, text, body

    def _client_form(self, provider: OAuthProvider, client: OAuthClient) -> dict[str, str]:
        """The client's authentication in the form: client_secret_post, a private-key JWT
        (audience: the token endpoint) or, for a public client, just the id."""
        form = {"client_id": client.client_id}
        if client.private_key_pem:
            form["client_assertion_type"] = oauth_jwt.CLIENT_ASSERTION_TYPE
            form["client_assertion"] = oauth_jwt.client_assertion(
                client, audience=provider.token_endpoint, now=self.clock())
        elif client.client_secret:
            form["client_secret"] = client.client_secret
        return form

    async def _post_token(self, url: str, form: Mapping[str, str],
                          what: str) -> tuple[float, int, str, dict[str, Any]]:
        started = self.clock()
        status, text, body = await self._call("POST", url, what, data=form)
        return started, status, text, body

    def _tokens(self, started: float, status: int, text: str, body: Mapping[str, Any],
                what: str) -> TokenResponse:
        access = body.get("access_token")
        if status != 200 or not isinstance(access, str) or not access:
            raise _failure(status, text, body, what)
        try:
            lifetime = float(body.get("expires_in", _DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            lifetime = _DEFAULT_LIFETIME
        if not math.isfinite(lifetime) or lifetime < 0:
            lifetime = _DEFAULT_LIFETIME

        def text_of(key: str) -> str | None:
            value = body.get(key)
            return value if isinstance(value, str) and value else None

        return TokenResponse(access_token=access, expires_at=started + lifetime,
                             refresh_token=text_of("refresh_token"), id_token=text_of("id_token"),
                             scope=text_of("scope"))

    async def _grant(self, provider: OAuthProvider, client: OAuthClient,
                     form: Mapping[str, str]) -> TokenResponse:
        what = f"token endpoint {provider.token_endpoint} ({form['grant_type']})"
        full = {**form, **self._client_form(provider, client)}
        return self._tokens(*await self._post_token(provider.token_endpoint, full, what), what)

    # -- grants ---------------------------------------------------------------------------
    async def refresh(self, provider: OAuthProvider, client: OAuthClient, refresh_token: str, *,
                      scope: str | None = None) -> TokenResponse:
        """A fresh access token (RFC 6749 §6); `refresh_token` of the answer is set when the
        endpoint rotated it (keep it, the old one may stop working)."""
        form = {"grant_type": GRANT_REFRESH, "refresh_token": refresh_token}
        if scope:
            form["scope"] = scope
        return await self._grant(provider, client, form)

    def authorization_url(self, provider: OAuthProvider, client: OAuthClient, *, redirect_uri: str,
                          state: str, code_challenge: str, nonce: str,
                          login_hint: str | None = None) -> str:
        """Where to send the browser (see gateway.oauth.providers.authorization_url)."""
        return authorization_url(provider, client.client_id, redirect_uri=redirect_uri, state=state,
                                 code_challenge=code_challenge, nonce=nonce, login_hint=login_hint)

    async def exchange_code(self, provider: OAuthProvider, client: OAuthClient, *, code: str,
                            redirect_uri: str, code_verifier: str) -> TokenResponse:
        """The authorization code of the callback for tokens (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        return await self._grant(provider, client, {
            "grant_type": GRANT_CODE, "code": code, "redirect_uri": redirect_uri,
            "code_verifier": code_verifier})

    async def start_device(self, provider: OAuthProvider, client: OAuthClient) -> DeviceAuthorization:
        """Begin a device authorization (RFC 8628 §3.1) for the provider's delegated scopes."""
        url = provider.device_authorization_endpoint
        if not url:
            raise ValueError(f"provider {provider.name} has no device authorization endpoint")
        what = f"device authorization endpoint {url}"
        form = {**self._client_form(provider, client), "scope": provider.scope()}
        started, status, text, body = await self._post_token(url, form, what)
        if status != 200:
            raise _failure(status, text, body, what)
        device_code, user_code = body.get("device_code"), body.get("user_code")
        # Google answers `verification_url`, the RFC `verification_uri`
        uri = body.get("verification_uri") or body.get("verification_url")
        if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
            raise AccountUnavailable(f"{what} answered without device_code, user_code and "
                                     "verification_uri")
        assert isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)
        complete = body.get("verification_uri_complete")
        try:
            lifetime = float(body["expires_in"])
            interval = float(body.get("interval", _DEVICE_INTERVAL))
        except (KeyError, TypeError, ValueError):
            raise AccountUnavailable(f"{what} answered without a usable expires_in") from None
        if not (math.isfinite(lifetime) and math.isfinite(interval)):
            raise AccountUnavailable(f"{what} answered without a usable expires_in")
        return DeviceAuthorization(
            device_code=device_code, user_code=user_code, verification_uri=uri,
            verification_uri_complete=complete if isinstance(complete, str) and complete else None,
            expires_at=started + lifetime, interval=max(1.0, interval))

    async def poll_device(self, provider: OAuthProvider, client: OAuthClient, device: DeviceAuthorization,
                          *, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> TokenResponse:
        """Wait for the user's decision (RFC 8628 §3.4, §3.5): poll every `interval` seconds,
        5 s more after each `slow_down`; the tokens once approved. A denial, an expired
        code or any other refusal raises AccountAuthError with the endpoint's words."""
        what = f"token endpoint {provider.token_endpoint} (device code {device.user_code})"
        interval = device.interval
        while True:
            if self.clock() >= device.expires_at:
                raise AccountAuthError(f"{what}: the code expired before the user approved it",
                                       server_text="expired_token")
            await sleep(interval)
            form = {"grant_type": GRANT_DEVICE, "device_code": device.device_code,
                    **self._client_form(provider, client)}
            started, status, text, body = await self._post_token(provider.token_endpoint, form, what)
            error = body.get("error") if status == 400 else None
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += _SLOW_DOWN
                continue
            return self._tokens(started, status, text, body, what)

    async def jwt_bearer(self, key: ServiceAccountKey, *, subject: str, scope: str,
                         token_uri: str | None = None) -> TokenResponse:
        """An access token for mailbox `subject` from a service account (RFC 7523 §2.1; Google
        domain-wide delegation): no client authentication, no refresh token."""
        url = token_uri or key.token_uri
        what = f"token endpoint {url} (service account {key.client_email} for {subject})"
        assertion = oauth_jwt.bearer_assertion(
            issuer=key.client_email, subject=subject, audience=url, scope=scope,
            private_key_pem=key.private_key_pem, key_id=key.private_key_id, now=self.clock())
        form = {"grant_type": GRANT_JWT_BEARER, "assertion": assertion}
        return self._tokens(*await self._post_token(url, form, what), what)

    async def client_credentials(self, provider: OAuthProvider, client: OAuthClient, *,
                                 scope: str | None = None) -> TokenResponse:
        """An app-only access token (RFC 6749 §4.4; Microsoft: one token for every mailbox
        the app was granted); `scope` defaults to the provider's `app_scope`."""
        scope = scope or provider.app_scope
        if not scope:
            raise ValueError(f"provider {provider.name} has no app-only scope; name one")
        return await self._grant(provider, client, {"grant_type": GRANT_CLIENT_CREDENTIALS,
                                                    "scope": scope})

    # -- OpenID Connect -------------------------------------------------------------------
    async def _fetch_jwks(self, provider: OAuthProvider, uri: str) -> dict[str, Any]:
        what = f"provider {provider.name} key set"
        status, text, body = await self._call("GET", uri, what)
        if status != 200 or not isinstance(body.get("keys"), list):
            _, words = _words(status, text, body)
            raise AccountUnavailable(f"{what} {uri} unusable: {words}", server_text=words)
        self._jwks[uri] = (self.clock(), body)
        return body

    async def verify_id_token(self, provider: OAuthProvider, client_id: str, id_token: str, *,
                              nonce: str | None) -> Identity:
        """Who the ID token names, once its signature (RS256/ES256, a key of the provider's
        JWK Set), issuer, audience, times and nonce check out (see gateway.oauth.jwt);
        AccountAuthError saying why otherwise, AccountUnavailable if the keys cannot be had."""
        if not provider.jwks_uri or not provider.issuer:
            raise ValueError(f"provider {provider.name} needs jwks_uri and issuer to verify ID tokens")
        uri = provider.jwks_uri
        where = f"provider {provider.name}"
        try:
            header = oauth_jwt.unverified_header(id_token)
        except oauth_jwt.IDTokenError as exc:
            raise AccountAuthError(f"{where}: {exc}", server_text=str(exc)) from None
        kept = self._jwks.get(uri)
        fetched = kept is None or self.clock() - kept[0] > _JWKS_MAX_AGE
        jwks = await self._fetch_jwks(provider, uri) if fetched or kept is None else kept[1]
        if oauth_jwt.find_key(jwks, header) is None and not fetched:
            jwks = await self._fetch_jwks(provider, uri)          # the provider rotated its keys
        try:
            claims = oauth_jwt.verify_id_token(id_token, jwks, issuer=provider.issuer,
                                               issuer_aliases=provider.issuer_aliases,
                                               audience=client_id, nonce=nonce, now=self.clock())
        except oauth_jwt.IDTokenError as exc:
            raise AccountAuthError(f"{where}: {exc}", server_text=str(exc)) from None
        return Identity.from_claims(claims)

    async def userinfo(self, provider: OAuthProvider, access_token: str) -> dict[str, Any]:
        """The UserInfo endpoint's claims (OpenID Connect Core §5.3) for a user's access token."""
        url = provider.userinfo_endpoint
        if not url:
            raise ValueError(f"provider {provider.name} has no userinfo endpoint")
        what = f"userinfo endpoint {url}"
        status, text, body = await self._call("GET", url, what,
                                              headers={"Authorization": f"Bearer {access_token}"})
        if status != 200:
            raise _failure(status, text, body, what)
        if not body:
            raise AccountUnavailable(f"{what} answered no JSON object")
        return body

    async def revoke(self, provider: OAuthProvider, client: OAuthClient, token: str) -> None:
        """Ask the provider to revoke a refresh or access token (RFC 7009), best effort: a
        provider without the endpoint, a refusal or an outage is logged, not raised."""
        url = provider.revocation_endpoint
        if not url:
            return
        what = f"revocation endpoint {url}"
        try:
            status, text, body = await self._call(
                "POST", url, what, data={"token": token, **self._client_form(provider, client)})
            if status != 200:
                raise _failure(status, text, body, what)
        except (AccountError, ValueError) as exc:
            self.log.warning("oauth.revoke_failed", provider=provider.name, error=str(exc))

    async def discover(self, name: str, url: str, scopes: tuple[str, ...]) -> OAuthProvider:
        """The provider whose discovery document is at `url` (RFC 8414, OpenID Connect
        Discovery); AccountUnavailable if it cannot be fetched, ValueError if it is unfit
        (a key missing, or an issuer that is not the document's own, §4.3)."""
        what = f"provider {name} discovery document"
        status, text, body = await self._call("GET", url, what)
        if status != 200 or not body:
            _, words = _words(status, text, body)
            raise AccountUnavailable(f"{what} {url} unusable: {words}", server_text=words)
        provider = from_discovery(name, body, scopes)
        suffix = "/.well-known/openid-configuration"
        issuer = provider.issuer or ""
        if (url.endswith(suffix) and "{" not in issuer
                and issuer.rstrip("/") != url[: -len(suffix)].rstrip("/")):
            raise ValueError(f"provider {name}: the discovery document at {url} names issuer "
                             f"{issuer!r}, not its own")
        return provider
