"""The work feed read from the event store's log, with a tracked position (embedded profile).

One consumer reads the log from its saved position and hands out the events of one type
(or of every type).
The saved position only ever passes an event once it is acknowledged, so after a restart
everything unacknowledged is delivered again; within a run, an event handed back, or left
unacknowledged past the ack wait, comes again too (up to max deliveries, then once more
marked exhausted, to be recorded as given up). Consumers of the same name in several
processes do not share the work out: each sees every event (harmless, as handling is
idempotent). Sharing work among processes is what the JetStream feed is for.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque

import structlog

from almanac.eventstore import EventStore, RecordedEvent
from almanac.feed import Delivery, EventFeed, Follower
from almanac.settings import WorkerSettings

log = structlog.get_logger("almanac.feed")

# Saving the position is a transaction on the event store; after a crash, what was done
# since the last save is only seen again (and skipped as settled).
CHECKPOINT_INTERVAL = 0.5


class LogDelivery:
    def __init__(
        self, feed: LogWorkFeed, event: RecordedEvent, attempt: int, *, exhausted: bool
    ) -> None:
        self._feed = feed
        self._event = event
        self._attempt = attempt
        self._exhausted = exhausted

    @property
    def event(self) -> RecordedEvent:
        return self._event

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    async def ack(self) -> None:
        self._feed.acked(self)

    async def nak(self, delay: float = 0.0) -> None:
        self._feed.handed_back(self, delay)

    async def in_progress(self) -> None:
        self._feed.touched(self)


class LogWorkFeed:
    def __init__(
        self,
        store: EventStore,
        feed: EventFeed,
        settings: WorkerSettings,
        *,
        event_type: str | None,
        batch_size: int = 500,
    ) -> None:
        self.store = store
        self.feed = feed
        self.settings = settings
        self.event_type = event_type
        self.batch_size = batch_size
        self.name = settings.consumer
        self._follower: Follower | None = None
        # How far the log has been read, and how far it is saved as done.
        self._read_to = 0
        self._saved = 0
        self._saved_at = 0.0
        # Every event of the type read and not yet acknowledged, by position: waiting to be
        # handed out, out with a consumer, or handed back for later.
        self._unfinished: dict[int, RecordedEvent] = {}
        self._attempts: dict[int, int] = {}
        self._ready: deque[int] = deque()
        self._out: dict[int, tuple[LogDelivery, float]] = {}
        self._later: list[tuple[float, int, int]] = []
        self._order = itertools.count()

    async def open(self) -> None:
        self._read_to = self._saved = await self.store.consumer_position(self.name)
        self._saved_at = time.monotonic()
        self._follower = self.feed.follow()
        log.info("workfeed.resumed", consumer=self.name, position=self._read_to)

    async def fetch(self, limit: int, timeout: float) -> list[Delivery]:
        assert self._follower is not None, "open() the feed first"
        await self._checkpoint()
        deadline = time.monotonic() + timeout
        while True:
            self._take_back_overdue()
            if self._ready:
                return self._hand_out(limit)
            now = time.monotonic()
            wait = deadline - now
            if self._later:
                wait = min(wait, self._later[0][0] - now)
            events = await self._follower.next_batch(self._read_to, self.batch_size, max(wait, 0.0))
            for event in events:
                if self.event_type is None or event.type == self.event_type:
                    self._unfinished[event.position] = event
                    self._ready.append(event.position)
            if events:
                self._read_to = events[-1].position
            elif time.monotonic() >= deadline and not self._ready:
                self._take_back_overdue()
                return self._hand_out(limit)

    async def close(self) -> None:
        try:
            await self._checkpoint(force=True)
        finally:
            if self._follower is not None:
                self._follower.close()
                self._follower = None

    def _hand_out(self, limit: int) -> list[Delivery]:
        deliveries: list[Delivery] = []
        expires = time.monotonic() + self.settings.ack_wait
        max_deliver = self.settings.max_deliver
        while self._ready and len(deliveries) < limit:
            position = self._ready.popleft()
            if position not in self._unfinished:
                continue
            attempt = self._attempts.get(position, 0) + 1
            self._attempts[position] = attempt
            delivery = LogDelivery(
                self,
                self._unfinished[position],
                attempt,
                exhausted=max_deliver != -1 and attempt > max_deliver,
            )
            self._out[position] = (delivery, expires)
            deliveries.append(delivery)
        return deliveries

    def _take_back_overdue(self) -> None:
        """Hand out again what was handed back and is due, and what was never answered."""
        now = time.monotonic()
        for position, (_, expires) in list(self._out.items()):
            if expires <= now:
                del self._out[position]
                self._again(position)
        while self._later and self._later[0][0] <= now:
            _, _, position = heapq.heappop(self._later)
            self._again(position)

    def _again(self, position: int) -> None:
        max_deliver = self.settings.max_deliver
        if max_deliver != -1 and self._attempts.get(position, 0) > max_deliver:
            # Even the delivery for recording it as given up went unanswered.
            log.error(
                "workfeed.delivery_exhausted",
                consumer=self.name,
                position=position,
                deliveries=self._attempts.get(position, 0),
            )
            self._finished(position)
            return
        self._ready.append(position)

    def _current(self, delivery: LogDelivery) -> bool:
        position = delivery.event.position
        out = self._out.get(position)
        return out is not None and out[0] is delivery

    def acked(self, delivery: LogDelivery) -> None:
        # A late answer from an earlier delivery still means the work is done.
        self._out.pop(delivery.event.position, None)
        self._finished(delivery.event.position)

    def handed_back(self, delivery: LogDelivery, delay: float) -> None:
        if not self._current(delivery):
            return
        position = delivery.event.position
        del self._out[position]
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._order), position))

    def touched(self, delivery: LogDelivery) -> None:
        if self._current(delivery):
            self._out[delivery.event.position] = (
                delivery,
                time.monotonic() + self.settings.ack_wait,
            )

    def _finished(self, position: int) -> None:
        self._unfinished.pop(position, None)
        self._attempts.pop(position, None)

    def _done_to(self) -> int:
        """The position up to which everything is done: just before the first unfinished."""
        if not self._unfinished:
            return self._read_to
        return min(self._unfinished) - 1

    async def _checkpoint(self, *, force: bool = False) -> None:
        done = self._done_to()
        if done <= self._saved:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < CHECKPOINT_INTERVAL:
            return
        await self.store.save_consumer_position(self.name, done)
        self._saved = done
        self._saved_at = now
