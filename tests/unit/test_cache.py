"""The read cache without I/O: L1 bounds and expiry on a fake clock, statistics, invalidation
marks, the behaviour while Redis fails (against an in-memory stand-in), and the refresher."""

from __future__ import annotations

import asyncio
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID, uuid4

import msgspec
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

import almanac.cache
from almanac.adapters.redis import RedisConnection
from almanac.adapters.replicas import ReadRouter
from almanac.auth import Principal
from almanac.cache import (
    CacheStats,
    CacheTotals,
    L1Cache,
    TwoLevelCache,
    chart_key,
    decode_chart,
    decode_reading,
    encode_entry,
    position_of,
    rank_hot,
    reading_key,
)
from almanac.domain.chart import ChartOptions
from almanac.domain.reading import Reading
from almanac.errors import Unavailable
from almanac.eventstore import MsgspecMapper, RecordedEvent
from almanac.readmodels import PositionWatch, ReadDatabase
from almanac.settings import CacheSettings
from almanac.timeouts import SETTLED_AFTER, Backoff
from almanac.views import CachedReading, ReadingView, reading_from_row
from projections import cache_refresher
from projections.cache_refresher import CacheRefresher
from queries.monitoring import get_cache_monitoring
from queries.readings import get_reading
from queries.routing import Reads
from tests.factories import birth
from tests.integration.support_waiting import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def l1_only(clock: FakeClock, size: int = 100, ttl: float = 5.0) -> TwoLevelCache:
    return TwoLevelCache(CacheSettings(l1_size=size, l1_ttl=ttl), None, clock=clock)


# L1: a bounded LRU with a TTL per entry.


def test_l1_returns_an_entry_until_its_ttl_has_passed(clock: FakeClock) -> None:
    l1 = L1Cache(size=10, ttl=5.0, clock=clock)
    l1.put("a", b"1")
    clock.advance(4.9)
    assert l1.get("a") == b"1"
    clock.advance(0.1)
    assert l1.get("a") is None
    assert len(l1) == 0


def test_putting_an_entry_again_restarts_its_ttl(clock: FakeClock) -> None:
    l1 = L1Cache(size=10, ttl=5.0, clock=clock)
    l1.put("a", b"1")
    clock.advance(4)
    l1.put("a", b"2")
    clock.advance(4)
    assert l1.get("a") == b"2"


def test_l1_evicts_the_least_recently_used_entry_beyond_its_size(clock: FakeClock) -> None:
    l1 = L1Cache(size=3, ttl=5.0, clock=clock)
    for key in "abc":
        l1.put(key, key.encode())
    assert l1.get("a") == b"a"  # now the most recently used
    l1.put("d", b"d")
    assert len(l1) == 3
    assert l1.get("b") is None
    assert [l1.get(k) for k in "acd"] == [b"a", b"c", b"d"]


@pytest.mark.parametrize(("size", "ttl"), [(0, 5.0), (10, 0.0)])
def test_an_l1_of_size_or_ttl_zero_keeps_nothing(clock: FakeClock, size: int, ttl: float) -> None:
    l1 = L1Cache(size=size, ttl=ttl, clock=clock)
    l1.put("a", b"1")
    assert not l1.enabled
    assert l1.get("a") is None
    assert len(l1) == 0


@given(
    size=st.integers(min_value=0, max_value=8),
    operations=st.lists(
        st.tuples(st.sampled_from(["put", "get", "tick"]), st.sampled_from("abcdefghij")),
        max_size=60,
    ),
)
def test_l1_never_exceeds_its_size_and_never_returns_a_value_not_last_put(
    size: int, operations: list[tuple[str, str]]
) -> None:
    clock = FakeClock()
    l1 = L1Cache(size=size, ttl=3.0, clock=clock)
    last: dict[str, bytes] = {}
    for step, (operation, key) in enumerate(operations):
        if operation == "put":
            last[key] = f"{key}{step}".encode()
            l1.put(key, last[key])
        elif operation == "get":
            assert l1.get(key) in (None, last.get(key))
        else:
            clock.advance(1.0)
        assert len(l1) <= size


# The two-level cache with no L2 (the embedded profile).


async def test_stats_count_l1_hits_and_misses(clock: FakeClock) -> None:
    cache = l1_only(clock)
    await cache.put_many({"a": b"1", "b": b"2"})
    assert await cache.get("a") == b"1"
    assert await cache.get("missing") is None
    assert await cache.get_many(["a", "b", "missing", "a"]) == {"a": b"1", "b": b"2"}
    stats = cache.stats()
    assert (stats.l1_hits, stats.l1_misses, stats.l1_size, stats.l1_capacity) == (3, 2, 2, 100)
    assert (stats.l2_enabled, stats.l2_hits, stats.l2_misses, stats.l2_errors) == (False, 0, 0, 0)
    assert not stats.degraded


async def test_stats_encode_as_json(clock: FakeClock) -> None:
    stats = l1_only(clock).stats()
    assert msgspec.json.decode(msgspec.json.encode(stats), type=CacheStats) == stats


async def test_entries_expire_after_the_l1_ttl(clock: FakeClock) -> None:
    cache = l1_only(clock, ttl=2.0)
    await cache.put_many({"a": b"1"})
    clock.advance(2.0)
    assert await cache.get("a") is None


async def test_invalidate_drops_keys_from_l1_and_counts_them(clock: FakeClock) -> None:
    cache = l1_only(clock)
    await cache.put_many({"a": b"1", "b": b"2"})
    await cache.invalidate(["a", "a", "c"])
    assert await cache.get("a") is None
    assert await cache.get("b") == b"2"
    assert cache.stats().invalidations_sent == 2


async def test_a_fill_is_kept_when_nothing_was_invalidated_during_the_read(
    clock: FakeClock,
) -> None:
    cache = l1_only(clock)
    mark = cache.mark()
    await cache.invalidate(["other"])
    await cache.fill("a", b"from the database", mark=mark)
    assert await cache.get("a") == b"from the database"


async def test_a_fill_is_refused_when_the_key_was_invalidated_during_the_read(
    clock: FakeClock,
) -> None:
    cache = l1_only(clock)
    mark = cache.mark()
    await cache.invalidate(["a"])
    await cache.fill("a", b"possibly stale", mark=mark)
    assert await cache.get("a") is None


async def test_a_refresh_during_a_read_wins_over_the_read(clock: FakeClock) -> None:
    cache = l1_only(clock)
    mark = cache.mark()
    assert await cache.refresh({"a": b"new"})
    await cache.fill("a", b"old", mark=mark)
    assert await cache.get("a") == b"new"
    assert cache.stats().invalidations_sent == 1


