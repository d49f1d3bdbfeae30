"""Password hashing for SMTP AUTH users: argon2id hashes, verified off the event loop.

Verification is deliberately slow and memory-hungry (argon2id, 64 MiB per check), so
`PasswordChecker` bounds it three ways:

- successful checks are cached in memory for a short while under a keyed digest of
  login and password, the way Dovecot's auth cache works; a wrong password is never
  cached as good;
- concurrent checks of the same login, password and hash share one verification
  (single-flight): twenty sessions of one mail client logging in at once cost one
  argon2 run, not twenty;
- at most `max_concurrent` verifications run at once (default: the CPU count), the
  others wait their turn, so a burst of logins cannot take 64 MiB each at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
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
    """Async verification with a positive cache (ttl seconds) keyed by HMAC(login, password),
    single-flight for identical concurrent checks and a bound on concurrent verifications."""

    def __init__(self, ttl: float = 300.0, max_concurrent: int | None = None) -> None:
        self.ttl = ttl
        self.max_concurrent = max(1, max_concurrent or os.cpu_count() or 1)
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self._inflight: dict[tuple[bytes, str | None], asyncio.Task[bool]] = {}
        self.verifications = 0
        """argon2 verifications run so far (for tests and metrics)."""

    def _digest(self, login: str, password: str) -> bytes:
        msg = login.lower().encode() + b"\0" + password.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    async def _verify(self, password_hash: str | None, password: str) -> bool:
        async with self._slots:
            self.verifications += 1
            if password_hash is None:
                # unknown user: spend comparable time so logins cannot be enumerated
                await asyncio.to_thread(lambda: verify_password(_dummy_hash(), password))
                return False
            return await asyncio.to_thread(verify_password, password_hash, password)

    async def check(self, login: str, password: str, password_hash: str | None) -> bool:
        d = self._digest(login, password)
        if password_hash is not None:
            hit = self._cache.get(d)
            now = time.monotonic()
            if hit is not None and hit[0] == password_hash and hit[1] > now:
                return True
        key = (d, password_hash)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._verify(password_hash, password))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shielded: a session that goes away does not cancel the check others wait for
        ok = await asyncio.shield(task)
        if ok and password_hash is not None:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[d] = (password_hash, time.monotonic() + self.ttl)
        return ok


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_HASHER.hash(secrets.token_hex(16)))
    return _DUMMY[0]
