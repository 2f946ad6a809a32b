"""Retries with stamina, paid for only when a try fails.

A stamina retry context builds tenacity's retrying object as it starts, and tenacity
inspects each of its callbacks' signatures then: ~25 µs of CPU on a quick host here, ~100 on
a slow one, before the first try even runs. On the group-commit writer's path that was once
a batch, a few per cent of every POST's CPU, and as much again for each projector batch.

So the first try runs on its own. Only if it fails with an error the policy retries does
stamina take over: its first attempt raises that same error again without doing the work
twice, so the attempts, the pauses, the timeout and stamina's log of a scheduled retry are
those of a context that had run the first try itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import stamina

T = TypeVar("T")

# What stamina takes as ``on``: an exception class, a tuple of them, or a predicate.
RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], Any]


def _retries(on: RetryOn, exc: Exception) -> bool:
    if isinstance(on, type | tuple):
        return isinstance(exc, on)
    # A predicate answers True or False, or a pause (a number or timedelta): retry then.
    return on(exc) is not False


async def retried(attempt: Callable[[], Awaitable[T]], *, on: RetryOn, **policy: Any) -> T:
    """``await attempt()``, retried as ``stamina.retry_context(on=on, **policy)`` would."""
    try:
        return await attempt()
    except Exception as exc:
        if not _retries(on, exc):
            raise
        failed: Exception | None = exc
    async for retry in stamina.retry_context(on=on, **policy):
        with retry:
            if failed is not None:
                first, failed = failed, None
                raise first
            return await attempt()
    raise AssertionError("unreachable: stamina raises the last failure")


def retried_sync(attempt: Callable[[], T], *, on: RetryOn, **policy: Any) -> T:
    """``attempt()``, retried as ``stamina.retry_context(on=on, **policy)`` would."""
    try:
        return attempt()
    except Exception as exc:
        if not _retries(on, exc):
            raise
        failed: Exception | None = exc
    for retry in stamina.retry_context(on=on, **policy):
        with retry:
            if failed is not None:
                first, failed = failed, None
                raise first
            return attempt()
    raise AssertionError("unreachable: stamina raises the last failure")
