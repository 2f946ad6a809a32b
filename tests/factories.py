"""Small builders of valid inputs for tests, and a clock they move by hand."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from almanac.domain.chart import BirthData, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading


def birth(**changes: Any) -> BirthData:
    fields: dict[str, Any] = {
        "date": "1990-04-12",
        "time": "14:30",
        "timezone": "Europe/London",
        "latitude": 51.5074,
        "longitude": -0.1278,
    }
    fields.update(changes)
    return BirthData(**fields)


def birth_json(**changes: Any) -> dict[str, Any]:
    b = birth()
    fields: dict[str, Any] = {
        "date": b.date,
        "time": b.time,
        "timezone": b.timezone,
        "latitude": b.latitude,
        "longitude": b.longitude,
    }
    fields.update(changes)
    return fields


def meta(owner: str = "owner-a") -> EventMeta:
    return EventMeta.for_request(owner)


def new_reading(
    reading_id: UUID | None = None, owner: str = "owner-a", label: str | None = None
) -> Reading:
    return Reading.request(
        reading_id=reading_id or uuid4(),
        meta=meta(owner),
        birth=birth(),
        options=ChartOptions(),
        kind="natal",
        label=label,
        request_hash="0" * 64,
    )


class Clock:
    """Monotonic time that moves only when a test moves it: called, or as the
    ``monotonic`` of a stand-in for the ``time`` module."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
