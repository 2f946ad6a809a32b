"""Bounded and interruptible waits: a stop or a cancellation is never lost."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from almanac.timeouts import cancel_and_wait, unless, wait_event


async def _swallows_one_cancellation(ended: asyncio.Event) -> None:
    """Behaves like a wait that returned its result just as it was cancelled (Python 3.11's
    ``asyncio.wait_for`` inside a library): the first cancellation is lost."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    try:
        await asyncio.Event().wait()
    finally:
        ended.set()


async def test_a_task_that_swallows_a_cancellation_is_cancelled_until_it_ends() -> None:
    ended = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancellation(ended))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, every=0.01), 5)
    assert task.cancelled()
    assert ended.is_set()


async def test_a_task_that_failed_while_stopping_reports_its_failure() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("could not close") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="could not close"):
        await cancel_and_wait(task)


async def test_unless_gives_the_result_when_it_comes_first() -> None:
    async def answer() -> list[int]:
        return [1, 2]

    assert await unless(asyncio.Event(), answer()) == [1, 2]


async def test_unless_ends_the_wait_as_soon_as_stop_is_signalled() -> None:
    stopping = asyncio.Event()
    ended = asyncio.Event()
    waiting = asyncio.create_task(unless(stopping, _swallows_one_cancellation(ended)))
    await asyncio.sleep(0)
    stopping.set()
    assert await asyncio.wait_for(waiting, 5) is None
    assert ended.is_set(), "the abandoned wait was cancelled, not left running"


async def test_cancelling_the_caller_of_unless_cancels_its_wait_too() -> None:
    ended = asyncio.Event()
    caller = asyncio.create_task(unless(asyncio.Event(), _swallows_one_cancellation(ended)))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
    assert ended.is_set()


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 5) is True
