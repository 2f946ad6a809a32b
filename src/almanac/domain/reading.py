"""The Reading aggregate: a request for an astrological reading and what became of it.

requested ──► chart_calculated ──► generated
     └──────────────┴────────────► failed
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate

from almanac.domain.chart import BirthData, Chart, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.interpretation import ReadingText
from almanac.domain.kinds import READING_KINDS, ReadingKind
from almanac.errors import Conflict

__all__ = [
    "READING_KINDS",
    "BatchLink",
    "Reading",
    "ReadingAlreadySettled",
    "ReadingKind",
    "ReadingStatus",
]
ReadingStatus = Literal["requested", "chart_calculated", "generated", "failed"]


class BatchLink(msgspec.Struct, frozen=True):
    """The batch item a reading carries out (its ``attempt``-th try)."""

    batch_id: UUID
    index: int
    attempt: int


class ReadingAlreadySettled(Conflict):
    """The reading has already been generated or has failed."""


class Reading(Aggregate):
    TOPIC = "reading"

    class Event(Aggregate.Event):
        TOPIC = "reading.event"
        meta: EventMeta

    class Requested(Event, Aggregate.Created):
        """A client asked for a reading of this birth data."""

        TOPIC = "reading.requested"
        birth: BirthData
        options: ChartOptions
        kind: ReadingKind
        label: str | None
        request_hash: str
        # Absent from readings asked for one by one (and from events stored before batches).
        batch: BatchLink | None = None

    class ChartCalculated(Event):
        """The chart for the birth data has been calculated."""

        TOPIC = "reading.chart_calculated"
        chart: Chart

        def apply(self, aggregate: Reading) -> None:
            aggregate.status = "chart_calculated"
            aggregate.chart = self.chart

    class Generated(Event):
        """The reading's text has been written."""

        TOPIC = "reading.generated"
        text: ReadingText

        def apply(self, aggregate: Reading) -> None:
            aggregate.status = "generated"
            aggregate.text = self.text

    class Failed(Event):
        """The reading could not be produced; ``reason`` says why."""

        TOPIC = "reading.failed"
        reason: str
        stage: Literal["chart", "text"]

        def apply(self, aggregate: Reading) -> None:
            aggregate.status = "failed"
            aggregate.failure = self.reason

    def __init__(  # noqa: PLR0917 - eventsourcing passes the Requested fields positionally
        self,
        meta: EventMeta,
        birth: BirthData,
        options: ChartOptions,
        kind: ReadingKind,
        label: str | None,
        request_hash: str,
        batch: BatchLink | None = None,
    ) -> None:
        self.owner = meta.owner
        self.birth = birth
        self.options = options
        self.kind = kind
        self.label = label
        self.request_hash = request_hash
        self.batch = batch
        self.status: ReadingStatus = "requested"
        self.chart: Chart | None = None
        self.text: ReadingText | None = None
        self.failure: str | None = None

    @classmethod
    def request(
        cls,
        *,
        reading_id: UUID,
        meta: EventMeta,
        birth: BirthData,
        options: ChartOptions,
        kind: ReadingKind,
        label: str | None,
        request_hash: str,
        batch: BatchLink | None = None,
    ) -> Reading:
        return cls._create(
            cls.Requested,
            id=reading_id,
            meta=meta,
            birth=birth,
            options=options,
            kind=kind,
            label=label,
            request_hash=request_hash,
            batch=batch,
        )

    @property
    def settled(self) -> bool:
        return self.status in ("generated", "failed")

    def record_chart(self, chart: Chart, meta: EventMeta) -> None:
        self._require_open()
        if self.status != "requested":
            raise Conflict("the chart has already been calculated")
        self.trigger_event(self.ChartCalculated, chart=chart, meta=meta)

    def record_text(self, text: ReadingText, meta: EventMeta) -> None:
        self._require_open()
        if self.chart is None:
            raise Conflict("the text needs the chart first")
        self.trigger_event(self.Generated, text=text, meta=meta)

    def fail(self, reason: str, meta: EventMeta) -> None:
        self._require_open()
        stage: Literal["chart", "text"] = "chart" if self.chart is None else "text"
        self.trigger_event(self.Failed, reason=reason, stage=stage, meta=meta)

    def _require_open(self) -> None:
        if self.settled:
            raise ReadingAlreadySettled(f"reading {self.id} is already {self.status}")
