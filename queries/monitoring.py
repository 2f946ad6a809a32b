"""Monitoring endpoints for operators (admin keys only)."""

from __future__ import annotations

import time
from typing import Literal

import msgspec
import structlog
from litestar import Router, get
from litestar.di import NamedDependency

from almanac.adapters.redis import RedisConnection
from almanac.adapters.replicas import SourceStats
from almanac.auth import Principal
from almanac.cache import CacheStats, CacheTotals, ProcessCacheStats, ReadCache
from almanac.container import Container
from almanac.errors import Unavailable
from almanac.timeouts import within

log = structlog.get_logger("almanac.monitoring")

# A monitoring request waits at most this long for Redis to answer.
PING_TIMEOUT = 1.0


class RedisStatus(msgspec.Struct, frozen=True):
    status: Literal["ok", "unavailable", "not_configured"]
    latency_ms: float | None = None
    detail: str | None = None


class CacheMonitoring(msgspec.Struct, frozen=True):
    # This process's counters.
    cache: CacheStats
    redis: RedisStatus
    # Every process's, as each shared them in the last seconds (this one's as of now), and
    # their sum; null without Redis, or when reading them failed or took over a second.
    processes: list[ProcessCacheStats] | None = None
    total: CacheTotals | None = None


async def get_cache_monitoring(cache: ReadCache, redis: RedisConnection | None) -> CacheMonitoring:
    status = await _redis_status(redis)
    shared = None
    if status.status == "ok":
        try:
            shared = await within(cache.shared_stats(), PING_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - this process's own counters still answer
            log.warning("monitoring.shared_stats_failed", error=str(exc) or repr(exc))
    return CacheMonitoring(
        cache=cache.stats(),
        redis=status,
        processes=shared,
        total=None if shared is None else CacheTotals.of(shared),
    )


async def _redis_status(redis: RedisConnection | None) -> RedisStatus:
    if redis is None:
        return RedisStatus(status="not_configured")
    started = time.perf_counter()
    try:
        await within(redis.ping(), PING_TIMEOUT)
    except Unavailable as exc:
        return RedisStatus(status="unavailable", detail=exc.detail)
    except TimeoutError:
        return RedisStatus(status="unavailable", detail=f"no answer within {PING_TIMEOUT} s")
    latency = round((time.perf_counter() - started) * 1000, 3)
    return RedisStatus(status="ok", latency_ms=latency)


@get(
    "/monitoring/cache",
    summary="Read cache statistics and Redis availability (admin)",
    tags=["monitoring"],
)
async def get_cache_monitoring_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> CacheMonitoring:
    principal.require_admin()
    return await get_cache_monitoring(container.cache, container.redis)


class ReadSources(msgspec.Struct, frozen=True):
    # False without ALMANAC_READ_REPLICA_URLS: every query reads the primary.
    routing: bool
    # The primary first, then each replica: its projection positions as last probed, its
    # lag behind the primary per projection, its health and how many reads went to it.
    sources: list[SourceStats]


@get(
    "/monitoring/replicas",
    summary="The read databases queries are routed to, with each one's positions and lag (admin)",
    tags=["monitoring"],
)
async def get_replica_monitoring_route(
    container: NamedDependency[Container],
    principal: NamedDependency[Principal],
) -> ReadSources:
    principal.require_admin()
    router = container.read_router
    if router is None:
        return ReadSources(routing=False, sources=[])
    await router.refresh()
    return ReadSources(routing=True, sources=router.stats())


router = Router(
    path="/api/v1", route_handlers=[get_cache_monitoring_route, get_replica_monitoring_route]
)
