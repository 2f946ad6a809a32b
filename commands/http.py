"""HTTP routes of the command side."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from almanac.auth import Principal
from almanac.container import Container
from almanac.domain.events import EventMeta
from almanac.errors import FieldError, ValidationFailed
from commands.batches import (
    BatchAccepted,
    BatchChanged,
    Label,
    cancel_batch,
    parse_json_batch,
    parse_ndjson_batch,
    retry_failed,
    start_batch,
)
from commands.readings import GenerateReading, ReadingAccepted, generate_reading


@post(
    "/readings",
    status_code=202,
    summary="Generate a reading",
    description=(
        "Validates the birth data and appends `reading.requested`. The reading is then "
        "calculated and written in the background; follow `Location` (with "
        "`?min_position=` set to the `Almanac-Position` header to read your own write). "
        "A repeated `Idempotency-Key` with the same body returns the original response."
    ),
    tags=["readings"],
)
async def post_reading(
    data: JSONBody[GenerateReading],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name="Idempotency-Key",
            description="Makes a retry safe: the same key and body return the first response.",
        ),
    ] = None,
) -> Response[ReadingAccepted]:
    meta = EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))
    accepted, replayed = await generate_reading(
        data,
        store=container.store,
        principal=principal,
        meta=meta,
        idempotency_key=idempotency_key,
    )
    headers = {
        "Location": f"/api/v1/readings/{accepted.id}",
        "Almanac-Position": str(accepted.position),
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(accepted, status_code=202, headers=headers)


NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


@post(
    "/batches",
    status_code=202,
    summary="Start a batch of readings",
    description=(
        "A JSON body `{items: [...], label}` with up to 10,000 items (each as the body of "
        "`POST /readings`), or an NDJSON body (`Content-Type: application/x-ndjson`) with one "
        "item per line, streamed. Every item is validated first: a bad one is reported by "
        "index (`items[3].birth.latitude`) in a 422 and nothing starts. Follow `Location` "
        "for progress; `Idempotency-Key` works as for readings."
    ),
    tags=["batches"],
)
async def post_batch(
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name="Idempotency-Key",
            description="Makes a retry safe: the same key and body return the first response.",
        ),
    ] = None,
    label: Annotated[str | None, QueryParameter(description="A name for an NDJSON batch.")] = None,
) -> Response[BatchAccepted]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in NDJSON_TYPES:
        if label is not None:
            try:
                msgspec.convert(label, Label)
            except msgspec.ValidationError as exc:
                raise ValidationFailed([FieldError("label", str(exc))]) from None
        items = await parse_ndjson_batch(request.stream())
    else:
        body = await request.body()
        if not body.strip():
            raise ValidationFailed([FieldError("body", "a JSON or NDJSON body is required")])
        try:
            items, label = parse_json_batch(body)
        except msgspec.DecodeError:
            raise ClientException("The request body is not valid JSON.") from None
    meta = EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))
    accepted, replayed = await start_batch(
        items,
        label,
        store=container.store,
        principal=principal,
        meta=meta,
        idempotency_key=idempotency_key,
    )
    headers = {
        "Location": f"/api/v1/batches/{accepted.id}",
        "Almanac-Position": str(accepted.position),
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(accepted, status_code=202, headers=headers)


@post(
    "/batches/{batch_id:uuid}/cancel",
    status_code=202,
    summary="Cancel a batch",
    description="No new items start; running ones finish; the batch ends `cancelled`.",
    tags=["batches"],
)
async def post_cancel_batch(
    request: Request[Any, Any, Any],
    batch_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[BatchChanged]:
    meta = EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))
    changed = await cancel_batch(batch_id, store=container.store, principal=principal, meta=meta)
    return _changed(changed)


@post(
    "/batches/{batch_id:uuid}/retry-failed",
    status_code=202,
    summary="Retry the failed items of a batch",
    description="Each failed item is tried again as a new reading; `retried` counts them.",
    tags=["batches"],
)
async def post_retry_failed(
    request: Request[Any, Any, Any],
    batch_id: FromPath[UUID],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[BatchChanged]:
    meta = EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))
    changed = await retry_failed(batch_id, store=container.store, principal=principal, meta=meta)
    return _changed(changed)


def _changed(changed: BatchChanged) -> Response[BatchChanged]:
    headers = {
        "Location": f"/api/v1/batches/{changed.id}",
        "Almanac-Position": str(changed.position),
    }
    return Response(changed, status_code=202, headers=headers)


# Mounted under /api/v1 by almanac.app together with the query side's handlers.
handlers = [post_reading, post_batch, post_cancel_batch, post_retry_failed]
