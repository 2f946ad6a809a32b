"""The projections and their runner on both profiles: a rebuild of every read model equals
the live one; replay, idempotence, tracking."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID, uuid4

import pytest

import projections.runner as runner_module
from almanac.auth import Principal
from almanac.container import Container
from almanac.domain.batch import Batch, BatchItem
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore, RecordedEvent
from almanac.readmodels import (
    FORGET_POSITION,
    POSITIONS_SCHEMA,
    SAVE_POSITION,
    Dialect,
    PositionWatch,
    ReadDatabase,
    Write,
    projection_position,
)
from almanac.settings import ProjectionSettings, Settings
from commands.batches import retry_failed
from commands.webhooks import (
    ChangeWebhook,
    RegisterWebhook,
    change_webhook,
    delete_webhook,
    register_webhook,
    rotate_webhook_secret,
)
from projections.readings import ReadingsProjection
from projections.runner import QUIET_SAVE_INTERVAL, Projection, ProjectionRunner, coalesce
from streams.logfeed import LogFeed
from tests.factories import birth, meta
from tests.integration.support_containers import running, settled
from tests.integration.support_databases import fresh_read_database
from tests.integration.support_eventlog import CHART_CALCULATED, whole_log
from tests.integration.support_projection import (
    ALL_ROWS,
    CHART,
    DOOMED,
    NAME,
    PROJECTIONS,
    TEXT,
    UNREACHABLE,
    RefusingGenerator,
    assert_same_rows,
    giving_up_after,
    log_feed,
    normalised,
    project_everything,
    read_model,
    rebuild,
    request,
    secondary_indexes,
    store_with_history,
    watch_of,
    write_history,
)
from tests.integration.support_waiting import eventually

OWNER = "owner-a"
PRINCIPAL = Principal(key_id="key-a", owner=OWNER, role="client", name="a")


def projections_of(container: Container) -> set[str]:
    """The names of the projections the container's projector role runs."""
    return {
        role.projection.name
        for role in container.background["projector"]
        if isinstance(role, ProjectionRunner)
    }


async def start_batch(container: Container, labels: list[str]) -> UUID:
    items = [BatchItem(birth(), label=label) for label in labels]
    batch = Batch.start(
        batch_id=uuid4(), meta=meta(OWNER), items=items, label="mixed", request_hash="0" * 64
    )
    await container.store.append(batch)
    return batch.id


async def completed(container: Container, batch_id: UUID, retries: int) -> Batch:
    """Wait until the batch has an outcome for every item after ``retries`` retries."""

    async def done() -> Batch | None:
        batch = await container.store.load(Batch, batch_id)
        if batch is None or batch.status != "completed":
            return None
        return batch if max(batch.attempts.values(), default=0) == retries else None

    return await eventually(done, what=f"the batch completed after {retries} retries")


async def change_webhook_endpoints(container: Container) -> None:
    """One endpoint registered, changed (and so disabled) and given a new secret; another
    registered and deleted. Neither wants any event this history has."""
    guard, box = container.webhook_guard, container.secret_box
    assert guard is not None and box is not None
    store, principal = container.store, PRINCIPAL
    quiet = RegisterWebhook(url="http://127.0.0.1:9/hook", event_types=["batch.cancelled"])
    kept, gone = [
        await register_webhook(quiet, store=store, guard=guard, box=box, meta=meta(OWNER))
        for _ in range(2)
    ]
    change = ChangeWebhook(description="changed", rate_limit=5, enabled=False)
    await change_webhook(
        kept.id, change, store=store, guard=guard, principal=principal, meta=meta(OWNER)
    )
    await rotate_webhook_secret(
        kept.id, store=store, box=box, principal=principal, meta=meta(OWNER), overlap=60
    )
    await delete_webhook(gone.id, store=store, principal=principal, meta=meta(OWNER))


