"""Batches as the read model has them: one with its progress (``get_batch``), the owner's
batches (``list_batches``), and a batch's per-item results, paged or streamed whole."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from almanac.auth import Principal
from almanac.errors import NotFound
from almanac.readmodels import ReadDatabase, Row
from queries.paging import Cursor, decode_cursor, encode_cursor, floor, read_at, scope_of
from queries.routing import Reads

PROJECTION = "batches"
MAX_PAGE = 1000
# Rows fetched per round trip when a whole result set is streamed out.
STREAM_CHUNK = 1000
BatchState = Literal["running", "completed", "cancelled"]


class BatchView(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    label: str | None
    total: int
    succeeded: int
    failed: int
    pending: int
    progress: float
    # Items settled per second since the batch started, and the seconds left at that rate.
    throughput: float | None
    eta_seconds: float | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    position: int


class BatchPage(msgspec.Struct, frozen=True):
    data: list[BatchView]
    has_more: bool
    next_cursor: str | None
    position: int


class ItemResult(msgspec.Struct, frozen=True):
    index: int
    status: str
    reading_id: UUID | None
    kind: str
    label: str | None
    attempt: int
    reason: str | None
    updated_at: datetime


class ResultPage(msgspec.Struct, frozen=True):
    data: list[ItemResult]
    has_more: bool
    next_cursor: str | None
    position: int


_SELECT_BATCH = (
    "SELECT id, owner, status, label, total, succeeded, failed, created_at, updated_at,"
    " finished_at, started_position, position FROM batches"
)
_SELECT_ITEMS = (
    "SELECT idx, status, reading_id, kind, label, attempt, reason, updated_at FROM batch_items"
    " WHERE batch_id = :batch_id AND idx > :after ORDER BY idx LIMIT :limit"
)
CSV_COLUMNS = ("index", "status", "reading_id", "kind", "label", "attempt", "reason", "updated_at")


def parse_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def batch_from_row(row: Row) -> BatchView:
    total, succeeded, failed = int(row["total"]), int(row["succeeded"]), int(row["failed"])
    settled = succeeded + failed
    created, updated = parse_time(row["created_at"]), parse_time(row["updated_at"])
    finished = parse_time(row["finished_at"]) if row["finished_at"] is not None else None
    elapsed = (updated - created).total_seconds()
    throughput = settled / elapsed if settled and elapsed > 0 else None
    pending = total - settled
    running = row["status"] == "running"
    eta = pending / throughput if running and throughput else (0.0 if not pending else None)
    return BatchView(
        id=UUID(str(row["id"])),
        status=str(row["status"]),
        label=row["label"],
        total=total,
        succeeded=succeeded,
        failed=failed,
        pending=pending,
        progress=round(100.0 * settled / total, 2) if total else 100.0,
        throughput=round(throughput, 3) if throughput is not None else None,
        eta_seconds=round(eta, 3) if eta is not None else None,
        created_at=created,
        updated_at=updated,
        finished_at=finished,
        position=int(row["position"]),
    )


def _item(row: Row) -> ItemResult:
    return ItemResult(
        index=int(row["idx"]),
        status=str(row["status"]),
        reading_id=UUID(str(row["reading_id"])) if row["reading_id"] else None,
        kind=str(row["kind"]),
        label=row["label"],
        attempt=int(row["attempt"]),
        reason=row["reason"],
        updated_at=parse_time(row["updated_at"]),
    )


async def _visible_row(batch_id: UUID, source: ReadDatabase, principal: Principal) -> Row:
    row = await source.fetch_one(_SELECT_BATCH + " WHERE id = :id", {"id": str(batch_id)})
    if row is None or not principal.may_see(str(row["owner"])):
        raise NotFound(f"no batch {batch_id}")
    return row


async def get_batch(
    batch_id: UUID,
    *,
    reads: Reads,
    principal: Principal,
    min_position: int | None,
) -> BatchView:
    source = await reads.route((PROJECTION,), min_position)
    return batch_from_row(await _visible_row(batch_id, source, principal))


async def download_results(
    batch_id: UUID,
    *,
    reads: Reads,
    principal: Principal,
    min_position: int | None,
) -> tuple[BatchView, AsyncIterator[list[ItemResult]]]:
    """The batch, and every one of its items to stream out, both from the same database."""
    source = await reads.route((PROJECTION,), min_position)
    row = await _visible_row(batch_id, source, principal)
    return batch_from_row(row), stream_results(batch_id, db=source)


async def list_batches(
    *,
    reads: Reads,
    principal: Principal,
    status: BatchState | None,
    limit: int,
    cursor: str | None,
    min_position: int | None,
) -> BatchPage:
    """The owner's batches (an admin's: everyone's), newest first."""
    scope = scope_of("batches", status, principal.owner)
    after = decode_cursor(cursor, scope)
    source, position = await reads.read((PROJECTION,), floor(min_position, after))
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if not principal.is_admin:
        where.append("owner = :owner")
        params["owner"] = principal.owner
    if after is not None:
        where.append("started_position < :before")
        params["before"] = after.key
    if status is not None:
        where.append("status = :status")
        params["status"] = status
    sql = _SELECT_BATCH + (" WHERE " + " AND ".join(where) if where else "")
    rows = await source.fetch_all(sql + " ORDER BY started_position DESC LIMIT :limit", params)
    more = len(rows) > limit
    next_cursor = None
    if more:
        at = read_at(position, (int(r["position"]) for r in rows))
        next_cursor = encode_cursor(Cursor(int(rows[limit - 1]["started_position"]), at, scope))
    return BatchPage([batch_from_row(r) for r in rows[:limit]], more, next_cursor, position)


