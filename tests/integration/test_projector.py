"""The readings projection and its runner on both profiles: replay, idempotence, tracking."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import uuid4

from almanac.domain.chart import Chart, ChartOptions, calculate_chart
from almanac.domain.interpretation import BuiltinGenerator, GenerationFailed, ReadingText
from almanac.domain.kinds import ReadingKind
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore, RecordedEvent
from almanac.readmodels import (
    FORGET_POSITION,
    POSITIONS_SCHEMA,
    SAVE_POSITION,
    PositionWatch,
    ReadDatabase,
    Row,
    Write,
    projection_position,
)
from almanac.settings import Settings
from projections.readings import ReadingsProjection
from projections.runner import Projection, ProjectionRunner, coalesce
from streams.logfeed import LogFeed
from tests.factories import birth, meta
from tests.integration.support_containers import running, settled
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_eventlog import CHART_CALCULATED, whole_log
from tests.integration.support_waiting import eventually

NAME = ReadingsProjection.name
CHART = calculate_chart(birth())
TEXT: ReadingText = asyncio.run(BuiltinGenerator().generate(CHART, "natal", None))
ALL_ROWS = "SELECT * FROM readings ORDER BY id"


def request(
    label: str | None = None, kind: ReadingKind = "natal", owner: str = "owner-a"
) -> Reading:
    return Reading.request(
        reading_id=uuid4(),
        meta=meta(owner),
        birth=birth(),
        options=ChartOptions(),
        kind=kind,
        label=label,
        request_hash="0" * 64,
    )


class RefusingGenerator:
    """The built-in generator, except for readings labelled ``doomed``."""

    name = "refusing"
    version = "1"

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        if label == "doomed":
            raise GenerationFailed("the stars decline to comment")
        return await BuiltinGenerator().generate(chart, kind, label)


FATES = ("generated", "text_failed", "chart_failed", "chart_only", "requested", "generated")


async def write_history(store: EventStore) -> None:
    """Twelve readings in every state: generated, failed at either stage, half done, untouched."""
    for i, fate in enumerate(FATES * 2):
        reading = request(label=f"r{i}", kind=("natal", "love", "career")[i % 3], owner=f"o{i % 2}")
        position = await store.append(reading)
        caused = meta(f"o{i % 2}").caused_by(position)
        if fate in ("generated", "text_failed", "chart_only"):
            reading.record_chart(CHART, caused)
        if fate == "generated":
            reading.record_text(TEXT, caused)
        elif fate in ("text_failed", "chart_failed"):
            reading.fail(f"reason {i}", caused)
        if reading.pending_events:
            await store.append(reading)


def normalised(rows: Sequence[Row]) -> list[dict[str, object]]:
    return [dict(row) for row in rows]


@asynccontextmanager
async def projecting(
    feed: LogFeed,
    db: ReadDatabase,
    *,
    batch_size: int = 500,
    projection: Projection | None = None,
) -> AsyncIterator[tuple[ProjectionRunner, PositionWatch]]:
    """A runner following ``feed`` into ``db`` in a task; stopped on the way out."""
    watch = _watch(db)
    runner = ProjectionRunner(
        projection or ReadingsProjection(), feed, db, watch, batch_size=batch_size
    )
    await runner.prepare()
    task = asyncio.create_task(runner.run())
    try:
        yield runner, watch
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=10)


@asynccontextmanager
async def log_feed(store: EventStore) -> AsyncIterator[LogFeed]:
    feed = LogFeed(store, poll_interval=0.05)
    await feed.start()
    try:
        yield feed
    finally:
        await feed.stop()


async def project_everything(store: EventStore, db: ReadDatabase, **kwargs: int) -> int:
    """Run a projection runner until it has applied the whole log; return the position."""
    end = await store.max_position()
    async with log_feed(store) as feed, projecting(feed, db, **kwargs) as (_, watch):
        reached = await watch.wait_for(NAME, end, timeout=20)
    assert reached == end
    return end


async def test_a_rebuild_from_position_zero_equals_the_live_read_model(
    settings: Settings, tmp_path: Path
) -> None:
    readings = [
        request(label="doomed" if i % 4 == 3 else f"r{i}", owner=f"o{i % 3}") for i in range(16)
    ]
    async with running(settings, generator=RefusingGenerator()) as container:
        for reading in readings:
            await container.store.append(reading)
        done = await settled(container, [r.id for r in readings])
        end = await container.store.max_position()
        assert await container.watch.wait_for(NAME, end, timeout=20) >= end
        live = normalised(await container.read_db.fetch_all(ALL_ROWS, {}))

        async with fresh_read_database(settings, tmp_path) as fresh:
            await project_everything(container.store, fresh, batch_size=7)
            rebuilt = normalised(await fresh.fetch_all(ALL_ROWS, {}))
            assert await projection_position(fresh, NAME) == end

    assert {r.status for r in done} == {"generated", "failed"}
    assert [str(row["id"]) for row in live] == sorted(str(r.id) for r in readings)
    assert {row["status"] for row in live} == {"generated", "failed"}
    assert rebuilt == live


async def test_reapplying_applied_events_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
    finally:
        store.close()
    projection = ReadingsProjection()

    def writes_for(batch: list[RecordedEvent]) -> list[Write]:
        return coalesce([w for e in batch for w in projection.handle(e)])

    async with fresh_read_database(settings, tmp_path) as db:
        await db.migrate([*POSITIONS_SCHEMA[db.dialect], *projection.schema[db.dialect]])
        await db.write(writes_for(events))
        once = normalised(await db.fetch_all(ALL_ROWS, {}))
        await db.write(writes_for(events))
        assert normalised(await db.fetch_all(ALL_ROWS, {})) == once
        # Older events arriving again (a redelivered batch) must not turn rows back.
        await db.write(writes_for([e for e in events if e.type == CHART_CALCULATED]))
        assert normalised(await db.fetch_all(ALL_ROWS, {})) == once
    statuses = sorted(str(row["status"]) for row in once)
    assert statuses == sorted(
        ["generated"] * 4 + ["failed"] * 4 + ["chart_calculated"] * 2 + ["requested"] * 2
    )


async def test_a_runner_restarted_from_zero_on_a_full_read_model_changes_no_row(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        async with fresh_read_database(settings, tmp_path) as db:
            end = await project_everything(store, db)
            before = normalised(await db.fetch_all(ALL_ROWS, {}))
            # As if the tracking row were lost: the whole log is applied a second time.
            await db.write([(FORGET_POSITION, [{"name": NAME}])])
            assert await projection_position(db, NAME) == 0
            assert await project_everything(store, db, batch_size=5) == end
            assert normalised(await db.fetch_all(ALL_ROWS, {})) == before
    finally:
        store.close()


class PoisonedProjection:
    """The readings projection, with a write that always fails for one event."""

    name = ReadingsProjection.name
    schema = ReadingsProjection.schema

    def __init__(self, poisoned_position: int) -> None:
        self.inner = ReadingsProjection()
        self.poisoned = poisoned_position
        self.poison_attempts = 0

    def handle(self, event: RecordedEvent) -> list[Write]:
        writes = self.inner.handle(event)
        if event.position == self.poisoned:
            self.poison_attempts += 1
            writes.append(("INSERT INTO no_such_table (x) VALUES (:x)", [{"x": 1}]))
        return writes


async def test_the_tracking_position_commits_with_the_rows_or_not_at_all(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        assert len(events) > 10
        poison = PoisonedProjection(poisoned_position=events[7].position)
        async with fresh_read_database(settings, tmp_path) as db, log_feed(store) as feed:
            async with projecting(feed, db, batch_size=5, projection=poison) as (runner, _):

                async def retried() -> bool:
                    return poison.poison_attempts >= 2

                # The second attempt at the poisoned batch starts after the first rolled back.
                await eventually(retried, what="the poisoned batch is tried twice")
                assert runner.position == events[4].position
                assert await projection_position(db, NAME) == events[4].position
                rows = await db.fetch_all(ALL_ROWS, {})
            first_five = {e.aggregate_id for e in events[:5]}
            assert {str(row["id"]) for row in rows} == {str(i) for i in first_five}
            assert max(int(row["position"]) for row in rows) <= events[4].position
    finally:
        store.close()


async def test_the_position_after_a_batch_is_its_last_event(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        await write_history(store)
        events = await whole_log(store)
        async with fresh_read_database(settings, tmp_path) as db:
            projection = ReadingsProjection()
            runner = ProjectionRunner(
                projection, LogFeed(store, poll_interval=0.05), db, _watch(db), batch_size=5
            )
            await runner.prepare()
            for batch in (events[:5], events[5:9], events[9:]):
                # One batch at a time, without the run loop, to look between batches.
                await runner._commit(batch)
                assert await projection_position(db, NAME) == batch[-1].position
                assert runner.position == batch[-1].position
    finally:
        store.close()


def _watch(db: ReadDatabase) -> PositionWatch:
    return PositionWatch(lambda name: projection_position(db, name))


@asynccontextmanager
async def positions_table(settings: Settings, tmp_path: Path) -> AsyncIterator[ReadDatabase]:
    async with fresh_read_database(settings, tmp_path) as db:
        await db.migrate(POSITIONS_SCHEMA[db.dialect])
        yield db


async def save_position(db: ReadDatabase, position: int) -> None:
    row = {"name": NAME, "position": position, "updated_at": "2026-01-01T00:00:00+00:00"}
    await db.write([(SAVE_POSITION, [row])])


async def test_wait_for_returns_as_soon_as_the_position_is_announced(
    settings: Settings, tmp_path: Path
) -> None:
    async with positions_table(settings, tmp_path) as db:
        reads: list[int] = []

        async def read_position(name: str) -> int:
            reads.append(await projection_position(db, name))
            return reads[-1]

        watch = PositionWatch(read_position)
        started = time.monotonic()
        waiting = asyncio.create_task(watch.wait_for(NAME, 7, timeout=30))

        async def polling() -> bool:
            return len(reads) >= 2

        await eventually(polling, what="the watch reads the position twice")
        assert not waiting.done()
        watch.announce(NAME, 7)
        assert await asyncio.wait_for(waiting, timeout=5) == 7
        assert time.monotonic() - started < 10, "returned long before its 30 s timeout"
        assert await watch.wait_for(NAME, 5, timeout=30) == 7, "known positions answer at once"


async def test_wait_for_sees_a_position_committed_elsewhere(
    settings: Settings, tmp_path: Path
) -> None:
    """A projector in another process only shows in the tracking row, never as an announcement."""
    async with positions_table(settings, tmp_path) as db:
        watch = _watch(db)
        waiting = asyncio.create_task(watch.wait_for(NAME, 4, timeout=30))
        await save_position(db, 4)
        assert await asyncio.wait_for(waiting, timeout=10) == 4


async def test_wait_for_times_out_with_the_current_position(
    settings: Settings, tmp_path: Path
) -> None:
    async with positions_table(settings, tmp_path) as db:
        await save_position(db, 3)
        watch = _watch(db)
        started = time.monotonic()
        assert await watch.wait_for(NAME, 10, timeout=0.3) == 3
        assert time.monotonic() - started >= 0.3
        assert await watch.wait_for("never-ran", 1, timeout=0.05) == 0
