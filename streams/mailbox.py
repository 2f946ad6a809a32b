"""A queue for exactly one consumer task, at a tenth of ``asyncio.Queue``'s memory."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """What ``asyncio.Queue`` does for one consumer, for a tenth of its memory: one list
    (a deque is ~600 bytes even when empty, and these hold a few items at most), and a
    future only while the consumer waits. A connection has two of these; with 10,000
    connections each is ~20 MB less than a queue. One task may wait in ``get`` at a time
    (a second waiter would take the first one's place).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def items(self) -> tuple[T, ...]:
        """What waits, in order (a copy)."""
        return tuple(self._items)

    def clear(self) -> None:
        self._items.clear()

    def get_nowait(self) -> T:
        return self._items.pop(0)

    async def get(self) -> T:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)
