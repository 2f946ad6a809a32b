"""Bookkeeping every projection shares: its lease, its schema version and its parked events,
and the read cache's mark (``cache_positions``: every commit up to it is refreshed in Redis).

The active runner writes these rows in the read database; the admin API reads them and
files requests (retry or skip a parked event) that the runner picks up, in whichever
process it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from almanac.readmodels import POSITIONS_SCHEMA, Dialect, ReadDatabase, Row

State = Literal["standby", "rebuilding", "running", "retrying", "parked", "stopped"]

_TEXT_TIME = {"sqlite": "TEXT", "postgres": "TIMESTAMPTZ"}
_BIGINT = {"sqlite": "INTEGER", "postgres": "BIGINT"}


def bookkeeping_schema(dialect: Dialect) -> list[str]:
    at, big = _TEXT_TIME[dialect], _BIGINT[dialect]
    return [
        *POSITIONS_SCHEMA[dialect],
        (
            "CREATE TABLE IF NOT EXISTS projection_leases ("
            f" name TEXT PRIMARY KEY, holder TEXT NOT NULL, state TEXT NOT NULL,"
            f" detail TEXT, heartbeat_at {at} NOT NULL)"
        ),
        (
            "CREATE TABLE IF NOT EXISTS projection_schemas ("
            f" name TEXT PRIMARY KEY, version INTEGER NOT NULL, built_at {at} NOT NULL)"
        ),
        # One row per parking of an event; ``request`` is what an operator asked for and
        # ``resolution`` what the runner did. A skipped event stays here as the record.
        (
            "CREATE TABLE IF NOT EXISTS projection_parked ("
            f" name TEXT NOT NULL, position {big} NOT NULL, event_type TEXT NOT NULL,"
            " aggregate_id TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,"
            f" parked_at {at} NOT NULL, request TEXT, resolution TEXT, resolved_at {at},"
            " PRIMARY KEY (name, position))"
        ),
        # How far the shared cache has taken in a projection's commits: every change
        # committed at or before ``position`` is in it (refreshed) or out of it (evicted).
        # ``lead`` is the refresher that may move it (``projections/cache_refresher.py``):
        # one that lost its lead without knowing it yet cannot.
        (
            "CREATE TABLE IF NOT EXISTS cache_positions (name TEXT PRIMARY KEY,"
            f" position {big} NOT NULL, lead TEXT NOT NULL, updated_at {at} NOT NULL)"
        ),
    ]


SAVE_LEASE = (
    "INSERT INTO projection_leases (name, holder, state, detail, heartbeat_at)"
    " VALUES (:name, :holder, :state, :detail, :at)"
    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, state = excluded.state,"
    " detail = excluded.detail, heartbeat_at = excluded.heartbeat_at"
)
# A runner that stops marks the lease stopped only if a successor has not taken it yet.
STOP_LEASE = (
    "UPDATE projection_leases SET state = 'stopped', detail = :detail, heartbeat_at = :at"
    " WHERE name = :name AND holder = :holder"
)
SAVE_SCHEMA_VERSION = (
    "INSERT INTO projection_schemas (name, version, built_at) VALUES (:name, :version, :at)"
    " ON CONFLICT (name) DO UPDATE SET version = excluded.version, built_at = excluded.built_at"
)
PARK = (
    "INSERT INTO projection_parked (name, position, event_type, aggregate_id, error, attempts,"
    " parked_at) VALUES (:name, :position, :event_type, :aggregate_id, :error, :attempts, :at)"
    " ON CONFLICT (name, position) DO UPDATE SET error = excluded.error,"
    " attempts = projection_parked.attempts + excluded.attempts,"
    " parked_at = excluded.parked_at, request = NULL, resolution = NULL, resolved_at = NULL"
)
REQUEST = (
    "UPDATE projection_parked SET request = :request"
    " WHERE name = :name AND position = :position AND resolution IS NULL"
)
RESOLVE = (
    "UPDATE projection_parked SET resolution = :resolution, resolved_at = :at"
    " WHERE name = :name AND position = :position"
)
_PARKED_COLUMNS = (
    "position, event_type, aggregate_id, error, attempts, parked_at, request, resolution,"
    " resolved_at"
)


def now() -> str:
    return datetime.now(UTC).isoformat()


async def schema_version(db: ReadDatabase, name: str) -> int | None:
    row = await db.fetch_one(
        "SELECT version FROM projection_schemas WHERE name = :name", {"name": name}
    )
    return None if row is None else int(row["version"])


async def open_parking(db: ReadDatabase, name: str) -> Row | None:
    """The event this projection is parked on, if any."""
    return await db.fetch_one(
        f"SELECT {_PARKED_COLUMNS} FROM projection_parked"
        " WHERE name = :name AND resolution IS NULL ORDER BY position LIMIT 1",
        {"name": name},
    )


class ParkedEvent(msgspec.Struct, frozen=True):
    position: int
    event_type: str
    aggregate_id: str
    error: str
    attempts: int
    parked_at: str
    request: str | None = None
    resolution: str | None = None
    resolved_at: str | None = None


class ProjectionStatus(msgspec.Struct, frozen=True):
    name: str
    state: str
    position: int
    head: int
    lag: int
    schema_version: int | None
    holder: str | None
    heartbeat_at: str | None
    detail: str | None
    parked: list[ParkedEvent]


# A lease not renewed for this long belongs to a process that is gone.
STALE_AFTER = 15.0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def parked_event(row: Mapping[str, Any]) -> ParkedEvent:
    return ParkedEvent(
        position=int(row["position"]),
        event_type=str(row["event_type"]),
        aggregate_id=str(row["aggregate_id"]),
        error=str(row["error"]),
        attempts=int(row["attempts"]),
        parked_at=_text(row["parked_at"]) or "",
        request=row["request"],
        resolution=row["resolution"],
        resolved_at=_text(row["resolved_at"]),
    )


async def projection_status(
    db: ReadDatabase, name: str, head: int, *, history: int = 20
) -> ProjectionStatus:
    """Where projection ``name`` stands, read from the database (any process may run it)."""
    params = {"name": name}
    position_row = await db.fetch_one(
        "SELECT position FROM projection_positions WHERE name = :name", params
    )
    lease = await db.fetch_one(
        "SELECT holder, state, detail, heartbeat_at FROM projection_leases WHERE name = :name",
        params,
    )
    parked = await db.fetch_all(
        f"SELECT {_PARKED_COLUMNS} FROM projection_parked WHERE name = :name"
        " ORDER BY position DESC LIMIT :limit",
        {**params, "limit": history},
    )
    position = 0 if position_row is None else int(position_row["position"])
    state = "stopped"
    heartbeat = None
    if lease is not None:
        heartbeat = _text(lease["heartbeat_at"])
        beat = datetime.fromisoformat(heartbeat) if heartbeat else None
        fresh = beat is not None and (datetime.now(UTC) - beat).total_seconds() < STALE_AFTER
        state = str(lease["state"]) if fresh else "stopped"
    return ProjectionStatus(
        name=name,
        state=state,
        position=position,
        head=head,
        lag=max(head - position, 0),
        schema_version=await schema_version(db, name),
        holder=None if lease is None else str(lease["holder"]),
        heartbeat_at=heartbeat,
        detail=None if lease is None else lease["detail"],
        parked=[parked_event(row) for row in parked],
    )
