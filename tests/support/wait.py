"""Condition waits for tests: poll a predicate until it holds, or fail naming what never happened.

A test that needs something to have happened (a delivery, a log line, a state) waits for
that condition with a deadline instead of sleeping a fixed time and hoping. The deadline
only bounds a failure: a wait returns as soon as its condition holds, so deadlines can be
generous enough for a slow, shared CI machine.

`wait_for` is for coroutines (the predicate may be plain or async); `wait_for_sync` is for
plain test functions and threads. Both check the predicate once more after the deadline has
passed before they fail, so a condition that comes true during the last interval counts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
                   what: str = "the condition", *, interval: float = 0.02) -> None:
    """Await until `predicate()` (or what it returns, when that is awaitable) is true.

    Raises AssertionError naming `what` if it is still false after `timeout` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], object], timeout: float = 10.0,
                  what: str = "the condition", *, interval: float = 0.05) -> None:
    """Block until `predicate()` is true; raise AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
