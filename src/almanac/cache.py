"""The read cache: a small in-process L1 in front of a shared Redis L2.

Both levels hold copies of read-model rows and are rebuildable from the read database at
any time, so every Redis failure is answered as a miss and the caller reads the database.

Who writes what:

- The projector, after each commit, re-reads the changed rows from the primary and calls
  ``refresh``: the new values go to L2 and one pipelined PUBLISH makes every other process
  drop its L1 copy (they re-read L2 and find the new value, since the SETs ran first).
  A projector that takes over calls ``evict`` for the rows its predecessor committed and
  never refreshed: gone from L2 and, by the same channel, from every L1.
- A query that had to read the database calls ``fill``: into L1 unless the key was
  invalidated while it was reading (``mark``), and into L2 only where L2 has nothing and
  for a short while (``fill_ttl``), so a row from a read that raced a commit never
  overwrites what the projector wrote and never outlives it for long.
- Only what is as new as the primary read database's state of its key goes into L2 from a
  query (``shared=False`` otherwise): a row from a hot standby may trail the primary by up
  to the router's ``max_lag``, and in L2 every process would serve that earlier state, with
  no commit to come that makes the projector put the later one back. Such a row goes into
  this process's L1 alone, where it lives ``l1_ttl`` seconds.
- An API process, as it starts, ``warm``s the keys read most of late (read counts per
  window of ``hot_window`` seconds, the previous window's fading out as the current one
  passes): each that Redis lacks is read from the primary read database (``load``, the
  refresher's own reads) and put there as a fill is, and all of them go into its L1.

L1 entries live ``l1_ttl`` seconds, which bounds how long a lost invalidation can matter.
While Redis is away nothing is asked of it for a backoff that grows from 1 s to 10 s; once
the invalidation channel is subscribed again the whole L1 is cleared, because whatever
was published meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID, uuid4

import msgspec
import structlog
from redis.exceptions import WatchError

from almanac.adapters.redis import REDIS_ERRORS, RedisConnection
from almanac.settings import CacheSettings
from almanac.timeouts import Backoff, wait_event
from almanac.views import CachedReading, ChartView

log = structlog.get_logger("almanac.cache")

Clock = Callable[[], float]
# The cache's entries of the given readings (ids) and charts (hashes), as the primary read
# database has them now; a row it does not have is left out.
Load = Callable[[Sequence[str], Sequence[str]], Awaitable[dict[str, bytes]]]
# Redis names under the (per-deployment or per-test) prefix.
ENTRY_NAMESPACE = "almanac:"
INVALIDATE_CHANNEL = "almanac:cache:invalidate"
# Read counts of one window, named by its number (``hot_window``): ``almanac:cache:hot:<n>``.
HOT_KEYS = "almanac:cache:hot"
# Each process's latest counters (``ProcessCacheStats`` as JSON) under ``<this>:<origin>``,
# gone a few seconds after the process stops sharing, and the set of those origins.
# Versioned: a release that changes the shape shares under a name of its own.
SHARED_STATS = "almanac:cache:stats:1"
READING_PREFIX = "reading:"
CHART_PREFIX = "chart:"


def reading_key(reading_id: UUID | str) -> str:
    """The key of a reading; its value is a ``CachedReading`` as JSON."""
    return f"{READING_PREFIX}{reading_id}"


def chart_key(chart_hash: str) -> str:
    """The key of a chart; its value is a ``ChartView`` as JSON."""
    return f"{CHART_PREFIX}{chart_hash}"


_encode = msgspec.json.Encoder().encode
_reading = msgspec.json.Decoder(CachedReading)
_chart = msgspec.json.Decoder(ChartView)


def encode_entry(value: CachedReading | ChartView) -> bytes:
    return _encode(value)


def decode_reading(data: bytes | None) -> CachedReading | None:
    """The cached reading, or None for a miss or a value of an older shape (also a miss)."""
    return None if data is None else _decode_reading(data)


# A hot reading is served from the same L1 bytes many times a second, and decoding its ~6 kB
# on every hit was the largest cost of a cached GET left in the profile (~23 us of ~200).
# Keyed by the bytes themselves (CPython hashes a bytes object once); the values are frozen
# Structs that nothing mutates, so sharing them between requests is safe.
@functools.lru_cache(maxsize=256)
def _decode_reading(data: bytes) -> CachedReading | None:
    try:
        return _reading.decode(data)
    except msgspec.DecodeError:
        return None


class _ViewPosition(msgspec.Struct):
    position: int


class _Positioned(msgspec.Struct):
    """What a cached value says of its position: a chart's own, or its reading's."""

    position: int | None = None
    view: _ViewPosition | None = None


_positioned = msgspec.json.Decoder(_Positioned)


def position_of(data: bytes) -> int | None:
    """The read-model position a cached value reflects; None if it does not say."""
    try:
        found = _positioned.decode(data)
    except msgspec.DecodeError:
        return None
    return found.view.position if found.view is not None else found.position


def decode_chart(data: bytes | None) -> ChartView | None:
    if data is None:
        return None
    try:
        return _chart.decode(data)
    except msgspec.DecodeError:
        return None


def hot_window(now: float, length: float) -> tuple[int, float]:
    """The number of the read-count window ``now`` (wall-clock seconds, the same in every
    process) falls in, and how much of it (0 to 1) has passed."""
    number, into = divmod(now, length)
    return int(number), into / length


def rank_hot(
    current: Iterable[tuple[str, float]],
    previous: Iterable[tuple[str, float]],
    passed: float,
    limit: int,
) -> list[str]:
    """The ``limit`` keys read most in about the last window's length, most read first.

    The reads of the window under way count whole, those of the window before it in the
    part of it that the current one has not yet replaced (``1 - passed``), so that a key's
    popularity fades out within two windows of its last read: counts only ever grow within
    a window, and a key hot long ago would otherwise rank above every key hot now.
    """
    scores: dict[str, float] = {}
    for key, count in previous:
        scores[key] = scores.get(key, 0.0) + count * (1.0 - passed)
    for key, count in current:
        scores[key] = scores.get(key, 0.0) + count
    # Ties by key, so that every process warms the same keys.
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return [key for key, score in ranked[:limit] if score > 0]


def split_keys(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """The reading ids and the chart hashes that ``keys`` name (other keys are skipped)."""
    readings: list[str] = []
    charts: list[str] = []
    for key in keys:
        if key.startswith(READING_PREFIX):
            readings.append(key.removeprefix(READING_PREFIX))
        elif key.startswith(CHART_PREFIX):
            charts.append(key.removeprefix(CHART_PREFIX))
    return readings, charts


class CacheStats(msgspec.Struct, frozen=True):
    """Counters since the process started, and the current state."""

    l1_hits: int
    l1_misses: int
    l1_size: int
    l1_capacity: int
    l2_enabled: bool
    l2_hits: int
    l2_misses: int
    # Failed calls to Redis (reads, writes, publishes, the subscriber).
    l2_errors: int
    # Calls not even tried because Redis failed a moment ago (answered as misses).
    l2_skipped: int
    # Redis calls failing, or the invalidation channel lost: L1 copies may lag up to l1_ttl.
    degraded: bool
    subscribed: bool
    invalidations_sent: int
    invalidations_received: int
    l1_clears: int
    warmed: int


class ProcessCacheStats(msgspec.Struct, frozen=True):
    """One process's counters, as it last shared them (about once a second)."""

    process: str  # host:pid
    roles: list[str]
    at: float  # when, in seconds since the epoch
    stats: CacheStats


