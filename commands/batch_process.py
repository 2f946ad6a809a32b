"""The batch process manager: turns a batch's items into readings, and records each
reading's outcome on its batch.

It follows the log. ``batch.started`` opens a batch; its items are released to the reading
workers as readings (``reading.requested`` with a ``batch`` link), at most
``ALMANAC_BATCH_WINDOW`` of one owner's items at a time, topped up as outcomes come in: so a
10,000-item batch never floods the work feed, and another owner's reading waits behind at
most a window of it. ``reading.generated`` / ``reading.failed`` of a linked reading becomes
``batch.item_succeeded`` / ``batch.item_failed``; the last outcome completes the batch.

Everything is idempotent, so a restart or a second manager never does anything twice: the
reading of an item has an id derived from the batch, the index and the attempt (asking
again finds it there), and outcomes are appended on a batch loaded fresh after any
conflict, where an outcome already recorded is skipped. Items are released in index order,
so after a restart the first window of items without an outcome covers all that were in
flight. One manager runs at a time, under a lease; others wait as hot standbys.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from uuid import UUID

import msgspec
import structlog

from almanac.adapters.leadership import Lease, take_turns
from almanac.container import Stoppable
from almanac.domain.batch import Batch
from almanac.domain.events import EventMeta
from almanac.domain.reading import BatchLink, Reading
from almanac.eventstore import ConcurrencyConflict, EventStore, RecordedEvent
from almanac.feed import EventFeed
from almanac.settings import BatchSettings

log = structlog.get_logger("almanac.batches")

_SAVE_EVERY = 0.5


class _Meta(msgspec.Struct):
    meta: EventMeta


class _Link(msgspec.Struct):
    meta: EventMeta
    batch: BatchLink | None = None


class _Failure(msgspec.Struct):
    meta: EventMeta
    reason: str


@dataclass
class _Open:
    """A running batch as the manager tracks it."""

    batch: Batch
    # The position from which a restart must read the log again to pick the batch up.
    since: int
    # Items whose reading has been asked for and has no outcome yet.
    asked: set[int] = field(default_factory=set)


@dataclass
class _Outcome:
    index: int
    reading_id: UUID
    attempt: int
    reason: str | None
    meta: EventMeta


class BatchProcessManager(Stoppable):
    name = "batch-manager"

    def __init__(
        self,
        store: EventStore,
        feed: EventFeed,
        lease: Lease,
        settings: BatchSettings,
        *,
        batch_size: int = 500,
    ) -> None:
        self.store = store
        self.feed = feed
        self.lease = lease
        self.settings = settings
        self.batch_size = batch_size
        self.position = 0
        self.recorded = 0
        self._open: dict[UUID, _Open] = {}
        # Readings of batch items not settled yet: their link and the position of the request.
        self._links: dict[UUID, tuple[BatchLink, int]] = {}
        super().__init__()

    async def run(self) -> None:
        try:
            # A lead that fails gives the lease up and resumes from the log when it next wins.
            await take_turns(
                self.lease,
                self._lead,
                role="batches",
                interval=self.settings.standby_interval,
                stopping=self._stopping,
                manager=self.name,
            )
        finally:
            log.info("batches.stopped", position=self.position, recorded=self.recorded)

    async def _lead(self) -> None:
        self._open.clear()
        self._links.clear()
        self.position = await self.store.consumer_position(self.settings.consumer)
        log.info("batches.leading", position=self.position)
        follower = self.feed.follow()
        saved_at = checked_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                if time.monotonic() - checked_at >= self.settings.standby_interval:
                    if not await self.lease.held():
                        log.warning("batches.lease_lost", position=self.position)
                        return
                    checked_at = time.monotonic()
                events = await follower.next_batch(
                    self.position, self.batch_size, timeout=self.settings.standby_interval
                )
                if events:
                    await self.handle(events)
                    self.position = events[-1].position
                if time.monotonic() - saved_at >= _SAVE_EVERY:
                    await self._save()
                    saved_at = time.monotonic()
        finally:
            follower.close()
        await self._save()

    async def _save(self) -> None:
        await self.store.save_consumer_position(self.settings.consumer, self.resume_position())

    def resume_position(self) -> int:
        """Where a restart must read from to pick up every open batch and unsettled item."""
        marks = [o.since - 1 for o in self._open.values()]
        marks.extend(requested - 1 for _, requested in self._links.values())
        return min([self.position, *marks])

    # -- reacting to events -------------------------------------------------------------

    async def handle(self, events: list[RecordedEvent]) -> None:
        """React to a run of events: record outcomes, then top every owner's window up."""
        outcomes: dict[UUID, list[_Outcome]] = {}
        for event in events:
            topic = event.type
            if topic == Reading.Requested.TOPIC:
                link = event.view(_Link)
                if link.batch is not None:
                    self._links[event.aggregate_id] = (link.batch, event.position)
                    opened = self._open.get(link.batch.batch_id)
                    if opened is not None:
                        opened.asked.add(link.batch.index)
            elif topic in {Reading.Generated.TOPIC, Reading.Failed.TOPIC}:
                found = self._links.pop(event.aggregate_id, None)
                if found is None:
                    continue
                batch_link = found[0]
                if topic == Reading.Failed.TOPIC:
                    failure = event.view(_Failure)
                    meta, reason = failure.meta, failure.reason
                else:
                    meta, reason = event.view(_Meta).meta, None
                outcomes.setdefault(batch_link.batch_id, []).append(
                    _Outcome(
                        batch_link.index,
                        event.aggregate_id,
                        batch_link.attempt,
                        reason,
                        meta.caused_by(event.position),
                    )
                )
            elif topic in {Batch.Started.TOPIC, Batch.FailedRetried.TOPIC, Batch.Cancelled.TOPIC}:
                # Outcomes gathered so far go first: the reload below must not lose them.
                await self._record_all(outcomes)
                outcomes = {}
                await self._reopen(event.aggregate_id, event.position)
        await self._record_all(outcomes)
        await self._top_up()

    async def _reopen(self, batch_id: UUID, position: int) -> None:
        """Track the batch as it now stands (started, retried or cancelled)."""
        batch = await self.store.load(Batch, batch_id)
        opened = self._open.get(batch_id)
        if batch is None or batch.status != "running":
            self._open.pop(batch_id, None)
            return
        if opened is None:
            self._open[batch_id] = _Open(batch, since=position)
            log.info("batches.opened", batch_id=str(batch_id), items=batch.total)
        else:
            opened.batch = batch
            opened.asked -= set(batch.outcomes)

    async def _record_all(self, outcomes: dict[UUID, list[_Outcome]]) -> None:
        if outcomes:
            await asyncio.gather(*(self._record(b, items) for b, items in outcomes.items()))

    async def _record(self, batch_id: UUID, outcomes: list[_Outcome]) -> None:
        """Append the outcomes to the batch; after a conflict, on the batch loaded again."""
        opened = self._open.get(batch_id)
        batch = opened.batch if opened is not None else await self.store.load(Batch, batch_id)
        for _ in range(10):
            if batch is None:
                return
            fresh = [
                o
                for o in outcomes
                if batch.record_outcome(
                    index=o.index,
                    reading_id=o.reading_id,
                    attempt=o.attempt,
                    reason=o.reason,
                    meta=o.meta,
                )
            ]
            try:
                if fresh:
                    position = await self.store.append(batch)
                    self.recorded += len(fresh)
                    log.debug(
                        "batches.outcomes_recorded",
                        batch_id=str(batch_id),
                        outcomes=len(fresh),
                        position=position,
                    )
            except ConcurrencyConflict:
                batch = await self.store.load(Batch, batch_id)
                continue
            break
        else:
            raise ConcurrencyConflict(f"batch {batch_id} kept changing under the manager")
        if opened is None or batch is None:
            return
        opened.batch = batch
        opened.asked -= {o.index for o in outcomes}
        if batch.status != "running":
            del self._open[batch_id]
            log.info(
                "batches.finished",
                batch_id=str(batch_id),
                status=batch.status,
                succeeded=batch.count("succeeded"),
                failed=batch.count("failed"),
            )

    # -- releasing items ----------------------------------------------------------------

    async def _top_up(self) -> None:
        """Release items until each owner has a window's worth in flight, taking turns
        among the owner's batches in the order they started."""
        owners: dict[str, list[_Open]] = {}
        for opened in sorted(self._open.values(), key=lambda o: o.since):
            owners.setdefault(opened.batch.owner, []).append(opened)
        asks: list[tuple[_Open, int]] = []
        for batches in owners.values():
            free = self.settings.window - sum(len(o.asked) for o in batches)
            if free <= 0:
                continue
            queues = [(o, iter(self._unasked(o, free))) for o in batches]
            while free > 0 and queues:
                for entry in list(queues):
                    index = next(entry[1], None)
                    if index is None:
                        queues.remove(entry)
                    elif free > 0:
                        asks.append((entry[0], index))
                        free -= 1
        if asks:
            await asyncio.gather(*(self._ask(opened, index) for opened, index in asks))

    @staticmethod
    def _unasked(opened: _Open, limit: int) -> list[int]:
        """Up to ``limit`` items, in order, with neither an outcome nor a reading asked for."""
        batch, found = opened.batch, []
        for index in range(batch.total):
            if index not in batch.outcomes and index not in opened.asked:
                found.append(index)
                if len(found) == limit:
                    break
        return found

    async def _ask(self, opened: _Open, index: int) -> None:
        batch = opened.batch
        item = batch.items[index]
        attempt = batch.attempt_of(index)
        reading = Reading.request(
            reading_id=batch.reading_id(index),
            meta=EventMeta(batch.owner, batch.correlation_id, f"position:{opened.since}"),
            birth=item.birth,
            options=item.options,
            kind=item.kind,
            label=item.label,
            request_hash=hashlib.sha256(msgspec.json.encode(item)).hexdigest(),
            batch=BatchLink(batch.id, index, attempt),
        )
        opened.asked.add(index)
        try:
            await self.store.append(reading)
        except ConcurrencyConflict:
            return  # asked for before (by this manager before a restart, or another)
