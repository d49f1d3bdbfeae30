"""Waiting on an asyncio event for at most a while, without losing a cancellation."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True when `event` is set within `timeout` seconds, False when the time runs out.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 it drops a cancellation
    that arrives just as the event is set (CPython gh-86296, fixed in 3.12), and a
    ``while True`` loop around it then never ends: the delivery scheduler's stop() hung
    waiting for its timer task that way.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
