"""OAuth 2.0 / OpenID Connect providers and clients as values: endpoints, scopes, presets.

    provider = PRESETS["google"]()                      # or microsoft("contoso.onmicrosoft.com")
    provider = from_discovery("corp-idp", document, scopes=("openid", "email"))
    client = OAuthClient("client-id", client_secret="…")
    url = authorization_url(provider, client.client_id, redirect_uri=…, state=…,
                            code_challenge=pkce.challenge(verifier), nonce=pkce.new_nonce())

A provider is what a standards-conforming authorization server publishes (RFC 8414 /
OpenID Connect Discovery 1.0): its endpoints, the issuer its ID tokens name, and the
scopes the gateway asks for. Google and Microsoft are presets; any other server is read
from its discovery document. Nothing here does I/O; gateway.accounts.grants talks HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "MICROSOFT_TENANT_PLACEHOLDER",
    "PRESETS",
    "OAuthClient",
    "OAuthProvider",
    "authorization_url",
    "from_discovery",
    "google",
    "microsoft",
]

#: Microsoft's multi-tenant issuer names the signing-in user's tenant: the ID token's `tid`
#: claim replaces this placeholder (as it appears in Microsoft's own discovery documents).
MICROSOFT_TENANT_PLACEHOLDER = "{tenantid}"

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,254}$")


@dataclass(frozen=True)
class OAuthProvider:
    """One authorization server: its endpoints and the scopes the gateway asks it for."""

    name: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    jwks_uri: str | None = None
    userinfo_endpoint: str | None = None
    revocation_endpoint: str | None = None
    #: what an ID token's `iss` must equal; may hold MICROSOFT_TENANT_PLACEHOLDER
    issuer: str | None = None
    #: delegated access (a user's consent): IMAP, SMTP and the user's identity
    scopes: tuple[str, ...] = ()
    #: the client-credentials (app-only) scope, e.g. Microsoft's Exchange Online `.default`
    app_scope: str | None = None
    #: extra query parameters of the authorization request (Google: offline access)
    authorize_params: tuple[tuple[str, str], ...] = ()
    #: other spellings of `issuer` found in the provider's ID tokens (Google's bare host)
    issuer_aliases: tuple[str, ...] = ()

    def scope(self) -> str:
        """The delegated scopes as the `scope` parameter: space-separated (RFC 6749 §3.3)."""
        return " ".join(self.scopes)


@dataclass(frozen=True)
class OAuthClient:
    """The gateway's registration at a provider: an id and (for a confidential client) a
    secret or a private key. A private key signs a `client_assertion` (RFC 7523 §2.2);
    with `certificate_pem` its header carries the certificate's `x5t#S256` and `x5t`
    thumbprints (how Microsoft finds the certificate), with `key_id` a `kid`."""

    client_id: str
    client_secret: str | None = None
    private_key_pem: str | None = None
    certificate_pem: str | None = None
    key_id: str | None = None

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("an OAuth client needs a client_id")
        if self.certificate_pem and not self.private_key_pem:
            raise ValueError(f"OAuth client {self.client_id}: a certificate needs its private key")

    def __repr__(self) -> str:  # never print the secrets
        kind = ("private key" if self.private_key_pem else "secret" if self.client_secret
                else "public")
        return f"OAuthClient(client_id={self.client_id!r}, credential={kind!r})"


def google() -> OAuthProvider:
    """Google accounts (Gmail and Workspace): IMAP/SMTP through https://mail.google.com/."""
    return OAuthProvider(
        name="google",
        authorization_endpoint="https://accounts.google.com/o/oauth2/v2/auth",
        token_endpoint="https://oauth2.googleapis.com/token",
        device_authorization_endpoint="https://oauth2.googleapis.com/device/code",
        jwks_uri="https://www.googleapis.com/oauth2/v3/certs",
        userinfo_endpoint="https://openidconnect.googleapis.com/v1/userinfo",
        revocation_endpoint="https://oauth2.googleapis.com/revoke",
        issuer="https://accounts.google.com",
        issuer_aliases=("accounts.google.com",),     # Google documents both values of `iss`
        scopes=("https://mail.google.com/", "openid", "email"),
        # a refresh token on every consent, not only the first one
        authorize_params=(("access_type", "offline"), ("prompt", "consent")),
    )