class CacheTotals(msgspec.Struct, frozen=True):
    """The counters of every process that shared them of late, added up."""

    processes: int
    l1_hits: int
    l1_misses: int
    l2_hits: int
    l2_misses: int
    l2_errors: int
    l2_skipped: int
    invalidations_sent: int
    invalidations_received: int
    # How many of the processes see Redis failing or their invalidations lost.
    degraded: int

    @classmethod
    def of(cls, shared: Sequence[ProcessCacheStats]) -> CacheTotals:
        """Each counter but ``processes`` is the sum of ``CacheStats``' field of its name."""
        every = [p.stats for p in shared]
        sums = {
            name: sum(getattr(s, name) for s in every)
            for name in cls.__struct_fields__
            if name != "processes"
        }
        return cls(processes=len(every), **sums)


class ReadCache(Protocol):
    """Copies of read-model values by key (``reading_key``, ``chart_key``)."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]: ...

    async def put_many(self, items: Mapping[str, bytes]) -> bool:
        """Store in every level; False if L2 could not take them."""
        ...

    async def refresh(self, items: Mapping[str, bytes]) -> bool:
        """New values of changed rows: store them, unless Redis holds a later state of one
        (then this L1 drops its copy too), and make every other L1 drop its copy."""
        ...

    def mark(self) -> int:
        """Taken before a database read, handed to ``fill`` with what was read."""
        ...

    async def fill(self, key: str, value: bytes, *, mark: int, shared: bool = True) -> None:
        """Cache a value read from the database, unless it may be older than the cache's.

        ``shared=False``: the value may be older than the primary's (a standby read it), so
        it goes into this process's L1 only, never where other processes would read it."""
        ...

    async def supersede(
        self, key: str, value: bytes, *, stale: Callable[[bytes], bool], shared: bool = True
    ) -> None:
        """Put ``value`` in place of a cached value that ``stale`` finds older than it (or of
        none): the cache answered an earlier state than the database has since shown.
        ``shared`` as for ``fill``."""
        ...

    async def invalidate(self, keys: Iterable[str]) -> None:
        """Drop ``keys`` from the L1 of every process (L2 is left to ``refresh``)."""
        ...

    async def evict(self, keys: Iterable[str]) -> bool:
        """Drop ``keys`` from every level, in every process: the next read of each goes to the
        database. False if L2 could not drop them."""
        ...

    @property
    def shared(self) -> bool:
        """Whether values outlive this process (an L2 that other processes read too)."""
        ...

    async def start(self) -> None: ...

    async def warm(self) -> int:
        """Make sure the keys read most of late are cached; how many are (never fails)."""
        ...

    async def stop(self) -> None: ...

    def stats(self) -> CacheStats: ...

    async def shared_stats(self) -> list[ProcessCacheStats] | None:
        """Every process's latest counters (this one's as of now); None without Redis."""
        ...


