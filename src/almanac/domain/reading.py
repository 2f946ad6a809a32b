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
    "DeadLetter",
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


class DeadLetter(msgspec.Struct, frozen=True):
    """Work on a reading given up: its request, at ``position``, was delivered ``deliveries``
    times to the work feed's ``consumer`` and never done; ``last_error`` is the last failure."""

    consumer: str
    position: int
    deliveries: int
    last_error: str

    @property
    def reason(self) -> str:
        deliveries = "1 delivery" if self.deliveries == 1 else f"{self.deliveries} deliveries"
        return f"exhausted {deliveries}: {self.last_error}"


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
        # Set when the reading failed because its work was given up after every delivery
        # failed (absent otherwise, and from events stored before dead letters).
        dead_letter: DeadLetter | None = None

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
        # What eventsourcing's ``_create`` does, without the general steps that find the
        # event's and ``__init__``'s parameters by their signatures on every call: 7.0 ->
        # 2.7 µs, on the path of every POST. ``Requested`` has no ``apply``; a test checks
        # that this aggregate equals the one its event builds when the reading is loaded.
        #
        # The event is built as the store's mapper builds a loaded one, its fields set at
        # once: the frozen dataclass's ``__init__`` sets them one by one through
        # ``object.__setattr__``, two thirds of the instructions of this method (callgrind:
        # 25k of 36k). Its one check, an ``originator_id`` that is a UUID, holds by the
        # parameter's type. In the dataclass's order of fields, which the stored JSON keeps;
        # a test checks that this event equals the dataclass's own.
        event = object.__new__(cls.Requested)
        object.__setattr__(
            event,
            "__dict__",
            {
                "originator_id": reading_id,
                "originator_version": cls.INITIAL_VERSION,
                "timestamp": cls.Requested.create_timestamp(),
                "originator_topic": cls.TOPIC,
                "meta": meta,
                "birth": birth,
                "options": options,
                "kind": kind,
                "label": label,
                "request_hash": request_hash,
                "batch": batch,
            },
        )
        reading = cls.__new__(cls)
        reading.__base_init__(reading_id, cls.INITIAL_VERSION, event.timestamp)
        reading.__init__(meta, birth, options, kind, label, request_hash, batch)  # type: ignore[misc]
        reading.pending_events.append(event)
        return reading

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
        self.trigger_event(self.Failed, reason=reason, stage=self._stage, meta=meta)

    def abandon(self, dead_letter: DeadLetter, meta: EventMeta) -> None:
        """Fail the reading because the work on it was given up (delivered too often)."""
        self._require_open()
        self.trigger_event(
            self.Failed,
            reason=dead_letter.reason,
            stage=self._stage,
            meta=meta,
            dead_letter=dead_letter,
        )

    @property
    def _stage(self) -> Literal["chart", "text"]:
        return "chart" if self.chart is None else "text"

    def _require_open(self) -> None:
        if self.settled:
            raise ReadingAlreadySettled(f"reading {self.id} is already {self.status}")
