"""The read router's choice of source, against in-memory stand-ins for the databases."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.adapters.replicas import ReadRouter, ReplicaReadDatabase
from almanac.errors import Unavailable
from almanac.readmodels import Row, Write
from tests.factories import Clock

MAX_LAG = 10
# Long enough for an answering fake, short enough to keep a hung one from slowing the suite.
TIMEOUT = 0.05


class FakeSource:
    """A read database that knows its projection position and tells who answered a read."""

    dialect: Literal["postgres"] = "postgres"

    def __init__(self, name: str, position: int = 0, **others: int) -> None:
        self.name = name
        self.url = f"postgresql://app:s3cret@{name}:5432/read"
        # ``readings``' position; ``others`` are further projections' positions.
        self.position = position
        self.others = others
        self.failure: Exception | None = None
        self.hangs = False
        # While set and not yet opened, position reads wait: a refresh held in flight.
        self.gate: asyncio.Event | None = None
        self.position_reads = 0
        self.reads = 0
        self.writes: list[Sequence[Write]] = []
        self.opened = self.closed = False

    async def _answer(self) -> None:
        if self.hangs:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        await self._answer()
        self.reads += 1
        return {"served_by": self.name}

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        if "projection_positions" in sql:
            self.position_reads += 1
            if self.gate is not None:
                await self.gate.wait()
            await self._answer()
            positions = {"readings": self.position, **self.others}
            return [{"name": name, "position": at} for name, at in positions.items()]
        row = await self.fetch_one(sql, params)
        return [] if row is None else [row]

    async def write(self, writes: Sequence[Write]) -> None:
        self.writes.append(writes)

    async def migrate(self, statements: Sequence[str]) -> None:
        return None

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    async def ping(self) -> None:
        await self._answer()


def make_router(
    primary: FakeSource, *replicas: FakeSource, clock: Clock | None = None, **options: Any
) -> ReadRouter:
    options.setdefault("max_lag", MAX_LAG)
    return ReadRouter(
        primary,
        list(replicas),
        timeout=TIMEOUT,
        down_for=1.0,
        max_down_for=4.0,
        clock=clock or Clock(),
        **options,
    )


async def served_by(
    router: ReadRouter,
    min_position: int | None = None,
    projections: tuple[str, ...] = ("readings",),
) -> str:
    row = await (await router.source(min_position, projections)).fetch_one("SELECT who", {})
    assert row is not None
    return str(row["served_by"])


async def test_reads_go_to_the_primary_when_there_are_no_replicas() -> None:
    primary = FakeSource("primary", 50)
    router = make_router(primary)

    assert await router.source() is primary
    assert await router.source(min_position=50) is primary


async def test_reads_go_to_a_replica_within_max_lag_of_the_primary() -> None:
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 100 - MAX_LAG))

    assert await served_by(router) == "replica"


async def test_a_replica_further_behind_than_max_lag_is_skipped() -> None:
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 99 - MAX_LAG))

    assert await served_by(router) == "primary"


async def test_max_lag_of_zero_uses_only_replicas_level_with_the_primary() -> None:
    replica = FakeSource("replica", 100)
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock, max_lag=0)
    assert await served_by(router) == "replica"

    replica.position = 99
    await router.refresh()
    assert await served_by(router) == "primary"


async def test_min_position_above_every_replica_routes_to_the_primary() -> None:
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 95))

    assert await served_by(router, min_position=96) == "primary"


async def test_min_position_at_or_below_a_replica_position_may_be_served_by_it() -> None:
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 95))

    assert await served_by(router, min_position=95) == "replica"
    assert await served_by(router, min_position=1) == "replica"


async def test_min_position_above_a_cached_position_refreshes_once_before_deciding() -> None:
    replica = FakeSource("replica", 95)
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock)
    await router.refresh()
    replica.position = 100  # it has caught up since the cache was filled
    clock.advance(0.02)  # past the forced-refresh spacing, within the refresh interval

    assert await served_by(router, min_position=100) == "replica"
    assert replica.position_reads == 2


async def test_reads_needing_more_than_any_replica_has_do_not_refresh_on_every_request() -> None:
    replica = FakeSource("replica", 95)
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock)
    await router.refresh()
    clock.advance(0.02)

    for _ in range(20):
        assert await served_by(router, min_position=100) == "primary"
    assert replica.position_reads == 2


async def test_reads_are_spread_round_robin_among_the_eligible_replicas() -> None:
    router = make_router(
        FakeSource("primary", 100),
        FakeSource("a", 100),
        FakeSource("lagging", 50),
        FakeSource("b", 95),
    )

    assert [await served_by(router) for _ in range(6)] == ["a", "b"] * 3


async def test_positions_are_read_once_per_refresh_interval_not_per_request() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    clock = Clock()
    router = make_router(primary, replica, clock=clock, refresh_interval=0.1)

    for _ in range(50):
        await served_by(router)
        clock.advance(0.001)
    assert (primary.position_reads, replica.position_reads) == (1, 1)


async def test_a_stale_cache_starts_one_background_refresh_and_reads_do_not_wait_for_it() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    clock = Clock()
    router = make_router(primary, replica, clock=clock, refresh_interval=0.1)
    await router.refresh()
    clock.advance(0.1)
    replica.gate = asyncio.Event()  # the next position read stays in flight

    answers = await asyncio.gather(*(served_by(router) for _ in range(20)))
    assert answers == ["replica"] * 20
    assert replica.position_reads == 2, "one refresh in flight for all twenty reads"

    replica.position = 90
    replica.gate.set()
    await router.refresh()  # joins the refresh in flight
    assert replica.position_reads == 2
    assert router.stats()[1].position == 90


async def test_a_read_naming_a_min_position_waits_for_fresh_positions_when_they_are_old() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    clock = Clock()
    router = make_router(primary, replica, clock=clock, refresh_interval=0.1)
    await router.refresh()
    # Rebuilt in place meanwhile: the primary's copy is back at 105, the replica's at 40.
    primary.position, replica.position = 105, 40
    clock.advance(0.1)
    assert await served_by(router, min_position=100) == "primary"
    assert router.stats()[1].position == 40


async def test_concurrent_first_reads_share_one_refresh() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)

    answers = await asyncio.gather(*(served_by(router) for _ in range(20)))
    assert answers == ["replica"] * 20
    assert (primary.position_reads, replica.position_reads) == (1, 1)


async def test_a_failing_replica_is_set_aside_until_its_backoff_has_passed() -> None:
    replica = FakeSource("replica", 100)
    replica.failure = Unavailable("connection refused")
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock)

    assert await served_by(router) == "primary"
    assert not router.stats()[1].healthy
    replica.failure = None
    clock.advance(0.5)  # a refresh is due, the replica's backoff (1 s) is not over
    await router.refresh()
    assert replica.position_reads == 1
    assert await served_by(router) == "primary"

    clock.advance(0.5)
    await router.refresh()
    assert replica.position_reads == 2
    assert router.stats()[1].healthy
    assert await served_by(router) == "replica"


async def test_backoff_doubles_with_each_failure_up_to_the_maximum() -> None:
    replica = FakeSource("replica", 100)
    replica.failure = Unavailable("connection refused")
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock)
    await router.refresh()
    probed_after = []
    # Backoffs of 1, 2, 4 then 4 s (the maximum): probes at 1, 3, 7 and 11 s.
    for _ in range(120):
        clock.advance(0.1)
        before = replica.position_reads
        await router.refresh()
        if replica.position_reads > before:
            probed_after.append(round(clock.now - 1000.0, 1))

    assert probed_after == [1.0, 3.0, 7.0, 11.0]


async def test_a_replica_that_does_not_answer_within_the_timeout_is_set_aside() -> None:
    replica = FakeSource("replica", 100)
    replica.hangs = True
    router = make_router(FakeSource("primary", 100), replica)

    assert await served_by(router) == "primary"
    assert not router.stats()[1].healthy
    await router.close()


async def test_a_read_that_fails_on_the_replica_is_answered_by_the_primary() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)
    source = await router.source()
    replica.failure = Unavailable("the replica went away")

    row = await source.fetch_one("SELECT who", {})
    rows = await source.fetch_all("SELECT who", {})

    assert row == {"served_by": "primary"}
    assert rows == [{"served_by": "primary"}]
    assert not router.stats()[1].healthy
    assert await served_by(router) == "primary"


async def test_a_read_that_hangs_on_the_replica_is_answered_by_the_primary_within_the_timeout() -> (
    None
):
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)
    source = await router.source()
    replica.hangs = True

    row = await asyncio.wait_for(source.fetch_one("SELECT who", {}), timeout=TIMEOUT * 20)

    assert row == {"served_by": "primary"}
    assert not router.stats()[1].healthy
    await router.close()


async def test_a_read_cancelled_by_a_recovery_conflict_moves_to_the_primary_alone() -> None:
    """The standby cancelled the query to apply WAL: it is working, so it stays in use."""
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)
    source = await router.source()
    conflict = psycopg.errors.SerializationFailure("conflict with recovery")
    replica.failure = Unavailable("the read database is not answering")
    replica.failure.__cause__ = conflict

    assert await source.fetch_one("SELECT who", {}) == {"served_by": "primary"}
    assert router.stats()[1].healthy


async def test_an_error_in_the_query_itself_is_not_retried_on_the_primary() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)
    source = await router.source()
    replica.failure = ValueError("bad query")

    with pytest.raises(ValueError, match="bad query"):
        await source.fetch_one("SELECT who", {})
    assert primary.reads == 0
    assert router.stats()[1].healthy


async def test_many_reads_failing_at_once_count_as_one_failure() -> None:
    replica = FakeSource("replica", 100)
    clock = Clock()
    router = make_router(FakeSource("primary", 100), replica, clock=clock)
    sources = [await router.source() for _ in range(10)]
    replica.failure = Unavailable("the replica went away")

    await asyncio.gather(*(s.fetch_one("SELECT who", {}) for s in sources))
    replica.failure = None
    clock.advance(1.0)  # the first backoff, not one doubled ten times
    await router.refresh()

    assert router.stats()[1].healthy


async def test_writes_through_a_routed_replica_go_to_the_primary() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)
    source = await router.source()
    write = ("INSERT INTO t VALUES (:x)", [{"x": 1}])

    await source.write([write])

    assert primary.writes == [[write]]
    assert replica.writes == []


async def test_reads_go_to_the_primary_until_the_primary_position_is_known() -> None:
    primary = FakeSource("primary", 100)
    primary.failure = Unavailable("starting")
    router = make_router(primary, FakeSource("replica", 100))

    assert await router.source() is primary


async def test_the_last_known_primary_position_still_bounds_lag_while_the_primary_is_down() -> None:
    primary = FakeSource("primary", 100)
    fresh, stale = FakeSource("fresh", 100), FakeSource("stale", 50)
    clock = Clock()
    router = make_router(primary, fresh, stale, clock=clock)
    await router.refresh()
    primary.failure = Unavailable("down")
    clock.advance(0.2)
    await router.refresh()

    assert not router.stats()[0].healthy
    assert {await served_by(router) for _ in range(4)} == {"fresh"}


async def test_applied_position_is_the_replicas_cached_position_and_none_for_the_primary() -> None:
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 97))

    assert router.applied_position(await router.source()) == 97
    assert router.applied_position(await router.source(min_position=100)) is None


async def test_each_read_is_routed_by_the_positions_of_the_projections_it_names() -> None:
    """A replica level in readings but far behind in batches serves readings, not batches."""
    router = make_router(
        FakeSource("primary", 100, batches=500),
        FakeSource("replica", 100, batches=500 - MAX_LAG - 1),
    )

    assert await served_by(router) == "replica"
    assert await served_by(router, projections=("batches",)) == "primary"
    assert await served_by(router, projections=("readings", "batches")) == "primary"


async def test_a_read_of_several_projections_needs_the_replica_fresh_in_every_one() -> None:
    router = make_router(
        FakeSource("primary", 100, batches=50),
        FakeSource("lags_readings", 80, batches=50),
        FakeSource("fresh", 95, batches=45),
    )

    assert {await served_by(router, projections=("readings", "batches")) for _ in range(4)} == {
        "fresh"
    }
    # min_position applies to each projection named: 'fresh' has batches only at 45.
    assert await served_by(router, 48, projections=("readings", "batches")) == "primary"


async def test_a_projection_the_replica_has_no_row_for_counts_as_position_zero() -> None:
    router = make_router(
        FakeSource("primary", 100, webhook_endpoints=3), FakeSource("replica", 100)
    )

    assert await served_by(router, projections=("webhook_endpoints",)) == "replica"
    assert await served_by(router, 1, projections=("webhook_endpoints",)) == "primary"


async def test_applied_position_is_the_lowest_of_the_projections_the_read_named() -> None:
    router = make_router(
        FakeSource("primary", 100, batches=90), FakeSource("replica", 97, batches=88)
    )

    assert router.applied_position(await router.source(projections=("readings", "batches"))) == 88
    assert router.applied_position(await router.source(projections=("readings",))) == 97


async def test_stats_mask_passwords_and_report_position_lag_health_and_routed_counts() -> None:
    down = FakeSource("down", 100)
    down.failure = Unavailable("connection refused")
    router = make_router(FakeSource("primary", 100), FakeSource("replica", 96), down)
    for _ in range(3):
        await router.source()
    await router.source(min_position=100)

    primary, replica, unreachable = router.stats()
    assert (primary.role, primary.position, primary.lag, primary.healthy, primary.routed) == (
        "primary",
        100,
        None,
        True,
        1,
    )
    assert (replica.role, replica.position, replica.lag, replica.healthy, replica.routed) == (
        "replica",
        96,
        4,
        True,
        3,
    )
    assert (unreachable.position, unreachable.lag, unreachable.healthy) == (None, None, False)
    assert (replica.positions, replica.lags) == ({"readings": 96}, {"readings": 4})
    assert replica.url == "postgresql://app:***@replica:5432/read"
    assert all("s3cret" not in s.url for s in router.stats())


async def test_open_and_close_act_on_the_replicas_only() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    router = make_router(primary, replica)

    await router.open()
    await router.close()

    assert (replica.opened, replica.closed) == (True, True)
    assert (primary.opened, primary.closed) == (False, False)


async def test_ping_passes_while_the_primary_answers_though_every_replica_is_down() -> None:
    replica = FakeSource("replica", 100)
    replica.failure = Unavailable("connection refused")
    router = make_router(FakeSource("primary", 100), replica)

    await router.ping()


async def test_ping_raises_unavailable_when_no_source_can_serve_reads() -> None:
    primary, replica = FakeSource("primary", 100), FakeSource("replica", 100)
    for source in (primary, replica):
        source.failure = Unavailable("connection refused")
    router = make_router(primary, replica)

    with pytest.raises(Unavailable, match="no read database"):
        await router.ping()


def test_refuses_a_negative_max_lag() -> None:
    with pytest.raises(ValueError, match="max_lag"):
        ReadRouter(FakeSource("primary"), [], max_lag=-1)


async def test_a_replica_database_refuses_writes_and_migrations() -> None:
    replica = ReplicaReadDatabase("postgresql://app:s3cret@standby:5432/read")

    with pytest.raises(RuntimeError, match="read-only") as refused:
        await replica.write([("INSERT INTO t VALUES (1)", [{}])])
    assert "s3cret" not in str(refused.value)
    with pytest.raises(RuntimeError, match="read-only"):
        await replica.migrate(["CREATE TABLE t (x INT)"])


@given(
    primary_position=st.integers(0, 1000),
    replicas=st.lists(st.tuples(st.integers(0, 1000), st.booleans()), max_size=4),
    max_lag=st.integers(0, 200),
    min_position=st.none() | st.integers(0, 1000),
)
def test_a_read_goes_to_a_replica_only_when_it_is_healthy_and_fresh_enough(
    primary_position: int,
    replicas: list[tuple[int, bool]],
    max_lag: int,
    min_position: int | None,
) -> None:
    """Whatever the positions: a replica serves only at or past both the lag floor and
    ``min_position``, and the primary serves only when no replica is such."""

    async def scenario() -> None:
        fakes = []
        for index, (position, healthy) in enumerate(replicas):
            fake = FakeSource(f"r{index}", position)
            fake.failure = None if healthy else Unavailable("down")
            fakes.append(fake)
        router = make_router(FakeSource("primary", primary_position), *fakes, max_lag=max_lag)
        floor = max(min_position or 0, primary_position - max_lag)
        fit = {f.name for f in fakes if f.failure is None and f.position >= floor}

        for _ in range(len(replicas) + 1):
            who = await served_by(router, min_position)
            assert who in fit if fit else who == "primary"

    asyncio.run(scenario())