async def test_a_rebuild_from_position_zero_equals_the_live_read_model(
    settings: Settings, tmp_path: Path
) -> None:
    """Every row of every projection's tables: readings and charts, a batch whose failed
    items were retried, webhook endpoints changed and deleted, and dead letters."""
    readings = [
        request(label=DOOMED if i % 4 == 3 else f"r{i}", owner=f"o{i % 3}") for i in range(16)
    ]
    async with running(giving_up_after(settings, 2), generator=RefusingGenerator()) as container:
        assert projections_of(container) == {p.name for p in PROJECTIONS}
        for reading in readings:
            await container.store.append(reading)
        batch_id = await start_batch(container, ["b0", "b1", DOOMED, UNREACHABLE])
        await change_webhook_endpoints(container)
        done = await settled(container, [r.id for r in readings])
        await completed(container, batch_id, retries=0)
        # The failed items run again (and fail again): the counts go down, then up.
        await retry_failed(batch_id, store=container.store, principal=PRINCIPAL, meta=meta(OWNER))
        await completed(container, batch_id, retries=1)
        end = await container.store.max_position()
        for projection in PROJECTIONS:
            assert await container.watch.wait_for(projection.name, end, timeout=20) >= end
        live = await read_model(container.read_db)

        async with fresh_read_database(settings, tmp_path) as fresh:
            assert await rebuild(container.store, fresh, batch_size=7) == end
            rebuilt = await read_model(fresh)

    assert {r.status for r in done} == {"generated", "failed"}
    assert all(live.values()), f"a table the history left empty: {[t for t in live if not live[t]]}"
    assert {str(r.id) for r in readings} <= {str(row["id"]) for row in live["readings"]}
    assert len(live["readings"]) == len(readings) + 6, "and the batch's readings, two retried"
    assert {row["status"] for row in live["readings"]} == {"generated", "failed"}
    assert live["charts"], "the readings that were generated calculated a chart"
    [batch] = live["batches"]
    counts = {"status": "completed", "total": 4, "succeeded": 2, "failed": 2}
    assert {column: batch[column] for column in counts} == counts
    assert {item["idx"]: (item["status"], item["attempt"]) for item in live["batch_items"]} == {
        0: ("succeeded", 0),
        1: ("succeeded", 0),
        2: ("failed", 1),
        3: ("failed", 1),
    }
    endpoints = {row["status"]: row for row in live["webhook_endpoints"]}
    assert sorted(endpoints) == ["deleted", "disabled"]
    assert endpoints["disabled"]["description"] == "changed"
    assert endpoints["disabled"]["previous_secret_sealed"] is not None
    dead = live["dead_letters"]
    assert [row["deliveries"] for row in dead] == [2, 2], "the unreachable item, twice"
    assert_same_rows(rebuilt, live)


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


def many_readings(count: int) -> list[Reading]:
    """``count`` readings: two in three generated, the others only requested."""
    readings = []
    for i in range(count):
        reading = request(label=f"m{i}")
        if i % 3:
            reading.record_chart(CHART, meta())
            reading.record_text(TEXT, meta())
        readings.append(reading)
    return readings


@pytest.mark.parametrize("size", ["twelve", "hundreds"])
async def test_a_run_overlapping_applied_events_applies_the_ones_after_them(
    settings: Settings, tmp_path: Path, size: str
) -> None:
    """A redelivered run from any earlier point leaves the rows as one pass does: requests
    met again do not hide what follows them. Written as the runner writes, with the
    position in the same transaction; hundreds of new readings go in by COPY on Postgres,
    which meets the rows already there and falls back to the insert with its conflict
    clause."""
    store = EventStore(settings)
    try:
        if size == "twelve":
            await write_history(store)
        else:
            store.append_sync(*many_readings(300))
        events = await whole_log(store)
    finally:
        store.close()
    projection = ReadingsProjection()

    def run(batch: list[RecordedEvent]) -> list[Write]:
        saved = {"name": NAME, "position": batch[-1].position, "updated_at": runner_module.now()}
        return [*projection.handle_batch(batch), (SAVE_POSITION, [saved])]

    async with fresh_read_database(settings, tmp_path) as db:
        await db.migrate([*POSITIONS_SCHEMA[db.dialect], *projection.schema[db.dialect]])
        await db.write(run(events))
        once = normalised(await db.fetch_all(ALL_ROWS, {}))
        tables = ("readings", "charts", "projection_positions")
        forget: list[Write] = [(f"DELETE FROM {table}", [{}]) for table in tables]
        await db.write(forget)
        for cut in (1, len(events) // 3, len(events) // 2):
            await db.write(run(events[:cut]))
            await db.write(run(events))  # from position 1 again
            assert normalised(await db.fetch_all(ALL_ROWS, {})) == once, f"cut at {cut}"
            assert await projection_position(db, NAME) == events[-1].position
            await db.write(forget)


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


async def test_the_position_after_a_batch_is_its_last_event(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        store_with_history(settings) as (store, events),
        fresh_read_database(settings, tmp_path) as db,
    ):
        projection = ReadingsProjection()
        runner = ProjectionRunner(
            projection, LogFeed(store, poll_interval=0.05), db, watch_of(db), batch_size=5
        )
        await runner.prepare()
        for batch in (events[:5], events[5:9], events[9:]):
            # One batch at a time, without the run loop, to look between batches.
            await runner._commit(batch)
            assert await projection_position(db, NAME) == batch[-1].position
            assert runner.position == batch[-1].position


class ClosableHook:
    """An after-commit hook that keeps work of its own going, as the cache refresher does."""

    def __init__(self) -> None:
        self.batches = 0
        self.closed = 0

    async def __call__(self, events: list[RecordedEvent]) -> None:
        self.batches += 1

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_runner_closes_its_hooks_when_its_lead_ends(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        store_with_history(settings) as (store, _),
        fresh_read_database(settings, tmp_path) as db,
        log_feed(store) as feed,
    ):
        hook = ClosableHook()
        runner = ProjectionRunner(
            ReadingsProjection(), feed, db, watch_of(db), batch_size=5, after_commit=[hook]
        )
        await runner.prepare()
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.caught_up.wait(), timeout=30)
        assert (hook.batches > 0, hook.closed) == (True, 0)
        runner.stop()
        await asyncio.wait_for(task, timeout=10)
    assert hook.closed == 1