class L1Cache:
    """A bounded LRU whose entries expire ``ttl`` seconds after they were put.

    A size or a ttl of 0 keeps nothing.
    """

    def __init__(self, size: int, ttl: float, clock: Clock) -> None:
        self.capacity = size if ttl > 0 else 0
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: bytes) -> None:
        if not self.capacity:
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count


class _Invalidation(msgspec.Struct, array_like=True):
    origin: str
    keys: list[str]


_invalidation = msgspec.json.Decoder(_Invalidation)
# How many recently invalidated keys are remembered exactly for ``fill`` (older: any fill
# that began before them is refused, which is safe).
_RECENT_INVALIDATIONS = 4096
# Distinct keys whose reads are counted between two flushes to the hot set.
_COUNTED_KEYS = 10_000
# Keys per MGET or DEL: one command of a pipeline never grows without bound.
_KEYS_PER_COMMAND = 1000
# Keys per run of the refresh's script: Redis runs nothing else meanwhile, and 1,000 entries
# of 6.5 kB held it for 32 to 46 ms (the API processes' reads waiting behind it).
_KEYS_PER_SCRIPT = 64
# The set of sharing processes outlives the last one that shared by an hour.
_SHARED_INDEX_TTL_MS = 3_600_000

# A refresh's write to Redis: each entry is set unless Redis holds a later state of it.
# KEYS are the entries; ARGV[1] the TTL in ms, then each entry's value and its position
# (empty when it has none). A held value's position is the last field of its JSON (a
# reading's view ends with it, as does a chart), so it is read off its last 48 bytes, not
# decoded (matching the whole of a 6.5 kB entry cost Redis ~45 µs a key). Redis spends
# ~30 µs of CPU a 6.5 kB entry on this (moving the values in and out of Lua), against ~2
# for a plain SET; one command instead of one per key, the projector's round trip is
# shorter (53 against 67 µs a key, 500 keys a refresh).
# This keeps a projector that lost its lease without noticing yet, and so refreshes rows
# it read before its successor's commits, from putting them over the successor's.
# It answers the (1-based) numbers of the entries it left alone.
_REFRESH_SCRIPT = """
local refused = {}
for i, key in ipairs(KEYS) do
  local value, at = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local held = redis.call('GET', key)
  local held_at = held and tonumber(string.match(string.sub(held, -48), '"position":(%d+)}+$'))
  if at and held_at and held_at > at then
    refused[#refused + 1] = i
  else
    redis.call('SET', key, value, 'PX', ARGV[1])
  end
end
return refused
"""


