"""The read cache against real Redis: one contract for every configuration, invalidation
between processes, warming, the refresher after a commit, the wired application, and an
outage of a private redis-server (killed, then restarted on the same port)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from litestar.testing import AsyncTestClient
from redis import Redis as SyncRedis

import almanac.cache
from almanac.adapters.redis import RedisConnection
from almanac.app import create_app
from almanac.auth import Principal
from almanac.bootstrap import bootstrap
from almanac.cache import (
    CacheTotals,
    TwoLevelCache,
    chart_key,
    decode_chart,
    decode_reading,
    encode_entry,
    reading_key,
)
from almanac.domain.access import Role
from almanac.domain.chart import ChartOptions, calculate_chart
from almanac.domain.interpretation import BuiltinGenerator
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore, RecordedEvent
from almanac.readmodels import POSITIONS_SCHEMA, ReadDatabase
from almanac.settings import CacheSettings, Settings
from almanac.views import (
    SELECT_CHART,
    SELECT_READINGS,
    CachedReading,
    ChartView,
    ReadingView,
    chart_from_row,
    reading_from_row,
)
from projections.cache_refresher import CacheRefresher, read_entries
from projections.readings import ReadingsProjection
from projections.runner import ProjectionRunner
from queries.readings import get_reading
from queries.routing import Reads
from tests.conftest import REDIS_URL, services_settings
from tests.factories import birth, birth_json, meta
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_projection import CHART, TEXT, log_feed, request, watch_of
from tests.integration.support_redis import PrivateRedis
from tests.integration.support_waiting import eventually

CACHE = CacheSettings(l1_size=100, l1_ttl=30.0, l2_ttl=60.0, warm_keys=0)
# Short pauses after a Redis failure, so that recovery is seen within a test's patience.
QUICK_BACKOFF: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.4}


@pytest.fixture
def prefix() -> str:
    return f"almanac-test-{uuid4().hex[:12]}:"


@pytest.fixture
def scrubbed(services: None, prefix: str) -> Iterator[None]:
    """The shared test Redis, from which the test's keys are deleted afterwards."""
    yield
    client = SyncRedis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def redis(scrubbed: None) -> AsyncIterator[Any]:
    """A plain client of the shared test Redis, to look behind the caches."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def started(
    url: str | None,
    prefix: str,
    settings: CacheSettings = CACHE,
    *,
    socket_timeout: float = 2.0,
    **kwargs: Any,
) -> AsyncIterator[TwoLevelCache]:
    """A started cache (as one process would have it); stopped and disconnected after."""
    connection = RedisConnection(url, socket_timeout=socket_timeout) if url else None
    cache = TwoLevelCache(settings, connection, prefix=prefix, **kwargs)
    try:
        await cache.start()
        yield cache
    finally:
        await cache.stop()
        if connection is not None:
            await connection.close()


async def subscribed(*caches: TwoLevelCache) -> None:
    async def all_subscribed() -> bool:
        return all(cache.stats().subscribed for cache in caches)

    await eventually(all_subscribed, within=10, what="caches subscribed to invalidations")


# One contract, whatever the levels: L1 only (embedded), L1 and L2, L2 only.

CONFIGURATIONS = {
    "l1_only": CACHE,
    "l1_and_l2": CACHE,
    "l2_only": CacheSettings(l1_size=0, l2_ttl=60.0, warm_keys=0),
}


@pytest.fixture(params=list(CONFIGURATIONS))
async def any_cache(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[TwoLevelCache]:
    url = None
    if request.param != "l1_only":
        request.getfixturevalue("scrubbed")
        url = REDIS_URL
    async with started(url, prefix, CONFIGURATIONS[request.param]) as cache:
        yield cache


class TestReadCacheContract:
    async def test_get_returns_what_put_many_stored(self, any_cache: TwoLevelCache) -> None:
        assert await any_cache.put_many({"reading:a": b"A", "chart:b": b"B"})
        assert await any_cache.get("reading:a") == b"A"
        assert await any_cache.get("chart:b") == b"B"

    async def test_a_key_never_stored_is_a_miss(self, any_cache: TwoLevelCache) -> None:
        assert await any_cache.get("reading:nothing") is None

    async def test_get_many_returns_the_stored_keys_only(self, any_cache: TwoLevelCache) -> None:
        await any_cache.put_many({"reading:a": b"A", "reading:b": b"B"})
        found = await any_cache.get_many(["reading:a", "reading:nothing", "reading:b"])
        assert found == {"reading:a": b"A", "reading:b": b"B"}

    async def test_a_refresh_replaces_the_stored_value(self, any_cache: TwoLevelCache) -> None:
        await any_cache.put_many({"reading:a": b"old"})
        assert await any_cache.refresh({"reading:a": b"new"})
        assert await any_cache.get("reading:a") == b"new"

    async def test_a_filled_value_is_served_next_time(self, any_cache: TwoLevelCache) -> None:
        await any_cache.fill("reading:a", b"from the database", mark=any_cache.mark())
        assert await any_cache.get("reading:a") == b"from the database"

    async def test_a_fill_never_replaces_a_value_refreshed_during_the_read(
        self, any_cache: TwoLevelCache
    ) -> None:
        mark = any_cache.mark()
        await any_cache.refresh({"reading:a": b"refreshed"})
        await any_cache.fill("reading:a", b"read before the refresh", mark=mark)
        assert await any_cache.get("reading:a") == b"refreshed"

    async def test_supersede_replaces_an_older_value_and_keeps_a_newer_one(
        self, any_cache: TwoLevelCache
    ) -> None:
        def older_than(version: bytes) -> Any:
            return lambda held: held < version

        await any_cache.put_many({"reading:a": b"v1", "reading:b": b"v3"})
        await any_cache.supersede("reading:a", b"v2", stale=older_than(b"v2"))
        await any_cache.supersede("reading:b", b"v2", stale=older_than(b"v2"))
        await any_cache.supersede("reading:c", b"v2", stale=older_than(b"v2"))
        assert await any_cache.get_many(["reading:a", "reading:b", "reading:c"]) == {
            "reading:a": b"v2",
            "reading:b": b"v3",
            "reading:c": b"v2",
        }

    async def test_every_get_is_a_hit_or_a_miss_at_some_level(
        self, any_cache: TwoLevelCache
    ) -> None:
        await any_cache.put_many({"reading:a": b"A"})
        for key in ("reading:a", "reading:a", "reading:nothing"):
            await any_cache.get(key)
        stats = any_cache.stats()
        assert stats.l1_hits + stats.l2_hits == 2
        assert stats.l1_misses == 1 + stats.l2_hits
        assert not stats.degraded


# Two levels, several processes (two caches on one Redis = two processes).


async def test_a_value_put_by_one_process_is_read_from_l2_by_another_and_expires(
    redis: Any, prefix: str
) -> None:
    async with started(REDIS_URL, prefix) as writer, started(REDIS_URL, prefix) as reader:
        await writer.put_many({"reading:a": b"A"})
        assert await reader.get("reading:a") == b"A"
        assert await reader.get("reading:a") == b"A"
        stats = reader.stats()
        assert (stats.l2_hits, stats.l1_hits) == (1, 1)
    ttl_ms = await redis.pttl(f"{prefix}almanac:reading:a")
    assert 0 < ttl_ms <= CACHE.l2_ttl * 1000


async def test_a_superseded_value_reaches_l2_for_every_process_unless_newer_is_there(
    redis: Any, prefix: str
) -> None:
    async with started(REDIS_URL, prefix) as api, started(REDIS_URL, prefix) as later:
        await api.put_many({"reading:a": b"v1", "reading:b": b"v3"})
        # A fill would leave L2 alone (set only if absent); a superseding value replaces it.
        await api.supersede("reading:a", b"v2", stale=lambda held: held < b"v2")
        await api.supersede("reading:b", b"v2", stale=lambda held: held < b"v2")
        assert await later.get("reading:a") == b"v2"
        assert await later.get("reading:b") == b"v3"
    assert 0 < await redis.pttl(f"{prefix}almanac:reading:a") <= CACHE.l2_ttl * 1000


async def test_caches_with_different_prefixes_share_nothing(redis: Any, prefix: str) -> None:
    async with (
        started(REDIS_URL, prefix) as mine,
        started(REDIS_URL, f"{prefix}other:") as theirs,
    ):
        await mine.put_many({"reading:a": b"A"})
        assert await theirs.get("reading:a") is None
    assert await redis.get(f"{prefix}almanac:reading:a") == b"A"


async def test_an_invalidation_drops_the_key_from_another_process_l1(
    redis: Any, prefix: str
) -> None:
    async with started(REDIS_URL, prefix) as one, started(REDIS_URL, prefix) as other:
        await subscribed(one, other)
        await one.put_many({"reading:a": b"old"})
        assert await other.get("reading:a") == b"old"
        # Written behind the caches' backs: the other process's L1 still answers "old".
        await redis.set(f"{prefix}almanac:reading:a", b"new")
        assert await other.get("reading:a") == b"old"
        await one.invalidate(["reading:a"])

        async def other_reads_new() -> bool:
            return await other.get("reading:a") == b"new"

        await eventually(other_reads_new, within=10, what="the invalidation reached the other")
        assert other.stats().invalidations_received == 1
        assert one.stats().invalidations_received == 0  # its own message is not counted


async def test_a_refresh_reaches_every_process(redis: Any, prefix: str) -> None:
    async with started(REDIS_URL, prefix) as projector, started(REDIS_URL, prefix) as api:
        await subscribed(projector, api)
        await projector.put_many({"reading:a": b"v1"})
        assert await api.get("reading:a") == b"v1"
        await projector.refresh({"reading:a": b"v2"})

        async def api_reads_v2() -> bool:
            return await api.get("reading:a") == b"v2"

        await eventually(api_reads_v2, within=10, what="the refreshed value in the other L1")


def a_reading_at(position: int) -> CachedReading:
    """A generated reading (chart and text) as the cache holds it, as of ``position``."""
    now = datetime.now(UTC)
    view = ReadingView(
        id=READING_ID,
        status="generated",
        kind="natal",
        label=f"as of {position}",
        birth=birth(),
        options=ChartOptions(),
        chart_hash=CHART.chart_hash,
        chart=CHART,
        text=TEXT,
        failure=None,
        created_at=now,
        updated_at=now,
        position=position,
    )
    return CachedReading(owner="alice", view=view)


READING_ID = uuid4()


async def test_a_refresh_never_puts_an_older_state_over_a_newer_one_in_redis(
    redis: Any, prefix: str
) -> None:
    """As when a projector that lost its lease without noticing yet refreshes a row it read
    before its successor's commit, after the successor's own refresh."""
    key = reading_key(READING_ID)
    charts = {at: ChartView(CHART.chart_hash, CHART, datetime.now(UTC), at) for at in (4, 8)}
    async with started(REDIS_URL, prefix) as successor, started(REDIS_URL, prefix) as stale:
        await successor.refresh({key: encode_entry(a_reading_at(9))})
        await successor.refresh({chart_key(CHART.chart_hash): encode_entry(charts[8])})
        await stale.refresh(
            {
                key: encode_entry(a_reading_at(5)),
                chart_key(CHART.chart_hash): encode_entry(charts[4]),
            }
        )
        held = decode_reading(await redis.get(f"{prefix}almanac:{key}"))
        assert held is not None and held.view.position == 9
        held_chart = decode_chart(await redis.get(f"{prefix}almanac:chart:{CHART.chart_hash}"))
        assert held_chart is not None and held_chart.position == 8
        # Nor does the stale process's own L1 keep the older state: it reads Redis's.
        served = decode_reading(await stale.get(key))
        assert served is not None and served.view.position == 9
        # A later state goes in, with the TTL of a refresh.
        await stale.refresh({key: encode_entry(a_reading_at(12))})
        held = decode_reading(await redis.get(f"{prefix}almanac:{key}"))
        assert held is not None and held.view.position == 12
        assert 0 < await redis.pttl(f"{prefix}almanac:{key}") <= CACHE.l2_ttl * 1000


async def test_warming_puts_the_hottest_keys_into_redis_from_the_read_database_and_into_l1(
    postgres_url: str, tmp_path: Path, redis: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis has lost the hot readings (restarted, or they expired there); a new API process
    finds them in the primary read database and puts them back where every process reads."""
    settings = services_settings(postgres_url)
    hot, warm, lukewarm, cold = (request(label=label) for label in ("hot", "warm", "lw", "cold"))
    store = EventStore(settings)
    try:
        for reading in (hot, warm, lukewarm, cold):
            await store.append(reading)
        events = await store.read(0, 100)
    finally:
        store.close()
    never_projected = reading_key(uuid4())
    counting = CacheSettings(l1_size=100, l1_ttl=30.0, l2_ttl=60.0, warm_keys=4)
    reads = {
        reading_key(hot.id): 5,
        reading_key(warm.id): 4,
        never_projected: 3,
        reading_key(lukewarm.id): 2,
        reading_key(cold.id): 1,
    }
    async with fresh_read_database(settings, tmp_path) as db:
        await db.migrate([*POSITIONS_SCHEMA[db.dialect], *ReadingsProjection.schema[db.dialect]])
        await project(db, events)
        rows = await read_entries(db, [str(r.id) for r in (hot, warm, lukewarm, cold)], [])
        async with started(REDIS_URL, prefix, counting) as first:
            # The one entry Redis still holds.
            await first.put_many({reading_key(lukewarm.id): rows[reading_key(lukewarm.id)]})
            for key, times in reads.items():
                for _ in range(times):
                    await first.get(key)
        # Stopping sent the read counts.
        entries = [f"{prefix}almanac:{key}" for key in reads]
        assert await redis.mget(entries) == [None, None, None, rows[reading_key(lukewarm.id)], None]

        load = functools.partial(read_entries, db)
        with structlog.testing.capture_logs() as logs:
            # A logger of its own: one bound elsewhere would not be captured.
            monkeypatch.setattr(almanac.cache, "log", structlog.get_logger("almanac.cache"))
            async with started(REDIS_URL, prefix, counting, load=load) as second:
                assert await second.warm() == 3
                assert second.stats().l1_size == 3
                assert await second.get(reading_key(hot.id)) == rows[reading_key(hot.id)]
                assert second.stats().l1_hits == 1

    # Read back from Redis itself: another process finds them there.
    assert await redis.mget(entries) == [
        rows[reading_key(hot.id)],
        rows[reading_key(warm.id)],
        None,
        rows[reading_key(lukewarm.id)],
        None,
    ]
    [warmed] = [line for line in logs if line["event"] == "cache.warmed"]
    assert (warmed["from_redis"], warmed["from_database"], warmed["missing"]) == (1, 2, 1)


