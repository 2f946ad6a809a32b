"""Awaiting with a time limit, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives just as the awaited
thing finishes (fixed in 3.12, where it is built on ``asyncio.timeout``). A role told to stop
by cancellation could then carry on until its next deadline, or for ever in a loop, so every
bounded wait in Almanac goes through ``within``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

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


# A try that ran this long before failing had recovered: the backoff starts again.
SETTLED_AFTER = 30.0


class Backoff:
    """Pauses that double from ``initial`` up to ``maximum``; ``reset`` after a success.

    For the supervision loops of long-running roles, which retry for as long as they run
    (stamina's retries, bounded in attempts or time, are for single calls)."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        pause = self._next
        self._next = min(pause * 2, self.maximum)
        return pause

    def reset(self) -> None:
        self._next = self.initial

    def after(self, ran: float) -> float:
        """The pause after a try that ran ``ran`` seconds before failing: from ``initial``
        again if it ran long enough to have recovered (``SETTLED_AFTER``)."""
        if ran > SETTLED_AFTER:
            self.reset()
        return self.next()


class Pulse:
    """Wakes every task waiting on it when it fires, and none that comes after."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the next pulse; whether it came."""
        return await wait_event(self._event, seconds)


async def cancel_and_wait(task: asyncio.Task[Any], *, every: float = 0.2) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again while it runs on.

    A library that waits through ``asyncio.wait_for`` (nats-py's pull ``fetch`` does) can
    swallow a cancellation on Python 3.11 when what it waited for arrives at the same moment;
    the task then carries on as if never cancelled. An exception the task ended with other
    than its cancellation is raised here.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=every)
    if not task.cancelled() and (failure := task.exception()) is not None:
        raise failure


async def unless(stopping: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """``await awaitable``, or None as soon as ``stopping`` is set (it is then cancelled)."""
    work = asyncio.ensure_future(awaitable)
    signal = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work, signal}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await cancel_and_wait(work)
        raise
    finally:
        signal.cancel()
    if work.done():
        return work.result()
    await cancel_and_wait(work)
    return None
