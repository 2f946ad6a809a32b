"""HTTP routes of the query side."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import MediaType, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream
from litestar.serialization import encode_json

from almanac.auth import Principal
from almanac.container import Container
from almanac.views import ChartView, ReadingView
from queries.batches import (
    MAX_PAGE as MAX_RESULTS_PAGE,
)
from queries.batches import (
    BatchPage,
    BatchState,
    BatchView,
    ResultPage,
    batch_results,
    csv_lines,
    download_results,
    get_batch,
    list_batches,
    ndjson_lines,
)
from queries.charts import get_chart
from queries.dead_letters import MAX_PAGE as MAX_DEAD_LETTER_PAGE
from queries.dead_letters import DeadLetterPage, list_dead_letters
from queries.fields import parse_fields, select
from queries.jobs import JobKind, JobPage, JobState, JobView, get_job, list_jobs
from queries.readings import (
    MAX_PAGE,
    Kind,
    ReadingFilters,
    ReadingPage,
    Status,
    get_reading,
    list_readings,
)
from queries.routing import reads_of
from queries.webhooks import (
    MAX_PAGE as MAX_DELIVERY_PAGE,
)
from queries.webhooks import (
    DeliveryDetail,
    DeliveryPage,
    DeliveryStatus,
    WebhookList,
    WebhookView,
    get_delivery,
    get_webhook,
    list_deliveries,
    list_webhooks,
)

MinPosition = Annotated[
    int | None,
    QueryParameter(
        ge=0,
        description="Wait (bounded) until the read model has reached this position; "
        "use the `Almanac-Position` of your command to read your own write. Not reached "
        "in time: 503 with Retry-After; past the last stored event: 422.",
    ),
]
# A list, so that a repeated ``fields`` is merged rather than all but its last value lost.
Fields = Annotated[
    list[str] | None,
    QueryParameter(
        description="Comma-separated dotted paths to return, e.g. `id,status,chart.sun`; "
        "repeated, the values are merged.",
    ),
]


def _etag(tag: str, paths: tuple[str, ...] | None) -> str:
    """A weak validator for ``tag`` as served with ``paths`` selected.

    Each selection is a representation of its own, so it gets a tag of its own (the sorted
    paths: their order only orders the keys). Weak, because the compression middleware
    changes the bytes of the same representation after the tag is set.
    """
    if paths is None:
        return f'W/"{tag}"'
    digest = hashlib.blake2b(",".join(sorted(paths)).encode(), digest_size=6).hexdigest()
    return f'W/"{tag}-f{digest}"'


def _not_modified(request: Request[Any, Any, Any], etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    # If-None-Match compares weakly: a tag matches in its weak or its strong form.
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


class _Encoded:
    """The JSON of the frozen views served most recently, keyed by identity.

    A cached reading is decoded once and the same view object then answers every hit, so
    its JSON is made once too instead of on every request. Each entry holds its view, so
    an id cannot be reused by another object while the entry lives.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._bodies: OrderedDict[int, tuple[Any, bytes]] = OrderedDict()

    def __call__(self, view: Any) -> bytes:
        held = self._bodies.get(id(view))
        if held is not None and held[0] is view:
            self._bodies.move_to_end(id(view))
            return held[1]
        body = encode_json(view)
        self._bodies[id(view)] = (view, body)
        if len(self._bodies) > self._size:
            self._bodies.popitem(last=False)
        return body


_encoded = _Encoded(256)


def _single(
    request: Request[Any, Any, Any],
    body: Any,
    tag: str,
    position: int,
    paths: tuple[str, ...] | None,
) -> Response[Any]:
    headers, not_modified = _conditional(request, _etag(tag, paths), position)
    if not_modified is not None:
        return not_modified
    if paths is not None:
        return Response(select(body, paths), headers=headers)
    return Response(_encoded(body), media_type=MediaType.JSON, headers=headers)


def _tagged(request: Request[Any, Any, Any], view: Any, tag: str, position: int) -> Response[Any]:
    """A single resource whose content follows from its position alone, with its ETag,
    without ``fields`` and not kept in the encoded-view cache that the hot reads share."""
    headers, not_modified = _conditional(request, _etag(tag, None), position)
    return not_modified or Response(view, headers=headers)