class TwoLevelCache:
    """L1 in this process, L2 in Redis (``redis=None``: L1 only, the embedded profile)."""

    def __init__(
        self,
        settings: CacheSettings,
        redis: RedisConnection | None,
        *,
        prefix: str = "",
        load: Load | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        backoff_initial: float = 1.0,
        backoff_max: float = 10.0,
        log_interval: float = 10.0,
        flush_interval: float = 1.0,
        fill_ttl: float = 60.0,
        hot_window: float = 3600.0,
        roles: Sequence[str] = (),
    ) -> None:
        self._l1 = L1Cache(settings.l1_size, settings.l1_ttl, clock)
        self._redis = redis
        self._load = load
        self._clock = clock
        self._wall_clock = wall_clock
        self._l2_ttl_ms = max(1, int(settings.l2_ttl * 1000))
        self._fill_ttl_ms = max(1, int(min(fill_ttl, settings.l2_ttl) * 1000))
        self._warm_limit = settings.warm_keys
        self._hot_capacity = max(4 * settings.warm_keys, 1000)
        self._hot_window = hot_window
        # A window's counts are read while it is the current one and the one after.
        self._hot_ttl_ms = max(1, int(2 * hot_window * 1000))
        self._entry_prefix = f"{prefix}{ENTRY_NAMESPACE}"
        # Per database, as the keys are: deployments sharing a Redis server in databases of
        # their own must not drop each other's L1 entries. Database 0 keeps the name it has
        # always had, so that processes of an earlier release hear this one's in a rollout.
        db = redis.db if redis else 0
        self._channel = f"{prefix}{INVALIDATE_CHANNEL}" + (f":{db}" if db else "")
        self._hot = f"{prefix}{HOT_KEYS}"
        self._shared = f"{prefix}{SHARED_STATS}"
        self._origin = uuid4().hex
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        self._roles = list(roles)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._log_interval = log_interval
        self._flush_interval = flush_interval
        # Counters for stats().
        self._l1_hits = self._l1_misses = self._l2_hits = self._l2_misses = 0
        self._l2_errors = self._l2_skipped = self._l1_clears = self._warmed = 0
        self._sent = self._received = 0
        # Redis health: calls are skipped until _skip_until after a failure.
        self._failing = False
        self._skip_until = 0.0
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._unlogged_errors = 0
        self._logged_at: float | None = None
        # Invalidation sequence: fill() refuses values read before a newer invalidation.
        self._seq = 0
        self._floor = 0
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._reads: Counter[str] = Counter()
        self._count_reads = redis is not None and self._warm_limit > 0
        self._subscribed = False
        self._subscriber_failing = False
        self._running = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # Reading.

    async def get(self, key: str) -> bytes | None:
        self._count_read(key)
        value = self._l1.get(key)
        if value is not None:
            self._l1_hits += 1
            return value
        self._l1_misses += 1
        if self._redis is None:
            return None
        return (await self._fetch([key])).get(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        missing: list[str] = []
        for key in dict.fromkeys(keys):
            self._count_read(key)
            value = self._l1.get(key)
            if value is None:
                self._l1_misses += 1
                missing.append(key)
            else:
                self._l1_hits += 1
                found[key] = value
        if missing and self._redis is not None:
            found.update(await self._fetch(missing))
        return found

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        """Read ``keys`` from L2; what is there also goes into L1."""
        mark = self._seq
        result = await self._pipeline(lambda pipe: pipe.mget([self._entry(k) for k in keys]))
        if result is None:
            return {}
        found: dict[str, bytes] = {}
        for key, value in zip(keys, result[0], strict=True):
            if value is None:
                self._l2_misses += 1
            else:
                self._l2_hits += 1
                found[key] = value
                self._fill_l1(key, value, mark)
        return found

    # Writing.

    async def put_many(self, items: Mapping[str, bytes]) -> bool:
        for key, value in items.items():
            self._l1.put(key, value)
        return await self._store(items)

    async def refresh(self, items: Mapping[str, bytes]) -> bool:
        if not items:
            return True
        # Each value's position, read once: the checks here and in Redis compare by it.
        positions = {key: position_of(value) for key, value in items.items()}
        # Not where this process's L1 already holds a later state: a refresher reads its rows,
        # then writes them, and a read of a later commit may have filled the key in between.
        items = {k: v for k, v in items.items() if not self._later_in_l1(k, positions[k])}
        # This process's L1 takes the new values at once; fills already under way are stale.
        self._forget(items)
        for key, value in items.items():
            self._l1.put(key, value)
        self._sent += len(items)
        refused = await self._store_refresh(items, positions)
        if refused is None:
            return False
        # Redis holds a later state of these (this process's lease may have passed on): this
        # L1 lets its older one go too, and reads the key again.
        for key in refused:
            self._l1.discard(key)
        return True

    def _later_in_l1(self, key: str, value_at: int | None) -> bool:
        held = self._l1.get(key)
        if held is None or value_at is None:
            return False
        held_at = position_of(held)
        return held_at is not None and held_at > value_at

    def mark(self) -> int:
        return self._seq

    async def fill(self, key: str, value: bytes, *, mark: int, shared: bool = True) -> None:
        self._fill_l1(key, value, mark)
        if shared:
            await self._store({key: value}, filling=True)

    async def supersede(
        self, key: str, value: bytes, *, stale: Callable[[bytes], bool], shared: bool = True
    ) -> None:
        held = self._l1.get(key)
        if held is None or stale(held):
            self._l1.put(key, value)
        if not shared or self._redis is None:
            return
        if self._failing and self._clock() < self._skip_until:
            return
        entry = self._entry(key)
        try:
            # Compare and set: a refresh that lands in between wins (WatchError), and what
            # it wrote is at least as new as this value.
            async with self._redis.client.pipeline(transaction=True) as pipe:
                await pipe.watch(entry)
                held = await pipe.get(entry)
                if held is not None and not stale(held):
                    return
                pipe.multi()
                pipe.set(entry, value, px=self._l2_ttl_ms)
                await pipe.execute()
        except WatchError:
            return
        except REDIS_ERRORS as exc:
            self._report_error(exc, "supersede", retry_in=0.0)

    async def invalidate(self, keys: Iterable[str]) -> None:
        await self._drop(keys, from_redis=False)

    async def evict(self, keys: Iterable[str]) -> bool:
        return await self._drop(keys, from_redis=True)

    async def _drop(self, keys: Iterable[str], *, from_redis: bool) -> bool:
        """Drop ``keys`` from this L1 and tell every other process to drop them from theirs,
        and, ``from_redis``, delete them from Redis first; False if Redis failed."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return True
        self._forget(unique)
        self._sent += len(unique)
        if self._redis is None:
            return True
        message = _encode(_Invalidation(self._origin, unique))

        def build(pipe: Any) -> None:
            if from_redis:
                for start in range(0, len(unique), _KEYS_PER_COMMAND):
                    part = unique[start : start + _KEYS_PER_COMMAND]
                    pipe.delete(*[self._entry(k) for k in part])
            # After the DELs: a process that re-reads on this message misses, and asks the
            # database.
            pipe.publish(self._channel, message)

        return await self._pipeline(build) is not None

    @property
    def shared(self) -> bool:
        return self._redis is not None

    async def _store(self, items: Mapping[str, bytes], *, filling: bool = False) -> bool:
        if self._redis is None or not items:
            return True
        ttl_ms = self._fill_ttl_ms if filling else self._l2_ttl_ms

        def build(pipe: Any) -> None:
            for key, value in items.items():
                pipe.set(self._entry(key), value, px=ttl_ms, nx=filling)

        return await self._pipeline(build) is not None

    async def _store_refresh(
        self, items: Mapping[str, bytes], positions: Mapping[str, int | None]
    ) -> list[str] | None:
        """A refresh's write, which never puts an older state over a newer one: the keys
        Redis kept a later state of; None if Redis failed."""
        if self._redis is None or not items:
            return []
        keys = list(items)
        parts = [keys[i : i + _KEYS_PER_SCRIPT] for i in range(0, len(keys), _KEYS_PER_SCRIPT)]

        def build(pipe: Any) -> None:
            for part in parts:
                args: list[Any] = [self._l2_ttl_ms]
                for key in part:
                    at = positions[key]
                    args += [items[key], "" if at is None else at]
                pipe.eval(_REFRESH_SCRIPT, len(part), *map(self._entry, part), *args)
            # After the writes: a process that re-reads on this message finds them.
            pipe.publish(self._channel, _encode(_Invalidation(self._origin, keys)))

        answers = await self._pipeline(build)
        if answers is None:
            return None
        return [
            part[int(i) - 1] for part, refused in zip(parts, answers, strict=False) for i in refused
        ]

    # L1 and invalidations.

    def _fill_l1(self, key: str, value: bytes, mark: int) -> None:
        if self._recent.get(key, self._floor) > mark:
            return  # invalidated since the value was read: it may be older than the cache's
        self._l1.put(key, value)

    def _forget(self, keys: Iterable[str]) -> None:
        self._seq += 1
        for key in keys:
            self._l1.discard(key)
            self._recent[key] = self._seq
            self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_INVALIDATIONS:
            _, seq = self._recent.popitem(last=False)
            self._floor = max(self._floor, seq)

    def _clear_l1(self) -> int:
        self._seq += 1
        self._floor = self._seq
        self._recent.clear()
        self._l1_clears += 1
        return self._l1.clear()

    def _received_invalidation(self, data: bytes) -> None:
        try:
            message = _invalidation.decode(data)
        except msgspec.DecodeError:
            # Not knowing what to drop, drop everything: L1 is only a copy.
            log.warning("cache.invalidation_unreadable", l1_cleared=self._clear_l1())
            return
        if message.origin == self._origin:
            return
        self._forget(message.keys)
        self._received += len(message.keys)

    # Lifecycle: the invalidation subscriber, the hot-key counts, warming.

    async def start(self) -> None:
        """Subscribe to invalidations and start sending the read counts (never fails)."""
        if self._running:
            return
        self._running = True
        self._stopping.clear()
        if self._redis is None:
            return
        self._tasks = [
            asyncio.create_task(self._listen(), name="cache-invalidations"),
            asyncio.create_task(self._flush_periodically(), name="cache-hot-keys"),
        ]

    async def stop(self) -> None:
        """End the subscriber; save the read counts, which ``warm`` ranks by in API processes
        started later."""
        if not self._running:
            return
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._flush_reads()
        if self._redis is not None:
            own = self._shared_key(self._origin.encode())
            await self._pipeline(
                lambda pipe: (pipe.delete(own), pipe.srem(self._shared, self._origin)),
                counted=False,
            )
        self._running = self._subscriber_failing = False

    async def _listen(self) -> None:
        assert self._redis is not None
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        missed = False
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while not self._stopping.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        self._received_invalidation(message["data"])
                    elif message["type"] == "subscribe":
                        self._subscribed = True
                        self._subscriber_failing = False
                        backoff.reset()
                        if missed:
                            log.info("cache.resubscribed", l1_cleared=self._clear_l1())
            except REDIS_ERRORS as exc:
                self._subscriber_failing = missed = True
                pause = backoff.next()
                self._report_error(exc, "subscribe", retry_in=pause)
                await self._pause(pause)
            except Exception:  # a dead subscriber would leave every L1 stale: keep it alive
                self._subscriber_failing = missed = True
                log.exception("cache.subscriber_failed")
                await self._pause(backoff.next())
            finally:
                self._subscribed = False
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    async def _flush_periodically(self) -> None:
        while not self._stopping.is_set():
            await self._pause(self._flush_interval)
            await self._flush_reads()
            await self._share_stats()

    def _own_stats(self) -> ProcessCacheStats:
        return ProcessCacheStats(self._process, self._roles, self._wall_clock(), self.stats())

    def _shared_key(self, origin: bytes) -> bytes:
        # Bytes, as Redis holds the set's members: one that is no UTF-8 still names its key.
        return self._shared.encode() + b":" + origin

    async def _share_stats(self) -> None:
        entry = msgspec.json.encode(self._own_stats())
        # Redis forgets it a few flushes after the last (its clock, not the processes').
        ttl_ms = int(max(10.0, 5 * self._flush_interval) * 1000)
        await self._pipeline(
            lambda pipe: (
                pipe.set(self._shared_key(self._origin.encode()), entry, px=ttl_ms),
                pipe.sadd(self._shared, self._origin),
                pipe.pexpire(self._shared, _SHARED_INDEX_TTL_MS),
            ),
            counted=False,
        )

    async def shared_stats(self) -> list[ProcessCacheStats] | None:
        if self._redis is None:
            return None
        members = await self._pipeline(lambda pipe: pipe.smembers(self._shared), counted=False)
        if members is None:
            return None
        others = sorted(m for m in members[0] if m != self._origin.encode())
        values: list[bytes | None] = []
        if others:
            keys = [self._shared_key(o) for o in others]
            answer = await self._pipeline(lambda pipe: pipe.mget(keys), counted=False)
            if answer is None:
                return None
            values = answer[0]
        shared, gone = [self._own_stats()], []
        for origin, raw in zip(others, values, strict=True):
            if raw is None:
                gone.append(origin)  # its entry expired: stopped, or cut off from Redis
                continue
            try:
                shared.append(msgspec.json.decode(raw, type=ProcessCacheStats))
            except msgspec.DecodeError:
                continue  # not this release's shape: left for its own to expire
        if gone:
            # A process sharing again at this moment is gone from the set until its next share.
            await self._pipeline(lambda pipe: pipe.srem(self._shared, *gone), counted=False)
        return sorted(shared, key=lambda p: p.process)

    def _count_read(self, key: str) -> None:
        # Counted here and sent to Redis about once a second, not once per read.
        if self._count_reads and (key in self._reads or len(self._reads) < _COUNTED_KEYS):
            self._reads[key] += 1

    def _hot_key(self, window: int) -> str:
        return f"{self._hot}:{window}"

    async def _flush_reads(self) -> None:
        if not self._reads:
            return
        reads, self._reads = self._reads, Counter()
        hot = self._hot_key(hot_window(self._wall_clock(), self._hot_window)[0])

        def build(pipe: Any) -> None:
            for key, count in reads.items():
                pipe.zincrby(hot, count, key)
            pipe.zremrangebyrank(hot, 0, -(self._hot_capacity + 1))
            pipe.pexpire(hot, self._hot_ttl_ms)

        await self._pipeline(build)

    async def warm(self) -> int:
        """Make sure the ``warm_keys`` keys read most of late are in L2 and in this L1.

        Bounded work, done once as an API process starts: one pipeline for the ranking, one
        of MGETs, queries (per 500 keys, readings and charts apart) for the keys Redis lacks
        (after a restart of Redis, or an expiry or eviction there), read from the primary
        read database as the refresher reads them, and one pipeline that puts those into L2
        as ``fill`` would (only where L2 has nothing, for ``fill_ttl``: a commit may land
        between the read and the write).
        Without Redis there is nothing to do: the read counts live there, and an L1 filled
        alone would expire ``l1_ttl`` seconds later, before it served much.
        """
        if self._redis is None or not self._warm_limit:
            return 0
        keys = await self._hottest()
        if not keys:
            return 0
        mark = self._seq

        def build(pipe: Any) -> None:
            for start in range(0, len(keys), _KEYS_PER_COMMAND):
                pipe.mget([self._entry(k) for k in keys[start : start + _KEYS_PER_COMMAND]])

        chunks = await self._pipeline(build)
        if chunks is None:
            return 0  # Redis is away: nothing read now could be shared
        values = [value for chunk in chunks for value in chunk]
        cached = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        loaded = await self._load_missing([k for k in keys if k not in cached])
        if loaded:
            await self._store(loaded, filling=True)
        # The coldest first: an L1 smaller than the list keeps the hottest.
        for key in reversed(keys):
            value = cached.get(key) or loaded.get(key)
            if value is not None:
                self._fill_l1(key, value, mark)
        warmed = len(cached) + len(loaded)
        self._warmed += warmed
        log.info(
            "cache.warmed",
            keys=len(keys),
            from_redis=len(cached),
            from_database=len(loaded),
            missing=len(keys) - warmed,
        )
        return warmed

    async def _hottest(self) -> list[str]:
        window, passed = hot_window(self._wall_clock(), self._hot_window)
        last = self._hot_capacity - 1
        ranked = await self._pipeline(
            lambda pipe: (
                pipe.zrevrange(self._hot_key(window), 0, last, withscores=True),
                pipe.zrevrange(self._hot_key(window - 1), 0, last, withscores=True),
            )
        )
        if ranked is None:
            return []
        current, previous = (((k.decode(), float(n)) for k, n in scores) for scores in ranked)
        return rank_hot(current, previous, passed, self._warm_limit)

    async def _load_missing(self, keys: list[str]) -> dict[str, bytes]:
        """The entries of ``keys`` from the primary read database; none if it failed."""
        if not keys or self._load is None:
            return {}
        readings, charts = split_keys(keys)
        try:
            loaded = await self._load(readings, charts)
        except Exception as exc:  # noqa: BLE001 - warming is an optimisation; start-up goes on
            log.warning("cache.warm_failed", keys=len(keys), error=str(exc) or repr(exc))
            return {}
        wanted = set(keys)
        return {k: v for k, v in loaded.items() if k in wanted}

    # Redis, and what happens when it is away.

    def _entry(self, key: str) -> str:
        return self._entry_prefix + key

    async def _pipeline(
        self, build: Callable[[Any], object], *, counted: bool = True
    ) -> list[Any] | None:
        """Run one pipeline; None when Redis failed or is being left alone for a while.

        ``counted=False``: the cache's bookkeeping (its shared counters), which neither
        counts in the L2 counters nor moves the backoff when it fails: those tell how the
        reads and writes of entries fare."""
        if self._redis is None:
            return None
        if self._failing and self._clock() < self._skip_until:
            self._l2_skipped += counted
            return None
        try:
            pipe = self._redis.client.pipeline(transaction=False)
            build(pipe)
            result: list[Any] = await pipe.execute()
        except REDIS_ERRORS as exc:
            if not counted:
                # Tried again at the next flush; the backoff is the entries' calls' to move.
                self._report_error(
                    exc, "shared counters", retry_in=self._flush_interval, counted=False
                )
                return None
            now = self._clock()
            if not self._failing or now >= self._skip_until:
                self._skip_until = now + self._backoff.next()
            self._failing = True
            self._report_error(exc, "command", retry_in=self._skip_until - now)
            return None
        if self._failing and counted:  # the entries' own calls tell when Redis is back
            self._failing = False
            self._backoff.reset()
            self._logged_at = None
            log.info("cache.redis_recovered")
        return result

    def _report_error(
        self, exc: BaseException, operation: str, *, retry_in: float, counted: bool = True
    ) -> None:
        """Count every error (in ``l2_errors`` unless not ``counted``: the bookkeeping's); log
        the first, then at most one line per ``log_interval``."""
        self._l2_errors += counted
        self._unlogged_errors += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self._log_interval:
            log.warning(
                "cache.redis_unavailable",
                operation=operation,
                error=str(exc) or type(exc).__name__,
                errors=self._unlogged_errors,
                retry_in=round(retry_in, 3),
            )
            self._logged_at = now
            self._unlogged_errors = 0

    async def _pause(self, seconds: float) -> None:
        await wait_event(self._stopping, seconds)

    @property
    def degraded(self) -> bool:
        if self._redis is None:
            return False
        return self._failing or self._subscriber_failing

    def stats(self) -> CacheStats:
        return CacheStats(
            l1_hits=self._l1_hits,
            l1_misses=self._l1_misses,
            l1_size=len(self._l1),
            l1_capacity=self._l1.capacity,
            l2_enabled=self._redis is not None,
            l2_hits=self._l2_hits,
            l2_misses=self._l2_misses,
            l2_errors=self._l2_errors,
            l2_skipped=self._l2_skipped,
            degraded=self.degraded,
            subscribed=self._subscribed,
            invalidations_sent=self._sent,
            invalidations_received=self._received,
            l1_clears=self._l1_clears,
            warmed=self._warmed,
        )
