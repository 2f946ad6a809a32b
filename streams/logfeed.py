"""The event feed that reads the event store's log directly (both profiles).

Followers poll the notification log, and are woken early: in-process after each commit of
the local writer, and across processes by Postgres NOTIFY on the events table's channel.
A lost LISTEN connection only costs latency (polling continues), and is re-established
with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import stamina
import structlog

from almanac.eventstore import EventStore, RecordedEvent
from almanac.feed import Prepare
from almanac.timeouts import wait_event

log = structlog.get_logger("almanac.feed")

# The application name of a feed's LISTEN connection, as Postgres shows it.
LISTENER_NAME = "almanac-feed-listen"


class LogFollower:
    def __init__(self, feed: LogFeed, prepare: Prepare | None = None) -> None:
        self._feed = feed
        self._prepare = prepare
        self.wake = asyncio.Event()
        # While a consumer works through a full batch, the next one is read (and prepared)
        # meanwhile.
        self._ahead: asyncio.Task[_Read] | None = None
        self._ahead_after = -1
        self._last: _Read = ([], None)

    async def next_batch(self, after: int, limit: int, timeout: float) -> list[RecordedEvent]:
        self._last = await self._read(after, limit, timeout)
        events = self._last[0]
        if len(events) == limit:
            self._ahead_after = events[-1].position
            self._ahead = asyncio.create_task(self._fetch(self._ahead_after, limit))
        return events

    def prepared(self, events: list[RecordedEvent]) -> object | None:
        last, result = self._last
        if events is not last:
            return None
        self._last = (last, None)
        return result

    async def _read(self, after: int, limit: int, timeout: float) -> _Read:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if self._ahead_after == after:
                read = await ahead
                if read[0]:
                    return read
            else:
                ahead.cancel()
        return await self._wait_and_read(after, limit, timeout)

    async def _wait_and_read(self, after: int, limit: int, timeout: float) -> _Read:
        read = await self._fetch(after, limit)
        if read[0] or timeout <= 0:
            return read
        # Clear, then look again: a commit between the first read and the clear would
        # otherwise be slept through.
        self.wake.clear()
        read = await self._fetch(after, limit)
        if read[0]:
            return read
        await wait_event(self.wake, min(timeout, self._feed.poll_interval))
        return await self._fetch(after, limit)

    async def _fetch(self, after: int, limit: int) -> _Read:
        store = self._feed.store
        if self._prepare is None:
            return await store.read(after, limit), None
        return await store.read_prepared(after, limit, self._prepare)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None
        self._feed.followers.discard(self)


_Read = tuple[list[RecordedEvent], object | None]


class LogFeed:
    def __init__(
        self, store: EventStore, *, poll_interval: float, listen_dsn: str | None = None
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.followers: set[LogFollower] = set()
        self._listen_dsn = listen_dsn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        store.on_commit(self._committed)

    @property
    def listening(self) -> bool:
        """Whether the feed holds, or is opening, its LISTEN connection."""
        return self._listener is not None and not self._listener.done()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listen_if_followed()

    def follow(self, prepare: Prepare | None = None) -> LogFollower:
        follower = LogFollower(self, prepare)
        self.followers.add(follower)
        self._listen_if_followed()
        return follower

    def _listen_if_followed(self) -> None:
        """LISTEN from the first follower on: a process that follows nothing here (an API
        process of the services profile, whose live events come through NATS) holds no
        connection for it and is not woken by every commit of every other process."""
        if self._listen_dsn and self._listener is None and self.followers and self._loop:
            self._listener = self._loop.create_task(self._listen(), name="almanac-feed-listen")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    def _committed(self, _position: int) -> None:
        loop = self._loop
        # Called in the writer's thread; with no follower there is nobody to wake.
        if self.followers and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for follower in self.followers:
            follower.wake.set()

    async def _listen(self) -> None:
        channel = self.store.notify_channel
        while True:
            try:
                await self._listen_once(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any failure
                log.warning("feed.listen_lost", error=str(exc))

    @stamina.retry(on=psycopg.OperationalError, attempts=None, timeout=None, wait_max=5.0)
    async def _listen_once(self, channel: str) -> None:
        assert self._listen_dsn is not None
        async with await psycopg.AsyncConnection.connect(
            self._listen_dsn, autocommit=True, application_name=LISTENER_NAME
        ) as conn:
            await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
            log.info("feed.listening", channel=channel)
            # Anything committed while (re)connecting is picked up by this wake-up.
            self._wake_all()
            async for _ in conn.notifies():
                self._wake_all()
