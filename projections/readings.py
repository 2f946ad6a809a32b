"""The ``readings`` read model: one row per reading, as it stands."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from almanac.domain.chart import BirthData, ChartOptions, chart_hash
from almanac.domain.reading import Reading
from almanac.errors import ValidationFailed
from almanac.eventstore import RecordedEvent
from almanac.readmodels import BulkInsert, Dialect, Write

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
    # JSON documents (birth, options, chart, text) are kept as text, as msgspec encoded them:
    # they are only ever read back whole and decoded by msgspec, and Postgres parsing them
    # into JSONB on insert cost more than the rest of the row (a rebuild's inserts ran ~1.5x
    # faster as text; measurements in benchmarks/README.md). Rows of a few kB stay in the
    # table uncompressed: pglz gained next to nothing on these documents and cost a quarter of
    # the insert time.
    "postgres": [
        (
            "CREATE TABLE IF NOT EXISTS readings ("
            " id UUID PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL,"
            " label TEXT, birth TEXT NOT NULL, options TEXT NOT NULL, chart_hash TEXT NOT NULL,"
            " has_chart INTEGER NOT NULL DEFAULT 0, text TEXT, failure TEXT,"
            " created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL,"
            " requested_position BIGINT NOT NULL, position BIGINT NOT NULL)"
            " WITH (toast_tuple_target = 8160)"
        ),
        "CREATE INDEX IF NOT EXISTS readings_owner_order ON readings (owner, requested_position)",
        "CREATE INDEX IF NOT EXISTS readings_order ON readings (requested_position)",
        (
            "CREATE TABLE IF NOT EXISTS charts ("
            " chart_hash TEXT PRIMARY KEY, chart TEXT NOT NULL,"
            " calculated_at TIMESTAMPTZ NOT NULL, position BIGINT NOT NULL)"
            " WITH (toast_tuple_target = 8160)"
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


def _expected_chart_hash(birth: msgspec.Raw, options: msgspec.Raw) -> str:
    """The hash the chart will have; the chart's own hash replaces it once calculated.

    Birth data accepted when requested can fail validation later (a time zone removed from
    the tz database): the row then waits for the chart instead of stopping the projection.
    """
    try:
        return chart_hash(_birth.decode(birth), _options.decode(options))
    except (ValidationFailed, msgspec.ValidationError):
        return ""


def _text(raw: msgspec.Raw) -> str:
    return str(raw, "utf-8")


_HASH_FIRST = b'{"chart_hash":"'
_HASH_AT = len(_HASH_FIRST)
# Enough of the chart's front for any hash it could carry (SHA-256 in hex: 64 characters).
_HASH_WINDOW = _HASH_AT + 130


def _hash_of(chart: msgspec.Raw) -> str:
    """A stored chart's hash, read off the front of its JSON: msgspec writes a Struct's
    fields in order and ``chart_hash`` is the first of ``Chart``'s. Decoding the whole
    ~3 kB chart for it took 3.1 us a chart event, this 0.7; any other layout (a chart
    stored by an older version) is decoded."""
    head = bytes(memoryview(chart)[:_HASH_WINDOW])
    end = head.find(b'"', _HASH_AT)
    if head.startswith(_HASH_FIRST) and end > 0 and b"\\" not in head[_HASH_AT:end]:
        return head[_HASH_AT:end].decode()
    return _chart_hash.decode(chart).chart_hash


def _at(timestamp: str) -> str:
    """An event's timestamp as ``datetime.isoformat`` writes it, from the RFC 3339 text that
    msgspec stored (the same digits, ``Z`` for UTC): a tenth of the cost of decoding the
    datetime and formatting it again."""
    return f"{timestamp[:-1]}+00:00" if timestamp[-1] == "Z" else timestamp


# What this projection reads of each event: the stored JSON of birth, options, chart and text
# goes into the read model as it is, never decoded into Structs and encoded again. (msgspec
# encodes a Struct the same way every time, so these are the bytes a re-encoding would give.)
# They hold text only, so the cyclic garbage collector is not made to track them.
class _Owner(msgspec.Struct, gc=False):
    owner: str


class _Requested(msgspec.Struct, gc=False):
    timestamp: str
    meta: _Owner
    birth: msgspec.Raw
    options: msgspec.Raw
    kind: str
    label: str | None


class _ChartCalculated(msgspec.Struct, gc=False):
    timestamp: str
    chart: msgspec.Raw


class _ChartHash(msgspec.Struct, gc=False):
    chart_hash: str


class _Generated(msgspec.Struct, gc=False):
    timestamp: str
    text: msgspec.Raw


class _Failed(msgspec.Struct, gc=False):
    timestamp: str
    reason: str


_birth = msgspec.json.Decoder(BirthData)
_options = msgspec.json.Decoder(ChartOptions)
_chart_hash = msgspec.json.Decoder(_ChartHash)


class ReadingsProjection:
    name = "readings"
    # Bump when the tables change shape: the runner then rebuilds them from position 0.
    version = 3
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

    def requested(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_Requested)
        at = _at(e.timestamp)
        row = {
            "id": event.aggregate_key,
            "at": at,
            "position": event.position,
            "owner": e.meta.owner,
            "kind": e.kind,
            "label": e.label,
            "birth": _text(e.birth),
            "options": _text(e.options),
            "chart_hash": _expected_chart_hash(e.birth, e.options),
        }
        return [(INSERT_REQUESTED, [row])]

    def chart_calculated(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_ChartCalculated)
        at = _at(e.timestamp)
        hash_ = _hash_of(e.chart)
        chart = {"chart_hash": hash_, "chart": _text(e.chart), "at": at, "position": event.position}
        update = {"id": event.aggregate_key, "at": at, "position": event.position}
        return [(INSERT_CHART, [chart]), (UPDATE_CHART, [{**update, "chart_hash": hash_}])]

    def generated(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_Generated)
        row = {
            "id": event.aggregate_key,
            "at": _at(e.timestamp),
            "position": event.position,
            "text": _text(e.text),
        }
        return [(UPDATE_GENERATED, [row])]

    def failed(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_Failed)
        row = {
            "id": event.aggregate_key,
            "at": _at(e.timestamp),
            "position": event.position,
            "reason": e.reason,
        }
        return [(UPDATE_FAILED, [row])]

    def handle_batch(self, events: list[RecordedEvent]) -> list[Write]:
        """The writes of a whole run of events, folded: a reading requested in this run is
        inserted once, in its final state, and new readings and charts go in as multi-row
        inserts. A rebuild thus costs a few statements per batch instead of one per event;
        readings requested in earlier runs get the per-event updates."""
        fresh: dict[str, list[object]] = {}
        # Birth data and options of fresh readings, hashed only for the rows still without a
        # chart at the end of the run: most get theirs in the same run, and hashing is not free.
        births: dict[str, tuple[msgspec.Raw, msgspec.Raw]] = {}
        charts: dict[str, list[object]] = {}
        updates: list[Write] = []
        for event in events:
            topic = event.type
            if topic == _REQUESTED:
                r = event.view(_Requested)
                at = _at(r.timestamp)
                key = event.aggregate_key
                fresh[key] = [
                    *(key, r.meta.owner, "requested", r.kind, r.label),
                    *(_text(r.birth), _text(r.options), "", 0, None, None),
                    *(at, at, event.position, event.position),
                ]
                births[key] = (r.birth, r.options)
            elif topic in self._handlers:
                row = fresh.get(event.aggregate_key)
                if row is None:
                    updates.append(self._update(event, charts))
                else:
                    self._fold(row, event, charts)
        for key, row in fresh.items():
            if not row[_HAS_CHART]:
                row[_CHART_HASH] = _expected_chart_hash(*births[key])
        result: list[Write] = []
        if charts:
            result.append(
                BulkInsert("charts", _CHART_COLUMNS, list(charts.values()), _CHART_ON_CONFLICT)
            )
        if fresh:
            result.append(
                BulkInsert(
                    "readings",
                    _READING_COLUMNS,
                    list(fresh.values()),
                    _READING_ON_CONFLICT,
                    new_keys=True,
                )
            )
        return result + updates

    def _update(self, event: RecordedEvent, charts: dict[str, list[object]]) -> Write:
        """The update of a reading requested in an earlier run; its chart joins the run's."""
        if event.type != _CHART_CALCULATED:
            return self._handlers[event.type](event)[-1]
        c = event.view(_ChartCalculated)
        at = _at(c.timestamp)
        hash_ = _hash_of(c.chart)
        if hash_ not in charts:
            charts[hash_] = [hash_, _text(c.chart), at, event.position]
        row = {"id": event.aggregate_key, "at": at, "position": event.position}
        return (UPDATE_CHART, [{**row, "chart_hash": hash_}])

    @staticmethod
    def _fold(row: list[object], event: RecordedEvent, charts: dict[str, list[object]]) -> None:
        """Apply one event to the row of a reading requested in this run."""
        if event.type == _CHART_CALCULATED:
            c = event.view(_ChartCalculated)
            at = _at(c.timestamp)
            hash_ = _hash_of(c.chart)
            if hash_ not in charts:
                charts[hash_] = [hash_, _text(c.chart), at, event.position]
            row[_STATUS], row[_HAS_CHART], row[_CHART_HASH] = "chart_calculated", 1, hash_
        elif event.type == _GENERATED:
            g = event.view(_Generated)
            at = _at(g.timestamp)
            row[_STATUS], row[_TEXT] = "generated", _text(g.text)
        else:
            f = event.view(_Failed)
            at = _at(f.timestamp)
            row[_STATUS], row[_FAILURE] = "failed", f.reason
        row[_UPDATED_AT], row[_POSITION] = at, event.position


_REQUESTED = Reading.Requested.TOPIC
_CHART_CALCULATED = Reading.ChartCalculated.TOPIC
_GENERATED = Reading.Generated.TOPIC
_CHART_COLUMNS = ("chart_hash", "chart", "calculated_at", "position")
_CHART_ON_CONFLICT = "ON CONFLICT (chart_hash) DO NOTHING"
# A run that overlaps events already applied (a redelivery) may hold a reading's request
# and events after those its row has: the row takes the run's final state where that is
# newer. What the request sets (owner, birth, created_at, ...) never changes.
_READING_ON_CONFLICT = (
    "ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " chart_hash = excluded.chart_hash, has_chart = excluded.has_chart,"
    " text = excluded.text, failure = excluded.failure, updated_at = excluded.updated_at,"
    " position = excluded.position WHERE readings.position < excluded.position"
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

# Where each column sits in a fresh reading's row (the order of _READING_COLUMNS).
_STATUS, _CHART_HASH, _HAS_CHART, _TEXT, _FAILURE, _UPDATED_AT, _POSITION = (
    _READING_COLUMNS.index(c)
    for c in ("status", "chart_hash", "has_chart", "text", "failure", "updated_at", "position")
)
