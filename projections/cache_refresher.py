"""Keeps the read cache in step with the readings read model after each projector commit,
and across projector deaths, changes of leader and Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import uuid4

import msgspec
import structlog

from almanac.cache import ReadCache, chart_key, encode_entry, reading_key
from almanac.domain.reading import Reading
from almanac.eventstore import RecordedEvent
from almanac.readmodels import ReadDatabase, Row
from almanac.timeouts import Backoff
from almanac.views import SELECT_CHART, SELECT_READINGS, chart_from_row, reading_from_row
from projections.status import now

log = structlog.get_logger("almanac.cache")

READING_EVENTS = f"{Reading.TOPIC}."
# The chart columns of SELECT_CHART, without its one-hash condition.
_SELECT_CHARTS = SELECT_CHART.partition(" WHERE ")[0]

# Up to ``limit`` events of the log after a position, in order (``EventStore.read``).
ReadLog = Callable[[int, int], Awaitable[list[RecordedEvent]]]

# The mark, in ``cache_positions`` (a bookkeeping table: ``projections.status``), made with
# the projection's other bookkeeping when its runner prepares.
_READ_MARK = "SELECT position FROM cache_positions WHERE name = :name"
_TAKE_MARK = (
    "INSERT INTO cache_positions (name, position, lead, updated_at)"
    " VALUES (:name, :position, :lead, :at)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position, lead = excluded.lead,"
    " updated_at = excluded.updated_at"
)
_MOVE_MARK = (
    "UPDATE cache_positions SET position = :position, updated_at = :at"
    " WHERE name = :name AND lead = :lead"
)

# The mark is stored at most this often while commits come, and when a lead ends: not a
# write per batch. A projector killed in between leaves its successor the readings of up
# to this long to evict, which a catch-up does in a few milliseconds.
MARK_INTERVAL = 1.0
# Events read from the log at a time when catching up.
CATCH_UP_CHUNK = 2000


# Only the chart's hash is needed: no chart is decoded whole to find it.
class _ChartHash(msgspec.Struct):
    chart_hash: str


class _ChartCalculated(msgspec.Struct):
    chart: _ChartHash


# Parameters per IN list: well below every engine's limit on bound parameters.
CHUNK = 500


def _in_list(column: str, values: list[str]) -> tuple[str, dict[str, Any]]:
    """``column IN (:v0, :v1, …)`` with its parameters (the read database's ``:name`` style)."""
    params = {f"v{i}": value for i, value in enumerate(values)}
    return f"{column} IN ({', '.join(f':{name}' for name in params)})", params


def _touched(events: list[RecordedEvent]) -> list[str]:
    """The ids of the readings ``events`` changed."""
    return [e.aggregate_key for e in events if e.type.startswith(READING_EVENTS)]


class CacheRefresher:
    """The projector's after-commit hook for the cache.

    For every reading a batch touched (and every chart it calculated) the row is read back
    from the primary read database, so the cached value is exactly what a query reads, and
    ``refresh`` puts it into L2 and makes every process's L1 drop its old copy. Refreshing is
    idempotent and never fails the projector: what could not be refreshed is retried with the
    next batch and, should no batch come, on a timer of its own (backing off up to
    ``retry_max`` seconds), so that an entry left behind while Redis was unreachable does not
    serve its old state until it expires; L1 copies expire by themselves meanwhile.

    What is owed outlives the process. With a shared cache, the refresher keeps in the read
    database how far the cache has taken in the projection's commits (``cache_positions``),
    and moves that mark only past commits whose every change the cache has taken. A lead
    that begins (``take_over``) starts from the mark: the commits after it are those of a
    projector that died, lost its lead or could not reach Redis before their refresh. Their
    readings are found in the log and evicted from L2 and from every L1, so that the next
    read of each takes it from the database; until Redis takes the evictions they are tried
    again as a failed refresh is. When more than ``max_pending`` keys wait, they are let go
    in the same way: the log says again which they were.
    """

    def __init__(
        self,
        cache: ReadCache,
        db: ReadDatabase,
        read_log: ReadLog,
        *,
        name: str = "readings",
        max_pending: int = 100_000,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        mark_interval: float = MARK_INTERVAL,
        catch_up_chunk: int = CATCH_UP_CHUNK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = cache
        self._db = db
        self._read_log = read_log
        self._name = name
        self._max_pending = max_pending
        self._mark_interval = mark_interval
        self._catch_up_chunk = catch_up_chunk
        self._clock = clock
        # Each key waiting for a refresh, with the position of the last commit that changed it.
        self._pending_readings: dict[str, int] = {}
        self._pending_charts: dict[str, int] = {}
        # What the cache has taken in, by position (each at least the one before): every
        # commit up to _gap_after; none known of those up to _gap_until, whose readings are
        # to be read from the log; every commit after that up to _clean; and of the commits
        # after that up to _seen, all but the changes to the pending keys.
        self._gap_after = self._gap_until = self._clean = self._seen = 0
        # One refresh at a time: the batches' and the timer's.
        self._lock = asyncio.Lock()
        self._backoff = Backoff(retry_initial, retry_max)
        self._retrying: asyncio.Task[None] | None = None
        # The lead this refresher stores the mark for (None: not leading, or no shared cache),
        # the mark it stored last, and when.
        self._lead: str | None = None
        self._marked = 0
        self._marked_at = -math.inf

    @property
    def pending(self) -> int:
        """Keys waiting for a refresh that failed."""
        return len(self._pending_readings) + len(self._pending_charts)

    @property
    def refreshed_through(self) -> int:
        """Every change committed at or before this position is in the cache (or out of it)."""
        return self._gap_after if self._catching_up else self._clean

    @property
    def _catching_up(self) -> bool:
        return self._gap_after < self._gap_until

    @property
    def _owed(self) -> bool:
        return self._catching_up or self.pending > 0

    async def take_over(self, position: int) -> None:
        """A lead begins, every commit up to ``position`` made: what earlier leads committed
        and the cache never took in is evicted, in the background, until Redis takes it.

        Raises if the read database fails: the lead is not to go on without knowing."""
        await self._stop_retrying()
        self._lead = None
        if not self._cache.shared:
            return  # an L1 of this process alone began empty with it
        row = await self._db.fetch_one(_READ_MARK, {"name": self._name})
        # No mark (the first start of a version that keeps one): the tracked position is
        # trusted. What a projector before this version left in Redis expires within the L2
        # TTL, as it did before there was a mark; evicting every reading of the whole log
        # instead would empty the cache and, stopped partway, begin again from 0.
        # A mark beyond ``position``: the read model started again (a rebuild from 0, a backup
        # restored); the commits after ``position`` are made again, and refreshed then.
        start = position if row is None else min(int(row["position"]), position)
        lead = uuid4().hex
        params = {"name": self._name, "position": start, "lead": lead, "at": now()}
        await self._db.write([(_TAKE_MARK, [params])])
        self._lead = lead
        self._marked, self._marked_at = start, self._clock()
        # Keys an earlier lead of this process left waiting are after the mark too.
        self._pending_readings.clear()
        self._pending_charts.clear()
        self._gap_after, self._gap_until = start, position
        self._clean = self._seen = position
        self._backoff.reset()
        if self._catching_up:
            log.info("cache.catching_up", after=start, until=position)
            self._retry_later(at_once=True)

    async def __call__(self, events: list[RecordedEvent]) -> None:
        for event in events:
            if event.type.startswith(READING_EVENTS):
                self._pending_readings[event.aggregate_key] = event.position
                if event.type == Reading.ChartCalculated.TOPIC:
                    chart_hash = event.view(_ChartCalculated).chart.chart_hash
                    self._pending_charts[chart_hash] = event.position
        if events:
            self._seen = max(self._seen, events[-1].position)
        if self._lock.locked():
            # The refresh under way (the timer's) takes these keys too before it ends: the
            # projector's next batches are not kept waiting for a catch-up.
            return
        # Only the timer's task catches up: a gap read and evicted here, a run at a time,
        # would hold the projector's next batches (and serve stale states) until its end.
        await self._refresh(catch_up=False)

    async def aclose(self) -> None:
        """The lead ends (the projector is no longer leading, or is stopping): stop retrying,
        and store the mark as it stands, so that the next lead, here or in another process,
        catches up from there."""
        await self._stop_retrying()
        await self._store_mark(force=True)
        self._lead = None

    async def _stop_retrying(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
            self._retrying = None

    async def _refresh(self, *, catch_up: bool) -> None:
        """Refresh the pending keys and, with ``catch_up``, evict the readings of the gap, a
        part at a time, the live keys first so that a long catch-up does not hold them back."""
        async with self._lock:
            # Until something fails or nothing is owed: keys that batches added meanwhile
            # (while this refresh held the lock) are taken on the next round.
            while await self._refresh_pending():
                # Within the loop: batches that keep it busy must not keep the mark still.
                await self._store_mark()
                if catch_up and self._catching_up:
                    if not await self._catch_up():
                        break
                    # Each run evicted is stored at once: a restart goes on from there.
                    await self._store_mark(force=True)
                elif not self.pending:
                    if not self._catching_up:
                        self._backoff.reset()
                    break
            await self._store_mark()
        if self._owed:
            self._let_go_if_too_many()
            self._retry_later()

    async def _refresh_pending(self) -> bool:
        """Refresh what waits now; False if that failed."""
        seen = self._seen
        readings, charts = dict(self._pending_readings), dict(self._pending_charts)
        if readings or charts:
            try:
                items = await read_entries(self._db, sorted(readings), sorted(charts))
                refreshed = await self._cache.refresh(items)
            except Exception as exc:  # noqa: BLE001 - the cache is derived; the projector goes on
                log.warning(
                    "cache.refresh_failed",
                    readings=len(readings),
                    charts=len(charts),
                    error=str(exc) or type(exc).__name__,
                )
                refreshed = False
            if not refreshed:
                self._move_clean(seen)
                return False
            # Not a key a commit changed again meanwhile: its row may have been read before.
            _done(self._pending_readings, readings)
            _done(self._pending_charts, charts)
        self._move_clean(seen)
        return True

    def _move_clean(self, seen: int) -> None:
        """Past the commits up to ``seen`` that changed no key still waiting: never up to one
        that did (its refresh failed, or is yet to come)."""
        waiting = [*self._pending_readings.values(), *self._pending_charts.values()]
        below = min(waiting) - 1 if waiting else seen
        self._clean = max(self._clean, min(seen, below))

    async def _catch_up(self) -> bool:
        """Evict the readings of the next run of the gap's commits; False if that failed."""
        after, until = self._gap_after, self._gap_until
        try:
            events = await self._read_log(after, self._catch_up_chunk)
            within = [e for e in events if e.position <= until]
            readings = sorted(set(_touched(within)))
            evicted = await self._cache.evict([reading_key(r) for r in readings])
        except Exception as exc:  # noqa: BLE001 - tried again, as a failed refresh is
            log.warning(
                "cache.catch_up_failed",
                after=after,
                until=until,
                error=str(exc) or type(exc).__name__,
            )
            return False
        if not evicted:
            return False
        # A whole run within the gap may be followed by more of it; anything less ends it.
        whole = len(within) == len(events) == self._catch_up_chunk
        self._gap_after = within[-1].position if whole else until
        if not self._catching_up:
            log.info("cache.caught_up", position=until)
        return True

    async def _store_mark(self, *, force: bool = False) -> None:
        mark = self.refreshed_through
        if self._lead is None or mark == self._marked:
            return
        if not force and self._clock() - self._marked_at < self._mark_interval:
            return
        params = {"name": self._name, "position": mark, "lead": self._lead, "at": now()}
        try:
            await self._db.write([(_MOVE_MARK, [params])])
        except Exception as exc:  # noqa: BLE001 - stored later; a successor starts further back
            log.warning("cache.mark_not_stored", position=mark, error=str(exc) or repr(exc))
            return
        self._marked, self._marked_at = mark, self._clock()

    async def _retry_until_refreshed(self, at_once: bool) -> None:
        if at_once:
            await self._refresh(catch_up=True)
        while self._owed:
            await asyncio.sleep(self._backoff.next())
            await self._refresh(catch_up=True)

    def _retry_later(self, *, at_once: bool = False) -> None:
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(
                self._retry_until_refreshed(at_once), name="almanac-cache-refresh-retry"
            )

    def _let_go_if_too_many(self) -> None:
        """Past ``max_pending`` waiting keys, keep only where they begin: the log has them."""
        keys = self.pending
        if keys <= self._max_pending:
            return
        if not self._catching_up:
            self._gap_after = self._clean
        self._gap_until = self._clean = self._seen
        self._pending_readings.clear()
        self._pending_charts.clear()
        log.warning(
            "cache.refresh_deferred", keys=keys, after=self._gap_after, until=self._gap_until
        )


async def read_entries(
    db: ReadDatabase, reading_ids: Sequence[str], hashes: Sequence[str]
) -> dict[str, bytes]:
    """The cache's entries of these readings and charts, as ``db`` has them now, by key: what
    a query reads, encoded as the cache holds it. Rows ``db`` does not have are left out.

    The refresher's reads after a commit, and the cache's when it warms (``Load``)."""
    items: dict[str, bytes] = {}
    for row in await _fetch(db, SELECT_READINGS, "r.id", reading_ids):
        cached = reading_from_row(row)
        items[reading_key(cached.view.id)] = encode_entry(cached)
    for row in await _fetch(db, _SELECT_CHARTS, "chart_hash", hashes):
        chart = chart_from_row(row)
        items[chart_key(chart.chart_hash)] = encode_entry(chart)
    return items


async def _fetch(db: ReadDatabase, select: str, column: str, values: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(values), CHUNK):
        condition, params = _in_list(column, list(values[start : start + CHUNK]))
        rows.extend(await db.fetch_all(f"{select} WHERE {condition}", params))
    return rows


def _done(pending: dict[str, int], refreshed: dict[str, int]) -> None:
    """Drop the refreshed keys from ``pending``, unless a later commit changed one since."""
    for key, position in refreshed.items():
        if pending.get(key) == position:
            del pending[key]