async def test_fills_older_than_the_remembered_invalidations_are_refused(
    clock: FakeClock,
) -> None:
    """Past what it remembers exactly, the cache refuses any fill begun before: safe."""
    cache = l1_only(clock, size=10)
    mark = cache.mark()
    await cache.invalidate(f"k{i}" for i in range(5000))
    await cache.fill("a", b"1", mark=mark)
    assert await cache.get("a") is None
    later = cache.mark()
    await cache.fill("a", b"1", mark=later)
    assert await cache.get("a") == b"1"


async def test_an_l1_only_cache_starts_and_stops_without_redis(clock: FakeClock) -> None:
    cache = l1_only(clock)
    await cache.start()
    await cache.put_many({"a": b"1"})
    await cache.stop()
    stats = cache.stats()
    assert not stats.degraded
    assert not stats.subscribed
    assert stats.warmed == 0


# Keys and values.


def test_keys_name_what_they_hold() -> None:
    reading_id = uuid4()
    assert reading_key(reading_id) == f"reading:{reading_id}"
    assert chart_key("ab" * 32) == f"chart:{'ab' * 32}"


def a_cached_reading() -> CachedReading:
    now = datetime.now(UTC)
    view = ReadingView(
        id=uuid4(),
        status="requested",
        kind="natal",
        label=None,
        birth=birth(),
        options=ChartOptions(),
        chart_hash="0" * 64,
        chart=None,
        text=None,
        failure=None,
        created_at=now,
        updated_at=now,
        position=7,
    )
    return CachedReading(owner="alice", view=view)


def test_a_cached_reading_round_trips_as_json() -> None:
    cached = a_cached_reading()
    assert decode_reading(encode_entry(cached)) == cached


def test_an_unreadable_or_absent_value_decodes_as_a_miss() -> None:
    assert decode_reading(None) is None
    assert decode_reading(b'{"owner": "alice"}') is None
    assert decode_chart(b"not json") is None


# While Redis fails: misses, counted errors, a growing backoff, rate-limited logs.


def test_backoff_doubles_up_to_its_maximum_and_starts_again_after_reset() -> None:
    backoff = Backoff(1.0, 10.0)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 1.0
    # After a try that failed at once it goes on growing; after one that had run a while
    # (had recovered), it starts again.
    assert [backoff.after(0.1), backoff.after(0.1)] == [2.0, 4.0]
    assert backoff.after(SETTLED_AFTER + 1) == 1.0


@dataclass
class FakeRedis:
    """Just enough of a Redis server behind redis-py's pipeline for the cache's calls."""

    down: bool = False
    data: dict[str, bytes] = field(default_factory=dict)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    ttls_ms: dict[str, int] = field(default_factory=dict)
    sorted_sets: dict[str, dict[bytes, float]] = field(default_factory=dict)
    sets: dict[str, set[bytes]] = field(default_factory=dict)
    executed: int = 0

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


def _text(key: str | bytes) -> str:
    return key.decode(errors="surrogateescape") if isinstance(key, bytes) else key