def microsoft(tenant: str = "common") -> OAuthProvider:
    """Microsoft identity platform v2.0 (Microsoft 365, Outlook.com) for `tenant`: `common`,
    `organizations`, `consumers`, a tenant id (GUID) or a verified domain."""
    if not _TENANT.match(tenant):
        raise ValueError(f"{tenant!r} is not a Microsoft tenant (common, organizations, consumers, "
                         "a tenant id or a domain)")
    base = f"https://login.microsoftonline.com/{tenant}"
    # ID tokens name the tenant by its id, whatever name it was addressed by
    named = tenant.lower() if _GUID.match(tenant) else None
    issuer = f"https://login.microsoftonline.com/{named or MICROSOFT_TENANT_PLACEHOLDER}/v2.0"
    return OAuthProvider(
        name="microsoft",
        authorization_endpoint=f"{base}/oauth2/v2.0/authorize",
        token_endpoint=f"{base}/oauth2/v2.0/token",
        device_authorization_endpoint=f"{base}/oauth2/v2.0/devicecode",
        jwks_uri=f"{base}/discovery/v2.0/keys",
        userinfo_endpoint="https://graph.microsoft.com/oidc/userinfo",
        revocation_endpoint=None,        # Microsoft has no RFC 7009 endpoint
        issuer=issuer,
        scopes=("https://outlook.office.com/IMAP.AccessAsUser.All", "https://outlook.office.com/SMTP.Send",
                "offline_access", "openid", "email"),
        app_scope="https://outlook.office365.com/.default",
    )


PRESETS: Mapping[str, Callable[..., OAuthProvider]] = {"google": google, "microsoft": microsoft}

# the optional endpoints of a discovery document (RFC 8414 §2, OpenID Connect Discovery §3);
# each is the OAuthProvider field of the same name
_OPTIONAL_KEYS = ("authorization_endpoint", "device_authorization_endpoint", "jwks_uri",
                  "userinfo_endpoint", "revocation_endpoint")


def _url(name: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"provider {name}: discovery document key {key!r} must be a URL, "
                         f"not {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
        raise ValueError(f"provider {name}: discovery document key {key!r} is not an "
                         f"http(s) URL without a fragment: {value!r}")
    return value


def from_discovery(name: str, document: Mapping[str, Any], scopes: Sequence[str]) -> OAuthProvider:
    """The provider a discovery document (RFC 8414 / OpenID Connect Discovery) describes.

    `issuer` and `token_endpoint` are required; the other endpoints are taken when present.
    Raises ValueError naming the key that is missing or not a URL."""
    if not isinstance(document, Mapping):
        raise ValueError(f"provider {name}: the discovery document is not a JSON object")
    for key in ("issuer", "token_endpoint"):
        if key not in document:
            raise ValueError(f"provider {name}: the discovery document has no {key!r}")
    issuer = document["issuer"]
    if not isinstance(issuer, str) or not issuer:
        raise ValueError(f"provider {name}: discovery document key 'issuer' must be a string")
    found = {key: _url(name, key, document[key]) if document.get(key) is not None else None
             for key in _OPTIONAL_KEYS}
    if isinstance(scopes, str):
        raise ValueError(f"provider {name}: scopes must be a list of scopes, not one string")
    return OAuthProvider(
        name=name, token_endpoint=_url(name, "token_endpoint", document["token_endpoint"]),
        authorization_endpoint=found["authorization_endpoint"],
        device_authorization_endpoint=found["device_authorization_endpoint"],
        jwks_uri=found["jwks_uri"], userinfo_endpoint=found["userinfo_endpoint"],
        revocation_endpoint=found["revocation_endpoint"], issuer=issuer, scopes=tuple(scopes))


def authorization_url(provider: OAuthProvider, client_id: str, *, redirect_uri: str, state: str,
                      code_challenge: str, nonce: str, login_hint: str | None = None) -> str:
    """The authorization request (RFC 6749 §4.1.1, PKCE S256 of RFC 7636, OpenID `nonce`)
    the browser is sent to; the endpoint's own query parameters are kept."""
    if not provider.authorization_endpoint:
        raise ValueError(f"provider {provider.name} has no authorization endpoint")
    params = [("response_type", "code"), ("client_id", client_id), ("redirect_uri", redirect_uri),
              ("scope", provider.scope()), ("state", state), ("code_challenge", code_challenge),
              ("code_challenge_method", "S256"), ("nonce", nonce)]
    if login_hint:
        params.append(("login_hint", login_hint))
    taken = {k for k, _ in params}
    params += [(k, v) for k, v in provider.authorize_params if k not in taken]
    parts = urlsplit(provider.authorization_endpoint)
    query = parse_qsl(parts.query, keep_blank_values=True) + params
    return urlunsplit(parts._replace(query=urlencode(query)))
