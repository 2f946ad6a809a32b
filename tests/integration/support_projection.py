"""Projecting for tests: a history to project, runners in tasks, a poisoned projection,
and every row of every read model, to compare a live one with a rebuild."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import uuid4

import msgspec

from almanac.adapters.leadership import Lease
from almanac.domain.chart import Chart, ChartOptions, calculate_chart
from almanac.domain.interpretation import BuiltinGenerator, GenerationFailed, ReadingText
from almanac.domain.kinds import ReadingKind
from almanac.domain.reading import Reading
from almanac.errors import Unavailable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.readmodels import (
    PositionWatch,
    ReadDatabase,
    Row,
    Write,
    projection_position,
)
from almanac.settings import ProjectionSettings, Settings
from projections.batches import BatchesProjection
from projections.dead_letters import DeadLettersProjection
from projections.readings import ReadingsProjection
from projections.runner import Projection, ProjectionRunner
from projections.webhooks import WebhookEndpointsProjection
from streams.logfeed import LogFeed
from tests.factories import birth, meta
from tests.integration.support_eventlog import whole_log

NAME = ReadingsProjection.name
CHART = calculate_chart(birth())
TEXT: ReadingText = asyncio.run(BuiltinGenerator().generate(CHART, "natal", None))
ALL_ROWS = "SELECT * FROM readings ORDER BY id"
# Every projection the projector role runs (a test checks the list against bootstrap's).
PROJECTIONS: tuple[type[Projection], ...] = (
    ReadingsProjection,
    BatchesProjection,
    WebhookEndpointsProjection,
    DeadLettersProjection,
)


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


DOOMED = "doomed"
UNREACHABLE = "unreachable"


class RefusingGenerator:
    """The built-in generator, except for readings labelled ``doomed`` (refused: the reading
    fails at once) and ``unreachable`` (its service is down: a transient failure, tried
    again on every delivery until the worker gives up and records a dead letter)."""

    name = "refusing"
    version = "1"

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        if label == DOOMED:
            raise GenerationFailed("the stars decline to comment")
        if label == UNREACHABLE:
            raise Unavailable("the oracle is unreachable")
        return await BuiltinGenerator().generate(chart, kind, label)


def giving_up_after(settings: Settings, max_deliver: int) -> Settings:
    """``settings`` with a worker that gives a reading up after ``max_deliver`` deliveries."""
    return msgspec.structs.replace(
        settings, worker=msgspec.structs.replace(settings.worker, max_deliver=max_deliver)
    )


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


@asynccontextmanager
async def store_with_history(
    settings: Settings,
) -> AsyncIterator[tuple[EventStore, list[RecordedEvent]]]:
    """An event store holding ``write_history``, and its whole log."""
    store = EventStore(settings)
    try:
        await write_history(store)
        yield store, await whole_log(store)
    finally:
        store.close()


def normalised(rows: Sequence[Row]) -> list[dict[str, object]]:
    return [dict(row) for row in rows]


ReadModel = dict[str, list[dict[str, object]]]


async def read_model(
    db: ReadDatabase, projections: Sequence[type[Projection]] = PROJECTIONS
) -> ReadModel:
    """Every row of every table of ``projections``, by table. Rows are sorted by their whole
    content (the tables' keys differ), so equal tables give equal lists on either engine."""
    return {
        table: sorted(normalised(await db.fetch_all(f"SELECT * FROM {table}", {})), key=repr)
        for projection in projections
        for table in projection.tables
    }


def assert_same_rows(rebuilt: ReadModel, live: ReadModel) -> None:
    """Table by table, so that a failure names the table that differs."""
    assert rebuilt.keys() == live.keys()
    for table, rows in live.items():
        assert rebuilt[table] == rows, f"{table}: the rebuild differs from the live rows"


@asynccontextmanager
async def projecting(
    feed: LogFeed,
    db: ReadDatabase,
    *,
    batch_size: int = 500,
    projection: Projection | None = None,
    lease: Lease | None = None,
    settings: ProjectionSettings | None = None,
    watch: PositionWatch | None = None,
) -> AsyncIterator[tuple[ProjectionRunner, PositionWatch]]:
    """A runner following ``feed`` into ``db`` in a task; stopped on the way out."""
    watch = watch or watch_of(db)
    runner = ProjectionRunner(
        projection or ReadingsProjection(),
        feed,
        db,
        watch,
        batch_size=batch_size,
        lease=lease,
        settings=settings,
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


async def project_everything(
    store: EventStore,
    db: ReadDatabase,
    batch_size: int = 500,
    projection: Projection | None = None,
) -> int:
    """Run a runner of ``projection`` (by default the readings) until it has applied the
    whole log; return the position."""
    projection = projection or ReadingsProjection()
    end = await store.max_position()
    async with (
        log_feed(store) as feed,
        projecting(feed, db, batch_size=batch_size, projection=projection) as (_, watch),
    ):
        reached = await watch.wait_for(projection.name, end, timeout=20)
    assert reached == end
    return end


async def rebuild(
    store: EventStore,
    db: ReadDatabase,
    projections: Sequence[type[Projection]] = PROJECTIONS,
    batch_size: int = 500,
) -> int:
    """Project the whole log from position 0 into the empty ``db`` with new instances of
    ``projections``; return the position they all reached (and saved)."""
    end = await store.max_position()
    for projection in projections:
        assert await project_everything(store, db, batch_size, projection()) == end
        assert await projection_position(db, projection.name) == end
    return end


class PoisonedProjection:
    """The readings projection, with a write that fails for one event until ``healed``."""

    name = ReadingsProjection.name
    schema = ReadingsProjection.schema
    version = ReadingsProjection.version
    tables = ReadingsProjection.tables

    def __init__(self, poisoned_position: int) -> None:
        self.inner = ReadingsProjection()
        self.poisoned = poisoned_position
        self.poison_attempts = 0
        self.healed = False

    def handle(self, event: RecordedEvent) -> list[Write]:
        writes = self.inner.handle(event)
        if event.position == self.poisoned and not self.healed:
            self.poison_attempts += 1
            writes.append(("INSERT INTO no_such_table (x) VALUES (:x)", [{"x": 1}]))
        return writes


def watch_of(db: ReadDatabase) -> PositionWatch:
    return PositionWatch(lambda name: projection_position(db, name))


async def secondary_indexes(db: ReadDatabase) -> set[str]:
    """The names of the indexes on ``readings`` besides its primary key."""
    sql = (
        "SELECT indexname AS name FROM pg_indexes"
        " WHERE tablename = 'readings' AND indexname <> 'readings_pkey'"
        if db.dialect == "postgres"
        else "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'readings'"
        " AND sql IS NOT NULL"
    )
    return {str(row["name"]) for row in await db.fetch_all(sql, {})}
