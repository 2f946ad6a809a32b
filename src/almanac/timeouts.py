"""Awaiting with a time limit, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives just as the awaited
thing finishes (fixed in 3.12, where it is built on ``asyncio.timeout``). A role told to stop
by cancellation could then carry on until its next deadline, or for ever in a loop, so every
bounded wait in Almanac goes through ``within``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or raise ``TimeoutError`` after ``seconds`` (it is cancelled)."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it is set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
