"""Read-replica routing: each query reads from a hot standby that is fresh enough, else the primary.

How fresh a source is comes from its own ``projection_positions`` rows: the table replicates
with the read model, so a standby's row for a projection says how far its copy of that
projection has got. Each read names the projections it reads (a reading, a batch, the jobs
over both), and is routed by those alone: a projection's rows commit with its position, so
a standby that has replayed that position holds those rows, whatever the lag of the
others (a projection being rebuilt, or one whose saves are deferred while it writes
nothing, may trail the rest). Positions are cached and refreshed in the background at
most every ``refresh_interval``, so routing adds no query to a request -- except a read
that names a ``min_position`` while the cached positions are older than that: it waits
for the refresh (a projection rebuilt in place starts again from 0, so an old position may
overstate what a copy holds). A standby that errors or does not answer within ``timeout``
is set aside for a backoff that doubles with each failure, then tried again; a read that
fails on a standby is answered by the primary instead, so losing a standby costs latency,
never an error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

# The primary's connection set-up, so that rows decode alike from every source.
from almanac.adapters.postgres import IdleCheck, PostgresReadDatabase, _configure
from almanac.errors import Unavailable
from almanac.readmodels import Dialect, ReadDatabase, Row, Write
from almanac.settings import mask_password

log = structlog.get_logger("almanac.replicas")
T = TypeVar("T")

# What "this source is not answering" looks like, whatever the adapter.
_NOT_ANSWERING = (Unavailable, psycopg.OperationalError, OSError, TimeoutError)
# A position probe may also meet a standby that has not yet replayed the tables.
_PROBE_FAILURES = (*_NOT_ANSWERING, psycopg.Error)
_POSITIONS = "SELECT name, position FROM projection_positions"
# What a read routes by when it names nothing else: the hot reads.
READINGS = ("readings",)


class ReplicaReadDatabase(PostgresReadDatabase):
    """A hot standby of the read database: read-only, never created or migrated from here,
    and quick to give up so that reads move to the primary instead of waiting."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        timeout: float = 1.0,
        reconnect_timeout: float = 5.0,
    ) -> None:
        super().__init__(url, min_size=1, max_size=max_size)
        self.pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            configure=_configure,
            # libpq rounds connect timeouts below 2 s up to 2 s.
            kwargs={"row_factory": dict_row, "connect_timeout": 2, "autocommit": True},
            timeout=timeout,
            # Give up reconnecting soon: the router decides when to try a lost standby again,
            # and a fresh attempt then connects at once instead of after a long pool backoff.
            reconnect_timeout=reconnect_timeout,
            check=(idle := IdleCheck()).check,
        )
        idle.sweeps(self.pool)

    async def open(self) -> None:
        # No ensure_database: a standby is read-only, and connects in the background so
        # that one which is down does not hold up start-up.
        await self.pool.open(wait=False)

    async def migrate(self, statements: Sequence[str]) -> None:
        raise RuntimeError(f"{self._where()} is a read-only standby; migrate the primary")

    async def write(self, writes: Sequence[Write]) -> None:
        raise RuntimeError(f"{self._where()} is a read-only standby; write to the primary")

    def _where(self) -> str:
        return mask_password(self.url)


class SourceStats(msgspec.Struct, frozen=True):
    """One source as the router last saw it."""

    role: Literal["primary", "replica"]
    url: str
    # The source's ``readings`` position, as last read; None before the first answer.
    position: int | None
    # How far behind the primary's ``readings`` position, for replicas whose both are known.
    lag: int | None
    healthy: bool
    # How many reads ``source()`` has sent here.
    routed: int
    # Every projection's position on this source, as last read.
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    # Per projection, how far behind the primary (replicas only).
    lags: dict[str, int] = msgspec.field(default_factory=dict)


@dataclass
class _Source:
    db: ReadDatabase
    role: Literal["primary", "replica"]
    label: str
    # Projection name -> position, as last read; None before the first answer.
    positions: dict[str, int] | None = None
    healthy: bool = True
    failures: int = 0
    retry_at: float = 0.0
    routed: int = 0

    def at(self, projection: str) -> int:
        """This source's position for ``projection``: 0 if it has none yet, or if the source
        has not answered yet (callers that must tell the two apart look at ``positions``)."""
        return 0 if self.positions is None else self.positions.get(projection, 0)


def _label(db: ReadDatabase) -> str:
    url = getattr(db, "url", None)
    return mask_password(url) if isinstance(url, str) else type(db).__name__


