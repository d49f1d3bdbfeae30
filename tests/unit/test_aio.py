"""gateway.aio.wait_event: set, timed out, and a cancellation that arrives as the event is set."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import wait_event


async def test_set_and_timed_out() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 0.01) is True
    later = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, later.set)
    assert await wait_event(later, 5) is True


async def test_a_cancel_arriving_as_the_event_is_set_is_not_lost() -> None:
    # asyncio.wait_for(ev.wait(), t) returns normally here on Python 3.11, and a loop
    # around it never sees that it was cancelled
    ev = asyncio.Event()
    task = asyncio.create_task(wait_event(ev, 10))
    await asyncio.sleep(0)          # the task is waiting
    ev.set()
    task.cancel()                   # before the task resumes
    with pytest.raises(asyncio.CancelledError):
        await task
