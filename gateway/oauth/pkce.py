"""PKCE (RFC 7636) verifiers and S256 challenges, and OpenID nonces, for the authorization-code grant.

    verifier = new_verifier()         # kept by the gateway (inside the signed state)
    challenge(verifier)               # sent in the authorization request
    new_nonce()                       # echoed back in the ID token
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = ["challenge", "new_nonce", "new_verifier"]

# RFC 7636 §4.1: code-verifier = 43*128unreserved
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


def new_verifier() -> str:
    """A fresh code verifier: 64 random bytes, base64url without padding (86 characters)."""
    return secrets.token_urlsafe(64)


def challenge(verifier: str) -> str:
    """The S256 code challenge: BASE64URL(SHA256(ASCII(verifier))) without padding (§4.2).

    Raises ValueError for a verifier that is not 43 to 128 unreserved characters."""
    if not isinstance(verifier, str) or not _VERIFIER.match(verifier):
        raise ValueError("a PKCE code verifier is 43 to 128 characters of A-Z a-z 0-9 - . _ ~")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_nonce() -> str:
    """A fresh OpenID Connect nonce: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)
