"""The projection runner under trouble: poison events, schema changes, rivals, lost connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from almanac.adapters.leadership import FileLease, Lease, PostgresLease
from almanac.adapters.postgres import PostgresReadDatabase
from almanac.eventstore import EventStore, RecordedEvent
from almanac.readmodels import PositionWatch, ReadDatabase, Write, projection_position
from almanac.settings import ProjectionSettings, Settings
from projections.readings import ReadingsProjection
from projections.runner import ProjectionRunner
from projections.status import (
    REQUEST,
    ProjectionStatus,
    open_parking,
    projection_status,
    schema_version,
)
from tests.conftest import services_settings
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_eventlog import whole_log
from tests.integration.support_projection import (
    ALL_ROWS,
    NAME,
    PoisonedProjection,
    log_feed,
    normalised,
    project_everything,
    projecting,
    request,
    secondary_indexes,
    watch_of,
    write_history,
)
from tests.integration.support_replica import Server, private_server, require_server_binaries
from tests.integration.support_waiting import eventually

QUICK = ProjectionSettings(attempts=3, standby_interval=0.05)


@pytest.fixture
def services_only(postgres_url: str) -> Settings:
    """The services profile alone: what these tests break exists only on Postgres."""
    return services_settings(postgres_url)


@asynccontextmanager
async def supervised(
    settings: Settings,
    tmp_path: Path,
    store: EventStore,
    *,
    lease: Callable[[ReadDatabase], Lease] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[ReadDatabase, ProjectionRunner, PositionWatch]]:
    """A fresh read database with a runner following ``store`` into it."""
    async with (
        fresh_read_database(settings, tmp_path) as db,
        log_feed(store) as feed,
        projecting(
            feed, db, lease=None if lease is None else lease(db), settings=QUICK, **options
        ) as (runner, watch),
    ):
        yield db, runner, watch


def lease_for(db: ReadDatabase, tmp_path: Path, name: str) -> Lease:
    """A lease of the profile: an advisory lock in the read database, or a lock file."""
    if isinstance(db, PostgresReadDatabase):
        return PostgresLease(db.url, name)
    return FileLease(tmp_path / f"{name}.lock")


async def rebuilt_rows(
    store: EventStore, settings: Settings, tmp_path: Path
) -> list[dict[str, object]]:
    async with fresh_read_database(settings, tmp_path) as fresh:
        await project_everything(store, fresh)
        return normalised(await fresh.fetch_all(ALL_ROWS, {}))


async def reached(runner: ProjectionRunner, position: int) -> None:
    """Wait until ``runner`` itself has committed ``position`` (not another runner)."""

    async def there() -> bool:
        return runner.state == "running" and runner.position >= position

    await eventually(there, what=f"the runner reaches position {position}")


async def shown(db: ReadDatabase, state: str, *, head: int) -> ProjectionStatus:
    """The projection's status once it shows ``state``."""

    async def showing() -> ProjectionStatus | None:
        status = await projection_status(db, NAME, head=head)
        return status if status.state == state else None

    return await eventually(showing, what=f"the status shows {state}")


async def parked_at(db: ReadDatabase, position: int) -> dict[str, Any]:
    async def parked() -> dict[str, Any] | None:
        row = await open_parking(db, NAME)
        return dict(row) if row is not None and row["position"] == position else None

    return await eventually(parked, what=f"the event at {position} is parked")


@asynccontextmanager
async def parked_on_the_eighth_event(
    settings: Settings, tmp_path: Path, poisoned: type[PoisonedProjection] = PoisonedProjection
) -> AsyncIterator[tuple[ReadDatabase, ProjectionRunner, list[RecordedEvent], dict[str, Any]]]:
    """A runner over a fresh history in batches of 5, parked at its eighth event: the read
    database, the runner, the log and the parking."""
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        poison = poisoned(poisoned_position=events[7].position)
        async with supervised(settings, tmp_path, store, batch_size=5, projection=poison) as (
            db,
            runner,
            _,
        ):
            parked = await parked_at(db, events[7].position)
            # The parking is written a moment before the state that shows it.
            await shown(db, "parked", head=events[-1].position)
            assert runner.state == "parked"
            yield db, runner, events, parked
        # The batch, then the event alone (and, where folding fails, the fold as it was read).
        extra = 1 if poisoned is FailingFold else 0
        assert poison.poison_attempts == 2 * QUICK.attempts + extra
    finally:
        store.close()


