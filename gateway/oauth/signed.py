"""HMAC-SHA256 signed, URL-safe, expiring tokens: the connect flow's `state` and connect links.

    tokens = SignedTokens(key)                                   # 32 bytes or more
    state = tokens.sign("state", {"link": link_id, "verifier": v}, expires_at=now + 600)
    tokens.verify("state", state, now=time.time())              # -> {"link": ..., "verifier": ...}

A token is `BODY.MAC`: BODY is the base64url of a JSON object (the payload and its expiry),
MAC the base64url of HMAC-SHA256 over a version tag, the purpose and BODY (one spelling
only: a token has exactly one string form, so it can be recorded as used). The purpose is
bound into the MAC, so a token signed for one purpose never verifies for another (a
`state` is not a connect link). The payload is signed, not encrypted: whoever holds a token
can read it. Verification compares MACs in constant time before anything else is parsed,
and every fault raises BadSignature or Expired (both ValueError), never anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["BadSignature", "Expired", "InvalidToken", "SignedTokens"]

_VERSION = b"mailgw-signed-v1"
_MIN_KEY = 32
_MAX_TOKEN = 8192          # characters; a URL query stays well below browsers' limits


class InvalidToken(ValueError):
    """A signed token that cannot be accepted (the base of BadSignature and Expired)."""


class BadSignature(InvalidToken):
    """Not a token signed with this key for this purpose (forged, altered, garbage)."""


class Expired(InvalidToken):
    """A genuine token whose time has passed."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SignedTokens:
    """Signs and verifies tokens with one HMAC key (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < _MIN_KEY:
            raise ValueError(f"a signing key is at least {_MIN_KEY} bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:  # never print the key
        return "SignedTokens(key=<hidden>)"

    def _mac(self, purpose: str, body: str) -> bytes:
        message = b"\x00".join((_VERSION, purpose.encode("utf-8"), body.encode("ascii")))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    @staticmethod
    def _check_purpose(purpose: str) -> None:
        if not isinstance(purpose, str) or not purpose or "\x00" in purpose:
            raise ValueError("a token purpose is a non-empty string without NUL")

    def sign(self, purpose: str, payload: Mapping[str, str | int], expires_at: float) -> str:
        """A token carrying `payload` (string and integer values) until `expires_at`."""
        self._check_purpose(purpose)
        for name, value in payload.items():
            if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError(f"signed payload field {name!r}: only strings and integers")
        if not math.isfinite(expires_at):
            raise ValueError("a token's expiry must be a finite time")
        doc = {"d": dict(payload), "e": math.floor(expires_at)}
        body = _b64encode(json.dumps(doc, separators=(",", ":"), sort_keys=True,
                                     ensure_ascii=False).encode("utf-8"))
        token = f"{body}.{_b64encode(self._mac(purpose, body))}"
        if len(token) > _MAX_TOKEN:
            raise ValueError(f"signed token longer than {_MAX_TOKEN} characters: payload too large")
        return token

    def verify(self, purpose: str, token: str, *, now: float) -> dict[str, Any]:
        """The payload of a token signed for `purpose`; raises BadSignature or Expired."""
        self._check_purpose(purpose)
        if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 1:
            raise BadSignature("not a signed token")
        body, mac_text = token.split(".")
        if not body or not token.isascii():
            raise BadSignature("not a signed token")
        # the MAC's one canonical spelling, compared in constant time: a token has one form
        if not hmac.compare_digest(mac_text, _b64encode(self._mac(purpose, body))):
            raise BadSignature("the token's signature does not verify")
        # genuine from here on: the body is what sign() wrote
        try:
            doc = json.loads(_b64decode(body).decode("utf-8"))
            data, expiry = doc["d"], doc["e"]
        except (ValueError, binascii.Error, UnicodeError, KeyError, TypeError):
            raise BadSignature("the token's body is unreadable") from None
        if not isinstance(data, dict) or not isinstance(expiry, int) or isinstance(expiry, bool):
            raise BadSignature("the token's body is unreadable")
        if not now < expiry:          # (a NaN clock expires everything)
            raise Expired("the token has expired")
        return data
