"""The ``batches`` read model: one row per batch with its counts, one row per item with
its outcome (the batch's results)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from almanac.domain.batch import Batch
from almanac.eventstore import RecordedEvent
from almanac.readmodels import BulkInsert, Dialect, Write
from projections.readings import _at

# Timestamps are kept as the ISO 8601 text events carry, alike on both engines: they are
# only shown and subtracted, never compared in SQL.
_BATCHES = (
    "CREATE TABLE IF NOT EXISTS batches ("
    " id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, label TEXT,"
    " total INTEGER NOT NULL, succeeded INTEGER NOT NULL DEFAULT 0,"
    " failed INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
    " finished_at TEXT, started_position {big} NOT NULL, position {big} NOT NULL)"
)
_ITEMS = (
    "CREATE TABLE IF NOT EXISTS batch_items ("
    " batch_id TEXT NOT NULL, idx INTEGER NOT NULL, reading_id TEXT, status TEXT NOT NULL,"
    " attempt INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL, label TEXT, reason TEXT,"
    " updated_at TEXT NOT NULL, position {big} NOT NULL, PRIMARY KEY (batch_id, idx))"
)
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS batches_owner_order ON batches (owner, started_position)",
    "CREATE INDEX IF NOT EXISTS batches_order ON batches (started_position)",
]
SCHEMA: dict[Dialect, list[str]] = {
    "sqlite": [_BATCHES.format(big="INTEGER"), _ITEMS.format(big="INTEGER"), *_INDEXES],
    "postgres": [_BATCHES.format(big="BIGINT"), _ITEMS.format(big="BIGINT"), *_INDEXES],
}
TABLES = ("batches", "batch_items")

INSERT_BATCH = (
    "INSERT INTO batches (id, owner, status, label, total, created_at, updated_at,"
    " started_position, position)"
    " VALUES (:id, :owner, 'running', :label, :total, :at, :at, :position, :position)"
    " ON CONFLICT (id) DO NOTHING"
)
_ITEM_COLUMNS = ("batch_id", "idx", "status", "kind", "label", "updated_at", "position")
# Every update is guarded by position, so an event applied already changes nothing; counts
# move only with the item's own update (the batch row's guard keeps them exact on a replay).
ITEM_OUTCOME = (
    "UPDATE batch_items SET status = :status, reading_id = :reading_id, reason = :reason,"
    " updated_at = :at, position = :position"
    " WHERE batch_id = :batch_id AND idx = :idx AND position < :position"
)
COUNT_OUTCOME = (
    "UPDATE batches SET succeeded = succeeded + :succeeded, failed = failed + :failed,"
    " updated_at = :at, position = :position WHERE id = :batch_id AND position < :position"
)
ITEM_RETRIED = (
    "UPDATE batch_items SET status = 'pending', attempt = attempt + 1, reason = NULL,"
    " updated_at = :at, position = :position"
    " WHERE batch_id = :batch_id AND idx = :idx AND position < :position"
)
BATCH_RETRIED = (
    "UPDATE batches SET status = 'running', failed = failed - :count, finished_at = NULL,"
    " updated_at = :at, position = :position WHERE id = :batch_id AND position < :position"
)
BATCH_FINISHED = (
    "UPDATE batches SET status = :status, finished_at = :at, updated_at = :at,"
    " position = :position WHERE id = :batch_id AND position < :position"
)


class _Owner(msgspec.Struct):
    owner: str


class _Item(msgspec.Struct):
    kind: str = "natal"
    label: str | None = None


class _Started(msgspec.Struct):
    timestamp: str
    meta: _Owner
    items: list[_Item]
    label: str | None


class _Outcome(msgspec.Struct):
    timestamp: str
    index: int
    reading_id: str
    reason: str | None = None


class _Retried(msgspec.Struct):
    timestamp: str
    indexes: list[int]


class _Stamp(msgspec.Struct):
    timestamp: str


class BatchesProjection:
    name = "batches"
    # Bump when the tables change shape: the runner then rebuilds them from position 0.
    version = 1
    schema = SCHEMA
    tables = TABLES

    def __init__(self) -> None:
        self._handlers: dict[str, Callable[[RecordedEvent], list[Write]]] = {
            Batch.Started.TOPIC: self.started,
            Batch.ItemSucceeded.TOPIC: self.item_succeeded,
            Batch.ItemFailed.TOPIC: self.item_failed,
            Batch.FailedRetried.TOPIC: self.failed_retried,
            Batch.Completed.TOPIC: self.completed,
            Batch.Cancelled.TOPIC: self.cancelled,
        }

    def handle(self, event: RecordedEvent) -> list[Write]:
        handler = self._handlers.get(event.type)
        return [] if handler is None else handler(event)

    def started(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_Started)
        at = _at(e.timestamp)
        key = event.aggregate_key
        batch = {
            "id": key,
            "owner": e.meta.owner,
            "label": e.label,
            "total": len(e.items),
            "at": at,
            "position": event.position,
        }
        rows = [
            [key, index, "pending", item.kind, item.label, at, event.position]
            for index, item in enumerate(e.items)
        ]
        return [
            (INSERT_BATCH, [batch]),
            BulkInsert(
                "batch_items",
                _ITEM_COLUMNS,
                rows,
                "ON CONFLICT (batch_id, idx) DO NOTHING",
                new_keys=True,
            ),
        ]

    def item_succeeded(self, event: RecordedEvent) -> list[Write]:
        return self._outcome(event, "succeeded")

    def item_failed(self, event: RecordedEvent) -> list[Write]:
        return self._outcome(event, "failed")

    @staticmethod
    def _outcome(event: RecordedEvent, status: str) -> list[Write]:
        e = event.view(_Outcome)
        at = _at(e.timestamp)
        common = {"batch_id": event.aggregate_key, "at": at, "position": event.position}
        item = {**common, "idx": e.index, "status": status, "reading_id": e.reading_id}
        counts = {
            **common,
            "succeeded": int(status == "succeeded"),
            "failed": int(status == "failed"),
        }
        return [(ITEM_OUTCOME, [{**item, "reason": e.reason}]), (COUNT_OUTCOME, [counts])]

    def failed_retried(self, event: RecordedEvent) -> list[Write]:
        e = event.view(_Retried)
        common = {
            "batch_id": event.aggregate_key,
            "at": _at(e.timestamp),
            "position": event.position,
        }
        items = [{**common, "idx": index} for index in e.indexes]
        return [(ITEM_RETRIED, items), (BATCH_RETRIED, [{**common, "count": len(e.indexes)}])]

    def completed(self, event: RecordedEvent) -> list[Write]:
        return self._finished(event, "completed")

    def cancelled(self, event: RecordedEvent) -> list[Write]:
        return self._finished(event, "cancelled")

    @staticmethod
    def _finished(event: RecordedEvent, status: str) -> list[Write]:
        e = event.view(_Stamp)
        row = {
            "batch_id": event.aggregate_key,
            "status": status,
            "at": _at(e.timestamp),
            "position": event.position,
        }
        return [(BATCH_FINISHED, [row])]
