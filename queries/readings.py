"""Readings as the read model has them: one (``get_reading``) or a page (``list_readings``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from almanac.auth import Principal
from almanac.cache import ReadCache, decode_reading, encode_entry, position_of, reading_key
from almanac.errors import FieldError, NotFound, ValidationFailed
from almanac.views import SELECT_READINGS, ReadingView, reading_from_row
from queries.paging import Cursor, decode_cursor, encode_cursor, floor, read_at, scope_of
from queries.routing import READINGS, Reads

MAX_PAGE = 200
Status = Literal["requested", "chart_calculated", "generated", "failed"]
Kind = Literal["natal", "love", "career"]

_SELECT_ONE = SELECT_READINGS + " WHERE r.id = :id"


class ReadingFilters(msgspec.Struct, frozen=True):
    status: Status | None = None
    kind: Kind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class ReadingPage(msgspec.Struct, frozen=True):
    data: list[Any]
    has_more: bool
    next_cursor: str | None
    position: int


def _older_than(held: bytes, position: int) -> bool:
    held_at = position_of(held)
    return held_at is None or held_at < position


async def get_reading(
    reading_id: UUID,
    *,
    reads: Reads,
    principal: Principal,
    min_position: int | None,
    cache: ReadCache,
) -> ReadingView:
    key = reading_key(reading_id)
    cached = decode_reading(await cache.get(key))
    # An entry at position p reflects every event of this reading up to p.
    if cached is not None and cached.view.position >= (min_position or 0):
        if not principal.may_see(cached.owner):
            raise NotFound(f"no reading {reading_id}")
        return cached.view
    mark = cache.mark()
    source = await reads.route(READINGS, min_position)
    row = await source.fetch_one(_SELECT_ONE, {"id": str(reading_id)})
    if row is None:
        raise NotFound(f"no reading {reading_id}")
    entry = reading_from_row(row)
    position = entry.view.position
    shared = reads.as_new_as_primary(source)
    if cached is not None and position > cached.view.position:
        # The cache gave an earlier state than this one: replace it there, so a later read
        # without min_position does not step back to it.
        await cache.supersede(
            key,
            encode_entry(entry),
            stale=lambda held: _older_than(held, position),
            shared=shared,
        )
    else:
        await cache.fill(key, encode_entry(entry), mark=mark, shared=shared)
    if not principal.may_see(entry.owner):
        raise NotFound(f"no reading {reading_id}")
    return entry.view


async def list_readings(
    *,
    reads: Reads,
    principal: Principal,
    filters: ReadingFilters,
    limit: int,
    cursor: str | None,
    min_position: int | None,
) -> tuple[list[ReadingView], str | None, int]:
    """Newest first, by the position of each reading's request: a stable order in which new
    readings only ever appear at the head, so paging on is unaffected by concurrent inserts."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed([FieldError("limit", f"must be from 1 to {MAX_PAGE}")])
    created = _created_bounds(filters)
    scope = scope_of("readings", filters, principal.owner)
    after = decode_cursor(cursor, scope)
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if not principal.is_admin:
        where.append("r.owner = :owner")
        params["owner"] = principal.owner
    if after is not None:
        where.append("r.requested_position < :before")
        params["before"] = after.key
    if filters.status is not None:
        where.append("r.status = :status")
        params["status"] = filters.status
    if filters.kind is not None:
        where.append("r.kind = :kind")
        params["kind"] = filters.kind
    if "created_after" in created:
        where.append("r.created_at >= :created_after")
        params["created_after"] = created["created_after"].isoformat()
    if "created_before" in created:
        where.append("r.created_at < :created_before")
        params["created_before"] = created["created_before"].isoformat()
    sql = SELECT_READINGS.replace(
        " FROM readings r", ", r.requested_position AS rp FROM readings r", 1
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY r.requested_position DESC LIMIT :limit"
    source, position = await reads.read(READINGS, floor(min_position, after))
    rows = await source.fetch_all(sql, params)
    more = len(rows) > limit
    next_cursor = None
    if more:
        at = read_at(position, (int(r["position"]) for r in rows))
        next_cursor = encode_cursor(Cursor(int(rows[limit - 1]["rp"]), at, scope))
    return [reading_from_row(r).view for r in rows[:limit]], next_cursor, position


def _created_bounds(filters: ReadingFilters) -> dict[str, datetime]:
    """The creation-time bounds given, in UTC, keyed by their parameter.

    Each bound is checked on its own before the two are compared: a time without a zone
    cannot be ordered against one with (Python raises TypeError), so comparing first turned
    a client's mistake into a 500. Every bad bound is reported at once.
    """
    bounds: dict[str, datetime] = {}
    errors: list[FieldError] = []
    for field, moment in (
        ("created_after", filters.created_after),
        ("created_before", filters.created_before),
    ):
        if moment is None:
            continue
        if moment.utcoffset() is None:
            errors.append(FieldError(field, "give a time zone, e.g. 2026-01-01T00:00:00Z"))
            continue
        try:
            bounds[field] = moment.astimezone(UTC)
        except OverflowError:
            errors.append(FieldError(field, "is outside the representable range"))
    if errors:
        raise ValidationFailed(errors)
    after, before = bounds.get("created_after"), bounds.get("created_before")
    if after is not None and before is not None and after >= before:
        raise ValidationFailed([FieldError("created_before", "must be after created_after")])
    return bounds