class TakingOverHook:
    """An after-commit hook that notes, in order, each lead's beginning, its batches and its
    end; its ``take_over`` fails as often as ``failures`` says."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.failures = failures

    async def take_over(self, position: int) -> None:
        self.calls.append(("take_over", position))
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the hook could not take over")

    async def __call__(self, events: list[RecordedEvent]) -> None:
        self.calls.append(("batch", events[0].position))

    async def aclose(self) -> None:
        self.calls.append(("aclose", 0))


async def test_a_runner_tells_its_hooks_where_each_lead_begins_before_any_batch(
    settings: Settings, tmp_path: Path
) -> None:
    """The commits before that position may include some whose hooks never ran (the
    projector before was killed): a hook catches up with those from there."""
    async with (
        store_with_history(settings) as (store, events),
        fresh_read_database(settings, tmp_path) as db,
        log_feed(store) as feed,
    ):
        end = events[-1].position
        hook = TakingOverHook(failures=1)
        for _ in range(2):
            runner = ProjectionRunner(
                ReadingsProjection(),
                feed,
                db,
                watch_of(db),
                batch_size=5,
                after_commit=[hook],
                settings=ProjectionSettings(standby_interval=0.05),
            )
            await runner.prepare()
            task = asyncio.create_task(runner.run())
            await asyncio.wait_for(runner.caught_up.wait(), timeout=30)
            runner.stop()
            await asyncio.wait_for(task, timeout=10)
    # The first lead failed, as its hook could not take over, and the hook was closed with
    # it; the next lead began at 0 again, before its first batch.
    assert hook.calls[:3] == [("take_over", 0), ("aclose", 0), ("take_over", 0)]
    lead_ended = hook.calls.index(("aclose", 0), 3)
    batches = hook.calls[3:lead_ended]
    assert batches[0] == ("batch", events[0].position)
    assert {kind for kind, _ in batches} == {"batch"}
    # The second runner began where the first had got to.
    assert hook.calls[lead_ended:] == [("aclose", 0), ("take_over", end), ("aclose", 0)]


READINGS_INDEXES = {"readings_owner_order", "readings_order"}


class ThreadNoting(ReadingsProjection):
    """The readings projection, noting the threads it folds batches in."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def handle_batch(self, events: list[RecordedEvent]) -> list[Write]:
        self.threads.append(threading.get_ident())
        return super().handle_batch(events)


