"""Reading the event log in tests: everything at once, or incrementally while it grows."""

from __future__ import annotations

from collections import Counter, defaultdict
from uuid import UUID

from almanac.domain.reading import Reading
from almanac.eventstore import EventStore, RecordedEvent

PAGE = 1000
# More pages than any test writes; bounds the reading loops.
MAX_PAGES = 1000

REQUESTED = Reading.Requested.TOPIC
CHART_CALCULATED = Reading.ChartCalculated.TOPIC
GENERATED = Reading.Generated.TOPIC
FAILED = Reading.Failed.TOPIC


async def whole_log(store: EventStore) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    for _ in range(MAX_PAGES):
        page = await store.read(events[-1].position if events else 0, PAGE)
        events.extend(page)
        if len(page) < PAGE:
            return events
    raise AssertionError(f"the log has more than {PAGE * MAX_PAGES} events")


def by_reading(events: list[RecordedEvent]) -> dict[UUID, list[RecordedEvent]]:
    grouped: dict[UUID, list[RecordedEvent]] = defaultdict(list)
    for event in events:
        grouped[event.aggregate_id].append(event)
    return dict(grouped)


class LogTally:
    """Counts events by type as the log grows, reading only what is new each time."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.position = 0
        self.types: Counter[str] = Counter()
        self.per_reading: dict[UUID, list[str]] = defaultdict(list)

    def refresh(self) -> LogTally:
        for _ in range(MAX_PAGES):
            page = self.store.read_sync(self.position, PAGE)
            for event in page:
                self.types[event.type] += 1
                self.per_reading[event.aggregate_id].append(event.type)
            if page:
                self.position = page[-1].position
            if len(page) < PAGE:
                return self
        raise AssertionError(f"the log has more than {PAGE * MAX_PAGES} new events")

    def count(self, event_type: str) -> int:
        return self.refresh().types[event_type]
