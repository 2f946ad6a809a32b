"""HTTP routes of the command side."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Request, Response, delete, patch, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from almanac.auth import Principal, principal_of
from almanac.container import Container, serving
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
from commands.webhooks import (
    Accepted,
    ChangeWebhook,
    EndpointState,
    EndpointWithSecret,
    RegisterWebhook,
    change_webhook,
    delete_webhook,
    recover_failed,
    register_webhook,
    resend_delivery,
    rotate_webhook_secret,
    send_test_message,
)
from queries.routing import reads_of
from queries.webhooks import get_delivery


class AcceptedResponse(ASGIResponse):
    """A 202 with a JSON body and headers encoded by the handler, sent as they are.

    ``ASGIResponse`` parses its headers into a mutable header list, looks each default
    (content type, length) up in it and encodes them again: 61k of the busiest command's
    554k instructions (callgrind), more than its birth validation. A subclass, so that
    Litestar sends it as a response of its own (by the handler's return annotation), and
    with none of the features the command does not use (cookies, background tasks, HEAD).
    The parent's other attributes are left unset: an ``after_request`` hook or the response
    cache on this route would need them.
    """

    __slots__ = ("_headers",)

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        # Not the parent's: its attributes are not used by ``__call__`` here.
        self.body = body
        self.status_code = 202
        self._headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self._headers
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


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
    responses={
        202: ResponseSpec(
            ReadingAccepted,
            description="Request accepted, processing continues off-line",
            generate_examples=False,
        )
    },
)
async def post_reading(
    data: JSONBody[GenerateReading],
    request: Request[Any, Any, Any],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name="Idempotency-Key",
            description="Makes a retry safe: the same key and body return the first response.",
        ),
    ] = None,
) -> AcceptedResponse:
    # The busiest command: the container and principal come from the scope rather than as
    # dependencies, and the body is encoded here rather than by a Response, which together
    # saved ~12 µs of the ~125 µs of CPU it costs in-process (benchmarks/README.md, cpu).
    principal = principal_of(request.scope)
    meta = EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))
    accepted, replayed = await generate_reading(
        data,
        store=serving(request).store,
        principal=principal,
        meta=meta,
        idempotency_key=idempotency_key,
    )
    body = msgspec.json.encode(accepted)
    headers = [
        (b"location", f"/api/v1/readings/{accepted.id}".encode()),
        (b"almanac-position", str(accepted.position).encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if replayed:
        headers.append((b"idempotent-replayed", b"true"))
    return AcceptedResponse(body, headers)


NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


@post(
    "/batches",
    status_code=202,
    summary="Start a batch of readings",
    description=(
        "A JSON body `{items: [...], label}` with up to 10,000 items (each as the body of "
        "`POST /readings`), or an NDJSON body (`Content-Type: application/x-ndjson`) with one "
        "item per line, streamed. Every item is validated first: a bad one is reported by "
        "index (`items[3].birth.latitude`) in a 422 and nothing starts. A batch is also "
        "limited in size (900 KiB as stored by default, about 5,000 items without labels): "
        "a larger one is a 422 naming `items`, and nothing starts. Follow `Location` "
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


def _meta(request: Request[Any, Any, Any], principal: Principal) -> EventMeta:
    return EventMeta.for_request(principal.owner, request.scope["state"].get("request_id"))


def _positioned(body: Any, position: int, status: int, **headers: str) -> Response[Any]:
    return Response(
        body, status_code=status, headers={"Almanac-Position": str(position), **headers}
    )


@post(
    "/webhooks",
    status_code=201,
    summary="Register a webhook endpoint",
    description="The response holds the signing secret (`whsec_…`); it is never shown again.",
    tags=["webhooks"],
)
async def post_webhook(
    data: JSONBody[RegisterWebhook],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[EndpointWithSecret]:
    guard, box = container.webhooks
    created = await register_webhook(
        data, store=container.store, guard=guard, box=box, meta=_meta(request, principal)
    )
    return _positioned(created, created.position, 201, Location=f"/api/v1/webhooks/{created.id}")


@patch("/webhooks/{endpoint_id:uuid}", summary="Change a webhook endpoint", tags=["webhooks"])
async def patch_webhook(
    endpoint_id: FromPath[UUID],
    data: JSONBody[ChangeWebhook],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[EndpointState]:
    guard, _ = container.webhooks
    state = await change_webhook(
        endpoint_id,
        data,
        store=container.store,
        guard=guard,
        principal=principal,
        meta=_meta(request, principal),
    )
    return _positioned(state, state.position, 200)


@delete(
    "/webhooks/{endpoint_id:uuid}",
    status_code=204,
    summary="Delete a webhook endpoint",
    tags=["webhooks"],
)
async def delete_webhook_route(
    endpoint_id: FromPath[UUID],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[None]:
    position = await delete_webhook(
        endpoint_id, store=container.store, principal=principal, meta=_meta(request, principal)
    )
    return _positioned(None, position, 204)


@post(
    "/webhooks/{endpoint_id:uuid}/rotate-secret",
    status_code=200,
    summary="Rotate the signing secret",
    description="The new secret signs from now on; the old one also signs during the "
    "overlap window (24 h by default), so receivers can switch without losing a message.",
    tags=["webhooks"],
)
async def rotate_secret_route(
    endpoint_id: FromPath[UUID],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[EndpointWithSecret]:
    _, box = container.webhooks
    rotated = await rotate_webhook_secret(
        endpoint_id,
        store=container.store,
        box=box,
        principal=principal,
        meta=_meta(request, principal),
        overlap=container.settings.webhooks.rotation_overlap,
    )
    return _positioned(rotated, rotated.position, 200)


@post(
    "/webhooks/{endpoint_id:uuid}/test",
    status_code=202,
    summary="Send a webhook.test message",
    tags=["webhooks"],
)
async def test_webhook_route(
    endpoint_id: FromPath[UUID],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[Accepted]:
    accepted = await send_test_message(
        endpoint_id, store=container.store, principal=principal, meta=_meta(request, principal)
    )
    location = f"/api/v1/webhooks/{endpoint_id}/deliveries/{accepted.id}"
    return _positioned(accepted, accepted.position, 202, Location=location)


@post(
    "/webhooks/{endpoint_id:uuid}/deliveries/{delivery_id:str}/resend",
    status_code=202,
    summary="Send one message again",
    tags=["webhooks"],
)
async def resend_route(
    endpoint_id: FromPath[UUID],
    delivery_id: FromPath[str],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[Accepted]:
    # The message must exist (a look at the delivery log, which the deliverer keeps).
    await get_delivery(reads_of(container).on_primary(), principal, endpoint_id, delivery_id)
    accepted = await resend_delivery(
        endpoint_id,
        delivery_id,
        store=container.store,
        principal=principal,
        meta=_meta(request, principal),
    )
    return _positioned(accepted, accepted.position, 202)


@post(
    "/webhooks/{endpoint_id:uuid}/recover",
    status_code=202,
    summary="Send again every message that failed since a time",
    tags=["webhooks"],
)
async def recover_route(
    endpoint_id: FromPath[UUID],
    since: Annotated[datetime, QueryParameter(description="ISO 8601 with a time zone.")],
    request: Request[Any, Any, Any],
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> Response[Accepted]:
    accepted = await recover_failed(
        endpoint_id,
        since,
        store=container.store,
        principal=principal,
        meta=_meta(request, principal),
    )
    return _positioned(accepted, accepted.position, 202)


# Mounted under /api/v1 by almanac.app together with the query side's handlers.
handlers = [
    post_reading,
    post_batch,
    post_cancel_batch,
    post_retry_failed,
    post_webhook,
    patch_webhook,
    delete_webhook_route,
    rotate_secret_route,
    test_webhook_route,
    resend_route,
    recover_route,
]
