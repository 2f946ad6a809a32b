"""Waiting for asynchronous work by checking a condition until a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

# Between two checks of a condition; short, so that a test never waits longer than it must.
CHECK_INTERVAL = 0.02


def _max_checks(within: float) -> int:
    # Bounds the loop in count as well as in time, whatever a single check costs.
    return int(within / CHECK_INTERVAL) + 2


async def eventually(
    check: Callable[[], Awaitable[T | bool | None]], *, within: float = 20, what: str
) -> T:
    """Await ``check()`` until it returns something truthy (returned) or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    last: object = None
    for _ in range(_max_checks(within)):
        last = await check()
        if last:
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(CHECK_INTERVAL)
    pytest.fail(f"{what}: not within {within} s (last check gave {last!r})")


def wait_until(check: Callable[[], T | bool | None], *, within: float = 20, what: str) -> T:
    """Call ``check()`` until it returns something truthy (returned) or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    last: object = None
    for _ in range(_max_checks(within)):
        last = check()
        if last:
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            break
        time.sleep(CHECK_INTERVAL)
    pytest.fail(f"{what}: not within {within} s (last check gave {last!r})")


async def until_started(server: Any, task: asyncio.Task[None], *, within: float, what: str) -> None:
    """Wait until a ``uvicorn.Server`` running as ``task`` listens; fail at once if it ends."""

    async def started() -> bool:
        assert not task.done(), f"{what}: the server stopped while starting"
        return bool(server.started)

    await eventually(started, within=within, what=what)
