"""Reaching an app's container from a test that drives the app through ``AsyncTestClient``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar.testing import AsyncTestClient

T = TypeVar("T")


async def on_app_loop(
    client: AsyncTestClient[Any], fn: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """Await ``fn(*args)`` on the event loop the app runs on, and return its result.

    ``AsyncTestClient`` runs the app (its lifespan, so the container's pools, locks and
    background tasks, and every request) on a loop of its own in a portal thread. A
    coroutine of the container awaited on the test's loop instead may wait on a future the
    other loop resolves without waking this one, and hang. The portal call blocks, so it
    runs in a thread to leave the test's loop free.
    """
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)
