"""The Batch aggregate: many readings asked for at once, and the outcome of each.

started ──► item_succeeded | item_failed (one per item) ──► completed
   │                 ▲            │                              │
   │                 └─ failed_retried (failed items again) ◄────┘
   └──► cancelled (no new items start; items already running still report)
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID, uuid5

import msgspec
from eventsourcing.domain import Aggregate

from almanac.domain.chart import BirthData, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.kinds import ReadingKind
from almanac.errors import Conflict

__all__ = ["MAX_ITEMS", "Batch", "BatchFinished", "BatchItem", "BatchStatus", "ItemOutcome"]

MAX_ITEMS = 10_000
BatchStatus = Literal["running", "completed", "cancelled"]
ItemOutcome = Literal["succeeded", "failed"]


class BatchItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One reading of a batch: the same fields as a single reading request."""

    birth: BirthData
    kind: ReadingKind = "natal"
    label: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=200,
                description="A name for the reading; no control characters.",
            ),
        ]
        | None
    ) = None
    options: ChartOptions = ChartOptions()


class BatchFinished(Conflict):
    """The batch is cancelled (or has nothing to retry): the command does not apply."""


class Batch(Aggregate):
    TOPIC = "batch"

    class Event(Aggregate.Event):
        TOPIC = "batch.event"
        meta: EventMeta

    class Started(Event, Aggregate.Created):
        """A client asked for a reading of each item."""

        TOPIC = "batch.started"
        items: list[BatchItem]
        label: str | None
        request_hash: str

    class ItemSucceeded(Event):
        """The reading of item ``index`` was generated."""

        TOPIC = "batch.item_succeeded"
        index: int
        reading_id: UUID
        attempt: int

        def apply(self, aggregate: Batch) -> None:
            aggregate.outcomes[self.index] = "succeeded"
            aggregate.failures.pop(self.index, None)

    class ItemFailed(Event):
        """The reading of item ``index`` failed; ``reason`` says why."""

        TOPIC = "batch.item_failed"
        index: int
        reading_id: UUID
        attempt: int
        reason: str

        def apply(self, aggregate: Batch) -> None:
            aggregate.outcomes[self.index] = "failed"
            aggregate.failures[self.index] = self.reason

    class FailedRetried(Event):
        """The failed items ``indexes`` are to be tried again, each as a new reading."""

        TOPIC = "batch.failed_retried"
        indexes: list[int]

        def apply(self, aggregate: Batch) -> None:
            for index in self.indexes:
                aggregate.outcomes.pop(index, None)
                aggregate.failures.pop(index, None)
                aggregate.attempts[index] = aggregate.attempts.get(index, 0) + 1
            aggregate.status = "running"

    class Completed(Event):
        """Every item has an outcome."""

        TOPIC = "batch.completed"
        succeeded: int
        failed: int

        def apply(self, aggregate: Batch) -> None:
            aggregate.status = "completed"

    class Cancelled(Event):
        """No further items start; those already running finish and still report."""

        TOPIC = "batch.cancelled"
        succeeded: int
        failed: int

        def apply(self, aggregate: Batch) -> None:
            aggregate.status = "cancelled"

    def __init__(
        self, meta: EventMeta, items: list[BatchItem], label: str | None, request_hash: str
    ) -> None:
        self.owner = meta.owner
        self.correlation_id = meta.correlation_id
        self.items = items
        self.label = label
        self.request_hash = request_hash
        self.status: BatchStatus = "running"
        self.outcomes: dict[int, ItemOutcome] = {}
        self.failures: dict[int, str] = {}
        # How often each item was retried; a retry is a new reading with a new id.
        self.attempts: dict[int, int] = {}

    @classmethod
    def start(
        cls,
        *,
        batch_id: UUID,
        meta: EventMeta,
        items: list[BatchItem],
        label: str | None,
        request_hash: str,
    ) -> Batch:
        return cls._create(
            cls.Started,
            id=batch_id,
            meta=meta,
            items=items,
            label=label,
            request_hash=request_hash,
        )

    @property
    def total(self) -> int:
        return len(self.items)

    def attempt_of(self, index: int) -> int:
        return self.attempts.get(index, 0)

    def reading_id(self, index: int) -> UUID:
        """The reading that carries out the current attempt at item ``index``: derived, so
        that releasing an item twice (after a crash) asks for the same reading."""
        return uuid5(self.id, f"{index}:{self.attempt_of(index)}")

    def pending(self) -> list[int]:
        """Items without an outcome, in order."""
        return [i for i in range(self.total) if i not in self.outcomes]

    def count(self, outcome: ItemOutcome) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    def record_outcome(
        self,
        *,
        index: int,
        reading_id: UUID,
        attempt: int,
        reason: str | None,
        meta: EventMeta,
    ) -> bool:
        """Record how item ``index`` went; ``False`` when that is known already (a repeat)
        or stale (the outcome of an attempt since retried)."""
        if not 0 <= index < self.total or index in self.outcomes:
            return False
        if attempt != self.attempt_of(index):
            return False
        if reason is None:
            self.trigger_event(
                self.ItemSucceeded, index=index, reading_id=reading_id, attempt=attempt, meta=meta
            )
        else:
            self.trigger_event(
                self.ItemFailed,
                index=index,
                reading_id=reading_id,
                attempt=attempt,
                reason=reason,
                meta=meta,
            )
        if self.status == "running" and len(self.outcomes) == self.total:
            self.trigger_event(
                self.Completed,
                succeeded=self.count("succeeded"),
                failed=self.count("failed"),
                meta=meta,
            )
        return True

    def cancel(self, meta: EventMeta) -> None:
        if self.status == "cancelled":
            return
        if self.status != "running":
            raise BatchFinished(f"batch {self.id} is already {self.status}")
        self.trigger_event(
            self.Cancelled,
            succeeded=self.count("succeeded"),
            failed=self.count("failed"),
            meta=meta,
        )

    def retry_failed(self, meta: EventMeta) -> list[int]:
        if self.status == "cancelled":
            raise BatchFinished(f"batch {self.id} is cancelled")
        failed = sorted(i for i, o in self.outcomes.items() if o == "failed")
        if failed:
            self.trigger_event(self.FailedRetried, indexes=failed, meta=meta)
        return failed
