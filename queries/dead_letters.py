"""Dead letters as the read model has them: work given up on after its last delivery,
newest first, for admins."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from almanac.readmodels import Row
from queries.batches import parse_time
from queries.paging import Cursor, decode_cursor, encode_cursor, floor, read_at, scope_of
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
    scope = scope_of("dead_letters")
    after = decode_cursor(cursor, scope)
    source, position = await reads.read((PROJECTION,), floor(min_position, after))
    params: dict[str, Any] = {"limit": limit + 1}
    where = ""
    if after is not None:
        where = " WHERE failed_position < :before"
        params["before"] = after.key
    rows = await source.fetch_all(
        _SELECT + where + " ORDER BY failed_position DESC LIMIT :limit", params
    )
    more = len(rows) > limit
    views = [_view(r) for r in rows[:limit]]
    next_cursor = None
    if more:
        # A dead letter is recorded at its failed_position, by this listing's projection.
        at = read_at(position, (int(r["failed_position"]) for r in rows))
        next_cursor = encode_cursor(Cursor(views[-1].failed_position, at, scope))
    return DeadLetterPage(views, more, next_cursor, position)