class ReadRouter:
    """Chooses, per read, the database to read from: a replica within ``max_lag`` positions of
    the primary (and at or past ``min_position``), round-robin among those; else the primary.

    The router opens and closes the replicas; the primary stays with whoever made it.
    """

    def __init__(
        self,
        primary: ReadDatabase,
        replicas: Sequence[ReadDatabase],
        *,
        max_lag: int,
        refresh_interval: float = 0.1,
        timeout: float = 1.0,
        down_for: float = 1.0,
        max_down_for: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_lag < 0:
            raise ValueError(f"max_lag must be 0 or more, got {max_lag}")
        self.max_lag = max_lag
        self._primary = _Source(primary, "primary", _label(primary))
        self._replicas = [_Source(db, "replica", _label(db)) for db in replicas]
        self._interval = refresh_interval
        # A read that needs a newer position may refresh sooner, but not on every request.
        self._forced_interval = refresh_interval / 10
        self._timeout = timeout
        self._down_for = down_for
        self._max_down_for = max_down_for
        self._clock = clock
        self._refreshed_at = -math.inf  # when the latest refresh started
        self._filled = False  # a refresh has completed: the cache holds what could be read
        self._refreshing: asyncio.Task[None] | None = None
        # Work abandoned at its deadline, still finishing its cancellation.
        self._stragglers: set[asyncio.Task[Any]] = set()
        self._turn = 0

    async def open(self) -> None:
        for replica in self._replicas:
            try:
                await replica.db.open()
            except _PROBE_FAILURES as exc:
                self._set_aside(replica, exc)

    async def close(self) -> None:
        # The refresh first: cancelling it abandons its probes, which then join the stragglers.
        for group in ([self._refreshing] if self._refreshing else [], self._stragglers):
            pending = list(group)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self._timeout)
        for replica in self._replicas:
            await replica.db.close()

    async def ping(self) -> None:
        """Probe every source now; raise ``Unavailable`` if none of them can serve reads."""
        await self.refresh()
        if self._primary.healthy or self._eligible(0, READINGS):
            return
        raise Unavailable("no read database is answering, neither the primary nor a replica")

    async def source(
        self, min_position: int | None = None, projections: Sequence[str] = READINGS
    ) -> ReadDatabase:
        """The database to run one read of ``projections`` on: it has applied at least
        ``min_position`` of each, and trails the primary by at most ``max_lag`` in each."""
        if not self._filled:
            await self.refresh()  # the very first reads wait for the first positions
        elif self._clock() - self._refreshed_at >= self._interval:
            if min_position:
                # Read-your-writes is not routed on old positions: a projection rebuilt in
                # place starts again from 0, and a replica's old position would overstate it.
                await self.refresh()
            else:
                self._start_refresh()
        wanted = min_position or 0
        eligible = self._eligible(wanted, projections)
        if not eligible and self._worth_refreshing_for(wanted, projections):
            await self.refresh()
            eligible = self._eligible(wanted, projections)
        if not eligible:
            self._primary.routed += 1
            return self._primary.db
        chosen = eligible[self._turn % len(eligible)]
        self._turn += 1
        chosen.routed += 1
        # Positions only grow, so the replica has applied at least what it had when chosen.
        applied = min(chosen.at(p) for p in projections)
        return _ReplicaRead(chosen, applied, self._primary.db, self._within, self._set_aside)

    def applied_position(self, source: ReadDatabase) -> int | None:
        """A position ``source`` (from ``source()``) has certainly applied in every projection
        the read named; None for the primary, whose own position is the one to report."""
        return source.position if isinstance(source, _ReplicaRead) else None

    def stats(self) -> list[SourceStats]:
        primary = self._primary
        stats = []
        for s in (primary, *self._replicas):
            positions = dict(s.positions or {})
            # A lag is known for a replica once both its positions and the primary's are.
            known = s.role == "replica" and None not in (s.positions, primary.positions)
            names = sorted({*(primary.positions or {}), *positions, READINGS[0]})
            lags = {n: primary.at(n) - s.at(n) for n in names} if known else {}
            stats.append(
                SourceStats(
                    role=s.role,
                    url=s.label,
                    position=None if s.positions is None else s.at(READINGS[0]),
                    lag=lags.get(READINGS[0]),
                    healthy=s.healthy,
                    routed=s.routed,
                    positions=positions,
                    lags=lags,
                )
            )
        return stats

    async def refresh(self) -> None:
        """Read every source's position now, joining a refresh already under way."""
        task = self._start_refresh()
        # Shielded: a caller that gives up must not cancel the refresh others are waiting on.
        await asyncio.shield(task)

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refreshing is None:
            self._refreshed_at = self._clock()
            self._refreshing = asyncio.create_task(self._probe_all(), name="read-router.refresh")
            self._refreshing.add_done_callback(self._refresh_done)
        return self._refreshing

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.error("read_router.refresh_failed", error=repr(task.exception()))

    async def _probe_all(self) -> None:
        now = self._clock()
        due = [r for r in self._replicas if r.healthy or r.retry_at <= now]
        await asyncio.gather(self._probe(self._primary), *(self._probe(r) for r in due))
        self._filled = True

    async def _probe(self, source: _Source) -> None:
        try:
            rows = await self._within(source.db.fetch_all(_POSITIONS, {}))
        except _PROBE_FAILURES as exc:
            self._set_aside(source, exc)
            return
        source.positions = {str(row["name"]): int(row["position"]) for row in rows}
        if not source.healthy:
            log.info("read_router.source_up", role=source.role, url=source.label)
        source.healthy = True
        source.failures = 0

    def _set_aside(self, source: _Source, exc: BaseException) -> None:
        """Mark ``source`` down; a replica is skipped until its backoff has passed."""
        if not source.healthy and source.retry_at > self._clock():
            return  # already set aside: concurrent failures are one failure, not many
        source.failures += 1
        backoff = min(self._down_for * 2 ** (source.failures - 1), self._max_down_for)
        source.retry_at = self._clock() + backoff
        if source.healthy:
            log.warning(
                "read_router.source_down",
                role=source.role,
                url=source.label,
                error=str(exc) or type(exc).__name__,
                retry_in=backoff if source.role == "replica" else None,
            )
        source.healthy = False

    def _eligible(self, wanted: int, projections: Sequence[str]) -> list[_Source]:
        # Without the primary's positions the lag cannot be known: read from the primary.
        if self._primary.positions is None:
            return []
        floors = [(p, max(wanted, self._primary.at(p) - self.max_lag)) for p in projections]
        return [
            r
            for r in self._replicas
            if r.healthy
            and r.positions is not None
            and all(r.at(p) >= floor for p, floor in floors)
        ]

    def _worth_refreshing_for(self, wanted: int, projections: Sequence[str]) -> bool:
        """A healthy replica's cached position is below ``wanted`` in a projection asked for:
        it may have moved on since."""
        if self._clock() - self._refreshed_at < self._forced_interval:
            return False
        return any(
            r.healthy and r.positions is not None and any(r.at(p) < wanted for p in projections)
            for r in self._replicas
        )

    async def _within(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``'s result, or TimeoutError after ``timeout`` s without waiting for it to stop.

        ``asyncio.wait_for`` would wait for the cancelled query to wind down, which against
        a hung server can take far longer than the time-out itself.
        """
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise TimeoutError(f"no answer within {self._timeout} s")
        return task.result()

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        self._stragglers.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._stragglers.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its failure has been handled already


class _ReplicaRead:
    """A replica chosen for one read; if it fails, the primary answers and the replica is
    set aside. The router owns the connections, so opening and closing this is a no-op."""

    def __init__(
        self,
        replica: _Source,
        position: int,
        primary: ReadDatabase,
        within: Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]],
        failed: Callable[[_Source, BaseException], None],
    ) -> None:
        self._replica = replica
        self._primary = primary
        self._within = within
        self._failed = failed
        self.position = position

    @property
    def dialect(self) -> Dialect:
        return self._replica.db.dialect

    @property
    def url(self) -> str:
        return self._replica.label

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        try:
            row: Row | None = await self._within(self._replica.db.fetch_one(sql, params))
        except _NOT_ANSWERING as exc:
            self._fall_back(exc)
            return await self._primary.fetch_one(sql, params)
        return row

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        try:
            rows: list[Row] = await self._within(self._replica.db.fetch_all(sql, params))
        except _NOT_ANSWERING as exc:
            self._fall_back(exc)
            return await self._primary.fetch_all(sql, params)
        return rows

    def _fall_back(self, exc: BaseException) -> None:
        cause = exc.__cause__ if isinstance(exc, Unavailable) else exc
        # A standby cancels queries that conflict with the WAL it is applying (SQLSTATE class
        # 40, transaction rollback): it is working, so only this read moves to the primary.
        if not isinstance(cause, psycopg.Error) or not (cause.sqlstate or "").startswith("40"):
            self._failed(self._replica, exc)

    async def write(self, writes: Sequence[Write]) -> None:
        # A standby takes no writes; the primary is where they belong.
        await self._primary.write(writes)

    async def migrate(self, statements: Sequence[str]) -> None:
        await self._primary.migrate(statements)

    async def ping(self) -> None:
        await self._within(self._replica.db.ping())

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None
