"""``get_chart``: a calculated chart, shared by every reading of the same birth data."""

from __future__ import annotations

from almanac.auth import Principal
from almanac.cache import ReadCache, chart_key, decode_chart, encode_entry
from almanac.errors import NotFound
from almanac.views import SELECT_CHART, ChartView, chart_from_row
from queries.routing import READINGS, Reads

# A client sees a chart only through a reading of its own: birth data is personal.
_OWNS = "SELECT 1 AS ok FROM readings WHERE chart_hash = :chart_hash AND owner = :owner LIMIT 1"


async def get_chart(
    chart_hash: str,
    *,
    reads: Reads,
    principal: Principal,
    min_position: int | None,
    cache: ReadCache | None = None,
) -> ChartView:
    source = await reads.route(READINGS, min_position)
    if len(chart_hash) != 64 or not all(c in "0123456789abcdef" for c in chart_hash):
        raise NotFound(f"no chart {chart_hash[:80]}")
    # A chart never changes once calculated (its hash is its content), so a cached one
    # answers any min_position the wait above has let through; the projector puts it there.
    key = chart_key(chart_hash)
    view = None if cache is None else decode_chart(await cache.get(key))
    if view is None:
        mark = 0 if cache is None else cache.mark()
        row = await source.fetch_one(SELECT_CHART, {"chart_hash": chart_hash})
        if row is None:
            raise NotFound(f"no chart {chart_hash}")
        view = chart_from_row(row)
        if cache is not None:
            # Whichever database answered, its row is the primary's: a chart is written once
            # and never changes, so even a standby's copy may be shared.
            await cache.fill(key, encode_entry(view), mark=mark, shared=True)
    if not principal.is_admin:
        owns = await source.fetch_one(_OWNS, {"chart_hash": chart_hash, "owner": principal.owner})
        if owns is None:
            raise NotFound(f"no chart {chart_hash}")
    return view
