"""Keeps the read cache in step with the readings read model after each projector commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import msgspec
import structlog

from almanac.cache import Backoff, ReadCache, chart_key, encode_entry, reading_key
from almanac.domain.reading import Reading
from almanac.eventstore import RecordedEvent
from almanac.readmodels import ReadDatabase, Row
from almanac.views import SELECT_CHART, SELECT_READINGS, chart_from_row, reading_from_row

log = structlog.get_logger("almanac.cache")

READING_EVENTS = f"{Reading.TOPIC}."
# The chart columns of SELECT_CHART, without its one-hash condition.
_SELECT_CHARTS = SELECT_CHART.partition(" WHERE ")[0]


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


class CacheRefresher:
    """The projector's after-commit hook for the cache.

    For every reading a batch touched (and every chart it calculated) the row is read back
    from the primary read database, so the cached value is exactly what a query reads, and
    ``refresh`` puts it into L2 and makes every process's L1 drop its old copy. Refreshing is
    idempotent and never fails the projector: what could not be refreshed is retried with the
    next batch and, should no batch come, on a timer of its own (backing off up to
    ``retry_max`` seconds), so that an entry left behind while Redis was unreachable does not
    serve its old state until it expires; L1 copies expire by themselves meanwhile.
    """

    def __init__(
        self,
        cache: ReadCache,
        db: ReadDatabase,
        *,
        max_pending: int = 100_000,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        self._cache = cache
        self._db = db
        self._max_pending = max_pending
        self._pending_readings: set[str] = set()
        self._pending_charts: set[str] = set()
        self._backoff = Backoff(retry_initial, retry_max)
        self._retrying: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Keys waiting for a refresh that failed."""
        return len(self._pending_readings) + len(self._pending_charts)

    async def __call__(self, events: list[RecordedEvent]) -> None:
        readings, charts = set(self._pending_readings), set(self._pending_charts)
        for event in events:
            if event.type.startswith(READING_EVENTS):
                readings.add(event.aggregate_key)
                if event.type == Reading.ChartCalculated.TOPIC:
                    charts.add(event.view(_ChartCalculated).chart.chart_hash)
        if not readings and not charts:
            return
        try:
            items = await self._entries(sorted(readings), sorted(charts))
            refreshed = await self._cache.refresh(items)
        except Exception as exc:  # noqa: BLE001 - the cache is derived; the projector goes on
            log.warning(
                "cache.refresh_failed",
                readings=len(readings),
                charts=len(charts),
                error=str(exc) or type(exc).__name__,
            )
            refreshed = False
        if refreshed:
            # Only what this call refreshed: a failed call meanwhile may have added keys.
            self._pending_readings -= readings
            self._pending_charts -= charts
            self._backoff.reset()
        else:
            self._retry_later(readings, charts)

    async def aclose(self) -> None:
        """Stop retrying (the projector is no longer leading, or is stopping); what waits
        is kept for the next lead's first batch."""
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
            self._retrying = None

    async def _retry_until_refreshed(self) -> None:
        while self.pending:
            await asyncio.sleep(self._backoff.next())
            await self([])

    async def _entries(self, reading_ids: list[str], hashes: list[str]) -> dict[str, bytes]:
        items: dict[str, bytes] = {}
        for row in await self._fetch(SELECT_READINGS, "r.id", reading_ids):
            cached = reading_from_row(row)
            items[reading_key(cached.view.id)] = encode_entry(cached)
        for row in await self._fetch(_SELECT_CHARTS, "chart_hash", hashes):
            chart = chart_from_row(row)
            items[chart_key(chart.chart_hash)] = encode_entry(chart)
        return items

    async def _fetch(self, select: str, column: str, values: list[str]) -> list[Row]:
        rows: list[Row] = []
        for start in range(0, len(values), CHUNK):
            condition, params = _in_list(column, values[start : start + CHUNK])
            rows.extend(await self._db.fetch_all(f"{select} WHERE {condition}", params))
        return rows

    def _retry_later(self, readings: Iterable[str], charts: Iterable[str]) -> None:
        self._pending_readings.update(readings)
        self._pending_charts.update(charts)
        pending = self.pending
        if pending > self._max_pending:
            # Beyond this the entries are left to expire (l2_ttl) rather than held forever.
            log.warning("cache.refresh_dropped", keys=pending)
            self._pending_readings.clear()
            self._pending_charts.clear()
            return
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(
                self._retry_until_refreshed(), name="almanac-cache-refresh-retry"
            )
