"""Read-model views: the shapes queries return and caches hold, and how rows become them.

Shared by the projector (which refreshes caches after a commit) and the query side.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from almanac.domain.chart import BirthData, Chart, ChartOptions
from almanac.domain.interpretation import ReadingText
from almanac.readmodels import Row


class ReadingView(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    kind: str
    label: str | None
    birth: BirthData
    options: ChartOptions
    chart_hash: str
    chart: Chart | None
    text: ReadingText | None
    failure: str | None
    created_at: datetime
    updated_at: datetime
    position: int


class ChartView(msgspec.Struct, frozen=True):
    chart_hash: str
    chart: Chart
    calculated_at: datetime
    position: int


class CachedReading(msgspec.Struct, frozen=True):
    """A reading as caches hold it: with its owner, so access can be checked on a hit."""

    owner: str
    view: ReadingView


# The reading with its chart (stored once per chart hash, shared by every reading of it).
SELECT_READINGS = (
    "SELECT r.id, r.owner, r.status, r.kind, r.label, r.birth, r.options, r.chart_hash,"
    " c.chart, r.text, r.failure, r.created_at, r.updated_at, r.position"
    " FROM readings r LEFT JOIN charts c ON r.has_chart = 1 AND c.chart_hash = r.chart_hash"
)
SELECT_CHART = (
    "SELECT chart_hash, chart, calculated_at, position FROM charts WHERE chart_hash = :chart_hash"
)

_birth = msgspec.json.Decoder(BirthData)
_options = msgspec.json.Decoder(ChartOptions)
_chart = msgspec.json.Decoder(Chart)
_text = msgspec.json.Decoder(ReadingText)


def reading_from_row(row: Row) -> CachedReading:
    chart, text = row["chart"], row["text"]
    view = ReadingView(
        id=_uuid(row["id"]),
        status=row["status"],
        kind=row["kind"],
        label=row["label"],
        birth=_birth.decode(row["birth"]),
        options=_options.decode(row["options"]),
        chart_hash=row["chart_hash"],
        chart=None if chart is None else _chart.decode(chart),
        text=None if text is None else _text.decode(text),
        failure=row["failure"],
        created_at=_timestamp(row["created_at"]),
        updated_at=_timestamp(row["updated_at"]),
        position=int(row["position"]),
    )
    return CachedReading(owner=row["owner"], view=view)


def chart_from_row(row: Row) -> ChartView:
    return ChartView(
        chart_hash=row["chart_hash"],
        chart=_chart.decode(row["chart"]),
        calculated_at=_timestamp(row["calculated_at"]),
        position=int(row["position"]),
    )


# SQLite hands back text where Postgres hands back typed values.
def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)


def _timestamp(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)
