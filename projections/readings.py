"""The ``readings`` read model: one row per reading, as it stands."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from almanac.domain.chart import chart_hash
from almanac.domain.reading import Reading
from almanac.errors import ValidationFailed
from almanac.eventstore import RecordedEvent
from almanac.readmodels import BulkInsert, Dialect, Write

_encode = msgspec.json.Encoder().encode


def _json(value: object) -> str:
    return _encode(value).decode()


SCHEMA: dict[Dialect, list[str]] = {
    "sqlite": [
        (
            "CREATE TABLE IF NOT EXISTS readings ("
            " id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL,"
            " label TEXT, birth TEXT NOT NULL, options TEXT NOT NULL, chart_hash TEXT NOT NULL,"
            " has_chart INTEGER NOT NULL DEFAULT 0, text TEXT, failure TEXT,"
            " created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
            " requested_position INTEGER NOT NULL, position INTEGER NOT NULL)"
        ),
        "CREATE INDEX IF NOT EXISTS readings_owner_order ON readings (owner, requested_position)",
        "CREATE INDEX IF NOT EXISTS readings_order ON readings (requested_position)",
        (
            "CREATE TABLE IF NOT EXISTS charts ("
            " chart_hash TEXT PRIMARY KEY, chart TEXT NOT NULL, calculated_at TEXT NOT NULL,"
            " position INTEGER NOT NULL)"
        ),
    ],
    "postgres": [
        (
            "CREATE TABLE IF NOT EXISTS readings ("
            " id UUID PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL,"
            " label TEXT, birth JSONB NOT NULL, options JSONB NOT NULL, chart_hash TEXT NOT NULL,"
            " has_chart INTEGER NOT NULL DEFAULT 0, text JSONB, failure TEXT,"
            " created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL,"
            " requested_position BIGINT NOT NULL, position BIGINT NOT NULL)"
        ),
        "CREATE INDEX IF NOT EXISTS readings_owner_order ON readings (owner, requested_position)",
        "CREATE INDEX IF NOT EXISTS readings_order ON readings (requested_position)",
        (
            "CREATE TABLE IF NOT EXISTS charts ("
            " chart_hash TEXT PRIMARY KEY, chart JSONB NOT NULL,"
            " calculated_at TIMESTAMPTZ NOT NULL, position BIGINT NOT NULL)"
        ),
    ],
}
TABLES = ("readings", "charts")

INSERT_REQUESTED = (
    "INSERT INTO readings (id, owner, status, kind, label, birth, options, chart_hash,"
    " created_at, updated_at, requested_position, position)"
    " VALUES (:id, :owner, 'requested', :kind, :label, :birth, :options, :chart_hash,"
    " :at, :at, :position, :position)"
    " ON CONFLICT (id) DO NOTHING"
)
# A chart is stored once per hash; every reading of the same birth data shares it.
INSERT_CHART = (
    "INSERT INTO charts (chart_hash, chart, calculated_at, position)"
    " VALUES (:chart_hash, :chart, :at, :position) ON CONFLICT (chart_hash) DO NOTHING"
)
# The position guard makes every update idempotent: an event already applied changes nothing.
UPDATE_CHART = (
    "UPDATE readings SET status = 'chart_calculated', has_chart = 1, chart_hash = :chart_hash,"
    " updated_at = :at, position = :position WHERE id = :id AND position < :position"
)
UPDATE_GENERATED = (
    "UPDATE readings SET status = 'generated', text = :text, updated_at = :at,"
    " position = :position WHERE id = :id AND position < :position"
)
UPDATE_FAILED = (
    "UPDATE readings SET status = 'failed', failure = :reason, updated_at = :at,"
    " position = :position WHERE id = :id AND position < :position"
)


def _expected_chart_hash(requested: Reading.Requested) -> str:
    """The hash the chart will have; the chart's own hash replaces it once calculated.

    Birth data accepted when requested can fail validation later (a time zone removed from
    the tz database): the row then waits for the chart instead of stopping the projection.
    """
    try:
        return chart_hash(requested.birth, requested.options)
    except ValidationFailed:
        return ""


class ReadingsProjection:
    name = "readings"
    # Bump when the tables change shape: the runner then rebuilds them from position 0.
    version = 2
    schema = SCHEMA
    tables = TABLES

    def __init__(self) -> None:
        self._handlers: dict[str, Callable[[RecordedEvent], list[Write]]] = {
            Reading.Requested.TOPIC: self.requested,
            Reading.ChartCalculated.TOPIC: self.chart_calculated,
            Reading.Generated.TOPIC: self.generated,
            Reading.Failed.TOPIC: self.failed,
        }

    def handle(self, event: RecordedEvent) -> list[Write]:
        handler = self._handlers.get(event.type)
        return [] if handler is None else handler(event)

    @staticmethod
    def _common(event: RecordedEvent) -> dict[str, object]:
        return {
            "id": str(event.aggregate_id),
            "at": event.occurred_at.isoformat(),
            "position": event.position,
        }

    def requested(self, event: RecordedEvent) -> list[Write]:
        e: Reading.Requested = event.event
        row = {
            **self._common(event),
            "owner": event.meta.owner,
            "kind": e.kind,
            "label": e.label,
            "birth": _json(e.birth),
            "options": _json(e.options),
            "chart_hash": _expected_chart_hash(e),
        }
        return [(INSERT_REQUESTED, [row])]

    def chart_calculated(self, event: RecordedEvent) -> list[Write]:
        e: Reading.ChartCalculated = event.event
        common = self._common(event)
        chart = {
            "chart_hash": e.chart.chart_hash,
            "chart": _json(e.chart),
            "at": common["at"],
            "position": event.position,
        }
        return [
            (INSERT_CHART, [chart]),
            (UPDATE_CHART, [{**common, "chart_hash": e.chart.chart_hash}]),
        ]

    def generated(self, event: RecordedEvent) -> list[Write]:
        e: Reading.Generated = event.event
        return [(UPDATE_GENERATED, [{**self._common(event), "text": _json(e.text)}])]

    def failed(self, event: RecordedEvent) -> list[Write]:
        e: Reading.Failed = event.event
        return [(UPDATE_FAILED, [{**self._common(event), "reason": e.reason}])]

    def handle_batch(self, events: list[RecordedEvent]) -> list[Write]:
        """The writes of a whole run of events, folded: a reading requested in this run is
        inserted once, in its final state, and new readings and charts go in as multi-row
        inserts. A rebuild thus costs a few statements per batch instead of one per event;
        readings requested in earlier runs get the per-event updates."""
        fresh: dict[str, dict[str, object]] = {}
        charts: dict[str, dict[str, object]] = {}
        updates: list[Write] = []
        for event in events:
            key = str(event.aggregate_id)
            e = event.event
            if event.type == Reading.Requested.TOPIC:
                fresh[key] = {
                    **self._common(event),
                    "owner": event.meta.owner,
                    "status": "requested",
                    "kind": e.kind,
                    "label": e.label,
                    "birth": _json(e.birth),
                    "options": _json(e.options),
                    "chart_hash": _expected_chart_hash(e),
                    "has_chart": 0,
                    "text": None,
                    "failure": None,
                    "updated_at": event.occurred_at.isoformat(),
                    "requested_position": event.position,
                }
                continue
            if event.type not in self._handlers:
                continue
            if event.type == Reading.ChartCalculated.TOPIC:
                charts.setdefault(
                    e.chart.chart_hash,
                    {
                        "chart_hash": e.chart.chart_hash,
                        "chart": _json(e.chart),
                        "at": event.occurred_at.isoformat(),
                        "position": event.position,
                    },
                )
            row = fresh.get(key)
            if row is None:
                update = self._handlers[event.type](event)[-1]
                updates.append(update)
                continue
            row.update(updated_at=event.occurred_at.isoformat(), position=event.position)
            if event.type == Reading.ChartCalculated.TOPIC:
                row.update(status="chart_calculated", has_chart=1, chart_hash=e.chart.chart_hash)
            elif event.type == Reading.Generated.TOPIC:
                row.update(status="generated", text=_json(e.text))
            else:
                row.update(status="failed", failure=e.reason)
        result = multi_row_insert(
            "charts",
            ("chart_hash", "chart", "at", "position"),
            list(charts.values()),
            columns_as=("chart_hash", "chart", "calculated_at", "position"),
            on_conflict="ON CONFLICT (chart_hash) DO NOTHING",
        )
        result += multi_row_insert(
            "readings",
            _READING_VALUES,
            list(fresh.values()),
            columns_as=_READING_COLUMNS,
            on_conflict="ON CONFLICT (id) DO NOTHING",
        )
        return result + updates


_STATUS_OF = {
    UPDATE_CHART: "chart_calculated",
    UPDATE_GENERATED: "generated",
    UPDATE_FAILED: "failed",
}
_READING_VALUES = (
    "id",
    "owner",
    "status",
    "kind",
    "label",
    "birth",
    "options",
    "chart_hash",
    "has_chart",
    "text",
    "failure",
    "at",
    "updated_at",
    "requested_position",
    "position",
)
_READING_COLUMNS = (
    "id",
    "owner",
    "status",
    "kind",
    "label",
    "birth",
    "options",
    "chart_hash",
    "has_chart",
    "text",
    "failure",
    "created_at",
    "updated_at",
    "requested_position",
    "position",
)


def multi_row_insert(
    table: str,
    keys: tuple[str, ...],
    rows: list[dict[str, object]],
    *,
    columns_as: tuple[str, ...],
    on_conflict: str,
) -> list[Write]:
    if not rows:
        return []
    return [BulkInsert(table, columns_as, [[row[k] for k in keys] for row in rows], on_conflict)]