async def test_a_runner_catching_up_from_zero_builds_its_indexes_once_caught_up(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    projection = ThreadNoting()
    try:
        for _ in range(3):
            await write_history(store)
        end = await store.max_position()
        async with fresh_read_database(settings, tmp_path) as db, log_feed(store) as feed:
            runner = ProjectionRunner(projection, feed, db, watch_of(db), batch_size=5)
            await runner.prepare()
            # Nothing applied yet: the tables are there, their indexes wait for the catch-up.
            assert await secondary_indexes(db) == set()
            assert await db.fetch_all(ALL_ROWS, {}) == []
            task = asyncio.create_task(runner.run())
            try:

                async def caught_up() -> bool:
                    return runner.state == "running" and runner.position == end

                await eventually(caught_up, what="the runner caught up and built its indexes")
                assert await secondary_indexes(db) == READINGS_INDEXES
            finally:
                runner.stop()
                await asyncio.wait_for(task, timeout=10)
            assert len(await db.fetch_all(ALL_ROWS, {})) == 36
    finally:
        store.close()
    # Every batch was folded as it was read, and the runner used those writes.
    assert projection.threads
    assert threading.get_ident() not in projection.threads


async def test_a_follower_prepares_every_batch_it_reads_off_the_event_loop(
    settings: Settings,
) -> None:
    store = EventStore(settings)
    threads: set[int] = set()

    def positions(events: list[RecordedEvent]) -> list[int]:
        threads.add(threading.get_ident())
        return [event.position for event in events]

    try:
        start = await store.max_position()
        for _ in range(3):
            await write_history(store)
        end = await store.max_position()
        logged = [e.position for e in await whole_log(store) if e.position > start]
        async with log_feed(store) as feed:
            follower = feed.follow(positions)
            plain = feed.follow()
            batches: list[list[int]] = []
            after = start
            while after < end:
                # Full batches of 5: each next one is read (and prepared) ahead.
                batch = await follower.next_batch(after, 5, timeout=5)
                assert follower.prepared(list(batch)) is None, "only for the batch returned"
                assert follower.prepared(batch) == [e.position for e in batch]
                assert follower.prepared(batch) is None, "handed out once"
                assert plain.prepared(await plain.next_batch(after, 5, timeout=5)) is None
                batches.append([e.position for e in batch])
                after = batch[-1].position
            follower.close()
            plain.close()
    finally:
        store.close()
    assert [p for batch in batches for p in batch] == logged
    assert threading.get_ident() not in threads


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
        # Its own timeout is far beyond the test's: returning at all says it was woken.
        waiting = asyncio.create_task(watch.wait_for(NAME, 7, timeout=3600))

        async def polling() -> bool:
            return len(reads) >= 2

        await eventually(polling, what="the watch reads the position twice")
        assert not waiting.done()
        watch.announce(NAME, 7)
        assert await asyncio.wait_for(waiting, timeout=30) == 7
        assert await watch.wait_for(NAME, 5, timeout=30) == 7, "known positions answer at once"


async def test_wait_for_sees_a_position_committed_elsewhere(
    settings: Settings, tmp_path: Path
) -> None:
    """A projector in another process only shows in the tracking row, never as an announcement."""
    async with positions_table(settings, tmp_path) as db:
        watch = watch_of(db)
        waiting = asyncio.create_task(watch.wait_for(NAME, 4, timeout=30))
        await save_position(db, 4)
        assert await asyncio.wait_for(waiting, timeout=10) == 4


async def test_wait_for_times_out_with_the_current_position(
    settings: Settings, tmp_path: Path
) -> None:
    async with positions_table(settings, tmp_path) as db:
        await save_position(db, 3)
        watch = watch_of(db)
        started = time.monotonic()
        assert await watch.wait_for(NAME, 10, timeout=0.3) == 3
        assert time.monotonic() - started >= 0.3
        assert await watch.wait_for("never-ran", 1, timeout=0.05) == 0


class Indifferent:
    """A projection that ignores every event: all its batches write nothing."""

    name = "indifferent"
    schema: ClassVar[Mapping[Dialect, Sequence[str]]] = {"sqlite": (), "postgres": ()}

    def handle(self, event: RecordedEvent) -> list[Write]:
        return []


async def test_a_batch_that_writes_nothing_saves_its_position_with_a_later_save(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        store_with_history(settings) as (store, events),
        fresh_read_database(settings, tmp_path) as db,
    ):
        watch = watch_of(db)
        feed = LogFeed(store, poll_interval=0.05)
        runner = ProjectionRunner(Indifferent(), feed, db, watch, batch_size=5)
        await runner.prepare()
        await runner._commit(events[:5])
        assert await projection_position(db, "indifferent") == events[4].position
        # At once after a save: nothing changed in the read model, so no transaction.
        runner._saved_at = time.monotonic()  # "at once", however slow this machine is
        await runner._commit(events[5:9])
        assert await projection_position(db, "indifferent") == events[4].position
        # This process may rely on it all the same: the read model is as of there.
        assert await watch.wait_for("indifferent", events[8].position, timeout=0) == (
            events[8].position
        )
        assert runner._idle_timeout() <= QUIET_SAVE_INTERVAL
        await runner._apply([])  # the log went quiet meanwhile
        assert await projection_position(db, "indifferent") == events[8].position


async def test_a_quiet_position_left_unsaved_by_a_lead_is_not_saved_by_the_next(
    settings: Settings, tmp_path: Path
) -> None:
    """The next lead starts from the tracked position (and may rebuild from 0): saving the
    position an earlier lead reached would skip what lies between."""
    async with (
        store_with_history(settings) as (store, events),
        fresh_read_database(settings, tmp_path) as db,
    ):
        runner = ProjectionRunner(
            Indifferent(), LogFeed(store, poll_interval=0.05), db, watch_of(db), batch_size=5
        )
        await runner.prepare()
        await runner._commit(events[:5])
        runner._saved_at = time.monotonic()
        await runner._commit(events[5:9])  # quiet, unsaved: say the database went away
        await runner._take_over()  # here a rebuild: no schema version was recorded
        started = runner.position
        assert started < events[8].position
        await runner._apply([])
        assert await projection_position(db, "indifferent") == started


class LostAfter:
    """A lease that is held for the first ``checks`` checks, then lost."""

    def __init__(self, checks: int) -> None:
        self.checks = checks

    async def acquire(self) -> bool:
        return True

    async def held(self) -> bool:
        self.checks -= 1
        return self.checks >= 0

    async def release(self) -> None:
        return None


@asynccontextmanager
async def quiet_runner(
    conf: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    projection: Callable[[list[RecordedEvent]], Projection],
    **options: Any,
) -> AsyncIterator[tuple[ProjectionRunner, ReadDatabase, list[RecordedEvent]]]:
    """A runner over ``write_history`` that saves a quiet position only when it must."""
    monkeypatch.setattr(runner_module, "QUIET_SAVE_INTERVAL", 60.0)
    async with (
        store_with_history(conf) as (store, events),
        fresh_read_database(conf, tmp_path) as db,
        log_feed(store) as feed,
    ):
        runner = ProjectionRunner(
            projection(events), feed, db, watch_of(db), batch_size=5, **options
        )
        await runner.prepare()
        yield runner, db, events


async def test_a_runner_that_lost_its_lease_does_not_save_its_quiet_position(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process leads by then, and may have started the projection again from 0."""
    async with quiet_runner(
        settings,
        tmp_path,
        monkeypatch,
        lambda _: Indifferent(),
        lease=LostAfter(checks=3),
        settings=ProjectionSettings(standby_interval=0.0),
    ) as (runner, db, events):
        await asyncio.wait_for(runner._lead(), timeout=20)
        # The first batch was saved; the next ones were quiet, then the lease was gone.
        assert runner.position > events[4].position
        assert await projection_position(db, "indifferent") == events[4].position


class IndifferentUntil(Indifferent):
    """Ignores every event but one, on which it fails."""

    def __init__(self, poisoned: int) -> None:
        self.poisoned = poisoned

    def handle(self, event: RecordedEvent) -> list[Write]:
        if event.position == self.poisoned:
            raise ValueError("poisoned")
        return []


async def test_a_runner_parking_an_event_saves_the_quiet_position_before_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other processes may be waiting for the positions before it, for as long as it stays."""
    async with quiet_runner(
        settings,
        tmp_path,
        monkeypatch,
        lambda events: IndifferentUntil(events[12].position),
        settings=ProjectionSettings(attempts=1),
    ) as (runner, db, events):
        task = asyncio.create_task(runner.run())
        try:

            async def parked() -> bool:
                return runner.state == "parked"

            await eventually(parked, what="the poisoned event parked")
            saved = await projection_position(db, "indifferent")
        finally:
            runner.stop()
            await asyncio.wait_for(task, timeout=10)
    assert saved == events[11].position


async def test_a_projection_that_writes_nothing_has_its_position_saved_when_the_log_is_quiet(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        async with (
            fresh_read_database(settings, tmp_path) as db,
            log_feed(store) as feed,
        ):
            runner = ProjectionRunner(Indifferent(), feed, db, watch_of(db), batch_size=5)
            await runner.prepare()
            task = asyncio.create_task(runner.run())
            try:
                for _ in range(2):
                    await write_history(store)
                end = await store.max_position()

                async def saved() -> bool:
                    return await projection_position(db, "indifferent") == end

                await eventually(saved, what="the quiet position saved")
                await write_history(store)
                end = await store.max_position()
                await runner.watch.wait_for("indifferent", end, timeout=20)
            finally:
                runner.stop()
                await asyncio.wait_for(task, timeout=10)
            # A runner that stops leaves its position saved.
            assert await projection_position(db, "indifferent") == end
    finally:
        store.close()
