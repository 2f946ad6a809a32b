"""HTTP routes of the command side."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody

from almanac.auth import Principal
from almanac.container import Container
from almanac.domain.events import EventMeta
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


# Mounted under /api/v1 by almanac.app together with the query side's handlers.
handlers = [post_reading]
