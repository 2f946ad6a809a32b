"""Projector processes: one leads, one stands by; kill -9 the leader mid-run and lose nothing."""

from __future__ import annotations

from pathlib import Path

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.eventstore import EventStore
from almanac.readmodels import ReadDatabase, projection_position
from almanac.settings import Settings
from tests.factories import meta
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_projection import (
    ALL_ROWS,
    CHART,
    NAME,
    TEXT,
    normalised,
    project_everything,
    request,
)
from tests.integration.support_waiting import eventually

READINGS = 600  # three events each


def read_database_of(settings: Settings) -> ReadDatabase:
    if settings.read_postgres_url is not None:
        return PostgresReadDatabase(settings.read_postgres_url, max_size=2)
    return SqliteReadDatabase(settings.store.sqlite_read_path)


def seed(store: EventStore, readings: int) -> int:
    """Complete readings (requested, chart calculated, generated), in a few big appends."""
    batch = []
    for i in range(readings):
        reading = request(label=f"r{i}")
        reading.record_chart(CHART, meta())
        reading.record_text(TEXT, meta())
        batch.append(reading)
        if len(batch) == 200:
            store.append_sync(*batch)
            batch.clear()
    if batch:
        store.append_sync(*batch)
    return store.max_position_sync()


def events_of_readings(process: RoleProcess) -> list[str]:
    """The process's lifecycle events of this projection (it runs others beside it)."""
    return [str(r["event"]) for r in process.log_records() if r.get("projection", NAME) == NAME]


async def logged(process: RoleProcess, event: str) -> None:
    async def seen() -> bool:
        process.ensure_running()
        return event in events_of_readings(process)

    await eventually(seen, within=30, what=f"{event} in the log of {process.pid}")


async def test_a_projector_killed_mid_run_is_replaced_by_its_standby_losing_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    db = read_database_of(settings)
    try:
        with RoleProcesses(
            settings,
            tmp_path,
            # Small batches: the run lasts long enough to be cut short between commits.
            ALMANAC_FEED_BATCH_SIZE="25",
            ALMANAC_PROJECTION_STANDBY_INTERVAL="0.1",
        ) as processes:
            leader = processes.start("projector")
            await logged(leader, "projection.started")
            standby = processes.start("projector")
            await logged(standby, "projection.standby")
            assert "projection.leading" not in events_of_readings(standby)

            end = seed(store, READINGS)
            await db.open()

            async def under_way() -> bool:
                leader.ensure_running()
                return await projection_position(db, NAME) >= end // 4

            await eventually(under_way, within=60, what="the leader projects a quarter")
            leader.kill()
            at_kill = await projection_position(db, NAME)
            assert at_kill < end, "the leader was not killed mid-run"

            await logged(standby, "projection.leading")

            async def caught_up() -> bool:
                standby.ensure_running()
                return await projection_position(db, NAME) == end

            await eventually(caught_up, within=60, what="the standby projects the rest")
            rows = normalised(await db.fetch_all(ALL_ROWS, {}))

            assert standby.terminate(timeout=20) == 0, standby.output()[-4000:]
            assert "projection.stopped" in standby.log_events()

        async with fresh_read_database(settings, tmp_path) as fresh:
            await project_everything(store, fresh)
            rebuilt = normalised(await fresh.fetch_all(ALL_ROWS, {}))
    finally:
        await db.close()
        store.close()
    assert len(rows) == READINGS
    assert {row["status"] for row in rows} == {"generated"}
    assert rows == rebuilt