class FakePipeline:
    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def command(*args: Any, **kwargs: Any) -> FakePipeline:
            self.commands.append((name, args, kwargs))
            return self

        return command

    async def execute(self) -> list[Any]:
        self.server.executed += 1
        if self.server.down:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return [self._one(name, args, kwargs) for name, args, kwargs in self.commands]

    def _one(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "eval":  # only the refresh's script is evaluated
            return self._refresh(args[2 : 2 + args[1]], args[2 + args[1] :])
        if name in ("sadd", "srem", "smembers"):
            return self._run_set(name, args)
        # Keys as str or bytes, one key as Redis takes them.
        if name == "mget":
            args = ([_text(k) for k in args[0]], *args[1:])
        elif name in ("set", "pexpire"):
            args = (_text(args[0]), *args[1:])
        elif name == "delete":
            args = tuple(_text(k) for k in args)
        return self._run(name, args, kwargs)

    def _run(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        data = self.server.data
        if name == "mget":
            return [data.get(key) for key in args[0]]
        if name == "set":
            if kwargs.get("nx") and args[0] in data:
                return None
            data[args[0]] = args[1]
            self.server.ttls_ms[args[0]] = kwargs["px"]
            return True
        if name == "publish":
            self.server.published.append((args[0], args[1]))
            return 0
        if name == "delete":
            return sum(data.pop(key, None) is not None for key in args)
        return self._run_sorted_set(name, args)

    def _run_set(self, name: str, args: tuple[Any, ...]) -> Any:
        members = self.server.sets.setdefault(args[0], set())
        given = {m if isinstance(m, bytes) else m.encode() for m in args[1:]}
        if name == "sadd":
            members.update(given)
        elif name == "srem":
            members.difference_update(given)
        return set(members)

    def _refresh(self, keys: tuple[str, ...], argv: tuple[Any, ...]) -> list[int]:
        """The refresh's script: set each entry unless a later state is held; the (1-based)
        numbers of those left alone."""
        refused = []
        for i, key in enumerate(keys):
            value, at = argv[1 + 2 * i], argv[2 + 2 * i]
            held = self.server.data.get(key)
            held_at = position_of(held) if held is not None else None
            if at == "" or held_at is None or held_at <= at:
                self.server.data[key] = value
                self.server.ttls_ms[key] = argv[0]
            else:
                refused.append(i + 1)
        return refused

    def _run_sorted_set(self, name: str, args: tuple[Any, ...]) -> Any:
        if name == "pexpire":
            self.server.ttls_ms[args[0]] = args[1]
            return 1
        scores = self.server.sorted_sets.setdefault(args[0], {})
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        if name == "zincrby":
            member = args[2].encode()
            scores[member] = scores.get(member, 0.0) + args[1]
            return scores[member]
        if name == "zremrangebyrank":  # keeps the highest ranked (as used: 0, -(n + 1))
            keep = -args[2] - 1
            self.server.sorted_sets[args[0]] = dict(ranked[:keep])
            return len(ranked) - keep
        if name == "zrevrange":
            return ranked[args[1] : args[2] + 1 if args[2] >= 0 else None]
        raise AssertionError(f"FakeRedis has no {name}")


class FakePubSub:
    """A subscription on which nothing is ever published."""

    async def subscribe(self, channel: str) -> None:
        return None

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        await asyncio.sleep(timeout)
        return None

    async def aclose(self) -> None:
        return None


@dataclass
class FakeConnection:
    client: FakeRedis
    db = 3

    def pubsub(self) -> FakePubSub:
        return FakePubSub()


def two_level(
    clock: FakeClock, server: FakeRedis, *, warm_keys: int = 0, **kwargs: Any
) -> TwoLevelCache:
    connection = cast("RedisConnection", FakeConnection(server))
    return TwoLevelCache(
        CacheSettings(l1_size=100, l1_ttl=5.0, warm_keys=warm_keys),
        connection,
        clock=clock,
        **kwargs,
    )


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The cache's log lines (its logger is replaced so none is cached from elsewhere)."""
    with structlog.testing.capture_logs() as captured:
        monkeypatch.setattr(almanac.cache, "log", structlog.get_logger("almanac.cache"))
        yield captured


async def test_a_redis_error_is_answered_as_a_miss_and_counted(clock: FakeClock) -> None:
    server = FakeRedis(down=True)
    cache = two_level(clock, server)
    assert await cache.get("a") is None
    assert await cache.get_many(["b"]) == {}
    stats = cache.stats()
    assert stats.l2_errors == 1
    assert stats.l2_skipped == 1
    assert stats.degraded


async def test_after_a_failure_redis_is_left_alone_for_a_backoff_that_grows(
    clock: FakeClock,
) -> None:
    server = FakeRedis(down=True)
    cache = two_level(clock, server, backoff_initial=1.0, backoff_max=4.0)
    await cache.get("a")
    pauses = []
    for _ in range(4):
        asked = server.executed
        waited = 0.0
        for _ in range(40):  # in steps of 0.25 s: at most 10 s
            clock.advance(0.25)
            waited += 0.25
            await cache.get("a")
            if server.executed > asked:
                break
        pauses.append(waited)
    assert pauses == [1.0, 2.0, 4.0, 4.0]


async def test_the_cache_uses_redis_again_once_it_answers(clock: FakeClock) -> None:
    server = FakeRedis(down=True)
    cache = two_level(clock, server, backoff_initial=1.0)
    await cache.put_many({"a": b"1"})
    assert cache.stats().degraded
    server.down = False
    server.data["almanac:b"] = b"2"
    assert await cache.get("b") is None  # still within the backoff
    clock.advance(1.0)
    assert await cache.get("b") == b"2"
    stats = cache.stats()
    assert not stats.degraded
    assert stats.l2_hits == 1


async def test_redis_being_away_is_logged_once_per_interval_not_per_request(
    clock: FakeClock, logs: list[MutableMapping[str, Any]]
) -> None:
    server = FakeRedis(down=True)
    cache = two_level(clock, server, backoff_initial=0.25, backoff_max=0.25, log_interval=60.0)
    for _ in range(50):  # 12.5 s of requests, each after the backoff: every one fails
        clock.advance(0.25)
        assert await cache.get("a") is None
    server.down = False
    clock.advance(0.25)
    await cache.get("a")
    events = [line["event"] for line in logs]
    assert events == ["cache.redis_unavailable", "cache.redis_recovered"]
    assert cache.stats().l2_errors == 50


async def test_a_refresh_publishes_after_storing_so_others_reread_the_new_value(
    clock: FakeClock,
) -> None:
    server = FakeRedis()
    cache = two_level(clock, server, prefix="p:")
    assert await cache.refresh({"reading:1": b"v"})
    assert server.data == {"p:almanac:reading:1": b"v"}
    [(channel, message)] = server.published
    assert channel == "p:almanac:cache:invalidate:3"
    assert msgspec.json.decode(message)[1] == ["reading:1"]


async def test_a_fill_never_overwrites_what_l2_holds(clock: FakeClock) -> None:
    server = FakeRedis()
    cache = two_level(clock, server)
    server.data["almanac:a"] = b"refreshed"
    await cache.fill("a", b"read from a replica", mark=cache.mark())
    assert server.data["almanac:a"] == b"refreshed"


async def test_a_filled_value_stays_in_l2_for_less_time_than_a_refreshed_one(
    clock: FakeClock,
) -> None:
    server = FakeRedis()
    cache = two_level(clock, server, fill_ttl=60.0)
    await cache.fill("filled", b"1", mark=cache.mark())
    await cache.refresh({"refreshed": b"2"})
    assert server.ttls_ms == {"almanac:filled": 60_000, "almanac:refreshed": 3_600_000}


async def test_an_eviction_drops_keys_from_l2_then_publishes_them_for_every_l1(
    clock: FakeClock,
) -> None:
    server = FakeRedis()
    cache = two_level(clock, server, prefix="p:")
    await cache.refresh({"reading:1": b"old", "reading:2": b"kept"})
    server.published.clear()
    assert await cache.evict(["reading:1"])
    assert server.data == {"p:almanac:reading:2": b"kept"}
    [(channel, message)] = server.published
    assert channel == "p:almanac:cache:invalidate:3"
    assert msgspec.json.decode(message)[1] == ["reading:1"]
    assert await cache.get("reading:1") is None  # this process's L1 let go of it too
    server.down = True
    assert not await cache.evict(["reading:2"])


# Warming: the keys read most of late, from Redis or else from the read database.

HOUR = 3600.0


class WallClock(FakeClock):
    """Wall-clock seconds, as every process reads them (read-count windows go by these)."""

    def __init__(self, at: float) -> None:
        self.now = at


class LoadFromDatabase:
    """The primary read database's entries by key, as ``read_entries`` would give them."""

    def __init__(self, rows: Mapping[str, bytes], *, down: bool = False) -> None:
        self.rows = dict(rows)
        self.down = down
        self.asked: list[tuple[list[str], list[str]]] = []

    async def __call__(self, readings: Sequence[str], charts: Sequence[str]) -> dict[str, bytes]:
        self.asked.append((list(readings), list(charts)))
        if self.down:
            raise Unavailable("the read database is not answering")
        wanted = {reading_key(r) for r in readings} | {chart_key(c) for c in charts}
        return {key: value for key, value in self.rows.items() if key in wanted}


async def count_reads(
    server: FakeRedis, clock: FakeClock, wall: WallClock, reads: Mapping[str, int]
) -> None:
    """``reads`` made in a process that then stops, sending its read counts to Redis."""
    cache = two_level(clock, server, warm_keys=10, wall_clock=wall)
    await cache.start()
    for key, times in reads.items():
        for _ in range(times):
            await cache.get(key)
    await cache.stop()


def test_reads_of_the_window_before_count_less_as_the_current_one_passes() -> None:
    previous, current = [("reading:old", 10.0)], [("reading:new", 6.0)]
    assert rank_hot(current, previous, passed=0.1, limit=2) == ["reading:old", "reading:new"]
    assert rank_hot(current, previous, passed=0.5, limit=2) == ["reading:new", "reading:old"]
    assert rank_hot(current, previous, passed=1.0, limit=2) == ["reading:new"]


async def test_a_key_read_most_long_ago_is_warmed_after_keys_read_less_but_lately(
    clock: FakeClock,
) -> None:
    """Read counts only grow: without windows the key read 1,000 times yesterday would be
    warmed first for ever, whatever is read now."""
    server = FakeRedis()
    wall = WallClock(100 * HOUR)
    await count_reads(server, clock, wall, {"reading:yesterday": 1000, "reading:lately": 1})
    wall.advance(24 * HOUR)
    await count_reads(server, clock, wall, {"reading:now": 3, "reading:lately": 1})
    for key in ["reading:now", "reading:lately", "reading:yesterday"]:
        server.data[f"almanac:{key}"] = key.encode()

    cache = two_level(clock, server, warm_keys=2, wall_clock=wall)
    assert await cache.warm() == 2
    assert await cache.get_many(["reading:now", "reading:lately", "reading:yesterday"]) == {
        "reading:now": b"reading:now",
        "reading:lately": b"reading:lately",
        "reading:yesterday": b"reading:yesterday",
    }
    stats = cache.stats()
    assert (stats.l1_hits, stats.l2_hits) == (2, 1), "yesterday's key was not warmed"
    # No window's counts outlive the window after it.
    assert {ttl for key, ttl in server.ttls_ms.items() if ":hot:" in key} == {int(2 * HOUR * 1000)}


async def test_warming_loads_hot_keys_redis_lacks_from_the_database_into_redis_and_l1(
    clock: FakeClock, logs: list[MutableMapping[str, Any]]
) -> None:
    server = FakeRedis()
    wall = WallClock(100 * HOUR)
    a, b, gone = reading_key(uuid4()), chart_key("c" * 64), reading_key(uuid4())
    await count_reads(server, clock, wall, {a: 4, b: 3, gone: 2, "reading:cold": 1})
    server.data[f"almanac:{a}"] = b"a in redis"
    load = LoadFromDatabase({a: b"a in the database", b: b"b in the database"})

    cache = two_level(clock, server, warm_keys=3, wall_clock=wall, load=load, fill_ttl=60.0)
    logs.clear()
    assert await cache.warm() == 2
    # Only what Redis lacked is read, in one go: readings and charts by their ids.
    assert load.asked == [([gone.removeprefix("reading:")], ["c" * 64])]
    assert server.data[f"almanac:{a}"] == b"a in redis"
    assert server.data[f"almanac:{b}"] == b"b in the database"
    assert server.ttls_ms[f"almanac:{b}"] == 60_000  # as a fill: a commit may have raced it
    assert f"almanac:{gone}" not in server.data
    assert "almanac:reading:cold" not in server.data
    assert (cache.stats().l1_size, cache.stats().warmed) == (2, 2)
    [warmed] = [line for line in logs if line["event"] == "cache.warmed"]
    assert (warmed["from_redis"], warmed["from_database"], warmed["missing"]) == (1, 1, 1)


async def test_warming_goes_on_without_the_database_or_redis_and_never_fails(
    clock: FakeClock, logs: list[MutableMapping[str, Any]]
) -> None:
    server = FakeRedis()
    wall = WallClock(100 * HOUR)
    await count_reads(server, clock, wall, {"reading:a": 2, "reading:b": 1})
    server.data["almanac:reading:a"] = b"a"
    down = LoadFromDatabase({}, down=True)
    assert await two_level(clock, server, warm_keys=2, wall_clock=wall, load=down).warm() == 1
    assert "cache.warm_failed" in [line["event"] for line in logs]
    server.down = True
    assert await two_level(clock, server, warm_keys=2, wall_clock=wall, load=down).warm() == 0


async def test_an_l1_only_cache_warms_nothing(clock: FakeClock) -> None:
    """Read counts live in Redis, and an L1 filled alone would expire before serving much."""
    cache = TwoLevelCache(
        CacheSettings(l1_size=100, l1_ttl=5.0, warm_keys=10),
        None,
        clock=clock,
        load=LoadFromDatabase({"reading:a": b"a"}),
    )
    assert await cache.warm() == 0
    assert cache.stats().l1_size == 0


# A reading a lagging standby served: this process's L1 may keep it, Redis may not.

READING = uuid4()
ALICE = Principal(key_id="k", owner="alice", role="client", name="alice")


class ReadingSource:
    """A read database with one reading, at ``position`` in ``status``, whose
    ``projection_positions`` say it has applied ``position``: a primary or a standby."""

    dialect = "postgres"

    def __init__(self, name: str, position: int, status: str) -> None:
        self.url = f"postgresql://{name}/read"
        self.position = position
        self.status = status
        self.reads = 0

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        assert "projection_positions" in sql, sql
        return [{"name": "readings", "position": self.position}]

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
        assert "FROM readings" in sql, sql
        self.reads += 1
        return {**reading_row(), "status": self.status, "position": self.position}


def reading_row() -> dict[str, Any]:
    return RowsDatabase.row(str(READING))


class Reached:
    """A position watch whose projections have all reached ``position``."""

    def __init__(self, position: int) -> None:
        self.position = position

    async def current(self, name: str) -> int:
        return self.position

    async def wait_for(self, name: str, position: int, timeout: float) -> int:
        return self.position


def reads_via(primary: ReadingSource, *standbys: ReadingSource) -> Reads:
    router = ReadRouter(
        cast("ReadDatabase", primary),
        [cast("ReadDatabase", s) for s in standbys],
        max_lag=100,
        clock=lambda: 1000.0,
    )
    watch = cast("PositionWatch", Reached(primary.position))
    return Reads(cast("ReadDatabase", primary), watch, 1.0, router)


async def test_a_reading_a_lagging_standby_served_is_cached_in_this_process_only(
    clock: FakeClock,
) -> None:
    """The standby, 2 behind and so within max_lag, has not applied the reading's text yet.
    In Redis its state would be served by every process, some of which may have answered
    "generated" already, until the entry expired: the reading would step back for all."""
    primary = ReadingSource("primary", 10, "generated")
    standby = ReadingSource("standby", 8, "chart_calculated")
    reads = reads_via(primary, standby)
    server = FakeRedis()
    cache = two_level(clock, server)

    view = await get_reading(READING, reads=reads, principal=ALICE, min_position=None, cache=cache)
    assert (view.status, standby.reads, primary.reads) == ("chart_calculated", 1, 0)
    assert server.data == {}
    again = await get_reading(READING, reads=reads, principal=ALICE, min_position=None, cache=cache)
    assert again == view
    assert standby.reads == 1, "the second read was answered by this process's L1"

    # What the primary answers is as new as there is: every process may be given it.
    other = two_level(clock, server)
    view = await get_reading(
        READING, reads=reads.on_primary(), principal=ALICE, min_position=None, cache=other
    )
    assert view.status == "generated"
    held = decode_reading(server.data[f"almanac:{reading_key(READING)}"])
    assert held is not None
    assert (held.view.status, held.view.position) == ("generated", 10)


async def test_a_standbys_later_state_does_not_replace_an_earlier_one_in_redis(
    clock: FakeClock,
) -> None:
    """A client asks for position 8: the standby has it, Redis holds 5. The standby's row
    answers and replaces 5 in this process's L1; Redis is left to the projector's refresh,
    as nothing says the standby's row is the primary's latest."""
    primary = ReadingSource("primary", 10, "generated")
    standby = ReadingSource("standby", 8, "chart_calculated")
    server = FakeRedis()
    key = f"almanac:{reading_key(READING)}"
    server.data[key] = encode_entry(reading_from_row({**reading_row(), "position": 5}))
    cache = two_level(clock, server)
    view = await get_reading(
        READING, reads=reads_via(primary, standby), principal=ALICE, min_position=8, cache=cache
    )
    assert (view.status, view.position) == ("chart_calculated", 8)
    held = decode_reading(server.data[key])
    assert held is not None
    assert held.view.position == 5
    cached = decode_reading(await cache.get(reading_key(READING)))
    assert cached is not None
    assert cached.view.position == 8


# The refresher, against stand-ins for the read database and the cache.


class RecordingCache:
    """Records what it is given; ``refreshes`` says whether its L2 takes it (Redis answers)."""

    def __init__(self, refreshes: bool = True, *, shared: bool = False) -> None:
        self.refreshed: list[dict[str, bytes]] = []
        self.evicted: list[list[str]] = []
        self.refreshes = refreshes
        self.shared = shared
        self.stored = asyncio.Event()

    async def refresh(self, items: Mapping[str, bytes]) -> bool:
        self.refreshed.append(dict(items))
        if self.refreshes:
            self.stored.set()
        return self.refreshes

    async def evict(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        if not keys:
            return True
        self.evicted.append(keys)
        return self.refreshes

    def all_evicted(self) -> set[str]:
        return {key for keys in self.evicted for key in keys}


class RowsDatabase:
    """Answers the refresher's reading query with rows for the ids asked, and keeps its
    cache mark as ``cache_positions`` would (``marks``: name -> (position, lead)); can be
    down."""

    dialect = "postgres"

    def __init__(self) -> None:
        self.queries: list[tuple[str, dict[str, Any]]] = []
        self.down = False
        self.marks: dict[str, tuple[int, str]] = {}
        self.migrated: list[str] = []

    def mark(self, name: str = "readings") -> int | None:
        found = self.marks.get(name)
        return None if found is None else found[0]

    async def migrate(self, statements: Sequence[str]) -> None:
        self._answer()
        self.migrated.extend(statements)

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
        self._answer()
        assert sql.startswith("SELECT position FROM cache_positions"), sql
        position = self.mark(params["name"])
        return None if position is None else {"position": position}

    async def write(self, writes: Sequence[Any]) -> None:
        self._answer()
        for sql, rows in writes:
            for row in rows:
                name, position, lead = row["name"], row["position"], row["lead"]
                if sql.startswith("INSERT INTO cache_positions"):
                    self.marks[name] = (position, lead)
                elif sql.startswith("UPDATE cache_positions"):
                    # As the statement says: only the lead that took the mark moves it.
                    guarded = "AND lead = :lead" in sql
                    if name in self.marks and (not guarded or self.marks[name][1] == lead):
                        self.marks[name] = (position, lead)
                else:
                    raise AssertionError(sql)

    def _answer(self) -> None:
        if self.down:
            raise Unavailable("the read database is not answering")

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.queries.append((sql, dict(params)))
        if self.down:
            raise Unavailable("the read database is not answering")
        if "FROM readings" not in sql:
            return []
        return [self.row(reading_id) for reading_id in params.values()]

    @staticmethod
    def row(reading_id: str) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "id": reading_id,
            "owner": "alice",
            "status": "requested",
            "kind": "natal",
            "label": None,
            "birth": msgspec.json.encode(birth()).decode(),
            "options": msgspec.json.encode(ChartOptions()).decode(),
            "chart_hash": "0" * 64,
            "chart": None,
            "text": None,
            "failure": None,
            "created_at": now,
            "updated_at": now,
            "position": 3,
        }


@dataclass
class _Chart:
    chart_hash: str


@dataclass
class _ChartCalculated:
    chart: _Chart


def recorded(
    event_type: str, event: Any = None, aggregate_id: Any = None, position: int = 1
) -> RecordedEvent:
    """An event as the log returns it, with ``event`` (what the refresher reads) as its state."""
    state = msgspec.json.encode(event or {})
    key = str(aggregate_id or uuid4())
    return RecordedEvent(position, event_type, key, 1, state, MsgspecMapper())


class FakeLog:
    """The event log, as ``EventStore.read`` hands it out; can be down."""

    def __init__(self, events: Sequence[RecordedEvent] = ()) -> None:
        self.events = list(events)
        self.reads: list[tuple[int, int]] = []
        self.down = False

    async def __call__(self, after: int, limit: int) -> list[RecordedEvent]:
        self.reads.append((after, limit))
        if self.down:
            raise Unavailable("the event store is not answering")
        return [e for e in self.events if e.position > after][:limit]


def refresher_with(
    db: RowsDatabase, cache: RecordingCache, log: FakeLog | None = None, **kwargs: Any
) -> CacheRefresher:
    return CacheRefresher(cast("Any", cache), cast("Any", db), log or FakeLog(), **kwargs)


async def test_the_refresher_reads_each_changed_reading_once_in_one_query() -> None:
    db, cache = RowsDatabase(), RecordingCache()
    first, second = uuid4(), uuid4()
    await refresher_with(db, cache)(
        [
            recorded(Reading.Requested.TOPIC, aggregate_id=first),
            recorded(Reading.Generated.TOPIC, aggregate_id=first),
            recorded(Reading.Failed.TOPIC, aggregate_id=second),
            recorded("api_key.issued"),
        ]
    )
    [(sql, params)] = db.queries
    assert sql.endswith("WHERE r.id IN (:v0, :v1)")
    assert sorted(params.values()) == sorted([str(first), str(second)])
    [items] = cache.refreshed
    assert set(items) == {reading_key(first), reading_key(second)}
    entry = decode_reading(items[reading_key(first)])
    assert entry is not None
    assert entry.owner == "alice"


async def test_the_refresher_refreshes_the_chart_a_batch_calculated() -> None:
    db, cache = RowsDatabase(), RecordingCache()
    chart_hash = "c" * 64
    await refresher_with(db, cache)(
        [recorded(Reading.ChartCalculated.TOPIC, _ChartCalculated(_Chart(chart_hash)))]
    )
    chart_queries = [(sql, params) for sql, params in db.queries if "FROM charts" in sql]
    expected = (
        "SELECT chart_hash, chart, calculated_at, position FROM charts WHERE chart_hash IN (:v0)"
    )
    assert chart_queries == [(expected, {"v0": chart_hash})]


async def test_the_refresher_does_nothing_for_a_batch_without_readings() -> None:
    db, cache = RowsDatabase(), RecordingCache()
    await refresher_with(db, cache)([recorded("api_key.issued")])
    assert db.queries == []
    assert cache.refreshed == []


async def test_what_the_refresher_could_not_refresh_is_retried_with_the_next_batch() -> None:
    db, cache = RowsDatabase(), RecordingCache()
    refresher = refresher_with(db, cache)
    missed = uuid4()
    db.down = True
    await refresher([recorded(Reading.Requested.TOPIC, aggregate_id=missed)])  # does not raise
    db.down = False
    later = uuid4()
    await refresher([recorded(Reading.Requested.TOPIC, aggregate_id=later)])
    assert set(cache.refreshed[-1]) == {reading_key(missed), reading_key(later)}
    await refresher([recorded(Reading.Requested.TOPIC, aggregate_id=uuid4())])
    assert len(cache.refreshed[-1]) == 1


async def test_the_refresher_retries_when_the_cache_could_not_store() -> None:
    db, cache = RowsDatabase(), RecordingCache(refreshes=False)
    refresher = refresher_with(db, cache)
    missed = uuid4()
    await refresher([recorded(Reading.Requested.TOPIC, aggregate_id=missed)])
    cache.refreshes = True
    await refresher([recorded("api_key.issued")])
    assert set(cache.refreshed[-1]) == {reading_key(missed)}


async def test_a_refresh_does_not_put_back_an_earlier_state_than_a_fill_just_cached(
    clock: FakeClock,
) -> None:
    # The refresher read the row at position 7, a commit moved it to 9, a query read and
    # cached that, and then the refresher's write of position 7 arrives.
    cache = l1_only(clock)
    earlier = a_cached_reading()
    later = msgspec.structs.replace(
        earlier, view=msgspec.structs.replace(earlier.view, status="generated", position=9)
    )
    key = reading_key(earlier.view.id)
    await cache.fill(key, encode_entry(later), mark=cache.mark())
    assert await cache.refresh({key: encode_entry(earlier)})
    assert decode_reading(await cache.get(key)) == later
    assert await cache.refresh({key: encode_entry(later)})  # the same state again: fine
    assert decode_reading(await cache.get(key)) == later


async def test_the_refresher_retries_by_itself_when_no_batch_follows() -> None:
    """An entry Redis missed must not keep its old state until it expires because the log
    went quiet: the refresher tries again on a timer of its own."""
    db, cache = RowsDatabase(), RecordingCache(refreshes=False)
    refresher = refresher_with(db, cache, retry_initial=0.01)
    missed = uuid4()
    await refresher([recorded(Reading.Requested.TOPIC, aggregate_id=missed)])
    assert refresher.pending == 1
    cache.refreshes = True
    await asyncio.wait_for(cache.stored.wait(), timeout=5)
    assert set(cache.refreshed[-1]) == {reading_key(missed)}
    assert refresher.pending == 0


async def test_the_refresher_stops_retrying_when_closed_and_keeps_what_waits() -> None:
    """Its retries end with the projector's lead (``aclose``); the keys stay for the next
    (and with a shared cache, the mark stays before them)."""
    db, cache = RowsDatabase(), RecordingCache(refreshes=False)
    refresher = refresher_with(db, cache, retry_initial=60)
    await refresher([recorded(Reading.Requested.TOPIC)])
    retrying = refresher._retrying
    assert retrying is not None and not retrying.done()
    await refresher.aclose()
    assert retrying.cancelled()
    assert refresher.pending == 1


async def test_a_key_a_commit_changes_again_during_its_refresh_is_refreshed_again() -> None:
    """The row read for the first refresh may be older than the second commit."""
    db = RowsDatabase()
    cache = GatedCache()
    refresher = refresher_with(db, cache, retry_initial=60)
    reading = uuid4()
    first = asyncio.create_task(refresher([reading_event(1, reading)]))
    await eventually(cache.waiting, within=5, what="the first refresh under way")
    # The batch of the second commit does not wait for the refresh under way to end.
    await asyncio.wait_for(refresher([reading_event(2, reading)]), timeout=5)
    cache.gate.set()
    await asyncio.wait_for(first, timeout=5)
    assert [set(items) for items in cache.refreshed] == [{reading_key(reading)}] * 2
    assert (refresher.pending, refresher.refreshed_through) == (0, 2)


class GatedCache(RecordingCache):
    """A cache whose L2 takes a refresh only once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(shared=True)
        self.gate = asyncio.Event()
        self.entered = 0

    async def waiting(self) -> bool:
        return self.entered > 0

    async def refresh(self, items: Mapping[str, bytes]) -> bool:
        self.entered += 1
        await self.gate.wait()
        return await super().refresh(items)


# The mark: how far the shared cache has taken in the projection's commits, kept in the read
# database, so that a lead that begins evicts what an earlier one committed and never
# refreshed (it died, lost its lead, or could not reach Redis).


def reading_event(position: int, reading: UUID | None = None) -> RecordedEvent:
    return recorded(Reading.Generated.TOPIC, aggregate_id=reading or uuid4(), position=position)


async def mark_reaches(db: RowsDatabase, position: int) -> None:
    async def there() -> bool:
        return db.mark() == position

    await eventually(there, within=5, what=f"the cache mark at {position}")


async def test_a_lead_evicts_the_readings_committed_after_the_mark_and_then_moves_it() -> None:
    before, after, again = uuid4(), uuid4(), uuid4()
    log = FakeLog(
        [
            reading_event(1, before),
            reading_event(2, after),
            recorded("api_key.issued", position=3),
            reading_event(4, again),
            reading_event(5, after),
        ]
    )
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    db.marks["readings"] = (1, "a lead that died")
    refresher = refresher_with(db, cache, log, mark_interval=0)
    await refresher.take_over(5)
    await mark_reaches(db, 5)
    assert cache.all_evicted() == {reading_key(after), reading_key(again)}
    # Evicted, not refreshed: the next read of each takes it from the database.
    assert cache.refreshed == []
    await refresher.aclose()


async def test_a_catch_up_reads_the_log_a_run_at_a_time_and_stops_where_the_lead_began() -> None:
    readings = [uuid4() for _ in range(6)]
    log = FakeLog([reading_event(i + 1, reading) for i, reading in enumerate(readings)])
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    db.marks["readings"] = (0, "a lead that died")
    refresher = refresher_with(db, cache, log, mark_interval=0, catch_up_chunk=2)
    await refresher.take_over(5)
    await mark_reaches(db, 5)
    assert log.reads == [(0, 2), (2, 2), (4, 2)]
    assert cache.all_evicted() == {reading_key(r) for r in readings[:5]}
    await refresher.aclose()


async def test_the_mark_stays_before_a_catch_up_redis_did_not_take_until_it_does() -> None:
    readings = [uuid4(), uuid4()]
    log = FakeLog([reading_event(1, readings[0]), reading_event(2, readings[1])])
    db, cache = RowsDatabase(), RecordingCache(refreshes=False, shared=True)
    db.marks["readings"] = (0, "a lead that died")
    refresher = refresher_with(db, cache, log, mark_interval=0, retry_initial=0.01)
    await refresher.take_over(2)

    async def tried_twice() -> bool:
        return len(cache.evicted) >= 2

    await eventually(tried_twice, within=5, what="the catch-up tried again")
    assert (db.mark(), refresher.refreshed_through) == (0, 0)
    cache.refreshes = True
    await mark_reaches(db, 2)
    await refresher.aclose()


async def test_what_a_lead_could_not_catch_up_with_is_owed_by_the_next() -> None:
    """A projector restarted while Redis is away: the mark has not moved, and the next lead
    evicts the same readings once Redis answers."""
    reading = uuid4()
    log = FakeLog([reading_event(1, reading)])
    db = RowsDatabase()
    db.marks["readings"] = (0, "a lead that died")
    away = RecordingCache(refreshes=False, shared=True)
    first = refresher_with(db, away, log, mark_interval=0, retry_initial=60)
    await first.take_over(1)
    await first.aclose()
    assert db.mark() == 0
    back = RecordingCache(shared=True)
    second = refresher_with(db, back, log, mark_interval=0)
    await second.take_over(1)
    await mark_reaches(db, 1)
    assert back.all_evicted() == {reading_key(reading)}
    await second.aclose()


async def test_the_mark_never_passes_a_commit_whose_refresh_failed() -> None:
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    refresher = refresher_with(db, cache, mark_interval=0, retry_initial=60)
    await refresher.take_over(0)
    await refresher([reading_event(1)])
    assert db.mark() == 1
    cache.refreshes = False
    await refresher([reading_event(2)])
    await refresher([recorded("api_key.issued", position=3)])
    assert (db.mark(), refresher.refreshed_through) == (1, 1)
    cache.refreshes = True
    await refresher([recorded("api_key.issued", position=4)])
    assert db.mark() == 4
    await refresher.aclose()


async def test_the_mark_is_stored_at_most_once_an_interval_and_when_the_lead_ends(
    clock: FakeClock,
) -> None:
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    refresher = refresher_with(db, cache, mark_interval=1.0, clock=clock)
    await refresher.take_over(0)
    await refresher([reading_event(1)])
    assert db.mark() == 0
    clock.advance(1.0)
    await refresher([reading_event(2)])
    assert db.mark() == 2
    await refresher([reading_event(3)])
    assert db.mark() == 2
    await refresher.aclose()
    assert db.mark() == 3


async def test_a_refresher_whose_lead_was_taken_cannot_move_the_mark() -> None:
    db = RowsDatabase()
    old = refresher_with(db, RecordingCache(shared=True), mark_interval=0)
    new = refresher_with(db, RecordingCache(shared=True), mark_interval=0)
    await old.take_over(0)
    await new.take_over(0)
    await old([reading_event(1)])
    await old.aclose()
    assert db.mark() == 0
    await new.aclose()


async def test_a_mark_beyond_where_a_lead_begins_is_brought_back_to_it() -> None:
    """The read model started again from 0 (a rebuild): its commits are made again, and
    refreshed as they are."""
    log = FakeLog([reading_event(1)])
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    db.marks["readings"] = (9, "the lead before the rebuild")
    refresher = refresher_with(db, cache, log)
    await refresher.take_over(0)
    assert db.mark() == 0
    assert (log.reads, cache.evicted) == ([], [])
    await refresher.aclose()


async def test_without_a_mark_a_lead_trusts_its_tracked_position() -> None:
    """The first start of a version that keeps a mark neither reads the whole log nor empties
    the cache: what an earlier version left in Redis expires within the L2 TTL, as before."""
    log = FakeLog([reading_event(1), reading_event(2)])
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    refresher = refresher_with(db, cache, log, mark_interval=0)
    await refresher.take_over(2)
    assert (db.mark(), refresher.refreshed_through) == (2, 2)
    assert (log.reads, cache.evicted, refresher._retrying) == ([], [], None)
    await refresher.aclose()


class FailingLog(FakeLog):
    """A log that answers its first ``answers`` reads and then stops answering."""

    def __init__(self, events: Sequence[RecordedEvent], answers: int) -> None:
        super().__init__(events)
        self.answers = answers

    async def __call__(self, after: int, limit: int) -> list[RecordedEvent]:
        self.down = len(self.reads) >= self.answers
        return await super().__call__(after, limit)


async def test_a_catch_up_stores_the_mark_after_each_run_it_evicted(clock: FakeClock) -> None:
    """A projector killed partway through a catch-up leaves its successor the rest, not all."""
    log = FailingLog([reading_event(i + 1) for i in range(4)], answers=2)
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    db.marks["readings"] = (0, "a lead that died")
    refresher = refresher_with(
        db, cache, log, catch_up_chunk=1, mark_interval=60, retry_initial=60, clock=clock
    )
    await refresher.take_over(4)

    async def stopped() -> bool:
        return len(log.reads) == 3 and not refresher._lock.locked()

    await eventually(stopped, within=5, what="the catch-up stopped by the log")
    assert db.mark() == 2
    await refresher.aclose()


async def test_a_batch_leaves_the_catch_up_to_the_background_while_it_backs_off() -> None:
    """The projector's after-commit call refreshes its own batch and returns: it never reads
    and evicts the gap itself, however long that is."""
    log = FakeLog([reading_event(i + 1) for i in range(3)])
    db, cache = RowsDatabase(), RecordingCache(refreshes=False, shared=True)
    db.marks["readings"] = (0, "a lead that died")
    refresher = refresher_with(db, cache, log, catch_up_chunk=1, mark_interval=0, retry_initial=60)
    await refresher.take_over(3)

    async def backing_off() -> bool:
        return bool(cache.evicted) and not refresher._lock.locked()

    await eventually(backing_off, within=5, what="the first run of the catch-up failed")
    cache.refreshes = True
    live = uuid4()
    await asyncio.wait_for(refresher([reading_event(4, live)]), timeout=5)
    assert log.reads == [(0, 1)]
    assert [set(items) for items in cache.refreshed] == [{reading_key(live)}]
    assert (db.mark(), refresher.refreshed_through) == (0, 0)
    retrying = refresher._retrying
    assert retrying is not None and not retrying.done()
    await refresher.aclose()


class SteppedCache(RecordingCache):
    """A shared cache whose L2 takes each refresh only once a step is let through."""

    def __init__(self) -> None:
        super().__init__(shared=True)
        self.steps = asyncio.Semaphore(0)
        self.entered = 0

    async def refresh(self, items: Mapping[str, bytes]) -> bool:
        self.entered += 1
        await self.steps.acquire()
        return await super().refresh(items)


async def test_the_mark_moves_while_batches_keep_a_refresh_busy() -> None:
    """Under sustained load a round never ends with nothing waiting: the mark still moves,
    up to the first commit whose keys wait, while the refresh goes on."""
    db, cache = RowsDatabase(), SteppedCache()
    refresher = refresher_with(db, cache, mark_interval=0, retry_initial=60)
    await refresher.take_over(0)

    def rounds(count: int) -> Callable[[], Awaitable[bool]]:
        async def entered() -> bool:
            return cache.entered == count

        return entered

    busy = asyncio.create_task(refresher([reading_event(1)]))
    await eventually(rounds(1), within=5, what="the first round under way")
    await asyncio.wait_for(refresher([reading_event(2)]), timeout=5)
    await asyncio.wait_for(refresher([reading_event(3)]), timeout=5)
    cache.steps.release()
    await eventually(rounds(2), within=5, what="the second round under way")
    assert db.mark() == 1
    await asyncio.wait_for(refresher([reading_event(4)]), timeout=5)
    cache.steps.release()
    await eventually(rounds(3), within=5, what="the third round under way")
    assert (db.mark(), busy.done()) == (3, False)
    cache.steps.release()
    await asyncio.wait_for(busy, timeout=5)
    assert db.mark() == 4
    await refresher.aclose()


async def test_batches_during_a_catch_up_are_not_held_up_and_are_refreshed_by_it() -> None:
    behind, live = uuid4(), uuid4()
    log = GatedLog([reading_event(1, behind)])
    db, cache = RowsDatabase(), RecordingCache(shared=True)
    db.marks["readings"] = (0, "a lead that died")
    refresher = refresher_with(db, cache, log, mark_interval=0)
    await refresher.take_over(1)

    async def reading() -> bool:
        return bool(log.reads)

    await eventually(reading, within=5, what="the catch-up reading the log")
    await asyncio.wait_for(refresher([reading_event(2, live)]), timeout=5)
    log.gate.set()
    await mark_reaches(db, 2)
    assert cache.all_evicted() == {reading_key(behind)}
    assert [set(items) for items in cache.refreshed] == [{reading_key(live)}]
    await refresher.aclose()


class GatedLog(FakeLog):
    """A log whose reads answer only once ``gate`` is set."""

    def __init__(self, events: Sequence[RecordedEvent]) -> None:
        super().__init__(events)
        self.gate = asyncio.Event()

    async def __call__(self, after: int, limit: int) -> list[RecordedEvent]:
        self.reads.append((after, limit))
        await self.gate.wait()
        return [e for e in self.events if e.position > after][:limit]


async def test_more_keys_waiting_than_max_pending_are_left_to_the_log(
    logs: list[MutableMapping[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not held in memory, and not left in Redis with their old state either: once Redis
    answers again, the readings of those commits are found in the log and evicted."""
    monkeypatch.setattr(cache_refresher, "log", structlog.get_logger("almanac.cache"))
    readings = [uuid4() for _ in range(3)]
    log = FakeLog([reading_event(i + 1, reading) for i, reading in enumerate(readings)])
    db, cache = RowsDatabase(), RecordingCache(refreshes=False, shared=True)
    refresher = refresher_with(db, cache, log, max_pending=1, mark_interval=0, retry_initial=0.01)
    await refresher.take_over(0)
    await refresher(log.events[:1])
    await refresher(log.events[1:])
    assert refresher.pending == 0
    assert [e["event"] for e in logs if e["event"] == "cache.refresh_deferred"]
    cache.refreshes = True
    await mark_reaches(db, 3)
    assert cache.all_evicted() == {reading_key(r) for r in readings}
    await refresher.aclose()


async def test_an_l1_only_cache_needs_no_mark() -> None:
    """An L1 of this process alone begins empty with the process."""
    log = FakeLog([reading_event(1)])
    db, cache = RowsDatabase(), RecordingCache(shared=False)
    refresher = refresher_with(db, cache, log)
    await refresher.take_over(1)
    assert (db.migrated, db.marks, log.reads) == ([], {}, [])
    await refresher.aclose()


async def test_sharing_counters_while_redis_is_down_counts_no_l2_error_or_skip(
    clock: FakeClock,
) -> None:
    """The L2 counters tell how reads and writes of entries fare, not the bookkeeping."""
    server = FakeRedis()
    cache = two_level(clock, server)
    server.down = True
    await cache.get("reading:1")  # a read: one error, and Redis is left alone a while
    before = cache.stats()
    assert before.l2_errors == 1
    for _ in range(5):
        await cache._share_stats()
        assert await cache.shared_stats() is None
        clock.advance(5.0)  # past the backoff: each share tries Redis again
    after = cache.stats()
    assert (after.l2_errors, after.l2_skipped) == (before.l2_errors, before.l2_skipped)


async def test_shared_counters_leave_out_expired_and_unreadable_entries(clock: FakeClock) -> None:
    server = FakeRedis()
    cache = two_level(clock, server, roles=("api",))
    await cache.get("reading:1")
    index = "almanac:cache:stats:1"
    server.sets[index] = {b"gone", b"newer", b"\xff"}
    server.data[f"{index}:newer"] = b"{not json"
    shared = await cache.shared_stats()
    assert shared is not None
    assert [(p.roles, p.stats) for p in shared] == [(["api"], cache.stats())]
    assert server.sets[index] == {b"newer"}  # the expired ones went from the set


async def test_the_shared_counters_answering_does_not_tell_redis_is_back(
    clock: FakeClock,
) -> None:
    """Only the entries' own calls do: bookkeeping that works may not make reads work."""
    server = FakeRedis()
    cache = two_level(clock, server)
    server.down = True
    await cache.get("reading:1")
    server.down = False
    clock.advance(5.0)  # past the backoff
    await cache._share_stats()
    assert cache.degraded
    await cache.get("reading:1")
    assert not cache.degraded


async def test_cache_monitoring_answers_when_the_shared_counters_cannot_be_read(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = two_level(clock, FakeRedis())

    async def broken() -> None:
        raise RuntimeError("a reply of an unexpected shape")

    class Answering:
        async def ping(self) -> None:
            return None

    monkeypatch.setattr(cache, "shared_stats", broken)
    report = await get_cache_monitoring(cache, cast("RedisConnection", Answering()))
    assert (report.redis.status, report.processes, report.total) == ("ok", None, None)
    assert report.cache == cache.stats()


async def test_each_process_s_shared_counters_are_read_back_by_another(clock: FakeClock) -> None:
    server = FakeRedis()
    one, other = two_level(clock, server, roles=("api",)), two_level(clock, server)
    await one.get("reading:1")
    await one._share_stats()
    shared = await other.shared_stats()
    assert shared is not None
    assert sorted(p.roles for p in shared) == [[], ["api"]]
    assert CacheTotals.of(shared).l1_misses == 1
