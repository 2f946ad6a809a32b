"""Projector processes: one leads, one stands by; kill -9 the leader mid-run and lose nothing,
and count nothing twice."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.domain.batch import Batch, BatchItem
from almanac.eventstore import EventStore
from almanac.readmodels import ReadDatabase, projection_position
from almanac.settings import Settings
from projections.batches import BatchesProjection
from projections.readings import ReadingsProjection
from tests.factories import birth, meta
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_projection import (
    CHART,
    NAME,
    TEXT,
    assert_same_rows,
    read_model,
    rebuild,
    request,
)
from tests.integration.support_waiting import eventually

READINGS = 600  # three events each
# Each run of readings is followed by a batch, so that batch events are spread over the log.
READINGS_PER_BATCH = 50
ITEMS = 8
PROJECTED = (ReadingsProjection, BatchesProjection)


def read_database_of(settings: Settings) -> ReadDatabase:
    if settings.read_postgres_url is not None:
        return PostgresReadDatabase(settings.read_postgres_url, max_size=2)
    return SqliteReadDatabase(settings.store.sqlite_read_path)


def retried_batch() -> Batch:
    """A batch whose items all succeed, the last one at its second attempt: its counts go
    up, down and up again (``failed`` 1, then 0), so an event applied twice would show."""
    batch = Batch.start(
        batch_id=uuid4(),
        meta=meta(),
        items=[BatchItem(birth(), label=f"i{i}") for i in range(ITEMS)],
        label=None,
        request_hash="0" * 64,
    )

    def outcome(index: int, reason: str | None = None) -> None:
        reading_id, attempt = batch.reading_id(index), batch.attempt_of(index)
        assert batch.record_outcome(
            index=index, reading_id=reading_id, attempt=attempt, reason=reason, meta=meta()
        )

    for index in range(ITEMS - 1):
        outcome(index)
    outcome(ITEMS - 1, reason="the stars decline to comment")
    assert batch.retry_failed(meta()) == [ITEMS - 1]
    outcome(ITEMS - 1)
    return batch


def seed(store: EventStore, readings: int) -> int:
    """Complete readings (requested, chart calculated, generated) in runs of a few big
    appends, each run followed by a batch that completed after a retry; a batch comes last."""
    for start in range(0, readings, READINGS_PER_BATCH):
        run = []
        for i in range(start, min(start + READINGS_PER_BATCH, readings)):
            reading = request(label=f"r{i}")
            reading.record_chart(CHART, meta())
            reading.record_text(TEXT, meta())
            run.append(reading)
        store.append_sync(*run)
        store.append_sync(retried_batch())
    return store.max_position_sync()


async def positions(db: ReadDatabase) -> list[int]:
    """The tracked positions of the projections compared here."""
    return [await projection_position(db, projection.name) for projection in PROJECTED]


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
    """The readings and the batches (with their counts) the standby finishes equal a rebuild."""
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

            # Stopped while the history is written: however fast it projects, the leader
            # then has the whole of it still to do, and is killed a part of the way through.
            leader.freeze()
            end = seed(store, READINGS)
            leader.thaw()
            await db.open()

            async def under_way() -> bool:
                leader.ensure_running()
                return min(await positions(db)) >= end // 4

            await eventually(under_way, within=60, what="the leader projects a quarter")
            leader.kill()
            at_kill = await positions(db)
            assert max(at_kill) < end, f"the leader was not killed mid-run: {at_kill}"

            await logged(standby, "projection.leading")

            async def caught_up() -> bool:
                standby.ensure_running()
                return await positions(db) == [end] * len(PROJECTED)

            await eventually(caught_up, within=60, what="the standby projects the rest")
            taken_over = await read_model(db, PROJECTED)

            assert standby.terminate(timeout=20) == 0, standby.output()[-4000:]
            assert "projection.stopped" in standby.log_events()

        async with fresh_read_database(settings, tmp_path) as fresh:
            await rebuild(store, fresh, PROJECTED)
            rebuilt = await read_model(fresh, PROJECTED)
    finally:
        await db.close()
        store.close()
    assert_same_rows(rebuilt, taken_over)
    assert len(taken_over["readings"]) == READINGS
    assert {row["status"] for row in taken_over["readings"]} == {"generated"}
    batches = READINGS // READINGS_PER_BATCH
    assert [(row["status"], row["succeeded"], row["failed"]) for row in taken_over["batches"]] == [
        ("completed", ITEMS, 0)
    ] * batches
    assert len(taken_over["batch_items"]) == batches * ITEMS
    assert {row["status"] for row in taken_over["batch_items"]} == {"succeeded"}