# The refresher: after a commit, the cache holds what the read database holds.


async def project(db: ReadDatabase, events: list[RecordedEvent]) -> None:
    projection = ReadingsProjection()
    await db.write([w for e in events for w in projection.handle(e)])


async def test_the_refresher_caches_each_changed_reading_as_the_read_database_has_it(
    settings: Settings, tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> None:
    url = None
    if settings.cache.redis_url:
        request.getfixturevalue("scrubbed")
        url = REDIS_URL
    owner = meta("alice")
    reading = Reading.request(
        reading_id=uuid4(),
        meta=owner,
        birth=birth(),
        options=ChartOptions(),
        kind="natal",
        label="refresh me",
        request_hash="0" * 64,
    )
    chart = calculate_chart(birth())
    store = EventStore(settings)
    try:
        position = await store.append(reading)
        reading.record_chart(chart, owner.caused_by(position))
        await store.append(reading)
        first = await store.read(0, 100)
        reading.record_text(
            await BuiltinGenerator().generate(chart, "natal", None), owner.caused_by(position)
        )
        await store.append(reading)
        second = await store.read(first[-1].position, 100)
    finally:
        store.close()

    async with (
        fresh_read_database(settings, tmp_path) as db,
        started(url, prefix) as projector,
        started(url, prefix) as api,
    ):
        await db.migrate([*POSITIONS_SCHEMA[db.dialect], *ReadingsProjection.schema[db.dialect]])
        refresher = CacheRefresher(projector, db, store.read)
        one = SELECT_READINGS + " WHERE r.id = :id"

        await project(db, first)
        await refresher(first)
        row = await db.fetch_one(one, {"id": str(reading.id)})
        assert row is not None
        cached = decode_reading(await projector.get(reading_key(reading.id)))
        assert cached == reading_from_row(row)
        assert cached.view.status == "chart_calculated"
        chart_row = await db.fetch_one(SELECT_CHART, {"chart_hash": chart.chart_hash})
        assert chart_row is not None
        assert decode_chart(await projector.get(chart_key(chart.chart_hash))) == chart_from_row(
            chart_row
        )
        if url is not None:  # the other process finds it in L2
            assert decode_reading(await api.get(reading_key(reading.id))) == cached
            await subscribed(projector, api)

        await project(db, second)
        await refresher(second)
        row = await db.fetch_one(one, {"id": str(reading.id)})
        assert row is not None
        fresh = encode_entry(reading_from_row(row))
        assert await projector.get(reading_key(reading.id)) == fresh

        if url is not None:  # and the other process's L1 let go of the old one

            async def api_sees_generated() -> bool:
                return await api.get(reading_key(reading.id)) == fresh

            await eventually(api_sees_generated, within=10, what="the generated reading cached")


# The wired application: the projector refreshes, queries read the cache, admins monitor it.


async def test_a_generated_reading_is_served_from_the_cache_and_admins_can_see_the_stats(
    settings: Settings, prefix: str, request: pytest.FixtureRequest
) -> None:
    if settings.cache.redis_url:
        request.getfixturevalue("scrubbed")
    container = bootstrap(settings, cache_prefix=prefix)
    cache = container.cache
    async with AsyncTestClient(create_app(settings, container)) as client:
        roles: list[tuple[str, Role]] = [("admin", "admin"), ("alice", "client"), ("bob", "client")]
        admin, alice, bob = [
            (await asyncio.to_thread(container.keyring.issue, name=o, role=r, owner=o)).secret
            for o, r in roles
        ]
        accepted = await client.post(
            "/api/v1/readings",
            json={"birth": birth_json(), "label": "cached"},
            headers=auth(alice),
        )
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        body = await until_generated(client, location, alice)

        before = cache.stats()
        again = await client.get(f"{location}?min_position={body['position']}", headers=auth(alice))
        assert again.json() == body
        after = cache.stats()
        assert after.l1_hits + after.l2_hits == before.l1_hits + before.l2_hits + 1
        # A hit is still checked against the reading's owner.
        assert (await client.get(location, headers=auth(bob))).status_code == 404

        # The reading's chart is served from the cache the projector filled, to its owner only.
        chart = f"/api/v1/charts/{body['chart_hash']}"
        before = cache.stats()
        shown = await client.get(chart, headers=auth(alice))
        assert shown.status_code == 200, shown.text
        assert shown.json()["chart"] == body["chart"]
        after = cache.stats()
        assert after.l1_hits + after.l2_hits == before.l1_hits + before.l2_hits + 1
        assert (await client.get(chart, headers=auth(bob))).status_code == 404

        forbidden = await client.get("/api/v1/monitoring/cache", headers=auth(alice))
        assert forbidden.status_code == 403
        monitoring = await client.get("/api/v1/monitoring/cache", headers=auth(admin))
        assert monitoring.status_code == 200, monitoring.text
        report = monitoring.json()
        assert report["cache"]["l1_hits"] + report["cache"]["l2_hits"] >= 1
        with_redis = settings.cache.redis_url is not None
        assert report["cache"]["l2_enabled"] is with_redis
        assert report["redis"]["status"] == ("ok" if with_redis else "not_configured")
        if with_redis:  # every process's counters, this one's among them with its roles
            assert list(container.roles) in [p["roles"] for p in report["processes"]]
            assert report["total"]["processes"] == len(report["processes"])
        else:
            assert report["processes"] is None and report["total"] is None
        # No replicas configured: every query reads the primary, and the report says so.
        replicas = await client.get("/api/v1/monitoring/replicas", headers=auth(admin))
        assert replicas.status_code == 200, replicas.text
        assert replicas.json() == {"routing": False, "sources": []}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until_generated(client: Any, location: str, key: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def generated() -> bool:
        nonlocal body
        response = await client.get(location, headers=auth(key))
        body = response.json() if response.status_code == 200 else {}
        return body.get("status") == "generated"

    await eventually(generated, within=20, what="reading generated")
    return body


# Redis going away and coming back.


async def test_the_cache_answers_misses_while_redis_is_down_and_recovers_by_itself(
    tmp_path: Path, prefix: str
) -> None:
    with PrivateRedis(tmp_path) as server:
        async with (
            started(server.url, prefix, **QUICK_BACKOFF) as one,
            started(server.url, prefix, **QUICK_BACKOFF) as other,
        ):
            await subscribed(one, other)
            await one.put_many({"reading:a": b"A"})
            assert await other.get("reading:a") == b"A"
            assert other.stats().l2_hits == 1

            server.kill()
            assert await other.get("reading:b") is None  # a miss, not an exception
            assert await other.get("reading:a") == b"A"  # its L1 still answers
            assert not await one.put_many({"reading:c": b"C"})
            await one.invalidate(["reading:a"])
            assert other.stats().l2_errors >= 1
            assert other.stats().degraded
            assert one.stats().degraded

            async def unsubscribed() -> bool:
                return not (one.stats().subscribed or other.stats().subscribed)

            await eventually(unsubscribed, within=10, what="subscribers noticing the outage")

            server.start()  # empty, on the same port

            async def using_redis_again() -> bool:
                await one.put_many({"reading:probe": b"P"})
                await other.get("reading:probe")
                return not (one.stats().degraded or other.stats().degraded)

            await eventually(using_redis_again, within=10, what="both caches using Redis again")
            stats = other.stats()
            assert stats.subscribed
            # What was published while it was away is lost, so its L1 was cleared.
            assert stats.l1_clears >= 1
            assert await other.get("reading:a") is None

            l2_hits = other.stats().l2_hits
            await one.put_many({"reading:d": b"D"})
            assert await other.get("reading:d") == b"D"
            assert other.stats().l2_hits == l2_hits + 1
            await one.put_many({"reading:d": b"D2"})
            assert await other.get("reading:d") == b"D"  # from its L1
            await one.invalidate(["reading:d"])

            async def invalidation_arrived() -> bool:
                return await other.get("reading:d") == b"D2"

            await eventually(invalidation_arrived, within=10, what="an invalidation after recovery")


async def test_queries_answer_from_postgres_while_redis_is_down_and_use_it_again_after(
    tmp_path: Path, postgres_url: str, prefix: str
) -> None:
    """Through the wired application: with Redis gone, a cached reading and one generated
    during the outage are both served (from Postgres), and the cache recovers by itself."""
    with PrivateRedis(tmp_path) as server:
        base = services_settings(postgres_url)
        # A short L1 life, so that the reads below reach past this process's own copies.
        cache = msgspec.structs.replace(base.cache, redis_url=server.url, l1_ttl=0.2)
        settings = msgspec.structs.replace(base, cache=cache)
        container = bootstrap(settings, cache_prefix=prefix)
        async with AsyncTestClient(create_app(settings, container)) as client:
            issued = await asyncio.to_thread(
                container.keyring.issue, name="alice", role="client", owner="alice"
            )
            alice = issued.secret

            async def generated_reading(label: str) -> tuple[str, dict[str, Any]]:
                accepted = await client.post(
                    "/api/v1/readings",
                    json={"birth": birth_json(), "label": label},
                    headers=auth(alice),
                )
                assert accepted.status_code == 202, accepted.text
                location = accepted.headers["location"]
                return location, await until_generated(client, location, alice)

            before, cached = await generated_reading("before the outage")
            server.kill()
            during, generated = await generated_reading("during the outage")
            for location, body in ((before, cached), (during, generated)):
                response = await client.get(location, headers=auth(alice))
                assert response.status_code == 200, response.text
                assert response.json() == body
            assert container.cache.stats().degraded

            server.start()  # empty, on the same port

            async def recovered() -> bool:
                response = await client.get(during, headers=auth(alice))
                assert response.status_code == 200, response.text
                return not container.cache.stats().degraded

            await eventually(recovered, within=15, what="the cache using Redis again")
            assert (await client.get(during, headers=auth(alice))).json() == generated


# Taking over: what a projector committed and never refreshed (it was killed, lost its lead,
# or could not reach Redis) is not served from the cache by any process after the next
# projector takes over.

OWNER = Principal(key_id="k1", owner="owner-a", role="client", name="owner-a")


async def status_read(cache: TwoLevelCache, db: ReadDatabase, reading_id: UUID) -> str:
    """The reading's status as a query of an API process reads it: through its cache."""
    reads = Reads(db, watch_of(db), timeout=5.0)
    view = await get_reading(
        reading_id, reads=reads, principal=OWNER, min_position=None, cache=cache
    )
    return view.status


@asynccontextmanager
async def leading(
    store: EventStore, db: ReadDatabase, cache: TwoLevelCache | None, **refresher: Any
) -> AsyncIterator[ProjectionRunner]:
    """A projector leading the readings projection (from its tracked position), once it has
    applied the whole log; its cache refresher refreshes ``cache`` (None: the projector of a
    process killed after its commits and before their refresh)."""
    hooks = [] if cache is None else [CacheRefresher(cache, db, store.read, **refresher)]
    end = await store.max_position()
    async with log_feed(store) as feed:
        runner = ProjectionRunner(ReadingsProjection(), feed, db, watch_of(db), after_commit=hooks)
        await runner.prepare()
        task = asyncio.create_task(runner.run())
        try:

            async def applied() -> bool:
                return runner.caught_up.is_set() and runner.position >= end

            await eventually(applied, within=20, what=f"the projector at position {end}")
            yield runner
        finally:
            runner.stop()
            await asyncio.wait_for(task, timeout=10)


@pytest.fixture
async def services_store(postgres_url: str) -> AsyncIterator[EventStore]:
    store = EventStore(services_settings(postgres_url))
    try:
        yield store
    finally:
        store.close()


async def test_a_projector_taking_over_evicts_what_a_killed_leader_committed_unrefreshed(
    services_store: EventStore, postgres_url: str, tmp_path: Path, redis: Any, prefix: str
) -> None:
    store = services_store
    settings = services_settings(postgres_url)
    untouched, changed = request(label="untouched"), request(label="changed")
    changed.record_chart(CHART, meta())
    await store.append(untouched, changed)
    async with fresh_read_database(settings, tmp_path) as db, started(REDIS_URL, prefix) as api:
        async with started(REDIS_URL, prefix) as cache, leading(store, db, cache):
            pass  # the leader before: applied and refreshed both, then stopped
        assert await status_read(api, db, changed.id) == "chart_calculated"  # now in its L1
        await subscribed(api)

        changed.record_text(TEXT, meta())
        await store.append(changed)
        async with leading(store, db, None):
            pass  # the killed leader: committed the generated reading, never refreshed it
        row = await db.fetch_one(SELECT_READINGS + " WHERE r.id = :id", {"id": str(changed.id)})
        assert row is not None and row["status"] == "generated"
        assert await status_read(api, db, changed.id) == "chart_calculated"  # stale, so far
        untouched_before = await redis.get(f"{prefix}almanac:{reading_key(untouched.id)}")
        assert untouched_before is not None

        async with started(REDIS_URL, prefix) as cache, leading(store, db, cache):

            async def generated() -> bool:
                return await status_read(api, db, changed.id) == "generated"

            # Well within the L1 TTL (30 s) and the L2 TTL (60 s) of these caches.
            await eventually(generated, within=10, what="the API process reads it generated")
            held = decode_reading(await redis.get(f"{prefix}almanac:{reading_key(changed.id)}"))
            assert held is None or held.view.status == "generated"
        # The catch-up began at the mark the leader before left: what it refreshed stays.
        untouched_after = await redis.get(f"{prefix}almanac:{reading_key(untouched.id)}")
        assert untouched_after == untouched_before


async def test_a_refresh_owed_when_redis_was_unreachable_is_made_after_restarts_once_it_answers(
    services_store: EventStore, postgres_url: str, tmp_path: Path, prefix: str
) -> None:
    """Redis keeps its data but answers nothing while the projector that could not refresh
    stops and the next one takes over; the entry is not served once Redis answers again."""
    store = services_store
    settings = services_settings(postgres_url)
    quick: dict[str, Any] = {"socket_timeout": 0.3, **QUICK_BACKOFF}
    retries: dict[str, Any] = {"retry_initial": 0.05, "retry_max": 0.4}
    reading = request(label="owed")
    reading.record_chart(CHART, meta())
    await store.append(reading)
    with PrivateRedis(tmp_path) as server:
        async with (
            fresh_read_database(settings, tmp_path) as db,
            started(server.url, prefix, **quick) as api,
        ):
            async with (
                started(server.url, prefix, **quick) as cache,
                leading(store, db, cache, **retries),
            ):
                pass
            assert await status_read(api, db, reading.id) == "chart_calculated"

            server.freeze()
            reading.record_text(TEXT, meta())
            end = await store.append(reading)
            async with (
                started(server.url, prefix, **quick) as cache,
                leading(store, db, cache, **retries),
            ):
                pass  # committed, and its refresh timed out: then it stopped
            async with (
                started(server.url, prefix, **quick) as cache,
                leading(store, db, cache, **retries) as successor,
            ):
                [refresher] = successor.after_commit
                assert isinstance(refresher, CacheRefresher)
                assert refresher.refreshed_through < end  # Redis still answers nothing
                server.thaw()

                async def generated() -> bool:
                    return await status_read(api, db, reading.id) == "generated"

                await eventually(generated, within=15, what="the API process reads it generated")

                async def marked() -> bool:
                    return refresher.refreshed_through == end

                await eventually(marked, within=5, what="the refresher caught up")


async def test_every_process_s_counters_are_shared_and_added_up(redis: Any, prefix: str) -> None:
    """Behind a load balancer, the admin's request lands on one API process of several."""
    quick: dict[str, Any] = {"flush_interval": 0.05}
    index = f"{prefix}almanac:cache:stats:1"
    async with (
        started(REDIS_URL, prefix, roles=("api",), **quick) as one,
        started(REDIS_URL, prefix, roles=("api", "projector"), **quick) as other,
    ):
        await one.put_many({"reading:a": b"{}"})
        await one.get("reading:a")
        await other.get("reading:missing")
        # A process whose entry Redis let expire (it stopped, or lost Redis), and one of a
        # release that shares another shape.
        await redis.sadd(index, "gone", "newer")
        await redis.set(f"{index}:newer", b'{"shape": 2}', px=60_000)

        async def one_seen_by_other() -> bool:
            shared = await other.shared_stats()
            return shared is not None and any(
                p.roles == ["api"] and p.stats.l1_hits >= 1 for p in shared
            )

        await eventually(one_seen_by_other, within=10, what="one process's counters shared")
        shared = await other.shared_stats()
        assert shared is not None
        by_roles = {tuple(p.roles): p.stats for p in shared}
        assert set(by_roles) == {("api",), ("api", "projector")}
        assert by_roles[("api", "projector")] == other.stats()  # its own, as of now
        total = CacheTotals.of(shared)
        assert total.processes == 2
        assert total.l1_hits == sum(s.l1_hits for s in by_roles.values()) >= 1
        assert total.l1_misses >= 1
        assert b"gone" not in await redis.smembers(index)

        async def both_in_the_set() -> bool:  # the two processes, and the other release's
            return len(await redis.smembers(index)) == 3

        await eventually(both_in_the_set, within=10, what="both processes in the set")
    # Stopped processes take their counters with them.
    assert await redis.smembers(index) == {b"newer"}
    assert await redis.keys(f"{index}:*") == [f"{index}:newer".encode()]


async def test_without_redis_there_are_no_shared_counters(prefix: str) -> None:
    async with started(None, prefix) as alone:
        assert await alone.shared_stats() is None
