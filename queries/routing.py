"""Where a query reads: read-your-writes on the primary's positions, then the primary read
database or a hot standby that the router finds fresh enough for what the query reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from almanac.adapters.replicas import READINGS, ReadRouter
from almanac.container import Container
from almanac.errors import NotYetVisible
from almanac.readmodels import PositionWatch, ReadDatabase

__all__ = ["READINGS", "Reads", "reads_of"]


async def _wait_for_position(
    watch: PositionWatch,
    min_position: int | None,
    timeout: float,
    projection: str,
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


@dataclass(frozen=True, slots=True)
class Reads:
    """What every query reads with: the primary read database, the router to its hot
    standbys (None without any), the projections' positions, and how long a query may wait
    for a ``min_position``."""

    db: ReadDatabase
    watch: PositionWatch
    timeout: float
    router: ReadRouter | None = None

    def on_primary(self) -> Reads:
        """These reads with no standby: for what no projection position can vouch for."""
        return replace(self, router=None)

    def as_new_as_primary(self, source: ReadDatabase) -> bool:
        """Whether what ``source`` (from ``route`` or ``read``) answers is certainly as new as
        the primary's state: only then may a query put it where every process reads (L2).

        A standby's answer may trail the primary by up to the router's ``max_lag``; in Redis
        it would serve that earlier state to every process, and no commit would come to make
        the projector put the later one back. (A standby that fails hands its read to the
        primary, and is still counted a standby here: the safe side.)"""
        return self._applied(source) is None

    async def route(self, projections: Sequence[str], min_position: int | None) -> ReadDatabase:
        """The database to read ``projections`` from, once each has reached
        ``min_position``."""
        source, _ = await self._route(projections, min_position)
        return source

    async def read(
        self, projections: Sequence[str], min_position: int | None
    ) -> tuple[ReadDatabase, int]:
        """``route``, and the position the chosen database's answer reflects: every event
        up to it is in what it returns."""
        source, reached = await self._route(projections, min_position)
        applied = self._applied(source)
        if applied is not None:
            return source, applied  # a standby's answer reflects its own positions
        if min(reached) > 0:
            return source, min(reached)  # the wait has read the positions already
        return source, min([await self.watch.current(p) for p in projections])

    def _applied(self, source: ReadDatabase) -> int | None:
        """The position a standby ``source`` has replayed; None for the primary."""
        return None if self.router is None else self.router.applied_position(source)

    async def _route(
        self, projections: Sequence[str], min_position: int | None
    ) -> tuple[ReadDatabase, list[int]]:
        reached = [
            await _wait_for_position(self.watch, min_position, self.timeout, p) for p in projections
        ]
        if self.router is None:
            return self.db, reached
        return await self.router.source(min_position, projections), reached


def reads_of(container: Container) -> Reads:
    """The reads of ``container``'s queries, routed to its standbys where it has any."""
    return Reads(
        container.read_db,
        container.watch,
        container.settings.http.min_position_timeout,
        container.read_router,
    )
