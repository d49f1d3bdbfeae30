"""The JWTs of OAuth 2.0 grants, built and checked with PyJWT: assertions out, ID tokens in (no I/O).

    client_assertion(client, audience=provider.token_endpoint, now=t)        # RFC 7523 §2.2
    bearer_assertion(issuer=…, subject=mailbox, audience=token_uri, scope=…,
                     private_key_pem=…, key_id=…, now=t)                     # RFC 7523 §2.1
    claims = verify_id_token(token, jwks, issuer=…, audience=client_id, nonce=…, now=t)

ID tokens (OpenID Connect Core §3.1.3.7) are accepted only when signed RS256 or ES256
with a key of the provider's JWK Set whose type fits the algorithm: never `none`, never
an HMAC algorithm (which would let a public key act as a shared secret). `iss` must equal
the provider's issuer (Microsoft's multi-tenant issuer takes the token's `tid`), `aud`
must name the client (and `azp` too when there are several audiences), `exp` must not
have passed and `iat` must not lie ahead, by LEEWAY; the nonce of the request must come
back. Every failure raises IDTokenError with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jwt as pyjwt

from gateway.oauth.providers import MICROSOFT_TENANT_PLACEHOLDER, OAuthClient

__all__ = [
    "ALGORITHMS",
    "ASSERTION_LIFETIME",
    "CLIENT_ASSERTION_TYPE",
    "LEEWAY",
    "IDTokenError",
    "bearer_assertion",
    "client_assertion",
    "expected_issuer",
    "find_key",
    "unverified_header",
    "verify_id_token",
]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: the signature algorithms an ID token may use, and the JWK key type each needs
ALGORITHMS: Mapping[str, str] = {"RS256": "RSA", "ES256": "EC"}
LEEWAY = 60.0                 # seconds of clock difference tolerated for exp and iat
ASSERTION_LIFETIME = 3600     # the longest Google accepts (RFC 7523 leaves it to the server)
_CLIENT_ASSERTION_LIFETIME = 600
_TENANT_ID = re.compile(r"^[0-9a-fA-F-]{1,64}$")


class IDTokenError(ValueError):
    """An ID token that must not be believed; the message says why."""


def _thumbprint(certificate_pem: str, algorithm: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise ValueError(f"the client certificate is not a PEM certificate: {exc}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.new(algorithm, der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _sign(claims: dict[str, Any], private_key_pem: str, headers: dict[str, str], what: str) -> str:
    try:
        return pyjwt.encode(claims, private_key_pem, algorithm="RS256", headers=headers or None)
    except (ValueError, TypeError, pyjwt.PyJWTError) as exc:
        # the library's words only: never the key itself
        raise ValueError(f"{what}: the private key cannot sign RS256 ({type(exc).__name__})") from None


def client_assertion(client: OAuthClient, *, audience: str, now: float) -> str:
    """A private-key JWT authenticating `client` at the token endpoint `audience` (RFC 7523
    §2.2, Microsoft's certificate credential): iss = sub = client id, a fresh `jti`, ten
    minutes long; header `x5t#S256` and `x5t` with a certificate, `kid` with a key id."""
    if not client.private_key_pem:
        raise ValueError(f"OAuth client {client.client_id} has no private key")
    headers: dict[str, str] = {}
    if client.certificate_pem:
        headers["x5t#S256"] = _thumbprint(client.certificate_pem, "sha256")
        headers["x5t"] = _thumbprint(client.certificate_pem, "sha1")
    if client.key_id:
        headers["kid"] = client.key_id
    iat = int(now)
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": audience, "iat": iat,
              "nbf": iat, "exp": iat + _CLIENT_ASSERTION_LIFETIME, "jti": secrets.token_urlsafe(16)}
    return _sign(claims, client.private_key_pem, headers, f"OAuth client {client.client_id}")


def bearer_assertion(*, issuer: str, subject: str, audience: str, scope: str, private_key_pem: str,
                     key_id: str | None, now: float) -> str:
    """The JWT-bearer grant's assertion (RFC 7523 §2.1; Google domain-wide delegation):
    iss = the service account, sub = the mailbox it acts for, aud = the token endpoint,
    the `scope` claim, one hour long, header `kid` = the key's id."""
    iat = int(now)
    claims = {"iss": issuer, "sub": subject, "aud": audience, "scope": scope, "iat": iat,
              "exp": iat + ASSERTION_LIFETIME}
    return _sign(claims, private_key_pem, {"kid": key_id} if key_id else {}, f"service account {issuer}")


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWT, unverified; raises IDTokenError for anything else."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise IDTokenError("the ID token is not a signed JWT")
    try:
        header: dict[str, Any] = pyjwt.get_unverified_header(token)
    except pyjwt.PyJWTError as exc:
        raise IDTokenError(f"the ID token is not a signed JWT: {exc}") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise IDTokenError(f"the ID token is signed with {alg!r}; only {', '.join(ALGORITHMS)} are accepted")
    return header


def find_key(jwks: Mapping[str, Any], header: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JWK of `jwks` that may have signed a token with `header`: the one with its
    `kid` (or, without a `kid`, the only signing key of the right type); None if none."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        return None
    kty = ALGORITHMS.get(str(header.get("alg")))
    fits = [k for k in keys if isinstance(k, dict) and k.get("kty") == kty
            and k.get("use", "sig") == "sig" and k.get("alg", header.get("alg")) == header.get("alg")]
    kid = header.get("kid")
    if kid is not None:
        fits = [k for k in fits if k.get("kid") == kid]
    return fits[0] if len(fits) == 1 else None


def expected_issuer(issuer: str, claims: Mapping[str, Any]) -> str:
    """The issuer the token must name: `issuer`, with Microsoft's tenant placeholder
    replaced by the token's (signed) `tid` claim."""
    if MICROSOFT_TENANT_PLACEHOLDER not in issuer:
        return issuer
    tid = claims.get("tid")
    if not isinstance(tid, str) or not _TENANT_ID.match(tid):
        raise IDTokenError("the ID token names no tenant (tid) for the multi-tenant issuer")
    return issuer.replace(MICROSOFT_TENANT_PLACEHOLDER, tid)


def verify_id_token(token: str, jwks: Mapping[str, Any], *, issuer: str, audience: str,
                    nonce: str | None, now: float, leeway: float = LEEWAY,
                    issuer_aliases: Sequence[str] = ()) -> dict[str, Any]:
    """The claims of an ID token signed with a key of `jwks`, checked as the module
    docstring says (`issuer_aliases`: other spellings of the issuer the provider uses);
    raises IDTokenError (an unknown key included)."""
    header = unverified_header(token)
    jwk = find_key(jwks, header)
    if jwk is None:
        raise IDTokenError(f"the ID token is signed with a key the provider does not publish "
                           f"(kid {header.get('kid')!r})")
    alg = str(header["alg"])
    try:
        key = pyjwt.PyJWK(jwk, algorithm=alg)
        claims: dict[str, Any] = pyjwt.decode(
            token, key.key, algorithms=[alg], audience=audience,
            options={"require": ["iss", "sub", "aud", "exp", "iat"], "verify_exp": False,
                     "verify_iat": False, "verify_nbf": False, "verify_iss": False})
    except pyjwt.InvalidSignatureError:
        raise IDTokenError("the ID token's signature does not verify") from None
    except pyjwt.InvalidAudienceError:
        raise IDTokenError(f"the ID token is not meant for this client ({audience})") from None
    except pyjwt.PyJWTError as exc:
        raise IDTokenError(f"the ID token is invalid: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:      # a malformed key in the provider's set
        raise IDTokenError(f"the provider's key {header.get('kid')!r} is unusable: "
                           f"{type(exc).__name__}") from None
    want = expected_issuer(issuer, claims)
    if claims["iss"] != want and claims["iss"] not in issuer_aliases:
        raise IDTokenError(f"the ID token was issued by {claims['iss']!r}, not {want!r}")
    aud = claims["aud"]
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != audience:
        raise IDTokenError("the ID token has several audiences and is not authorized for this client")
    exp, iat = claims["exp"], claims["iat"]
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (exp, iat)):
        raise IDTokenError("the ID token's exp and iat are not times")
    if exp <= now - leeway:
        raise IDTokenError("the ID token has expired")
    if iat > now + leeway:
        raise IDTokenError("the ID token was issued in the future (clock difference?)")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not secrets.compare_digest(got.encode(), nonce.encode()):
            raise IDTokenError("the ID token's nonce is not the one of this sign-in")
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise IDTokenError("the ID token names no subject")
    return claims
