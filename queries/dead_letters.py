"""Dead letters as the read model has them: work given up on after its last delivery,
newest first, for admins."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from almanac.readmodels import Row
from queries.batches import cursor_number, parse_time
from queries.routing import Reads

PROJECTION = "dead_letters"
MAX_PAGE = 200


class DeadLetterView(msgspec.Struct, frozen=True):
    # The work given up on: the stored event (a reading's request) and its position.
    position: int
    event_type: str
    aggregate_id: UUID
    owner: str
    # The work feed's consumer, the deliveries it made and the last failure among them.
    consumer: str
    deliveries: int
    last_error: str
    # When, and at which position, the failure was recorded; where to read more.
    failed_at: datetime
    failed_position: int
    location: str


class DeadLetterPage(msgspec.Struct, frozen=True):
    data: list[DeadLetterView]
    has_more: bool
    next_cursor: str | None
    position: int


_SELECT = (
    "SELECT position, event_type, aggregate_id, owner, consumer, deliveries, last_error,"
    " failed_at, failed_position FROM dead_letters"
)


def _view(row: Row) -> DeadLetterView:
    return DeadLetterView(
        position=int(row["position"]),
        event_type=str(row["event_type"]),
        aggregate_id=UUID(str(row["aggregate_id"])),
        owner=str(row["owner"]),
        consumer=str(row["consumer"]),
        deliveries=int(row["deliveries"]),
        last_error=str(row["last_error"]),
        failed_at=parse_time(row["failed_at"]),
        failed_position=int(row["failed_position"]),
        location=f"/api/v1/readings/{row['aggregate_id']}",
    )


async def list_dead_letters(
    *,
    reads: Reads,
    limit: int,
    cursor: str | None,
    min_position: int | None,
) -> DeadLetterPage:
    """A page of dead letters, the most recently recorded first (admins only: the caller
    checks)."""
    before = cursor_number(cursor)
    source, position = await reads.read((PROJECTION,), min_position)
    params: dict[str, Any] = {"limit": limit + 1}
    where = ""
    if cursor is not None:
        where = " WHERE failed_position < :before"
        params["before"] = before
    rows = await source.fetch_all(
        _SELECT + where + " ORDER BY failed_position DESC LIMIT :limit", params
    )
    more = len(rows) > limit
    views = [_view(r) for r in rows[:limit]]
    next_cursor = str(views[-1].failed_position) if more else None
    return DeadLetterPage(views, more, next_cursor, position)
