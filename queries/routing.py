"""Where a query reads: read-your-writes on the primary's positions, then the primary read
database or a hot standby that the router finds fresh enough for what the query reads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from almanac.adapters.replicas import READINGS, ReadRouter
from almanac.container import Container
from almanac.errors import FieldError, NotYetVisible, ValidationFailed
from almanac.readmodels import PositionWatch, ReadDatabase
from almanac.timeouts import within

__all__ = ["READINGS", "Reads", "reads_of"]

# How long a query that has waited out its ``min_position`` asks the store for its last.
HEAD_TIMEOUT = 0.5


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
    standbys (None without any), the projections' positions, how long a query may wait
    for a ``min_position``, and the event store's last position (``head``), which tells a
    position not reached yet from one that was never given out."""

    db: ReadDatabase
    watch: PositionWatch
    timeout: float
    router: ReadRouter | None = None
    head: Callable[[], Awaitable[int]] | None = None

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

    async def _given_out(self, position: int) -> None:
        """Raise a 422 naming ``min_position`` if no command has been answered with
        ``position`` yet: no wait would reach it, where a 503 would have the client retry."""
        if self.head is None:
            return
        try:
            # Briefly: the wait has run its course, and a stalled store must not hold the 503.
            # (The store's thread goes on with the query after a timeout; it is one query.)
            head = await within(self.head(), HEAD_TIMEOUT)
        except Exception:  # noqa: BLE001 - the store cannot say: the 503 stands
            return
        if position > head:
            raise ValidationFailed(
                [FieldError("min_position", f"is past the last stored position ({head})")]
            ) from None

    def _applied(self, source: ReadDatabase) -> int | None:
        """The position a standby ``source`` has replayed; None for the primary."""
        return None if self.router is None else self.router.applied_position(source)

    async def _route(
        self, projections: Sequence[str], min_position: int | None
    ) -> tuple[ReadDatabase, list[int]]:
        try:
            reached = [
                await _wait_for_position(self.watch, min_position, self.timeout, p)
                for p in projections
            ]
        except NotYetVisible as late:
            await self._given_out(late.wanted)
            raise
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
        container.store.max_position,
    )
