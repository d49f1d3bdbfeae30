"""AUTH password checks: argon2id, a positive cache, single-flight, bounded concurrency."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway import passwords
from gateway.passwords import PasswordChecker, hash_password, verify_password
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def good_hash() -> str:
    return hash_password("s3cret")


async def test_real_argon2_check_and_positive_cache(good_hash: str) -> None:
    assert verify_password(good_hash, "s3cret") and not verify_password(good_hash, "nope")
    pc = PasswordChecker()
    assert await pc.check("Ann@example.com", "s3cret", good_hash)
    assert await pc.check("ann@example.com", "s3cret", good_hash)  # cached
    assert pc.verifications == 1
    assert not await pc.check("ann@example.com", "nope", good_hash)
    assert not await pc.check("ann@example.com", "nope", good_hash)  # never cached
    assert pc.verifications == 3
    assert not await pc.check("ghost@example.com", "s3cret", None)  # unknown user
    assert pc.verifications == 4


class SlowVerifier:
    """Stands in for argon2: takes a while (or until `release` is set), counts how many run at once."""

    def __init__(self, seconds: float = 0.05, release: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.release = release
        self.running = 0
        self.most = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, password_hash: str, password: str) -> bool:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        if self.release is not None:
            assert self.release.wait(30), "the test never released the verification"
        else:
            time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return password == "right"


async def test_identical_concurrent_checks_share_one_verification(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowVerifier()
    monkeypatch.setattr(passwords, "verify_password", slow)
    pc = PasswordChecker(max_concurrent=2)
    results = await asyncio.gather(*(pc.check("a@x", "right", "$h") for _ in range(20)))
    assert results == [True] * 20 and slow.calls == 1
    wrong = await asyncio.gather(*(pc.check("a@x", "wrong", "$h") for _ in range(5)))
    assert wrong == [False] * 5 and slow.calls == 2


async def test_verifications_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowVerifier()
    monkeypatch.setattr(passwords, "verify_password", slow)
    pc = PasswordChecker(max_concurrent=2)
    results = await asyncio.gather(*(pc.check(f"u{i}@x", "right", "$h") for i in range(8)),
                                   pc.check("ghost@x", "right", None))
    assert results == [True] * 8 + [False]
    assert slow.calls == 9 and slow.most == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    slow = SlowVerifier(release=release)
    monkeypatch.setattr(passwords, "verify_password", slow)
    pc = PasswordChecker()
    first = asyncio.ensure_future(pc.check("a@x", "right", "$h"))
    second = asyncio.ensure_future(pc.check("a@x", "right", "$h"))
    await wait_for(lambda: slow.calls == 1, what="the shared verification to start")
    first.cancel()
    release.set()
    assert await second is True
    assert slow.calls == 1 and first.cancelled()
