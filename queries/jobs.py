"""One view over all background work: reading generations and batches (and, as they come,
replays and rebuilds). ``get_job`` finds one by id; ``list_jobs`` pages through the owner's
(an admin's: everyone's), newest first, filtered by kind and state."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from almanac.auth import Principal
from almanac.errors import NotFound
from almanac.readmodels import Row
from queries.batches import parse_time
from queries.paging import Cursor, decode_cursor, encode_cursor, floor, read_at, scope_of
from queries.routing import Reads

JobKind = Literal["reading", "batch"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_PAGE = 200
# Jobs are read from both read models: a ``min_position`` waits for each.
PROJECTIONS = ("readings", "batches")

# Each kind's own statuses, as job states.
_READING_STATES: dict[str, JobState] = {
    "requested": "queued",
    "chart_calculated": "running",
    "generated": "succeeded",
    "failed": "failed",
}
_BATCH_STATES: dict[str, JobState] = {"running": "running", "cancelled": "cancelled"}


class JobView(msgspec.Struct, frozen=True):
    id: UUID
    kind: JobKind
    state: JobState
    # The kind's own status (``chart_calculated``, ``completed`` …), and where to read more.
    status: str
    progress: float
    location: str
    created_at: datetime
    updated_at: datetime
    position: int


class JobPage(msgspec.Struct, frozen=True):
    data: list[JobView]
    has_more: bool
    next_cursor: str | None
    # The position both read models have reached: the page reflects every event up to it.
    position: int


_READINGS = (
    "SELECT id, owner, status, created_at, updated_at, requested_position AS pos, position"
    " FROM readings"
)
_BATCHES = (
    "SELECT id, owner, status, total, succeeded, failed, created_at, updated_at,"
    " started_position AS pos, position FROM batches"
)


def _reading_job(row: Row) -> JobView:
    state = _READING_STATES.get(str(row["status"]), "running")
    return JobView(
        id=UUID(str(row["id"])),
        kind="reading",
        state=state,
        status=str(row["status"]),
        progress=100.0 if state in {"succeeded", "failed"} else 0.0,
        location=f"/api/v1/readings/{row['id']}",
        created_at=parse_time(row["created_at"]),
        updated_at=parse_time(row["updated_at"]),
        position=int(row["position"]),
    )


def _batch_job(row: Row) -> JobView:
    status = str(row["status"])
    total, failed = int(row["total"]), int(row["failed"])
    settled = int(row["succeeded"]) + failed
    state = _BATCH_STATES.get(status) or ("failed" if failed else "succeeded")
    return JobView(
        id=UUID(str(row["id"])),
        kind="batch",
        state=state,
        status=status,
        progress=round(100.0 * settled / total, 2) if total else 100.0,
        location=f"/api/v1/batches/{row['id']}",
        created_at=parse_time(row["created_at"]),
        updated_at=parse_time(row["updated_at"]),
        position=int(row["position"]),
    )


async def get_job(
    job_id: UUID,
    *,
    reads: Reads,
    principal: Principal,
    min_position: int | None,
) -> JobView:
    source = await reads.route(PROJECTIONS, min_position)
    for sql, build in ((_READINGS, _reading_job), (_BATCHES, _batch_job)):
        row = await source.fetch_one(sql + " WHERE id = :id", {"id": str(job_id)})
        if row is not None and principal.may_see(str(row["owner"])):
            return build(row)
    raise NotFound(f"no job {job_id}")


def _batch_statuses(state: JobState) -> tuple[str, str]:
    """The batch statuses (and the failure condition) a job state stands for."""
    return {
        "queued": ("status = 'none'", ""),
        "running": ("status = 'running'", ""),
        "cancelled": ("status = 'cancelled'", ""),
        "succeeded": ("status = 'completed'", " AND failed = 0"),
        "failed": ("status = 'completed'", " AND failed > 0"),
    }[state]


async def list_jobs(
    *,
    reads: Reads,
    principal: Principal,
    kind: JobKind | None,
    state: JobState | None,
    limit: int,
    cursor: str | None,
    min_position: int | None,
) -> JobPage:
    scope = scope_of("jobs", kind, state, principal.owner)
    after = decode_cursor(cursor, scope)
    source, position = await reads.read(PROJECTIONS, floor(min_position, after))
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if not principal.is_admin:
        where.append("owner = :owner")
        params["owner"] = principal.owner
    if after is not None:
        # Positions are one global order, so one cursor pages through both kinds at once.
        where.append("{pos} < :before")
        params["before"] = after.key
    found: list[tuple[int, JobView]] = []
    # The latest position each projection's rows show (see ``read_at``). A projection that
    # was not read (the other kind was asked for) or showed no rows is not in it: it puts no
    # constraint on how far the next page's source must have got.
    seen: dict[str, int] = {}
    if kind in {None, "reading"}:
        clauses = [w.format(pos="requested_position") for w in where]
        if state is not None:
            statuses = [s for s, st in _READING_STATES.items() if st == state]
            clauses.append("status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")")
        sql = _READINGS + (" WHERE " + " AND ".join(clauses) if clauses else "")
        rows = await source.fetch_all(
            sql + " ORDER BY requested_position DESC LIMIT :limit", params
        )
        found.extend((int(r["pos"]), _reading_job(r)) for r in rows)
        if rows:
            seen["readings"] = max(int(r["position"]) for r in rows)
    if kind in {None, "batch"}:
        clauses = [w.format(pos="started_position") for w in where]
        if state is not None:
            status, extra = _batch_statuses(state)
            clauses.append(status + extra)
        sql = _BATCHES + (" WHERE " + " AND ".join(clauses) if clauses else "")
        rows = await source.fetch_all(sql + " ORDER BY started_position DESC LIMIT :limit", params)
        found.extend((int(r["pos"]), _batch_job(r)) for r in rows)
        if rows:
            seen["batches"] = max(int(r["position"]) for r in rows)
    found.sort(key=lambda pair: pair[0], reverse=True)
    more = len(found) > limit
    page = found[:limit]
    next_cursor = None
    if more:
        # One floor holds for both projections: only as far as all those whose rows were
        # shown are shown to have got (``more`` means at least one showed rows).
        at = read_at(position, (min(seen.values()),))
        next_cursor = encode_cursor(Cursor(page[-1][0], at, scope))
    return JobPage([job for _, job in page], more, next_cursor, position)