async def test_a_poison_event_is_retried_then_parked_after_the_events_before_it(
    settings: Settings, tmp_path: Path
) -> None:
    async with parked_on_the_eighth_event(settings, tmp_path) as (db, runner, events, parked):
        status = await projection_status(db, NAME, head=events[-1].position)
        # The events before the poison, also those of its own batch, are committed.
        assert runner.position == events[6].position
        assert await projection_position(db, NAME) == events[6].position
        rows = await db.fetch_all(ALL_ROWS, {})
    assert parked["event_type"] == events[7].type
    assert parked["aggregate_id"] == str(events[7].aggregate_id)
    assert "no_such_table" in parked["error"]
    assert status.state == "parked"
    assert status.lag == events[-1].position - events[6].position
    assert [p.position for p in status.parked] == [events[7].position]
    assert {str(row["id"]) for row in rows} == {str(e.aggregate_id) for e in events[:7]}
    assert max(int(row["position"]) for row in rows) <= events[6].position


class FailingFold(PoisonedProjection):
    """Raises while folding the poisoned event, as a decode error would, instead of failing
    at the database."""

    def handle(self, event: RecordedEvent) -> list[Write]:
        if event.position == self.poisoned and not self.healed:
            self.poison_attempts += 1
            raise ValueError("cannot make sense of this event")
        return self.inner.handle(event)


async def test_an_event_the_projection_cannot_fold_is_parked_too(
    settings: Settings, tmp_path: Path
) -> None:
    """Folding runs as the batch is read; its failure must still end in a parking."""
    async with parked_on_the_eighth_event(settings, tmp_path, FailingFold) as (
        db,
        _,
        events,
        parked,
    ):
        position = await projection_position(db, NAME)
    assert "cannot make sense of this event" in parked["error"]
    assert position == events[6].position


async def test_indexes_a_runner_left_unbuilt_are_built_by_its_successor_once_caught_up(
    settings: Settings, tmp_path: Path
) -> None:
    async with parked_on_the_eighth_event(settings, tmp_path) as (db, first, events, _):
        indexes_while_parked = await secondary_indexes(db)
        first.stop()
        await ask(db, events[7].position, "skip")
        successor = ProjectionRunner(
            ReadingsProjection(), first.feed, db, first.watch, settings=QUICK
        )
        await successor.prepare()
        indexes_after_prepare = await secondary_indexes(db)
        task = asyncio.create_task(successor.run())
        try:
            await asyncio.wait_for(successor.caught_up.wait(), timeout=20)
            indexes_once_caught_up = await secondary_indexes(db)
        finally:
            successor.stop()
            await asyncio.wait_for(task, timeout=10)
    assert indexes_while_parked == set(), "deferred until the runner has caught up"
    assert indexes_after_prepare == set(), "only the active runner builds indexes"
    assert indexes_once_caught_up == {"readings_owner_order", "readings_order"}


async def ask(db: ReadDatabase, position: int, what: str) -> None:
    await db.write([(REQUEST, [{"name": NAME, "position": position, "request": what}])])


