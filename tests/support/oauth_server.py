"""A loopback OAuth2 / OpenID Connect authorization server for tests (aiohttp, in a thread).

    with TokenServer() as ts:
        refresh = ts.issue_refresh_token("carol@example.test")
        ts.token_url          # POST grant_type=refresh_token -> {"access_token", "expires_in"}
        ts.tokeninfo_url      # Dovecot's oauth2 passdb appends the bearer token to this URL

        ts.register_redirect_uri("http://127.0.0.1:8080/connect/callback")
        ts.authorize_url      # the browser goes here: consent page, then back with ?code=&state=
        ts.consent(url, email="rep@example.test")   # the same decision without a browser
        ts.device_authorization_url; ts.approve_device(user_code, "rep@example.test")
        key = ts.create_service_account(domains=("example.test",))   # Google's JSON key file
        ts.register_client("app-id", "app-secret", mailboxes=("a@example.test",))  # app-only
        ts.revoke("carol@example.test")   # the user removed the app's access

It runs aiohttp in a background thread with its own event loop, so it serves requests
from Dovecot's auth process, from a browser and from the code under test whatever event
loop (or none) the test uses, and it can live for a whole test session. Only 127.0.0.1.
JOSE (ID tokens, JWKS, assertion checks) goes through PyJWT with `cryptography`; PyJWT
is imported on first use, so the refresh-token and tokeninfo parts need nothing but aiohttp.

Behaviour, all thread-safe. Access tokens are opaque (`at-…`); the server's clock is
`time.time()` plus whatever `advance(seconds)` added, so tests expire codes and tokens
without sleeping.

Clients. The default client (`client_id`, `client_secret`) is confidential. More with
`register_client(id, secret | None, redirect_uris=…, mailboxes=…)`: `secret=None` makes a
public client (sends only `client_id`, e.g. a CLI using the device grant). Client
authentication at the token and device endpoints: HTTP basic, or `client_id` and
`client_secret` in the form, or a private-key JWT (`client_assertion_type=
urn:ietf:params:oauth:client-assertion-type:jwt-bearer`, RFC 7523 §2.2, the certificate
way of Microsoft app-only access; keys from `add_client_key`). A wrong or missing client
gets `401 {"error": "invalid_client"}`.

Endpoints (see `discovery_url`, `/.well-known/openid-configuration`, for all of them):

- `GET /authorize` (RFC 6749 §4.1, RFC 7636): `response_type=code`, `client_id`,
  `redirect_uri` (must be registered for the client, exactly), `scope`, `state`,
  `code_challenge` + `code_challenge_method=S256` (required; `plain` is refused), `nonce`,
  `login_hint`. An unknown client or redirect URI gets a 400 page and no redirect; other
  faults go back to the redirect URI as `error=…` (`invalid_request`,
  `unsupported_response_type`) with the `state`. Otherwise a consent page: a real
  `<form method=post>` with an `email` field (who signs in: `sign_in(email)` if set, else
  `login_hint`) and two submit buttons, `#approve` and `#deny`. Approve redirects to
  `redirect_uri?code=…&state=…&iss=…`; deny to `redirect_uri?error=access_denied&state=…`.
  A pending request is decided once; a code lives `code_lifetime` seconds, is bound to the
  client, the redirect URI and the PKCE challenge, and works once (a second use is
  `invalid_grant` and revokes what the first one issued, RFC 6749 §4.1.2).
- `POST /token`, every grant answers `{"access_token", "token_type": "Bearer",
  "expires_in", "scope"}` plus the extras named here, or `400 {"error", …}`:
  - `refresh_token`: a fresh access token (and an `id_token` if the grant had `openid`);
    `invalid_grant` for an unknown or revoked token. With `rotate_refresh_tokens=True` the
    answer carries a new `refresh_token` and the old one stops working (Microsoft does).
  - `authorization_code`: `code`, `redirect_uri`, `code_verifier` checked
    (`BASE64URL(SHA256(verifier)) == challenge`); answers `refresh_token` and, with scope
    `openid`, an `id_token`: RS256 JWT with `iss`, `sub`, `aud` (= client id), `exp`,
    `iat`, `auth_time`, `email`, `email_verified`, `name` and the request's `nonce`.
  - `urn:ietf:params:oauth:grant-type:device_code` (RFC 8628 §3.4): `device_code`,
    client; `authorization_pending` until `approve_device` / `deny_device` (or the
    verification page), `slow_down` when polled sooner than `interval` seconds after the
    last poll (and the interval grows by 5 s), `expired_token` after `device_lifetime`,
    `access_denied` after a deny; then the tokens as for a code, once.
  - `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1, Google domain-wide
    delegation): `assertion` is an RS256 JWT signed with a service account's key
    (`create_service_account`): `iss` = its `client_email`, `aud` = `token_url`, `exp`
    after now and at most 3600 s after `iat`, `iat` not in the future (60 s leeway),
    `scope` claim, `sub` = the mailbox. Bad signature, unknown issuer, wrong audience or
    times: `invalid_grant`; a `sub` outside the account's `domains`: `unauthorized_client`.
    No client authentication, no refresh token.
  - `client_credentials` (Microsoft app-only): an authenticated client, `scope` ending in
    `/.default` (else `invalid_scope`); an app token (no user, no refresh token) that
    stands for every mailbox in the client's `mailboxes` (`grant_mailboxes`).
- `POST /device/code` (RFC 8628 §3.1): `client_id`, `scope` ->
  `{"device_code", "user_code", "verification_uri", "verification_uri_complete",
  "expires_in", "interval"}`. `GET /device` is the verification page (user code, e-mail,
  approve / deny form), `POST /device` its decision.
- `GET /tokeninfo?access_token=T` answers `{"email", "email_verified", "sub", "aud",
  "expires_in", "scope"}` for a live user token and `400 {"error": "invalid_token"}`
  otherwise (the shape of Google's tokeninfo); an app token answers without `email`.
  `GET /tokeninfo/{mailbox}?access_token=T` answers with `email` = mailbox when the token
  may open it: a user token for that mailbox, or an app token granted it. (Dovecot 2.3.19
  does not expand variables in `tokeninfo_url`, and an unexpanded `%u` makes its auth
  process panic, so Dovecot's oauth2 passdb cannot check app tokens per mailbox; an XOAUTH2
  upstream in a test asks `token_allows(token, mailbox)` instead.)
- `GET /userinfo` with `Authorization: Bearer T`: `{"sub", "email", "email_verified",
  "name"}` or `401` with `WWW-Authenticate: Bearer error="invalid_token"`.
- `GET /jwks`: the signing key(s) as a JWK Set. `POST /revoke` (RFC 7009): `token=T`
  revokes that refresh or access token, answers 200 whatever it was.

Test controls: `issue_refresh_token(email)`, `mint_access_token(email, lifetime)`,
`revoke_refresh_token(token)`, `revoke(email)` (every refresh and access token of that
user), `expire_access_tokens()`, `fail_next(status, body, times)` (scripted answers of the
token endpoint, before any check), `set_user(email, email_verified=…, name=…)`,
`sign_in(email)`, `approve_device`, `deny_device`, `advance(seconds)`, `token_allows(token,
mailbox)` (what an XOAUTH2 upstream asks), `grants` (every token request's form fields),
`tokeninfo_requests`, `consents` (the decisions taken).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

__all__ = ["ClientKey", "TokenServer"]

GRANT_CODE = "authorization_code"
GRANT_REFRESH = "refresh_token"
GRANT_DEVICE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"      # RFC 8628 §6.1: no vowels, no look-alikes
_LEEWAY = 60.0


def _jwt() -> Any:
    """PyJWT, imported when a JOSE feature is first used (see the module docstring)."""
    import jwt

    return jwt


def _new_rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _private_pem(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode())


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge of a verifier (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ClientKey:
    """A key pair for private-key JWT client authentication (`add_client_key`)."""

    client_id: str
    key_id: str
    private_key_pem: str


@dataclass
class _Client:
    secret: str | None                                  # None: a public client
    redirect_uris: set[str] = field(default_factory=set)
    keys: dict[str, Any] = field(default_factory=dict)  # key id -> public key
    mailboxes: set[str] = field(default_factory=set)    # app-only access granted


@dataclass
class _User:
    email: str
    sub: str
    email_verified: bool = True
    name: str = ""


@dataclass
class _Refresh:
    email: str
    client_id: str | None
    scope: str


@dataclass
class _Access:
    email: str | None             # None: an app token (client credentials)
    expiry: float
    scope: str
    client_id: str | None


@dataclass
class _Pending:
    client_id: str
    redirect_uri: str
    state: str | None
    scope: str
    code_challenge: str
    nonce: str | None
    login_hint: str


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    email: str
    scope: str
    code_challenge: str
    nonce: str | None
    expiry: float
    auth_time: int
    used: bool = False
    issued: list[str] = field(default_factory=list)


@dataclass
class _Device:
    client_id: str
    user_code: str
    scope: str
    expiry: float
    interval: int
    last_poll: float | None = None
    status: str = "pending"       # pending | approved | denied
    email: str = ""
    auth_time: int = 0


@dataclass
class _ServiceAccount:
    client_email: str
    client_id: str
    key_id: str
    public_key: Any
    domains: set[str]


@dataclass
class _State:
    clients: dict[str, _Client] = field(default_factory=dict)
    users: dict[str, _User] = field(default_factory=dict)
    refresh: dict[str, _Refresh] = field(default_factory=dict)
    access: dict[str, _Access] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)
    devices: dict[str, _Device] = field(default_factory=dict)        # device code -> grant
    service_accounts: dict[str, _ServiceAccount] = field(default_factory=dict)  # by client_email
    scripted: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    grants: list[dict[str, str]] = field(default_factory=list)
    consents: list[dict[str, str]] = field(default_factory=list)
    tokeninfo_requests: int = 0
    signed_in: str | None = None
    skew: float = 0.0


class _OAuthError(Exception):
    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(error)
        self.error, self.description, self.status = error, description, status

    def response(self) -> web.Response:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        headers = {"WWW-Authenticate": 'Basic realm="token"'} if self.status == 401 else None
        return web.json_response(body, status=self.status, headers=headers)


def _with_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _page(title: str, body: str, status: int = 200) -> web.Response:
    doc = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return web.Response(text=doc, status=status, content_type="text/html")


class TokenServer:
    """OAuth2 / OpenID authorization server on 127.0.0.1 in a thread (see the module docstring)."""

    def __init__(self, *, client_id: str = "mailgw-test", client_secret: str = "s3cret",
                 access_lifetime: float = 3600.0, scope: str = "https://mail.example.test/",
                 code_lifetime: float = 60.0, device_lifetime: float = 900.0, device_interval: int = 5,
                 rotate_refresh_tokens: bool = False, redirect_uris: tuple[str, ...] = ()) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_lifetime = access_lifetime
        self.scope = scope
        self.code_lifetime = code_lifetime
        self.device_lifetime = device_lifetime
        self.device_interval = device_interval
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.port = 0
        self._state = _State(clients={client_id: _Client(client_secret, set(redirect_uris))})
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._signing_key: Any = None
        self.signing_key_id = "idp-" + secrets.token_hex(4)

    # -- URLs ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def tokeninfo_url(self) -> str:
        return f"{self.base_url}/tokeninfo?access_token="

    def mailbox_tokeninfo_url(self, mailbox: str) -> str:
        """The tokeninfo URL that answers for `mailbox` (user tokens and granted app tokens)."""
        return f"{self.base_url}/tokeninfo/{mailbox}?access_token="

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def device_authorization_url(self) -> str:
        return f"{self.base_url}/device/code"

    @property
    def verification_url(self) -> str:
        return f"{self.base_url}/device"

    @property
    def userinfo_url(self) -> str:
        return f"{self.base_url}/userinfo"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    @property
    def revocation_url(self) -> str:
        return f"{self.base_url}/revoke"

    @property
    def discovery_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    def _now(self) -> float:
        return time.time() + self._state.skew

    # -- test controls: clients, users, keys ----------------------------------------------
    def register_client(self, client_id: str, secret: str | None, *, redirect_uris: tuple[str, ...] = (),
                        mailboxes: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._state.clients[client_id] = _Client(secret, set(redirect_uris),
                                                     mailboxes={m.lower() for m in mailboxes})

    def register_redirect_uri(self, uri: str, client_id: str | None = None) -> None:
        with self._lock:
            self._state.clients[client_id or self.client_id].redirect_uris.add(uri)

    def grant_mailboxes(self, client_id: str, *mailboxes: str) -> None:
        """App-only access (Exchange's mailbox permission for an app) to these mailboxes."""
        with self._lock:
            self._state.clients[client_id].mailboxes.update(m.lower() for m in mailboxes)

    def add_client_key(self, client_id: str | None = None) -> ClientKey:
        """A key pair the client may sign its `client_assertion` with (header `kid` = key_id)."""
        key = _new_rsa_key()
        cid = client_id or self.client_id
        kid = "ck-" + secrets.token_hex(4)
        with self._lock:
            self._state.clients[cid].keys[kid] = key.public_key()
        return ClientKey(cid, kid, _private_pem(key))

    def set_user(self, email: str, *, email_verified: bool = True, name: str = "") -> None:
        with self._lock:
            user = self._user(email)
            user.email_verified, user.name = email_verified, name or user.name

    def sign_in(self, email: str | None) -> None:
        """Who the browser is signed in as at the provider (fills the consent page's e-mail)."""
        with self._lock:
            self._state.signed_in = email

    def create_service_account(self, *, domains: tuple[str, ...] = ("example.test",),
                               client_email: str | None = None) -> dict[str, str]:
        """A Google service-account JSON key (as downloaded), delegated for `domains`."""
        key = _new_rsa_key()
        email = client_email or f"sa-{secrets.token_hex(3)}@mailgw-test.iam.example.test"
        kid = secrets.token_hex(20)
        numeric_id = str(secrets.randbelow(10**20))
        with self._lock:
            self._state.service_accounts[email] = _ServiceAccount(
                email, numeric_id, kid, key.public_key(), {d.lower() for d in domains})
        return {"type": "service_account", "project_id": "mailgw-test", "private_key_id": kid,
                "private_key": _private_pem(key), "client_email": email, "client_id": numeric_id,
                "auth_uri": self.authorize_url, "token_uri": self.token_url}

    def _user(self, email: str) -> _User:       # with the lock held
        key = email.lower()
        user = self._state.users.get(key)
        if user is None:
            sub = str(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
            user = self._state.users[key] = _User(email, sub, name=email.split("@")[0].title())
        return user

    # -- test controls: tokens ------------------------------------------------------------
    def issue_refresh_token(self, email: str, *, client_id: str | None = None,
                            scope: str | None = None) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._state.refresh[token] = _Refresh(email, client_id, scope or self.scope)
        return token

    def revoke_refresh_token(self, token: str) -> None:
        with self._lock:
            self._state.refresh.pop(token, None)

    def revoke(self, email: str) -> int:
        """The user withdrew the grant: every refresh and access token of `email` stops working.

        Returns how many tokens were revoked."""
        key = email.lower()
        with self._lock:
            gone = [t for t, r in self._state.refresh.items() if r.email.lower() == key]
            gone += [t for t, a in self._state.access.items() if (a.email or "").lower() == key]
            for token in gone:
                self._state.refresh.pop(token, None)
                self._state.access.pop(token, None)
        return len(gone)

    def mint_access_token(self, email: str, lifetime: float | None = None) -> str:
        return self._mint(email, lifetime, self.scope, None)

    def _mint(self, email: str | None, lifetime: float | None, scope: str, client_id: str | None) -> str:
        token = "at-" + secrets.token_urlsafe(24)
        life = self.access_lifetime if lifetime is None else lifetime
        with self._lock:
            self._state.access[token] = _Access(email, self._now() + life, scope, client_id)
        return token

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid (as if their lifetime had passed)."""
        with self._lock:
            for entry in self._state.access.values():
                entry.expiry = 0.0

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward (codes, device codes and tokens expire by it)."""
        with self._lock:
            self._state.skew += seconds

    def fail_next(self, status: int, body: dict[str, Any] | None = None, times: int = 1) -> None:
        with self._lock:
            self._state.scripted.extend([(status, body or {"error": "temporarily_unavailable"})] * times)

    def token_allows(self, token: str, mailbox: str) -> bool:
        """Whether `token` opens `mailbox` (what an XOAUTH2 upstream in a test should ask)."""
        with self._lock:
            return self._allows(token, mailbox)

    def _allows(self, token: str, mailbox: str) -> bool:      # with the lock held
        entry = self._state.access.get(token)
        if entry is None or entry.expiry <= self._now():
            return False
        if entry.email is not None:
            return entry.email.lower() == mailbox.lower()
        client = self._state.clients.get(entry.client_id or "")
        return client is not None and mailbox.lower() in client.mailboxes

    @property
    def grants(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._state.grants)

    @property
    def consents(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._state.consents)

    @property
    def tokeninfo_requests(self) -> int:
        with self._lock:
            return self._state.tokeninfo_requests

    # -- JOSE -----------------------------------------------------------------------------
    @property
    def jwks(self) -> dict[str, Any]:
        jwk = _jwt().algorithms.RSAAlgorithm.to_jwk(self._key().public_key(), as_dict=True)
        jwk.update({"kid": self.signing_key_id, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def _key(self) -> Any:
        with self._lock:
            if self._signing_key is None:
                self._signing_key = _new_rsa_key()
            return self._signing_key

    def _id_token(self, email: str, client_id: str, nonce: str | None, auth_time: int) -> str:
        with self._lock:
            user = self._user(email)
            now = int(self._now())
            claims: dict[str, Any] = {"iss": self.issuer, "sub": user.sub, "aud": client_id,
                                      "iat": now, "exp": now + int(self.access_lifetime),
                                      "auth_time": auth_time, "email": user.email,
                                      "email_verified": user.email_verified, "name": user.name}
        if nonce:
            claims["nonce"] = nonce
        return str(_jwt().encode(claims, self._key(), algorithm="RS256",
                                 headers={"kid": self.signing_key_id}))

    def _verify_assertion(self, assertion: str, key: Any, issuer: str) -> dict[str, Any]:
        """Signature (RS256), `iss`, `aud` = token URL, `exp`/`iat` by the server's clock."""
        jwt = _jwt()
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion, key, algorithms=["RS256"], audience=self.token_url, issuer=issuer,
                options={"require": ["iss", "aud", "exp", "iat"], "verify_exp": False,
                         "verify_iat": False, "verify_nbf": False})
        except jwt.InvalidSignatureError as exc:
            raise _OAuthError("invalid_grant", "Invalid JWT Signature.") from exc
        except jwt.InvalidAudienceError as exc:
            raise _OAuthError("invalid_grant", "Invalid JWT: audience is not the token endpoint.") from exc
        except jwt.PyJWTError as exc:
            raise _OAuthError("invalid_grant", f"Invalid JWT: {exc}") from exc
        now = self._now()
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise _OAuthError("invalid_grant", "Invalid JWT: exp and iat must be numbers.")
        short = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
        if exp <= now - _LEEWAY:
            raise _OAuthError("invalid_grant", short + " Token has expired.")
        if iat > now + _LEEWAY or exp - iat > 3600:
            raise _OAuthError("invalid_grant", short + " Check your iat and exp values.")
        return claims

    def _unverified(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        jwt = _jwt()
        try:
            return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _OAuthError("invalid_grant", f"Invalid JWT: {exc}") from exc

    # -- the authorization decision (shared by the page and `consent`) ------------------------
    def _begin(self, params: dict[str, str]) -> tuple[str, str]:
        """-> ("page", pending id) | ("redirect", location); raises ValueError for a 400 page."""
        client_id, redirect_uri = params.get("client_id", ""), params.get("redirect_uri", "")
        with self._lock:
            client = self._state.clients.get(client_id)
            if client is None:
                raise ValueError("invalid_request: unknown client_id")
            if redirect_uri not in client.redirect_uris:
                raise ValueError("invalid_request: redirect_uri is not registered for this client")
        state = params.get("state")

        def back(error: str, description: str) -> tuple[str, str]:
            answer = {"error": error, "error_description": description}
            if state is not None:
                answer["state"] = state
            return "redirect", _with_query(redirect_uri, answer)

        if params.get("response_type") != "code":
            return back("unsupported_response_type", "only response_type=code")
        challenge = params.get("code_challenge", "")
        if not challenge:
            return back("invalid_request", "code_challenge is required (PKCE)")
        if params.get("code_challenge_method", "plain") != "S256":
            return back("invalid_request", "code_challenge_method must be S256")
        pending_id = secrets.token_urlsafe(16)
        with self._lock:
            self._state.pending[pending_id] = _Pending(
                client_id, redirect_uri, state, params.get("scope", ""), challenge,
                params.get("nonce") or None, params.get("login_hint", ""))
        return "page", pending_id

    def _decide(self, pending_id: str, approve: bool, email: str) -> str:
        """-> the redirect location; raises ValueError for an unknown (or decided) request."""
        with self._lock:
            pending = self._state.pending.pop(pending_id, None)
            if pending is None:
                raise ValueError("invalid_request: no such authorization request (already decided?)")
            self._state.consents.append({"client_id": pending.client_id, "email": email,
                                         "decision": "approve" if approve else "deny",
                                         "scope": pending.scope})
            answer: dict[str, str] = {}
            if not approve:
                answer = {"error": "access_denied", "error_description": "The user denied access."}
            elif not email or "@" not in email:
                answer = {"error": "access_denied", "error_description": "No account was signed in."}
            else:
                code = "ac-" + secrets.token_urlsafe(24)
                self._state.codes[code] = _Code(
                    pending.client_id, pending.redirect_uri, email, pending.scope, pending.code_challenge,
                    pending.nonce, self._now() + self.code_lifetime, int(self._now()))
                self._user(email)
                answer = {"code": code, "iss": self.issuer}
            if pending.state is not None:
                answer["state"] = pending.state
            return _with_query(pending.redirect_uri, answer)

    def consent(self, authorization_url: str, *, email: str | None = None, approve: bool = True) -> str:
        """Decide an authorization request as the consent page would; -> the redirect location.

        `email` defaults to who is signed in, then the request's `login_hint`. Raises
        ValueError where the page would show a 400 error."""
        params = dict(parse_qsl(urlsplit(authorization_url).query, keep_blank_values=True))
        kind, value = self._begin(params)
        if kind == "redirect":
            return value
        with self._lock:
            who = email or self._state.signed_in or self._state.pending[value].login_hint
        return self._decide(value, approve, who)

    def approve_device(self, user_code: str, email: str) -> None:
        self._device_decision(user_code, True, email)

    def deny_device(self, user_code: str) -> None:
        self._device_decision(user_code, False, "")

    def _device_decision(self, user_code: str, approve: bool, email: str) -> None:
        wanted = user_code.upper().replace("-", "").replace(" ", "")
        with self._lock:
            for grant in self._state.devices.values():
                if grant.user_code.replace("-", "") == wanted and grant.status == "pending" \
                        and grant.expiry > self._now():
                    grant.status = "approved" if approve else "denied"
                    grant.email, grant.auth_time = email, int(self._now())
                    if approve:
                        self._user(email)
                    return
        raise ValueError(f"no pending device authorization with user code {user_code!r}")

    # -- handlers: authorization and device pages -------------------------------------------
    async def _authorize(self, request: web.Request) -> web.Response:
        params = {k: str(v) for k, v in request.query.items()}
        try:
            kind, value = self._begin(params)
        except ValueError as exc:
            return _page("Authorization error", f"<p id=\"error\">{html.escape(str(exc))}</p>", status=400)
        if kind == "redirect":
            return web.Response(status=302, headers={"Location": value})
        with self._lock:
            pending = self._state.pending[value]
            who = self._state.signed_in or pending.login_hint
        scopes = "".join(f"<li>{html.escape(s)}</li>" for s in pending.scope.split())
        body = (f"<p><b>{html.escape(pending.client_id)}</b> wants to access your account:</p>\n"
                f"<ul id=\"scopes\">{scopes}</ul>\n"
                "<form method=\"post\" action=\"/authorize/decision\">\n"
                f"<input type=\"hidden\" name=\"request\" value=\"{html.escape(value)}\">\n"
                "<label>Signed in as <input type=\"email\" name=\"email\" id=\"email\" "
                f"value=\"{html.escape(who)}\"></label>\n"
                "<button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Allow</button>\n"
                "<button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button>\n"
                "</form>")
        return _page("Sign in with the test provider", body)

    async def _authorize_decision(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        try:
            location = self._decide(form.get("request", ""), form.get("decision") == "approve",
                                    form.get("email", "").strip())
        except ValueError as exc:
            return _page("Authorization error", f"<p id=\"error\">{html.escape(str(exc))}</p>", status=400)
        return web.Response(status=302, headers={"Location": location})

    async def _device_page(self, request: web.Request) -> web.Response:
        code = html.escape(request.query.get("user_code", ""))
        with self._lock:
            who = html.escape(self._state.signed_in or "")
        body = ("<form method=\"post\" action=\"/device\">\n"
                f"<label>Code <input name=\"user_code\" id=\"user_code\" value=\"{code}\"></label>\n"
                "<label>Signed in as <input type=\"email\" name=\"email\" id=\"email\" "
                f"value=\"{who}\"></label>\n"
                "<button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Allow</button>\n"
                "<button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button>\n"
                "</form>")
        return _page("Connect a device", body)

    async def _device_decide(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        approve = form.get("decision") == "approve"
        try:
            self._device_decision(form.get("user_code", ""), approve, form.get("email", "").strip())
        except ValueError as exc:
            return _page("Device error", f"<p id=\"error\">{html.escape(str(exc))}</p>", status=400)
        done = "You may close this window." if approve else "Access was denied."
        return _page("Device connected" if approve else "Device denied", f"<p id=\"done\">{done}</p>")

    # -- handlers: token, device code, revocation --------------------------------------------
    def _client_auth(self, request: web.Request, form: dict[str, str]) -> str:
        """The authenticated client's id; raises `_OAuthError` invalid_client (401)."""
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        basic = request.headers.get("Authorization", "")
        if basic.lower().startswith("basic "):
            with contextlib.suppress(ValueError):
                client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
        assertion = form.get("client_assertion")
        if assertion is not None:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                raise _OAuthError("invalid_client", "unsupported client_assertion_type", 401)
            header, claims = self._unverified(assertion)
            cid = str(claims.get("iss", ""))
            with self._lock:
                client = self._state.clients.get(cid)
                key = client.keys.get(str(header.get("kid", ""))) if client else None
            if key is None or (client_id and client_id != cid) or claims.get("sub") != cid:
                raise _OAuthError("invalid_client", "unknown client or key", 401)
            try:
                self._verify_assertion(assertion, key, cid)
            except _OAuthError as exc:
                raise _OAuthError("invalid_client", exc.description, 401) from exc
            return cid
        with self._lock:
            client = self._state.clients.get(client_id)
        if not client_id or client is None:
            raise _OAuthError("invalid_client", "", 401)
        if client.secret is not None and secret != client.secret:
            raise _OAuthError("invalid_client", "", 401)
        return client_id

    def _tokens(self, email: str, client_id: str, scope: str, nonce: str | None, auth_time: int,
                *, refresh: bool) -> tuple[dict[str, Any], list[str]]:
        access = self._mint(email, None, scope, client_id)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                                "expires_in": int(self.access_lifetime), "scope": scope}
        issued = [access]
        if refresh:
            body["refresh_token"] = self.issue_refresh_token(email, client_id=client_id, scope=scope)
            issued.append(body["refresh_token"])
        if "openid" in scope.split():
            body["id_token"] = self._id_token(email, client_id, nonce, auth_time)
        return body, issued

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        with self._lock:
            self._state.grants.append(form)
            if self._state.scripted:
                status, body = self._state.scripted.pop(0)
                return web.json_response(body, status=status)
        grant = form.get("grant_type", "")
        try:
            if grant == GRANT_JWT_BEARER:
                return web.json_response(self._jwt_bearer(form))
            client_id = self._client_auth(request, form)
            if grant == GRANT_REFRESH:
                return web.json_response(self._refresh(form, client_id))
            if grant == GRANT_CODE:
                return web.json_response(self._code(form, client_id))
            if grant == GRANT_DEVICE:
                return web.json_response(self._device_token(form, client_id))
            if grant == GRANT_CLIENT_CREDENTIALS:
                return web.json_response(self._client_credentials(form, client_id))
            raise _OAuthError("unsupported_grant_type")
        except _OAuthError as exc:
            return exc.response()

    def _refresh(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        old = form.get("refresh_token", "")
        with self._lock:
            entry = self._state.refresh.get(old)
            if entry is None or (entry.client_id is not None and entry.client_id != client_id):
                raise _OAuthError("invalid_grant", "Token has been expired or revoked.")
            if self.rotate_refresh_tokens:
                del self._state.refresh[old]
        if "openid" not in entry.scope.split():
            body: dict[str, Any] = {"access_token": self._mint(entry.email, None, entry.scope, client_id),
                                    "token_type": "Bearer", "expires_in": int(self.access_lifetime),
                                    "scope": entry.scope}
        else:
            body, _ = self._tokens(entry.email, client_id, entry.scope, None, int(self._now()), refresh=False)
        if self.rotate_refresh_tokens:
            body["refresh_token"] = self.issue_refresh_token(entry.email, client_id=entry.client_id,
                                                             scope=entry.scope)
        return body

    def _code(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        with self._lock:
            grant = self._state.codes.get(form.get("code", ""))
            if grant is None or grant.client_id != client_id:
                raise _OAuthError("invalid_grant", "unknown authorization code")
            if grant.used:          # replayed: revoke what the first exchange issued
                for token in grant.issued:
                    self._state.access.pop(token, None)
                    self._state.refresh.pop(token, None)
                raise _OAuthError("invalid_grant", "authorization code already used")
            grant.used = True
            if grant.expiry <= self._now():
                raise _OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not verifier:
            raise _OAuthError("invalid_request", "code_verifier is required")
        if not secrets.compare_digest(s256(verifier), grant.code_challenge):
            raise _OAuthError("invalid_grant", "PKCE verification failed")
        body, issued = self._tokens(grant.email, client_id, grant.scope, grant.nonce, grant.auth_time,
                                    refresh=True)
        with self._lock:
            grant.issued = issued
        return body

    def _device_token(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        code = form.get("device_code", "")
        with self._lock:
            grant = self._state.devices.get(code)
            if grant is None or grant.client_id != client_id:
                raise _OAuthError("invalid_grant", "unknown device_code")
            now = self._now()
            if grant.expiry <= now:
                raise _OAuthError("expired_token", "the device code has expired")
            if grant.status == "denied":
                del self._state.devices[code]
                raise _OAuthError("access_denied", "the user denied the request")
            if grant.status == "pending":
                too_soon = grant.last_poll is not None and now - grant.last_poll < grant.interval
                grant.last_poll = now
                if too_soon:
                    grant.interval += 5
                    raise _OAuthError("slow_down", f"poll at most every {grant.interval} s")
                raise _OAuthError("authorization_pending")
            del self._state.devices[code]
        body, _ = self._tokens(grant.email, client_id, grant.scope, None, grant.auth_time, refresh=True)
        return body

    def _jwt_bearer(self, form: dict[str, str]) -> dict[str, Any]:
        assertion = form.get("assertion", "")
        if not assertion:
            raise _OAuthError("invalid_request", "assertion is required")
        _, unverified = self._unverified(assertion)
        with self._lock:
            account = self._state.service_accounts.get(str(unverified.get("iss", "")))
        if account is None:
            raise _OAuthError("invalid_grant", "Invalid grant: account not found")
        claims = self._verify_assertion(assertion, account.public_key, account.client_email)
        scope = str(claims.get("scope") or form.get("scope") or "")
        if not scope:
            raise _OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        sub = claims.get("sub")
        if not sub:        # the service account for itself: no mailbox
            return {"access_token": self._mint(None, None, scope, account.client_id),
                    "token_type": "Bearer", "expires_in": int(self.access_lifetime), "scope": scope}
        if str(sub).rpartition("@")[2].lower() not in account.domains:
            raise _OAuthError("unauthorized_client", "Client is unauthorized to retrieve access tokens "
                                                     "using this method, or client not authorized for any "
                                                     "of the scopes requested.")
        with self._lock:
            self._user(str(sub))
        return {"access_token": self._mint(str(sub), None, scope, account.client_id),
                "token_type": "Bearer", "expires_in": int(self.access_lifetime), "scope": scope}

    def _client_credentials(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        scope = form.get("scope", "")
        if not scope or not all(s.endswith("/.default") for s in scope.split()):
            raise _OAuthError("invalid_scope", "The scope for client credentials must be RESOURCE/.default")
        return {"access_token": self._mint(None, None, scope, client_id), "token_type": "Bearer",
                "expires_in": int(self.access_lifetime), "scope": scope}

    async def _device_code(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        try:
            client_id = self._client_auth(request, form)
        except _OAuthError as exc:
            return exc.response()
        device_code = "dc-" + secrets.token_urlsafe(24)
        letters = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        user_code = f"{letters[:4]}-{letters[4:]}"
        with self._lock:
            self._state.devices[device_code] = _Device(
                client_id, user_code, form.get("scope", ""), self._now() + self.device_lifetime,
                self.device_interval)
        return web.json_response({
            "device_code": device_code, "user_code": user_code, "verification_uri": self.verification_url,
            "verification_uri_complete": f"{self.verification_url}?user_code={user_code}",
            "expires_in": int(self.device_lifetime), "interval": self.device_interval})

    async def _revoke(self, request: web.Request) -> web.Response:
        token = str((await request.post()).get("token", ""))
        with self._lock:
            self._state.refresh.pop(token, None)
            self._state.access.pop(token, None)
        return web.Response(status=200)

    # -- handlers: token info, userinfo, JWKS, discovery --------------------------------------
    async def _tokeninfo(self, request: web.Request) -> web.Response:
        token = request.query.get("access_token", "")
        mailbox = request.match_info.get("mailbox")
        with self._lock:
            self._state.tokeninfo_requests += 1
            entry = self._state.access.get(token)
            now = self._now()
            refused = mailbox is not None and not self._allows(token, mailbox)
            if entry is None or entry.expiry <= now or refused:
                return web.json_response({"error": "invalid_token"}, status=400)
            info: dict[str, Any] = {"expires_in": int(entry.expiry - now), "scope": entry.scope}
            if entry.client_id:
                info["aud"] = entry.client_id
            if entry.email is not None:
                user = self._user(entry.email)
                info.update({"email": entry.email, "sub": user.sub,
                             "email_verified": "true" if user.email_verified else "false"})
            if mailbox is not None:
                info["email"] = mailbox
        return web.json_response(info)

    async def _userinfo(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        with self._lock:
            entry = self._state.access.get(token)
            if entry is None or entry.expiry <= self._now() or entry.email is None:
                return web.json_response({"error": "invalid_token"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            user = self._user(entry.email)
            return web.json_response({"sub": user.sub, "email": user.email,
                                      "email_verified": user.email_verified, "name": user.name})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks)

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "device_authorization_endpoint": self.device_authorization_url,
            "userinfo_endpoint": self.userinfo_url,
            "jwks_uri": self.jwks_url,
            "revocation_endpoint": self.revocation_url,
            "response_types_supported": ["code"],
            "grant_types_supported": [GRANT_CODE, GRANT_REFRESH, GRANT_DEVICE, GRANT_JWT_BEARER,
                                      GRANT_CLIENT_CREDENTIALS],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post",
                                                      "private_key_jwt", "none"],
            "scopes_supported": ["openid", "email", "profile", "offline_access"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "email",
                                 "email_verified", "name"],
        })

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> TokenServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def setup() -> None:
                app = web.Application()
                app.router.add_post("/token", self._token)
                app.router.add_get("/tokeninfo", self._tokeninfo)
                app.router.add_get("/tokeninfo/{mailbox}", self._tokeninfo)
                app.router.add_get("/authorize", self._authorize)
                app.router.add_post("/authorize/decision", self._authorize_decision)
                app.router.add_post("/device/code", self._device_code)
                app.router.add_get("/device", self._device_page)
                app.router.add_post("/device", self._device_decide)
                app.router.add_post("/revoke", self._revoke)
                app.router.add_get("/userinfo", self._userinfo)
                app.router.add_get("/jwks", self._jwks)
                app.router.add_get("/.well-known/openid-configuration", self._discovery)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self.port = runner.addresses[0][1]
                self._runner = runner

            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="token-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("token server did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


OAuthServer = TokenServer
