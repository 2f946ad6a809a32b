"""Where a query reads: read-your-writes on the primary's positions, then the primary read
database or a hot standby that the router finds fresh enough for what the query reads."""

from __future__ import annotations

from collections.abc import Sequence

from almanac.adapters.replicas import ReadRouter
from almanac.errors import NotYetVisible
from almanac.readmodels import PositionWatch, ReadDatabase


async def wait_for_position(
    watch: PositionWatch,
    min_position: int | None,
    timeout: float,
    projection: str = "readings",
) -> int:
    """Return once the read model has reached ``min_position``, or raise NotYetVisible."""
    if min_position is None or min_position <= 0:
        return 0
    current = await watch.wait_for(projection, min_position, timeout)
    if current < min_position:
        raise NotYetVisible(
            f"the read model is at position {current}, not yet at {min_position}; retry shortly",
            wanted=min_position,
            current=current,
        )
    return current


async def route(
    projections: Sequence[str],
    *,
    db: ReadDatabase,
    router: ReadRouter | None,
    watch: PositionWatch,
    min_position: int | None,
    timeout: float,
) -> ReadDatabase:
    """The database to read ``projections`` from, once each has reached ``min_position``."""
    source, _ = await _route(
        projections, db=db, router=router, watch=watch, min_position=min_position, timeout=timeout
    )
    return source


async def read_source(
    projections: Sequence[str],
    *,
    db: ReadDatabase,
    router: ReadRouter | None,
    watch: PositionWatch,
    min_position: int | None,
    timeout: float,
) -> tuple[ReadDatabase, int]:
    """``route``, and the position the chosen database's answer reflects: every event up to
    it is in what it returns."""
    source, reached = await _route(
        projections, db=db, router=router, watch=watch, min_position=min_position, timeout=timeout
    )
    applied = None if router is None else router.applied_position(source)
    if applied is not None:
        return source, applied  # a standby's answer reflects its own positions
    if min(reached) > 0:
        return source, min(reached)  # the wait has read the positions already
    return source, min([await watch.current(p) for p in projections])


async def _route(
    projections: Sequence[str],
    *,
    db: ReadDatabase,
    router: ReadRouter | None,
    watch: PositionWatch,
    min_position: int | None,
    timeout: float,
) -> tuple[ReadDatabase, list[int]]:
    reached = [await wait_for_position(watch, min_position, timeout, p) for p in projections]
    source = db if router is None else await router.source(min_position, projections)
    return source, reached