def _conditional(
    request: Request[Any, Any, Any], etag: str, position: int
) -> tuple[dict[str, str], Response[Any] | None]:
    """A single resource's headers, and the 304 to answer with if ``If-None-Match`` has
    ``etag`` (else None)."""
    headers = {"ETag": etag, "Almanac-Position": str(position), "Cache-Control": "private"}
    if _not_modified(request, etag):
        return headers, Response(None, status_code=304, headers=headers)
    return headers, None


@get("/readings/{reading_id:uuid}", summary="Get a reading", tags=["readings"])
async def get_reading_route(
    request: Request[Any, Any, Any],
    reading_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
    fields: Fields = None,
) -> Response[ReadingView]:
    paths = parse_fields(fields, ReadingView)
    view = await get_reading(
        reading_id,
        reads=reads_of(container),
        cache=container.cache,
        principal=principal,
        min_position=min_position,
    )
    return _single(request, view, f"r-{view.id}-{view.position}", view.position, paths)


@get("/readings", summary="List readings, newest first", tags=["readings"])
async def list_readings_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    status: FromQuery[Status | None] = None,
    kind: FromQuery[Kind | None] = None,
    created_after: Annotated[
        datetime | None, QueryParameter(description="ISO 8601 with a time zone; inclusive.")
    ] = None,
    created_before: Annotated[
        datetime | None, QueryParameter(description="ISO 8601 with a time zone; exclusive.")
    ] = None,
    min_position: MinPosition = None,
    fields: Fields = None,
) -> Response[ReadingPage]:
    paths = parse_fields(fields, ReadingView)
    views, next_cursor, position = await list_readings(
        reads=reads_of(container),
        principal=principal,
        filters=ReadingFilters(status, kind, created_after, created_before),
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    data: list[Any] = views if paths is None else [select(v, paths) for v in views]
    page = ReadingPage(
        data=data, has_more=next_cursor is not None, next_cursor=next_cursor, position=position
    )
    return Response(page, headers={"Almanac-Position": str(position)})


@get("/charts/{chart_hash:str}", summary="Get a calculated chart by its hash", tags=["charts"])
async def get_chart_route(
    request: Request[Any, Any, Any],
    chart_hash: FromPath[str],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
    fields: Fields = None,
) -> Response[ChartView]:
    paths = parse_fields(fields, ChartView)
    view = await get_chart(
        chart_hash,
        reads=reads_of(container),
        cache=container.cache,
        principal=principal,
        min_position=min_position,
    )
    return _single(request, view, f"c-{view.chart_hash[:16]}-{view.position}", view.position, paths)


@get("/batches/{batch_id:uuid}", summary="Get a batch and its progress", tags=["batches"])
async def get_batch_route(
    request: Request[Any, Any, Any],
    batch_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
) -> Response[BatchView]:
    view = await get_batch(
        batch_id,
        reads=reads_of(container),
        principal=principal,
        min_position=min_position,
    )
    return _tagged(request, view, f"b-{view.id}-{view.position}", view.position)


@get("/batches", summary="List the owner's batches, newest first", tags=["batches"])
async def list_batches_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    status: FromQuery[BatchState | None] = None,
    min_position: MinPosition = None,
) -> Response[BatchPage]:
    page = await list_batches(
        reads=reads_of(container),
        principal=principal,
        status=status,
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return Response(page, headers={"Almanac-Position": str(page.position)})


ResultFormat = Literal["json", "ndjson", "csv"]


@get(
    "/batches/{batch_id:uuid}/results",
    summary="A batch's per-item results",
    description=(
        "Paginated JSON by default; `format=ndjson` or `format=csv` (or an `Accept` of "
        "`application/x-ndjson` / `text/csv`) streams every item as a download."
    ),
    tags=["batches"],
)
async def batch_results_route(
    request: Request[Any, Any, Any],
    batch_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_RESULTS_PAGE)] = 100,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    format: FromQuery[ResultFormat | None] = None,
    min_position: MinPosition = None,
) -> Response[ResultPage] | Stream:
    accept = request.headers.get("accept", "")
    chosen = format or (
        "ndjson" if "ndjson" in accept else "csv" if "text/csv" in accept else "json"
    )
    if chosen == "json":
        page = await batch_results(
            batch_id,
            reads=reads_of(container),
            principal=principal,
            limit=limit,
            cursor=cursor,
            min_position=min_position,
        )
        return Response(page, headers={"Almanac-Position": str(page.position)})
    view, chunks = await download_results(
        batch_id,
        reads=reads_of(container),
        principal=principal,
        min_position=min_position,
    )
    body, media_type = (
        (ndjson_lines(chunks), "application/x-ndjson")
        if chosen == "ndjson"
        else (csv_lines(chunks), "text/csv; charset=utf-8")
    )
    return Stream(
        body,
        media_type=media_type,
        headers={
            "Content-Disposition": f'attachment; filename="batch-{batch_id}.{chosen}"',
            "Almanac-Position": str(view.position),
        },
    )


