"""Retries with stamina, paid for only when a try fails.

A stamina retry context builds tenacity's retrying object as it starts, and tenacity
inspects each of its callbacks' signatures then: ~25 µs of CPU on a quick host here, ~100 on
a slow one, before the first try even runs. On the group-commit writer's path that was once
a batch, a few per cent of every POST's CPU, and as much again for each projector batch.

So the first try runs on its own. Only if it fails with an error the policy retries does
stamina take over: its first attempt raises that same error again without doing the work
twice, so the attempts, the pauses and stamina's log of a scheduled retry are those of a
context that had run the first try itself. Its timeout is what the first try left of it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypedDict, TypeVar, Unpack

import stamina

T = TypeVar("T")

# What stamina takes as ``on``: an exception class, a tuple of them, or a hook that answers
# whether to retry (a bool) or how long to pause first (seconds or a timedelta).
RetryOn = (
    type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool | float | timedelta]
)


class RetryPolicy(TypedDict, total=False):
    """``stamina.retry_context``'s arguments but ``on``; what is left out is its default."""

    attempts: int | None
    timeout: float | timedelta | None
    wait_initial: float | timedelta
    wait_max: float | timedelta
    wait_jitter: float | timedelta
    wait_exp_base: float


# stamina's own, so that a policy without a timeout is bounded as a plain context is.
_DEFAULT_TIMEOUT = inspect.signature(stamina.retry_context).parameters["timeout"].default


def _retries(on: RetryOn, exc: Exception) -> bool:
    """Whether stamina would retry ``exc``: ``None`` from a hook means no (stamina warns).
    A hook is asked again by stamina when the failure is raised in its first attempt, so it
    must answer the same for the same failure (Almanac's hooks are pure)."""
    if isinstance(on, type | tuple):
        return isinstance(exc, on)
    answer = on(exc)
    return answer is not None and answer is not False


def _rest(policy: RetryPolicy, started: float) -> RetryPolicy | None:
    """The policy for the tries after the first, which began at ``started``; None if the
    first try used up the whole timeout (stamina would stop after it)."""
    timeout = policy.get("timeout", _DEFAULT_TIMEOUT)
    if timeout is None or stamina.is_testing():  # testing mode counts attempts only
        return policy
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    left = seconds - (time.monotonic() - started)
    return {**policy, "timeout": left} if left > 0 else None


async def retried(
    attempt: Callable[[], Awaitable[T]], *, on: RetryOn, **policy: Unpack[RetryPolicy]
) -> T:
    """``await attempt()``, retried as ``stamina.retry_context(on=on, **policy)`` would."""
    started = time.monotonic()
    try:
        return await attempt()
    except Exception as exc:
        rest = _rest(policy, started) if _retries(on, exc) else None
        if rest is None:
            raise
        failed: Exception | None = exc
    async for retry in stamina.retry_context(on=on, **rest):
        with retry:
            if failed is not None:  # stamina's first attempt is the first try, which failed
                first, failed = failed, None
                raise first
            return await attempt()
    raise AssertionError("unreachable: stamina raises the last failure")


def retried_sync(attempt: Callable[[], T], *, on: RetryOn, **policy: Unpack[RetryPolicy]) -> T:
    """``attempt()``, retried as ``stamina.retry_context(on=on, **policy)`` would."""
    started = time.monotonic()
    try:
        return attempt()
    except Exception as exc:
        rest = _rest(policy, started) if _retries(on, exc) else None
        if rest is None:
            raise
        failed: Exception | None = exc
    for retry in stamina.retry_context(on=on, **rest):
        with retry:
            if failed is not None:  # stamina's first attempt is the first try, which failed
                first, failed = failed, None
                raise first
            return attempt()
    raise AssertionError("unreachable: stamina raises the last failure")
