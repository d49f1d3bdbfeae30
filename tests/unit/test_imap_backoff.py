"""Reconnect backoff: exponential, capped, jittered, reset."""

from __future__ import annotations

import pytest

from gateway.imap.backoff import Backoff


def test_ceilings_double_up_to_the_cap_and_reset() -> None:
    b = Backoff(base=1, cap=60, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    b.reset()
    assert b.next_delay() == 1
    for _ in range(500):
        b.next_delay()
    assert b.ceiling() == 60


def test_jitter_spreads_delays_below_the_ceiling() -> None:
    b = Backoff(base=2, cap=100)
    delays = []
    for _ in range(200):
        b.attempt = 5
        delays.append(b.next_delay())
    assert all(0 <= d <= 64 for d in delays)
    assert max(delays) - min(delays) > 20


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=10, cap=5)
