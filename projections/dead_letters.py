"""The ``dead_letters`` read model: one row per piece of work given up on after its last
delivery, as the ``reading.failed`` that carries a dead letter records it.

Admins list it (``GET /api/v1/dead-letters``); the failure itself reaches the reading, its
batch and every subscriber as an ordinary ``reading.failed``.
"""

from __future__ import annotations

import msgspec

from almanac.domain.reading import Reading
from almanac.eventstore import RecordedEvent
from almanac.readmodels import Dialect, Write
from projections.readings import _at

# Keyed by the position of the work given up on (a reading's request): it is given up once.
_TABLE = (
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " position {big} PRIMARY KEY, event_type TEXT NOT NULL, aggregate_id TEXT NOT NULL,"
    " owner TEXT NOT NULL, consumer TEXT NOT NULL, deliveries INTEGER NOT NULL,"
    " last_error TEXT NOT NULL, failed_at TEXT NOT NULL, failed_position {big} NOT NULL)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS dead_letters_order ON dead_letters (failed_position)"
SCHEMA: dict[Dialect, list[str]] = {
    "sqlite": [_TABLE.format(big="INTEGER"), _INDEX],
    "postgres": [_TABLE.format(big="BIGINT"), _INDEX],
}
TABLES = ("dead_letters",)

INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (position, event_type, aggregate_id, owner, consumer,"
    " deliveries, last_error, failed_at, failed_position) VALUES (:position, :event_type,"
    " :aggregate_id, :owner, :consumer, :deliveries, :last_error, :at, :failed_position)"
    " ON CONFLICT (position) DO NOTHING"
)


class _Owner(msgspec.Struct):
    owner: str


class _DeadLetter(msgspec.Struct):
    consumer: str
    position: int
    deliveries: int
    last_error: str


class _Failed(msgspec.Struct):
    timestamp: str
    meta: _Owner
    dead_letter: _DeadLetter | None = None


class DeadLettersProjection:
    name = "dead_letters"
    # Bump when the table changes shape: the runner then rebuilds it from position 0.
    version = 1
    schema = SCHEMA
    tables = TABLES

    def handle(self, event: RecordedEvent) -> list[Write]:
        if event.type != Reading.Failed.TOPIC:
            return []
        e = event.view(_Failed)
        dead = e.dead_letter
        if dead is None:
            return []
        row = {
            "position": dead.position,
            # The work a reading's dead letter gives up on is always its request.
            "event_type": Reading.Requested.TOPIC,
            "aggregate_id": event.aggregate_key,
            "owner": e.meta.owner,
            "consumer": dead.consumer,
            "deliveries": dead.deliveries,
            "last_error": dead.last_error,
            "at": _at(e.timestamp),
            "failed_position": event.position,
        }
        return [(INSERT_DEAD_LETTER, [row])]
