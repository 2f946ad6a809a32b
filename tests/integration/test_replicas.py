"""Read routing against a real streaming hot standby: freshness, lag, min_position, outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.replicas import ReadRouter, ReplicaReadDatabase
from almanac.readmodels import POSITIONS_SCHEMA, SAVE_POSITION, ReadDatabase, projection_position
from tests.integration.support_replica import StreamingPair, require_server_binaries, streaming_pair
from tests.integration.support_waiting import eventually, wait_until

DATABASE = "almanac_read"
NAME = "readings"
MAX_LAG = 10
NOTES_SCHEMA = "CREATE TABLE notes (position BIGINT PRIMARY KEY, body TEXT NOT NULL)"
ADD_NOTE = "INSERT INTO notes (position, body) VALUES (:position, :body)"


@pytest.fixture(scope="module")
def pair() -> Iterator[StreamingPair]:
    """A primary with the read-model tables, and a hot standby streaming from it."""
    require_server_binaries()
    with streaming_pair() as built:
        with psycopg.connect(built.primary.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(built.primary.url(DATABASE)) as conn:
            for statement in [*POSITIONS_SCHEMA["postgres"], NOTES_SCHEMA]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO projection_positions (name, position, updated_at)"
                " VALUES (%s, 0, now())",
                (NAME,),
            )
        wait_until(lambda: _standby_has_tables(built), within=15, what="the tables on the standby")
        yield built


def _standby_has_tables(pair: StreamingPair) -> bool:
    try:
        with psycopg.connect(pair.standby.url(DATABASE), connect_timeout=2) as conn:
            found = conn.execute(
                "SELECT 1 FROM projection_positions WHERE name = %s", (NAME,)
            ).fetchone()
    except psycopg.Error:
        return False
    return found is not None


@pytest.fixture
async def primary(pair: StreamingPair) -> AsyncIterator[PostgresReadDatabase]:
    db = PostgresReadDatabase(pair.primary.url(DATABASE), max_size=2)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def router(pair: StreamingPair, primary: PostgresReadDatabase) -> AsyncIterator[ReadRouter]:
    """A router over the pair, starting from a standby that is up, replaying and caught up."""
    await _restore(pair)
    replica = ReplicaReadDatabase(pair.standby.url(DATABASE), max_size=2, reconnect_timeout=1.0)
    routing = ReadRouter(primary, [replica], max_lag=MAX_LAG, down_for=0.2, max_down_for=1.0)
    await routing.open()
    try:
        await replayed(pair, await advance(primary, 1))
        yield routing
    finally:
        await routing.close()
        # The pair outlives this test: leave it as the next test expects to find it.
        await _restore(pair)


async def _restore(pair: StreamingPair) -> None:
    if not pair.standby.running:
        await asyncio.to_thread(pair.standby.start)
    await _on_standby(pair, "SELECT pg_wal_replay_resume()")


async def _on_standby(pair: StreamingPair, sql: str) -> object:
    async with await psycopg.AsyncConnection.connect(
        pair.standby.url(DATABASE), autocommit=True, connect_timeout=5
    ) as conn:
        row = await (await conn.execute(sql)).fetchone()
        return None if row is None else row[0]


async def advance(primary: ReadDatabase, by: int) -> int:
    """Project ``by`` more positions on the primary, a note for the last; return it."""
    position = await projection_position(primary, NAME) + by
    await primary.write(
        [
            (ADD_NOTE, [{"position": position, "body": f"note {position}"}]),
            (
                SAVE_POSITION,
                [{"name": NAME, "position": position, "updated_at": datetime.now(UTC)}],
            ),
        ]
    )
    return position


async def replayed(pair: StreamingPair, position: int) -> None:
    """Wait until the standby's copy of the read model has reached ``position``."""

    async def standby_there() -> bool:
        try:
            reached = await _on_standby(
                pair, f"SELECT position FROM projection_positions WHERE name = '{NAME}'"
            )
        except psycopg.Error:
            return False
        return isinstance(reached, int) and reached >= position

    await eventually(standby_there, within=15, what=f"the standby replaying position {position}")


async def pause_replay(pair: StreamingPair) -> None:
    await _on_standby(pair, "SELECT pg_wal_replay_pause()")

    async def paused() -> bool:
        return await _on_standby(pair, "SELECT pg_get_wal_replay_pause_state()") == "paused"

    await eventually(paused, within=10, what="the standby's replay paused")


async def served_by_standby(router: ReadRouter, min_position: int | None = None) -> bool:
    """Route one read and tell whether a standby answered it."""
    source = await router.source(min_position)
    row = await source.fetch_one("SELECT pg_is_in_recovery() AS standby", {})
    assert row is not None
    return bool(row["standby"])


async def test_reads_without_min_position_go_to_a_replica_that_has_caught_up(
    pair: StreamingPair, primary: PostgresReadDatabase, router: ReadRouter
) -> None:
    position = await advance(primary, 3)
    await replayed(pair, position)
    await router.refresh()

    assert [await served_by_standby(router) for _ in range(3)] == [True, True, True]
    source = await router.source()
    assert await source.fetch_one(
        "SELECT body FROM notes WHERE position = :position", {"position": position}
    ) == {"body": f"note {position}"}
    _, replica = router.stats()
    assert replica.healthy and replica.position == position and replica.lag == 0
    assert replica.routed == 4


async def test_a_paused_replica_serves_only_what_it_has_and_is_skipped_beyond_max_lag(
    pair: StreamingPair, primary: PostgresReadDatabase, router: ReadRouter
) -> None:
    held = await advance(primary, 1)
    await replayed(pair, held)
    await pause_replay(pair)
    ahead = await advance(primary, 3)
    await router.refresh()

    assert await served_by_standby(router)  # 3 behind, within max_lag
    assert await served_by_standby(router, min_position=held)
    assert not await served_by_standby(router, min_position=ahead)
    assert not await served_by_standby(router, min_position=held + 1)

    beyond = await advance(primary, MAX_LAG + 5)

    async def routed_to_primary() -> bool:
        return not await served_by_standby(router)

    await eventually(routed_to_primary, within=5, what="reads leaving the lagging standby")
    _, replica = router.stats()
    assert replica.healthy and replica.position == held and replica.lag == beyond - held

    await _on_standby(pair, "SELECT pg_wal_replay_resume()")
    await eventually(
        lambda: served_by_standby(router), within=10, what="reads back on the resumed standby"
    )
    assert await served_by_standby(router, min_position=beyond)


async def test_falls_back_to_the_primary_without_errors_while_the_replica_is_down(
    pair: StreamingPair, primary: PostgresReadDatabase, router: ReadRouter
) -> None:
    position = await advance(primary, 1)
    await replayed(pair, position)
    await router.refresh()
    assert await served_by_standby(router)

    await asyncio.to_thread(pair.standby.stop)

    answers = [await served_by_standby(router) for _ in range(10)]
    assert not any(answers), "a stopped standby cannot have answered"
    source = await router.source()
    assert await source.fetch_one(
        "SELECT body FROM notes WHERE position = :position", {"position": position}
    ) == {"body": f"note {position}"}
    _, replica = router.stats()
    assert not replica.healthy

    await asyncio.to_thread(pair.standby.start)
    await eventually(
        lambda: served_by_standby(router), within=15, what="reads back on the restarted standby"
    )
    _, replica = router.stats()
    assert replica.healthy
