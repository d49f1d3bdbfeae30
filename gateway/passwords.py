"""Password hashing for SMTP AUTH users: argon2id hashes, verified off the event loop.

Verification is deliberately slow (argon2id, 64 MiB), so successful checks are
cached in memory for a short while under a keyed digest of login and password,
the way Dovecot's auth cache works; a wrong password is never cached as good.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("empty password")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class PasswordChecker:
    """Async verification with a positive cache (ttl seconds) keyed by HMAC(login, password)."""

    def __init__(self, ttl: float = 300.0) -> None:
        self.ttl = ttl
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[str, float]] = {}

    def _digest(self, login: str, password: str) -> bytes:
        msg = login.lower().encode() + b"\0" + password.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    async def check(self, login: str, password: str, password_hash: str | None) -> bool:
        if password_hash is None:
            # unknown user: spend comparable time so logins cannot be enumerated
            await asyncio.to_thread(verify_password, _dummy_hash(), password)
            return False
        d = self._digest(login, password)
        hit = self._cache.get(d)
        now = time.monotonic()
        if hit is not None and hit[0] == password_hash and hit[1] > now:
            return True
        ok = await asyncio.to_thread(verify_password, password_hash, password)
        if ok:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[d] = (password_hash, now + self.ttl)
        return ok


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_HASHER.hash(secrets.token_hex(16)))
    return _DUMMY[0]