async def batch_results(
    batch_id: UUID,
    *,
    reads: Reads,
    principal: Principal,
    limit: int,
    cursor: str | None,
    min_position: int | None,
) -> ResultPage:
    """A page of the batch's items in index order, each with its outcome so far."""
    scope = scope_of("batch_results", str(batch_id))
    after = decode_cursor(cursor, scope)
    source, position = await reads.read((PROJECTION,), floor(min_position, after))
    batch = await _visible_row(batch_id, source, principal)
    start = -1 if after is None else after.key
    params = {"batch_id": str(batch_id), "after": start, "limit": limit + 1}
    rows = await source.fetch_all(_SELECT_ITEMS, params)
    more = len(rows) > limit
    items = [_item(r) for r in rows[:limit]]
    next_cursor = None
    if more:
        # The batch row was read from the same source: its projection had got that far.
        at = read_at(position, (int(batch["position"]),))
        next_cursor = encode_cursor(Cursor(items[-1].index, at, scope))
    return ResultPage(items, more, next_cursor, position)


async def stream_results(batch_id: UUID, *, db: ReadDatabase) -> AsyncIterator[list[ItemResult]]:
    """Every item, a chunk at a time: never the whole result set in memory."""
    after = -1
    while True:
        params = {"batch_id": str(batch_id), "after": after, "limit": STREAM_CHUNK}
        rows = await db.fetch_all(_SELECT_ITEMS, params)
        if not rows:
            return
        items = [_item(r) for r in rows]
        yield items
        after = items[-1].index
        if len(rows) < STREAM_CHUNK:
            return


async def ndjson_lines(chunks: AsyncIterator[list[ItemResult]]) -> AsyncIterator[bytes]:
    encoder = msgspec.json.Encoder()
    async for chunk in chunks:
        buffer = bytearray()
        for item in chunk:
            encoder.encode_into(item, buffer, len(buffer))
            buffer.extend(b"\n")
        yield bytes(buffer)


async def csv_lines(chunks: AsyncIterator[list[ItemResult]]) -> AsyncIterator[bytes]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    async for chunk in chunks:
        for i in chunk:
            writer.writerow(
                (
                    i.index,
                    i.status,
                    i.reading_id or "",
                    i.kind,
                    i.label or "",
                    i.attempt,
                    i.reason or "",
                    i.updated_at.isoformat(),
                )
            )
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.tell():
        yield out.getvalue().encode()
