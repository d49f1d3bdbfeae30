"""Secrets at rest: AES-256-GCM over OAuth2 tokens and stored credentials, bound to what they belong to.

`TokenCipher` encrypts an `AccessToken` (and any rotated refresh token) for one account;
a `TokenStore` (the CRM store in production, `MemoryTokenStore` in tests) only ever sees
the ciphertext and the expiry time (`EncryptedToken`). The 32-byte key comes from a secret
(`token_key_file`) or a key file created with mode 0600. `seal`/`unseal` encrypt any
other secret the store keeps (the password or refresh token of an account created at run
time, a connect flow in progress) under a label, so a ciphertext cannot be moved to
another account or purpose.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import ConfigError, Problem

_VERSION = b"\x01"


@dataclass(frozen=True)
class AccessToken:
    """A bearer token and when it expires (epoch seconds)."""

    token: str
    expires_at: float
    refresh_token: str | None = None   # a rotated refresh token, when the endpoint sent one

    def __repr__(self) -> str:
        return f"AccessToken(expires_at={self.expires_at!r})"


@dataclass(frozen=True)
class EncryptedToken:
    """What a TokenStore keeps: ciphertext and the (plain) expiry time."""

    ciphertext: bytes
    expires_at: float


class TokenStore(Protocol):
    """Where encrypted tokens live between runs (the CRM store in production)."""

    async def load(self, account_id: str) -> EncryptedToken | None: ...

    async def save(self, account_id: str, ciphertext: bytes, expires_at: float) -> None: ...


class MemoryTokenStore:
    """A TokenStore in a dict (tests; a gateway without a store keeps tokens for its run)."""

    def __init__(self) -> None:
        self.tokens: dict[str, EncryptedToken] = {}

    async def load(self, account_id: str) -> EncryptedToken | None:
        return self.tokens.get(account_id)

    async def save(self, account_id: str, ciphertext: bytes, expires_at: float) -> None:
        self.tokens[account_id] = EncryptedToken(ciphertext, expires_at)


class TokenCipher:
    """AES-256-GCM over the token JSON, with the account id as associated data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the token key must be 32 bytes")
        self._aead = AESGCM(key)
        self._key = key

    @staticmethod
    def generate_key() -> bytes:
        return AESGCM.generate_key(bit_length=256)

    @classmethod
    def from_secret(cls, text: str, where: str = "token_key_file") -> TokenCipher:
        """A key given as base64 text (from `token_key_file`: a file, env: or credential:)."""
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigError([Problem(where, None, "", "the token key must be the base64 of 32 "
                                       "random bytes (e.g. `head -c32 /dev/urandom | base64`)")])
        return cls(key)

    @classmethod
    def from_key_file(cls, path: Path) -> TokenCipher:
        """Read the key file, creating it (mode 0600, exclusively) with a new key if missing."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = path.stat().st_mode
            if mode & 0o077:
                raise ConfigError([Problem(str(path), None, "", f"mode {mode & 0o777:o} lets others "
                                           "read the token key; chmod 600 it")]) from None
            return cls.from_secret(path.read_text(), str(path))
        key = cls.generate_key()
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    def encrypt(self, account_id: str, token: AccessToken, origin: str) -> bytes:
        payload = json.dumps({"access_token": token.token, "expires_at": token.expires_at,
                              "refresh_token": token.refresh_token, "origin": origin}).encode()
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, payload, _aad(account_id))

    def decrypt(self, account_id: str, blob: bytes) -> tuple[AccessToken, str] | None:
        """The token and the fingerprint of the refresh token it came from; None if unreadable."""
        if len(blob) < 13 + 16 or blob[:1] != _VERSION:
            return None
        try:
            data = json.loads(self._aead.decrypt(blob[1:13], blob[13:], _aad(account_id)))
            return (AccessToken(str(data["access_token"]), float(data["expires_at"]),
                                data.get("refresh_token")), str(data.get("origin", "")))
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None


    def derive(self, label: str) -> bytes:
        """A 32-byte key for another purpose (HKDF-SHA256 of the token key with `label` as
        info): every node sharing `token_key_file` derives the same one."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"mailgw:" + label.encode()).derive(self._key)

    def seal(self, label: str, plaintext: bytes) -> bytes:
        """Encrypt any secret (a stored password or refresh token, a connect flow's PKCE
        verifier) bound to `label` (e.g. "credential:alice"): it decrypts under that label only."""
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, b"mailgw-secret:" + label.encode())

    def unseal(self, label: str, blob: bytes) -> bytes | None:
        """The plaintext `seal` encrypted under `label`; None if it does not decrypt (another
        key, another label, damaged)."""
        if len(blob) < 13 + 16 or blob[:1] != _VERSION:
            return None
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], b"mailgw-secret:" + label.encode())
        except InvalidTag:
            return None


def _aad(account_id: str) -> bytes:
    return b"mailgw-oauth2-token:" + account_id.encode()