@get("/jobs/{job_id:uuid}", summary="Get a background job", tags=["jobs"])
async def get_job_route(
    request: Request[Any, Any, Any],
    job_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
) -> Response[JobView]:
    view = await get_job(
        job_id,
        reads=reads_of(container),
        principal=principal,
        min_position=min_position,
    )
    return _tagged(request, view, f"j-{view.id}-{view.position}", view.position)


@get(
    "/jobs",
    summary="List background jobs, newest first",
    description="The owner's reading generations and batches (an admin's: everyone's).",
    tags=["jobs"],
)
async def list_jobs_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    kind: FromQuery[JobKind | None] = None,
    # ``state`` is Litestar's own name for app state, so the parameter is spelled apart.
    job_state: Annotated[JobState | None, QueryParameter(name="state")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    min_position: MinPosition = None,
) -> Response[JobPage]:
    page = await list_jobs(
        reads=reads_of(container),
        principal=principal,
        kind=kind,
        state=job_state,
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return Response(page, headers={"Almanac-Position": str(page.position)})


@get(
    "/dead-letters",
    summary="Work given up on after its last delivery, newest first (admin)",
    description=(
        "One record per reading whose every delivery to the workers failed "
        "(`ALMANAC_WORKER_MAX_DELIVER`); the reading itself failed with the reason."
    ),
    tags=["admin"],
)
async def list_dead_letters_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_DEAD_LETTER_PAGE)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    min_position: MinPosition = None,
) -> Response[DeadLetterPage]:
    principal.require_admin()
    page = await list_dead_letters(
        reads=reads_of(container),
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return Response(page, headers={"Almanac-Position": str(page.position)})


@get("/webhooks", summary="List webhook endpoints", tags=["webhooks"])
async def list_webhooks_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
) -> Response[WebhookList]:
    found = await list_webhooks(
        reads_of(container),
        principal,
        min_position=min_position,
    )
    return Response(found, headers={"Almanac-Position": str(found.position)})


@get("/webhooks/{endpoint_id:uuid}", summary="Get a webhook endpoint", tags=["webhooks"])
async def get_webhook_route(
    request: Request[Any, Any, Any],
    endpoint_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
) -> Response[WebhookView]:
    view = await get_webhook(
        reads_of(container),
        principal,
        endpoint_id,
        min_position=min_position,
    )
    return _tagged(request, view, f"w-{view.id}-{view.position}", view.position)


@get(
    "/webhooks/{endpoint_id:uuid}/deliveries",
    summary="List the messages sent to an endpoint, newest first",
    tags=["webhooks"],
)
async def list_deliveries_route(
    endpoint_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    status: FromQuery[DeliveryStatus | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_DELIVERY_PAGE)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(description="`next_cursor` of the previous page.")
    ] = None,
    min_position: MinPosition = None,
) -> Response[DeliveryPage]:
    page, position = await list_deliveries(
        reads_of(container),
        principal,
        endpoint_id,
        status=status,
        limit=limit,
        cursor=cursor,
        min_position=min_position,
    )
    return Response(page, headers={"Almanac-Position": str(position)})


@get(
    "/webhooks/{endpoint_id:uuid}/deliveries/{delivery_id:str}",
    summary="One message with every attempt made to deliver it",
    tags=["webhooks"],
)
async def get_delivery_route(
    endpoint_id: FromPath[UUID],
    delivery_id: FromPath[str],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    min_position: MinPosition = None,
) -> Response[DeliveryDetail]:
    detail, position = await get_delivery(
        reads_of(container),
        principal,
        endpoint_id,
        delivery_id,
        min_position=min_position,
    )
    return Response(detail, headers={"Almanac-Position": str(position)})


# Mounted under /api/v1 by almanac.app together with the command side's handlers.
handlers = [
    get_job_route,
    list_jobs_route,
    get_reading_route,
    list_readings_route,
    get_chart_route,
    get_batch_route,
    list_batches_route,
    batch_results_route,
    list_dead_letters_route,
    list_webhooks_route,
    get_webhook_route,
    list_deliveries_route,
    get_delivery_route,
]