async def test_a_parked_event_retried_after_a_fix_lets_the_projection_finish(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        poisoned = events[len(events) // 2].position
        poison = PoisonedProjection(poisoned_position=poisoned)
        end = events[-1].position
        async with supervised(settings, tmp_path, store, batch_size=4, projection=poison) as (
            db,
            runner,
            _,
        ):
            await parked_at(db, poisoned)
            poison.healed = True
            await ask(db, poisoned, "retry")
            await reached(runner, end)
            rows = normalised(await db.fetch_all(ALL_ROWS, {}))
            # The runner's state changes a moment before the row that shows it.
            status = await shown(db, "running", head=end)
        assert rows == await rebuilt_rows(store, settings, tmp_path)
    finally:
        store.close()
    assert [(p.position, p.resolution) for p in status.parked] == [(poisoned, "retried")]


async def test_a_retried_event_that_fails_again_is_parked_again(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        poisoned = events[3].position
        poison = PoisonedProjection(poisoned_position=poisoned)
        async with supervised(settings, tmp_path, store, projection=poison) as (db, runner, _):
            first = await parked_at(db, poisoned)
            await ask(db, poisoned, "retry")

            async def parked_twice() -> dict[str, Any] | None:
                row = await open_parking(db, NAME)
                return dict(row) if row and row["attempts"] > first["attempts"] else None

            again = await eventually(parked_twice, what="the event is parked again")
            assert runner.position == events[2].position
    finally:
        store.close()
    assert again["attempts"] == 2 * first["attempts"]
    assert again["request"] is None


async def test_a_skipped_event_is_recorded_and_the_projection_moves_on(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        # A reading's first event: skipping it leaves that reading out of the read model.
        skipped = next(e for e in events[4:] if e.type == "reading.requested")
        poison = PoisonedProjection(poisoned_position=skipped.position)
        end = events[-1].position
        async with supervised(settings, tmp_path, store, projection=poison) as (db, runner, _):
            await parked_at(db, skipped.position)
            await ask(db, skipped.position, "skip")
            await reached(runner, end)
            rows = await db.fetch_all(ALL_ROWS, {})
            status = await projection_status(db, NAME, head=end)
    finally:
        store.close()
    ids = {str(row["id"]) for row in rows}
    assert ids == {str(e.aggregate_id) for e in events} - {str(skipped.aggregate_id)}
    assert [(p.position, p.resolution) for p in status.parked] == [(skipped.position, "skipped")]
    assert status.lag == 0


class ReshapedReadings(ReadingsProjection):
    """The readings projection in a new version (as after a change of its tables)."""

    version = ReadingsProjection.version + 1


async def test_a_new_schema_version_rebuilds_the_tables_from_position_zero(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        async with fresh_read_database(settings, tmp_path) as db:
            end = await project_everything(store, db)
            before = normalised(await db.fetch_all(ALL_ROWS, {}))
            # A change no event explains: only a rebuild from scratch undoes it.
            stale = [{"id": before[0]["id"]}]
            await db.write([("UPDATE readings SET label = 'stale' WHERE id = :id", stale)])
            # A query here saw the old tables at ``end`` a moment ago.
            watch = watch_of(db)
            assert await watch.wait_for(NAME, end, timeout=5) == end
            async with (
                log_feed(store) as feed,
                projecting(
                    feed, db, projection=ReshapedReadings(), settings=QUICK, watch=watch
                ) as (runner, _),
            ):

                async def rebuilt() -> bool:
                    # Never more than the tables hold, at any moment of the rebuild: the
                    # watch is read between two reads of the tracking row, one of which
                    # may come just before the rebuild starts again from 0 (the old tables
                    # held what the watch said until then).
                    before = await projection_position(db, NAME)
                    said = await watch.wait_for(NAME, end, timeout=0)
                    assert said <= max(before, await projection_position(db, NAME))
                    return said == end and runner.caught_up.is_set()

                await eventually(rebuilt, within=30, what="the rebuild caught up")
                await reached(runner, end)
                after = normalised(await db.fetch_all(ALL_ROWS, {}))
            assert await schema_version(db, NAME) == ReadingsProjection.version + 1
    finally:
        store.close()
    assert after == before


async def test_one_runner_leads_and_a_standby_takes_over_when_it_stops(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    name = f"projection:test:{uuid.uuid4().hex[:8]}"

    def lease(db: ReadDatabase) -> Lease:
        return lease_for(db, tmp_path, name)

    try:
        await write_history(store)
        async with supervised(settings, tmp_path, store, lease=lease) as (db, first, _):
            await reached(first, await store.max_position())
            async with (
                log_feed(store) as feed,
                projecting(feed, db, lease=lease(db), settings=QUICK) as (second, _),
            ):

                async def standing_by() -> bool:
                    return second.state == "standby"

                await eventually(standing_by, what="the second runner waits as a standby")
                assert first.state == "running"
                first.stop()
                for i in range(5):
                    end = await store.append(request(label=f"late {i}"))
                await reached(second, end)
            rows = normalised(await db.fetch_all(ALL_ROWS, {}))
        assert rows == await rebuilt_rows(store, settings, tmp_path)
    finally:
        store.close()


def _terminate(admin_url: str, databases: list[str], application: str | None = None) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        query = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()"
        )
        params: list[object] = [databases]
        if application is not None:
            query += " AND application_name LIKE %s"
            params.append(f"{application}%")
        row = conn.execute(query, params).fetchone()
        return 0 if row is None else int(row[0])


def _lock_holders(admin_url: str, database: str) -> set[int]:
    """The sessions of ``database`` holding an advisory lock."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = %s",
            (database,),
        ).fetchall()
        return {int(row[0]) for row in rows}


def _admin_url(url: str) -> str:
    return urlsplit(url)._replace(path="/postgres").geturl()


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _postgres_lease(db: ReadDatabase) -> Lease:
    assert isinstance(db, PostgresReadDatabase)
    return PostgresLease(db.url, f"projection:test:{uuid.uuid4().hex[:8]}")


async def test_a_lost_lease_connection_is_noticed_and_the_lease_taken_again(
    services_only: Settings, tmp_path: Path
) -> None:
    settings = services_only
    store = EventStore(settings)
    try:
        await write_history(store)
        async with supervised(settings, tmp_path, store, lease=_postgres_lease) as (
            db,
            runner,
            _,
        ):
            await reached(runner, await store.max_position())
            assert isinstance(db, PostgresReadDatabase)
            admin, database = _admin_url(db.url), _dbname(db.url)
            first_holders = _lock_holders(admin, database)
            assert len(first_holders) == 1
            killed = _terminate(admin, [database], "almanac-lease")
            assert killed == 1
            for i in range(5):
                end = await store.append(request(label=f"after {i}"))

            async def lease_taken_again() -> bool:
                # Asked of the server, not of the lease: a check through the lease itself
                # would be the one to notice the loss, in the runner's stead.
                holders = _lock_holders(admin, database)
                return len(holders) == 1 and not holders & first_holders

            await eventually(lease_taken_again, what="a new lease connection holds the lock")
            await reached(runner, end)
            rows = normalised(await db.fetch_all(ALL_ROWS, {}))
        assert rows == await rebuilt_rows(store, settings, tmp_path)
    finally:
        store.close()


async def test_the_runner_resumes_after_every_connection_is_dropped(
    services_only: Settings, tmp_path: Path
) -> None:
    """As after a database restart: the log's LISTEN, the read pool and the lease all drop."""
    settings = services_only
    assert settings.store.postgres_url is not None
    event_url = settings.store.postgres_url

    async def drop_every_connection(db: ReadDatabase) -> None:
        assert isinstance(db, PostgresReadDatabase)
        killed = _terminate(_admin_url(event_url), [_dbname(event_url), _dbname(db.url)])
        assert killed >= 2, "the lease and the LISTEN connection at least"

    await survives(settings, tmp_path, drop_every_connection, rounds=3)


async def survives(
    settings: Settings,
    tmp_path: Path,
    trouble: Callable[[ReadDatabase], Awaitable[None]],
    *,
    rounds: int,
) -> None:
    """A leading runner over a history meets ``trouble`` ``rounds`` times, with six new
    readings after each: it reaches each end, and its rows equal a rebuild."""
    store = EventStore(settings)
    try:
        await write_history(store)
        async with supervised(settings, tmp_path, store, batch_size=7, lease=_postgres_lease) as (
            db,
            runner,
            _,
        ):
            await reached(runner, await store.max_position())
            for round_ in range(rounds):
                await trouble(db)
                for i in range(6):
                    end = await store.append(request(label=f"round {round_} #{i}"))
                await reached(runner, end)
            rows = normalised(await db.fetch_all(ALL_ROWS, {}))
        assert rows == await rebuilt_rows(store, settings, tmp_path)
        assert len(rows) == 12 + 6 * rounds
    finally:
        store.close()


@pytest.fixture
def own_server() -> Iterator[Server]:
    """A Postgres server of this test's own: stopping the shared one would fail its
    neighbours."""
    require_server_binaries()
    with private_server() as server:
        yield server


async def test_the_runner_resumes_after_the_database_restarts(
    own_server: Server, tmp_path: Path
) -> None:
    """The server stops (every connection ends, and new ones are refused until it is back)
    and starts again, twice: the runner goes on from its tracked position, nothing lost
    and nothing applied twice."""
    # A name of the test's own, as every test's database has (its stream names follow it).
    database = f"almanac_restart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    settings = services_settings(own_server.url(database))

    async def restart(_: ReadDatabase) -> None:
        await asyncio.to_thread(own_server.stop, "fast")
        await asyncio.to_thread(own_server.start)

    await survives(settings, tmp_path, restart, rounds=2)
