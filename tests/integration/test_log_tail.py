"""The log feed's shared tail, on both profiles: followers at the head share the reads of the
log, one behind the tail reads for itself, and a log that cannot be read is not hidden."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from almanac.errors import Unavailable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.settings import Settings
from streams.logfeed import LogFeed, LogFollower
from tests.integration.support_eventlog import whole_log
from tests.integration.support_projection import request
from tests.integration.support_waiting import eventually

Read = Callable[[int, int], Awaitable[list[RecordedEvent]]]


class CountedReads:
    """Counts the event store's reads of the log (the tail's and the followers' own), and
    can make them fail."""

    def __init__(self, store: EventStore) -> None:
        self.count = 0
        self.failing = False
        store.read = self._counted(store.read)  # type: ignore[method-assign]
        store.read_tail = self._counted(store.read_tail)  # type: ignore[method-assign]

    def _counted(self, read: Read) -> Read:
        async def counted(after: int, limit: int) -> list[RecordedEvent]:
            self.count += 1
            if self.failing:
                raise Unavailable("the event store is not answering: test")
            return await read(after, limit)

        return counted


@asynccontextmanager
async def feed_of(settings: Settings, **kwargs: Any) -> AsyncIterator[tuple[EventStore, LogFeed]]:
    store = EventStore(settings)
    # Only commits wake the feed: no poll falls inside a test.
    feed = LogFeed(store, poll_interval=30, **kwargs)
    try:
        await feed.start()
        yield store, feed
    finally:
        await feed.stop()
        store.close()


async def tail_ready(feed: LogFeed) -> None:
    async def found_the_head() -> bool:
        return feed.tail.end is not None

    await eventually(found_the_head, what="the tail found the head of the log")


async def collect(follower: LogFollower, after: int, count: int) -> list[int]:
    """The next ``count`` positions after ``after``, batch by batch."""
    positions: list[int] = []
    while len(positions) < count:
        batch = await follower.next_batch(after, 100, timeout=10)
        assert batch, "no event came within 10 s"
        positions.extend(e.position for e in batch)
        after = batch[-1].position
    return positions


async def test_followers_at_the_head_share_one_read_of_each_commit(settings: Settings) -> None:
    async with feed_of(settings) as (store, feed):
        followers = [feed.follow() for _ in range(4)]
        await tail_ready(feed)
        head = await store.max_position()
        reads = CountedReads(store)
        appended = []
        for i in range(5):
            waiting = [asyncio.create_task(collect(f, head, i + 1)) for f in followers]
            appended.append(await store.append(request(label=f"r{i}")))
            seen = await asyncio.gather(*waiting)
            assert seen == [appended] * len(followers)
        for follower in followers:
            follower.close()
    # One read a commit, and now and then one that a wake-up found nothing new for; four
    # followers reading for themselves would have made at least 20.
    assert reads.count <= 2 * len(appended)


async def test_a_follower_behind_the_tail_reads_the_log_itself_without_a_gap(
    settings: Settings,
) -> None:
    # A tail of 4 x 2 events: most of what follows is behind it by the time it is read.
    async with feed_of(settings, read_size=2) as (store, feed):
        live = feed.follow()
        await tail_ready(feed)
        start = await store.max_position()
        following = asyncio.create_task(collect(live, start, 20))
        for i in range(20):
            await store.append(request(label=f"r{i}"))
        logged = [e.position for e in await whole_log(store) if e.position > start]
        late = feed.follow()

        async def passed_the_start() -> bool:
            return feed.tail.start is not None and feed.tail.start > start

        await eventually(passed_the_start, what="the tail moved past the late follower")
        caught_up = await collect(late, start, 20)
        assert await following == logged
        live.close()
        late.close()
    assert caught_up == logged


async def test_a_log_that_cannot_be_read_fails_the_followers_reads(settings: Settings) -> None:
    async with feed_of(settings) as (store, feed):
        follower = feed.follow()
        await tail_ready(feed)
        head = await store.max_position()
        reads = CountedReads(store)
        reads.failing = True
        waiting = asyncio.create_task(follower.next_batch(head, 10, timeout=10))
        # The commit wakes the tail's reader, whose read fails; the follower, waiting on
        # the tail, then reads the log itself and meets the failure.
        unread = await store.append(request(label="unread"))
        with pytest.raises(Unavailable):
            await waiting
        reads.failing = False
        read = await store.append(request(label="read"))
        assert await collect(follower, head, 2) == [unread, read]
        follower.close()


async def test_a_tail_nobody_follows_is_let_go_and_the_next_follower_starts_at_the_head(
    settings: Settings,
) -> None:
    async with feed_of(settings) as (store, feed):
        first = feed.follow()
        await tail_ready(feed)
        head = await store.max_position()
        following = asyncio.create_task(collect(first, head, 1))
        seen = await store.append(request(label="seen"))
        assert await following == [seen]
        first.close()

        async def let_go() -> bool:
            return feed.tail.end is None

        await eventually(let_go, what="the tail let go once nobody follows")
        for i in range(5):
            await store.append(request(label=f"unfollowed {i}"))
        head = await store.max_position()
        later = feed.follow()
        await tail_ready(feed)
        # Begun at the head, not where the last reader stopped.
        assert feed.tail.start == head
        following = asyncio.create_task(collect(later, head, 1))
        new = await store.append(request(label="new"))
        assert await following == [new]
        later.close()
