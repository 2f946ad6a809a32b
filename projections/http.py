"""Projection administration (admin keys only): status, and what to do with parked events."""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import Router, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from almanac.auth import Principal
from almanac.container import Container
from almanac.errors import NotFound
from almanac.readmodels import ReadDatabase
from projections.status import (
    REQUEST,
    ParkedEvent,
    ProjectionStatus,
    open_parking,
    parked_event,
    projection_status,
)

Request = Literal["retry", "skip"]


class ProjectionList(msgspec.Struct, frozen=True):
    projections: list[ProjectionStatus]


def projection_names(container: Container) -> list[str]:
    """Every projection this deployment runs (whichever process runs it now)."""
    names = []
    for role in container.background.get("projector", []):
        projection = getattr(role, "projection", None)
        if projection is not None:
            names.append(str(projection.name))
    return names


async def list_projections(container: Container) -> ProjectionList:
    head = await container.store.max_position()
    return ProjectionList(
        projections=[
            await projection_status(container.read_db, name, head)
            for name in projection_names(container)
        ]
    )


async def get_projection(container: Container, name: str) -> ProjectionStatus:
    if name not in projection_names(container):
        raise NotFound(f"no projection named {name!r}")
    return await projection_status(container.read_db, name, await container.store.max_position())


async def request_for_parked(
    db: ReadDatabase, name: str, position: int, request: Request
) -> ParkedEvent:
    """File an operator's request; the runner holding the projection carries it out."""
    parked = await open_parking(db, name)
    if parked is None or int(parked["position"]) != position:
        raise NotFound(f"projection {name!r} is not parked at position {position}")
    await db.write([(REQUEST, [{"name": name, "position": position, "request": request}])])
    return msgspec.structs.replace(parked_event(parked), request=request)


@get("/projections", summary="Every projection's state, position and lag (admin)", tags=["admin"])
async def list_projections_route(
    container: NamedDependency[Container], principal: NamedDependency[Principal]
) -> ProjectionList:
    principal.require_admin()
    return await list_projections(container)


@get(
    "/projections/{name:str}",
    summary="One projection with its parked events (admin)",
    tags=["admin"],
)
async def get_projection_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    name: FromPath[str],
) -> ProjectionStatus:
    principal.require_admin()
    return await get_projection(container, name)


@post(
    "/projections/{name:str}/parked/{position:int}/{action:str}",
    summary="Retry a parked event (after a fix), or skip it and go on after it (admin)",
    tags=["admin"],
    status_code=202,
)
async def act_on_parked_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
    name: FromPath[str],
    position: FromPath[int],
    action: FromPath[Request],
) -> ParkedEvent:
    principal.require_admin()
    await get_projection(container, name)
    return await request_for_parked(container.read_db, name, position, action)


router = Router(
    path="/api/v1",
    route_handlers=[
        list_projections_route,
        get_projection_route,
        act_on_parked_route,
    ],
)
