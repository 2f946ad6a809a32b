"""The event-feed port: how consumers follow the global order of stored events."""

from __future__ import annotations

from typing import Protocol

from almanac.eventstore import RecordedEvent


class Follower(Protocol):
    """One consumer's view of the feed, with its own wake-ups."""

    async def next_batch(self, after: int, limit: int, timeout: float) -> list[RecordedEvent]:
        """Events with positions greater than ``after``, in order; waits up to ``timeout``
        seconds for the first one and returns an empty list if none came."""
        ...

    def close(self) -> None: ...


class EventFeed(Protocol):
    async def start(self) -> None: ...

    def follow(self) -> Follower: ...

    async def stop(self) -> None: ...
