"""The event feed that reads the event store's log directly (both profiles).

Followers poll the notification log, and are woken early: in-process after each commit of
the local writer, and across processes by Postgres NOTIFY on the events table's channel.
A lost LISTEN connection only costs latency (polling continues), and is re-established
with backoff.

The followers of one process that keep up with the log read its newest events from one
shared ``Tail``: one read of the log per commit, not one per follower. A process runs
several (every projection, the relay, the worker, the WebSocket hub), and each commit used
to wake all of them into reading the same few rows: on the projector role that alone took
projection lag from ~3 ms to ~7 ms at the median. A follower behind the tail (catching up,
rebuilding) reads the log for itself, in large batches prepared in the reading thread.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time

import psycopg
import stamina
import structlog

from almanac.eventstore import EventStore, RecordedEvent, running_on
from almanac.feed import Prepare
from almanac.timeouts import Backoff, Pulse, wait_event

log = structlog.get_logger("almanac.feed")

# The application name of a feed's LISTEN connection, as Postgres shows it.
LISTENER_NAME = "almanac-feed-listen"


class Tail:
    """The newest events of the log, as one reader of this process has read them.

    Holds every event with a position in (``start``, ``end``], the most recent
    ``capacity`` of them; ``start`` and ``end`` are None until the reader has found the
    head of the log. While the reader's last read failed, the tail covers nothing: the
    followers read for themselves, and so see the failure.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.start: int | None = None
        self.end: int | None = None
        self.failed = False
        self._events: list[RecordedEvent] = []
        self._positions: list[int] = []
        self._grown = Pulse()

    def begin(self, head: int) -> None:
        self.start = self.end = head

    def forget(self) -> None:
        """Hold nothing: no reader keeps the tail up to date (the next one begins at the
        head; a follower meanwhile reads the log itself)."""
        self.start = self.end = None
        self._events.clear()
        self._positions.clear()
        self._grown.fire()

    def covers(self, after: int) -> bool:
        return not self.failed and self.start is not None and self.start <= after

    def after(self, after: int, limit: int) -> list[RecordedEvent]:
        """The events after ``after``, at most ``limit`` of them (``after`` is covered)."""
        first = bisect.bisect_right(self._positions, after)
        return self._events[first : first + limit]

    def extend(self, events: list[RecordedEvent]) -> None:
        """Add what the reader read after ``end``, and wake whoever waits for it."""
        self._events.extend(events)
        self._positions.extend(event.position for event in events)
        self.end = events[-1].position
        excess = len(self._events) - self.capacity
        if excess > 0:
            self.start = self._positions[excess - 1]
            del self._events[:excess], self._positions[:excess]
        self._grown.fire()

    def fail(self) -> None:
        self.failed = True
        self._grown.fire()

    async def grown(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the tail to change."""
        await self._grown.wait(seconds)


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
        tail = self._feed.tail
        if tail.covers(after):
            self._drop_ahead()
            # As when reading the log: a consumer hears back within the poll interval (it
            # checks whether it is to stop between batches).
            wait = min(timeout, self._feed.poll_interval)
            events = await self._from_tail(tail, after, limit, wait)
            if tail.covers(after):
                self._last = (events, None)
                return events
        self._last = await self._read(after, limit, timeout)
        events = self._last[0]
        if len(events) == limit:
            self._ahead_after = events[-1].position
            self._ahead = asyncio.create_task(self._fetch(self._ahead_after, limit))
        return events

    @staticmethod
    async def _from_tail(tail: Tail, after: int, limit: int, timeout: float) -> list[RecordedEvent]:
        """The tail's events after ``after``, waiting up to ``timeout`` for some (or for the
        tail to stop covering ``after``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (events := tail.after(after, limit)) and tail.covers(after):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await tail.grown(remaining)
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

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    def close(self) -> None:
        self._drop_ahead()
        self._feed.unfollow(self)


_Read = tuple[list[RecordedEvent], object | None]


class LogFeed:
    def __init__(
        self,
        store: EventStore,
        *,
        poll_interval: float,
        listen_dsn: str | None = None,
        read_size: int = 500,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.followers: set[LogFollower] = set()
        # Enough for a follower a few batches behind the head to read from the tail.
        self.tail = Tail(capacity=4 * read_size)
        self._read_size = read_size
        self._tail_wake = asyncio.Event()
        self._tail_reader: asyncio.Task[None] | None = None
        self._listen_dsn = listen_dsn
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.Task[None] | None = None
        store.on_commit(self._committed)

    @property
    def listening(self) -> bool:
        """Whether the feed holds, or is opening, its LISTEN connection."""
        return self._listener is not None and not self._listener.done()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._listen_if_followed()
        self._read_tail_if_followed()

    def follow(self, prepare: Prepare | None = None) -> LogFollower:
        follower = LogFollower(self, prepare)
        self.followers.add(follower)
        self._listen_if_followed()
        self._read_tail_if_followed()
        return follower

    def unfollow(self, follower: LogFollower) -> None:
        self.followers.discard(follower)
        if not self.followers:
            self._tail_wake.set()  # the tail's reader ends, and lets the tail go

    def _read_tail_if_followed(self) -> None:
        reader = self._tail_reader
        if self._stopped:
            return
        if self.followers and self._loop and (reader is None or reader.done()):
            self._tail_reader = self._loop.create_task(self._read_tail(), name="almanac-feed-tail")

    async def _read_tail(self) -> None:
        """Read the log's newest events into the tail, on every wake-up, while anything here
        follows the feed. Once it stops, the tail is let go: a follower that comes later (a
        projection taken over again hours on) would otherwise wait while a new reader went
        through everything committed meanwhile, batch by batch."""
        try:
            await self._keep_tail()
        finally:
            self.tail.forget()

    async def _keep_tail(self) -> None:
        tail = self.tail
        while self.followers and not self._stopped:
            self._tail_wake.clear()
            try:
                if tail.end is None:
                    tail.begin(await self.store.max_position())
                    assert tail.end is not None
                events = await self.store.read_tail(tail.end, self._read_size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the followers read for themselves meanwhile
                if not tail.failed:
                    log.warning("feed.tail_read_failed", error=str(exc))
                tail.fail()
                await wait_event(self._tail_wake, self.poll_interval)
                continue
            tail.failed = False
            if events:
                tail.extend(events)
            if len(events) < self._read_size:
                await wait_event(self._tail_wake, self.poll_interval)

    def _listen_if_followed(self) -> None:
        """LISTEN from the first follower on: a process that follows nothing here (an API
        process of the services profile, whose live events come through NATS) holds no
        connection for it and is not woken by every commit of every other process."""
        if self._stopped:
            return
        if self._listen_dsn and self._listener is None and self.followers and self._loop:
            self._listener = self._loop.create_task(self._listen(), name="almanac-feed-listen")

    async def stop(self) -> None:
        self._stopped = True
        for task in (self._listener, self._tail_reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener = self._tail_reader = None

    def _committed(self, _position: int) -> None:
        loop = self._loop
        # With no follower there is nobody to wake.
        if not self.followers or loop is None or loop.is_closed():
            return
        if running_on(loop):  # the loop writer's commit, on this loop
            self._wake_all()
        else:  # the writer thread's, or another loop's
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        self._tail_wake.set()
        for follower in self.followers:
            follower.wake.set()

    async def _listen(self) -> None:
        channel = self.store.notify_channel
        backoff = Backoff(0.1, 5.0)
        while True:
            started = time.monotonic()
            try:
                await self._listen_once(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any failure
                log.warning("feed.listen_lost", error=str(exc))
            # Lost connections are retried inside ``_listen_once``; what comes here again and
            # again at once (a LISTEN refused, say) waits longer each time, up to 5 s.
            await asyncio.sleep(backoff.after(time.monotonic() - started))

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
