"""Webhook endpoints and their deliveries, as the read model and the delivery log hold them."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from almanac.auth import Principal
from almanac.errors import FieldError, NotFound, ValidationFailed
from almanac.readmodels import ReadDatabase, Row
from queries.routing import Reads

ENDPOINTS = "webhook_endpoints"
MAX_PAGE = 200
DeliveryStatus = Literal["pending", "succeeded", "failed"]


class WebhookView(msgspec.Struct, frozen=True):
    id: UUID
    url: str
    event_types: list[str]
    description: str
    rate_limit: int | None
    status: str
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    position: int


class WebhookList(msgspec.Struct, frozen=True):
    data: list[WebhookView]
    position: int


class AttemptView(msgspec.Struct, frozen=True):
    id: str
    attempted_at: datetime
    outcome: str
    status_code: int | None
    latency_ms: float | None
    error: str | None
    response: str | None
    trigger: str


class DeliveryView(msgspec.Struct, frozen=True):
    id: str
    endpoint_id: UUID
    event_type: str
    position: int | None
    status: str
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DeliveryDetail(DeliveryView, frozen=True):
    """A delivery with its payload and every attempt at it."""

    payload: msgspec.Raw
    attempt_log: list[AttemptView]


class DeliveryPage(msgspec.Struct, frozen=True):
    data: list[DeliveryView]
    has_more: bool
    next_cursor: str | None


def _time(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), UTC)


def _view(row: Row) -> WebhookView:
    return WebhookView(
        id=UUID(str(row["id"])),
        url=row["url"],
        event_types=msgspec.json.decode(row["event_types"], type=list[str]),
        description=row["description"],
        rate_limit=row["rate_limit"],
        status=row["status"],
        disabled_reason=row["disabled_reason"],
        created_at=_time(row["created_at"]),
        updated_at=_time(row["updated_at"]),
        position=int(row["position"]),
    )


_ENDPOINT_COLUMNS = (
    "id, owner, url, event_types, description, rate_limit, status, disabled_reason,"
    " created_at, updated_at, position"
)


async def list_webhooks(
    reads: Reads, principal: Principal, *, min_position: int | None = None
) -> WebhookList:
    source, position = await reads.read((ENDPOINTS,), min_position)
    rows = await source.fetch_all(
        f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints"
        " WHERE owner = :owner AND status != 'deleted' ORDER BY created_at, id",
        {"owner": principal.owner},
    )
    return WebhookList(data=[_view(r) for r in rows], position=position)


async def get_webhook(
    reads: Reads, principal: Principal, endpoint_id: UUID, *, min_position: int | None = None
) -> WebhookView:
    source = await reads.route((ENDPOINTS,), min_position)
    row = await _endpoint_row(source, principal, endpoint_id)
    return _view(row)


async def _endpoint_row(db: ReadDatabase, principal: Principal, endpoint_id: UUID) -> Row:
    row = await db.fetch_one(
        f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = :id",
        {"id": str(endpoint_id)},
    )
    if row is None or row["status"] == "deleted" or not principal.may_see(row["owner"]):
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return row


def _delivery(row: Row) -> DeliveryView:
    due = row["next_attempt_at"]
    return DeliveryView(
        id=row["id"],
        endpoint_id=UUID(str(row["endpoint_id"])),
        event_type=row["event_type"],
        position=row["position"],
        status=row["status"],
        attempts=int(row["attempts"]),
        next_attempt_at=_time(due) if row["status"] == "pending" and due is not None else None,
        created_at=_time(row["created_at"]),
        updated_at=_time(row["updated_at"]),
    )


_DELIVERY_COLUMNS = (
    "id, endpoint_id, owner, event_type, position, status, attempts, next_attempt_at,"
    " created_at, updated_at"
)


async def list_deliveries(
    reads: Reads,
    principal: Principal,
    endpoint_id: UUID,
    *,
    status: DeliveryStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
    min_position: int | None = None,
) -> tuple[DeliveryPage, int]:
    """Newest first, with the endpoints' position; ``cursor`` is the ``next_cursor`` of the
    page before."""
    # The deliveries are a log, not a projection; what a position makes visible is the
    # endpoint they belong to, so that one just created is found rather than a 404. No
    # projection position tells how fresh a standby's copy of the log is, so it is read
    # from the primary.
    db, position = await reads.on_primary().read((ENDPOINTS,), min_position)
    await _endpoint_row(db, principal, endpoint_id)
    params: dict[str, Any] = {"endpoint_id": str(endpoint_id), "limit": limit + 1}
    where = "endpoint_id = :endpoint_id"
    if status is not None:
        where += " AND status = :status"
        params["status"] = status
    if cursor is not None:
        params["c_at"], params["c_id"] = _delivery_cursor(cursor)
        where += " AND (created_at < :c_at OR (created_at = :c_at AND id < :c_id))"
    rows = await db.fetch_all(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_messages WHERE {where}"
        " ORDER BY created_at DESC, id DESC LIMIT :limit",
        params,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = f"{float(rows[-1]['created_at'])!r}~{rows[-1]['id']}" if more else None
    page = DeliveryPage(data=[_delivery(r) for r in rows], has_more=more, next_cursor=next_cursor)
    return page, position


def _delivery_cursor(cursor: str) -> tuple[float, str]:
    """The creation time and id a deliveries ``next_cursor`` holds, or a 422 naming it."""
    created, _, last_id = cursor.partition("~")
    try:
        at = float(created)
    except ValueError:
        at = math.nan
    if not math.isfinite(at) or not last_id or not _storable(last_id):
        raise ValidationFailed([FieldError("cursor", "not a cursor of this list")])
    return at, last_id


def _storable(text: str) -> bool:
    """Whether ``text`` could be stored in a text column at all: Postgres refuses a NUL in
    a parameter, an error of the query rather than an answer, so a NUL names nothing."""
    return "\x00" not in text


async def get_delivery(
    reads: Reads,
    principal: Principal,
    endpoint_id: UUID,
    delivery_id: str,
    *,
    min_position: int | None = None,
) -> tuple[DeliveryDetail, int]:
    """The delivery with every attempt, and the endpoints' position."""
    db, position = await reads.on_primary().read((ENDPOINTS,), min_position)
    await _endpoint_row(db, principal, endpoint_id)
    row = (
        await db.fetch_one(
            f"SELECT {_DELIVERY_COLUMNS}, payload FROM webhook_messages"
            " WHERE id = :id AND endpoint_id = :endpoint_id",
            {"id": delivery_id, "endpoint_id": str(endpoint_id)},
        )
        if _storable(delivery_id)
        else None
    )
    if row is None:
        raise NotFound(f"no delivery {delivery_id} to webhook endpoint {endpoint_id}")
    attempts = await db.fetch_all(
        "SELECT id, attempted_at, outcome, status_code, latency_ms, error, response, trigger"
        " FROM webhook_attempts WHERE message_id = :id AND endpoint_id = :endpoint_id"
        " ORDER BY attempted_at, id",
        {"id": delivery_id, "endpoint_id": str(endpoint_id)},
    )
    view = _delivery(row)
    detail = DeliveryDetail(
        **msgspec.structs.asdict(view),
        payload=msgspec.Raw(str(row["payload"]).encode()),
        attempt_log=[
            AttemptView(
                id=a["id"],
                attempted_at=_time(a["attempted_at"]),
                outcome=a["outcome"],
                status_code=a["status_code"],
                latency_ms=a["latency_ms"],
                error=a["error"],
                response=a["response"],
                trigger=a["trigger"],
            )
            for a in attempts
        ],
    )
    return detail, position
