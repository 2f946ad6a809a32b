"""The event store and its group-commit writer, on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

import msgspec
import psycopg
import pytest

from almanac import eventstore
from almanac.domain.batch import Batch, BatchItem
from almanac.domain.chart import calculate_chart
from almanac.domain.reading import Reading
from almanac.errors import Unavailable
from almanac.eventstore import ConcurrencyConflict, EventStore, EventTooLarge, GroupCommitWriter
from almanac.settings import Settings
from tests.conftest import services_settings
from tests.factories import birth, meta, new_reading
from tests.integration.support_databases import end_sessions
from tests.integration.support_redis import free_port
from tests.integration.support_waiting import eventually


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    s = EventStore(settings)
    yield s
    s.close()


async def test_concurrent_appends_get_distinct_positions_in_few_transactions(
    store: EventStore,
) -> None:
    readings = [new_reading() for _ in range(200)]
    positions = await asyncio.gather(*(store.append(r) for r in readings))
    assert sorted(positions) == list(range(1, 201))
    assert store.batches < 200, "concurrent commands should share transactions"
    stored = await store.read(0, 1000)
    assert {e.aggregate_id for e in stored} == {r.id for r in readings}


async def test_each_caller_gets_the_position_of_its_own_last_event(store: EventStore) -> None:
    first = new_reading()
    p1 = await store.append(first)
    loaded = await store.load(Reading, first.id)
    assert loaded is not None
    loaded.record_chart(calculate_chart(birth()), meta())
    p2 = await store.append(loaded)
    assert p2 > p1
    events = await store.read(0, 10)
    assert [(e.position, e.type) for e in events] == [
        (p1, "reading.requested"),
        (p2, "reading.chart_calculated"),
    ]


async def test_an_event_over_the_size_limit_is_refused_alone_and_nothing_of_it_is_stored(
    settings: Settings,
) -> None:
    settings = msgspec.structs.replace(
        settings, store=msgspec.structs.replace(settings.store, max_event_bytes=64 * 1024)
    )
    store = EventStore(settings)
    try:
        items = [BatchItem(birth=birth())] * 500  # ~88 KB as JSON
        big = Batch.start(batch_id=uuid4(), meta=meta(), items=items, label=None, request_hash="")
        small = [new_reading() for _ in range(4)]
        # Together, so that they share a group commit.
        outcomes = await asyncio.gather(
            *(store.append(a) for a in [small[0], small[1], big, small[2], small[3]]),
            return_exceptions=True,
        )
        refused = outcomes.pop(2)
        assert isinstance(refused, EventTooLarge), refused
        assert refused.limit == 64 * 1024 < refused.size
        assert [e.field for e in refused.errors] == ["body"]
        assert all(isinstance(position, int) for position in outcomes), outcomes
        stored = await store.read(0, 100)
        assert sorted(str(e.aggregate_id) for e in stored) == sorted(str(r.id) for r in small)
    finally:
        store.close()


def test_conflict_in_a_batch_fails_only_the_stale_command(settings: Settings) -> None:
    store = EventStore(settings)
    try:
        stale_a, stale_b = _stale_pair(store)
        # Queue everything before the writer runs, so it all lands in one batch.
        writer = GroupCommitWriter(store.app, max_batch=64, on_commit=lambda _p: None)
        others = [new_reading() for _ in range(5)]
        futures = [writer.submit([stale_a]), writer.submit([stale_b])]
        futures += [writer.submit([r]) for r in others]
        writer.start()
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=30))
            except ConcurrencyConflict as exc:
                outcomes.append(exc)
        writer.stop()
        assert isinstance(outcomes[0], int)
        assert isinstance(outcomes[1], ConcurrencyConflict)
        assert all(isinstance(o, int) for o in outcomes[2:])
        assert writer.fallbacks == 1
        assert len(store.read_sync(0, 100)) == 1 + 1 + 5
    finally:
        store.close()


async def test_events_round_trip_with_their_typed_fields_and_meta(store: EventStore) -> None:
    reading = new_reading(owner="owner-z")
    await store.append(reading)
    [event] = await store.read(0, 10)
    assert event.meta.owner == "owner-z"
    assert event.event.birth == birth()
    loaded = await store.load(Reading, reading.id)
    assert loaded is not None
    assert loaded.birth == birth() and loaded.owner == "owner-z" and loaded.status == "requested"


async def test_position_of_finds_the_first_event_of_an_aggregate(store: EventStore) -> None:
    await store.append(new_reading())
    reading = new_reading()
    position = await store.append(reading)
    assert await store.position_of(reading.id, 1) == position
    assert await store.position_of(reading.id, 2) is None


async def test_first_events_are_the_events_that_began_the_aggregates_found(
    store: EventStore,
) -> None:
    readings = [new_reading(owner=f"owner-{i}") for i in range(3)]
    positions = [await store.append(r) for r in readings]
    for i, reading in enumerate(readings):
        reading.record_chart(calculate_chart(birth()), meta(f"owner-{i}"))
        await store.append(reading)
    missing = new_reading().id
    asked = [readings[2].id, missing, readings[0].id, readings[0].id]
    firsts = await store.first_events(asked)
    assert sorted(firsts) == sorted([readings[0].id, readings[2].id])
    for i in (0, 2):
        first = firsts[readings[i].id]
        assert (first.position, first.type, first.aggregate_key) == (
            positions[i],
            "reading.requested",
            str(readings[i].id),
        )
        assert first.meta.owner == f"owner-{i}"
    assert await store.first_events([missing]) == {}
    assert await store.first_events([]) == {}


async def test_consumer_positions_only_move_forward(store: EventStore) -> None:
    assert await store.consumer_position("c") == 0
    await store.save_consumer_position("c", 5)
    await store.save_consumer_position("c", 3)
    assert await store.consumer_position("c") == 5


def test_stores_opened_at_once_on_a_new_database_all_open(settings: Settings) -> None:
    """As processes starting together on a new (or older) database do: all but one find
    the tables and functions being created by another."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(lambda _: EventStore(settings), range(4)))
    for opened in stores:
        assert opened.max_position_sync() == 0
        opened.close()


def test_stores_opened_at_once_on_one_database_all_open(settings: Settings) -> None:
    """As processes starting together do: each (re)creates the schema as it opens."""
    EventStore(settings).close()
    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(lambda _: EventStore(settings), range(4)))
    for opened in stores:
        assert opened.max_position_sync() == 0
        opened.close()


def test_a_reader_following_the_log_skips_nothing_while_several_writers_append(
    settings: Settings,
) -> None:
    """Positions become visible in order: a reader that asks for what follows the last
    position it saw never steps over one committed late (the table lock's promise)."""
    stores = [EventStore(settings) for _ in range(3)]
    per_writer, batches = 200, 4
    try:

        def write(store: EventStore) -> None:
            # Several small batches in flight at once, from each of three writers.
            for _ in range(per_writer // batches):
                futures = [store.writer.submit([new_reading()]) for _ in range(batches)]
                for future in futures:
                    future.result(timeout=30)

        reader = stores[0]
        seen: list[int] = []

        def read_on() -> int:
            events = reader.read_sync(seen[-1] if seen else 0, 50)
            seen.extend(e.position for e in events)
            return len(events)

        with ThreadPoolExecutor(max_workers=len(stores)) as pool:
            writing = [pool.submit(write, store) for store in stores]
            while not all(w.done() for w in writing):
                read_on()
            for w in writing:
                w.result()
        while read_on():
            pass
        logged = [e.position for e in reader.read_sync(0, 10_000)]
    finally:
        for store in stores:
            store.close()
    assert len(logged) == len(stores) * per_writer
    assert seen == logged


def test_an_append_straight_after_the_server_ended_the_store_sessions_succeeds(
    postgres_url: str,
) -> None:
    """As after a database restart: the store lends no connection whose session the server
    has ended, not even one used a moment ago, and the first one it meets has the pool let
    the others go at once, so the next append lands."""
    store = EventStore(services_settings(postgres_url))
    try:
        first = store.append_sync(new_reading())
        assert asyncio.run(end_sessions(postgres_url)), "the store had sessions to end"
        second = store.append_sync(new_reading())
        assert second > first
        assert [e.position for e in store.read_sync(0, 10)] == [first, second]
    finally:
        store.close()


def _stale_pair(store: EventStore) -> tuple[Reading, Reading]:
    """Two copies of one stored reading, each with a chart recorded: the second to be
    saved is stale."""
    reading = new_reading()
    store.append_sync(reading)
    stale_a = store.load_sync(Reading, reading.id)
    stale_b = store.load_sync(Reading, reading.id)
    assert stale_a is not None and stale_b is not None
    chart = calculate_chart(birth())
    stale_a.record_chart(chart, meta())
    stale_b.record_chart(chart, meta())
    return stale_a, stale_b


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[EventStore]:
    """A store on Postgres, whose event loop's commands go through the loop writer."""
    s = EventStore(services_settings(postgres_url))
    yield s
    s.close()


async def test_a_conflict_among_commands_of_the_event_loop_fails_only_the_stale_one(
    postgres_store: EventStore,
) -> None:
    """On Postgres the loop's commands are saved by the loop writer; its batches fall back
    to one by one on a conflict, as the thread writer's do."""
    stale_a, stale_b = _stale_pair(postgres_store)
    others = [new_reading() for _ in range(5)]
    # Queued in one turn of the loop, before the writer's task runs: one batch.
    outcomes = await asyncio.gather(
        *(postgres_store.append(a) for a in (stale_a, stale_b, *others)), return_exceptions=True
    )
    assert isinstance(outcomes[0], int)
    assert isinstance(outcomes[1], ConcurrencyConflict)
    assert all(isinstance(o, int) for o in outcomes[2:])
    assert postgres_store.writer.batches == 1, "only the set-up went through the thread writer"
    assert len(await postgres_store.read(0, 100)) == 1 + 1 + 5


async def test_an_append_on_the_loop_after_the_server_ended_its_session_succeeds(
    postgres_store: EventStore,
    postgres_url: str,
) -> None:
    first = await postgres_store.append(new_reading())
    assert await end_sessions(postgres_url), "the store had sessions to end"
    second = await postgres_store.append(new_reading())
    assert second > first
    assert [e.position for e in await postgres_store.read(0, 10)] == [first, second]


async def test_stopping_saves_what_the_loop_queued_and_later_appends_still_land(
    postgres_store: EventStore,
) -> None:
    queued = [asyncio.ensure_future(postgres_store.append(new_reading())) for _ in range(20)]
    await asyncio.sleep(0)  # each has queued its events
    await postgres_store.stop_appending()
    assert all(task.done() for task in queued), "stopping waits for what was queued"
    positions = [task.result() for task in queued]
    later = await postgres_store.append(new_reading())
    assert sorted([*positions, later]) == list(range(1, 22))


def test_a_store_serves_the_commands_of_a_new_loop_after_the_first_closed(
    postgres_store: EventStore,
) -> None:
    """As when tests or tools run one event loop after another with one store (the first
    stopping as a server does)."""

    async def append_then_stop() -> int:
        position = await postgres_store.append(new_reading())
        await postgres_store.stop_appending()
        return position

    first = asyncio.run(append_then_stop())
    second = asyncio.run(postgres_store.append(new_reading()))
    assert (first, second) == (1, 2)
    assert postgres_store.writer.batches == 0, "both loops' commands went through a loop writer"


async def test_commands_on_the_loop_hear_unavailable_when_the_database_cannot_be_reached(
    postgres_store: EventStore,
) -> None:
    writer = postgres_store._loop_writer
    assert writer is not None
    writer.connection.connect_kwargs["port"] = free_port()  # nobody listens there
    outcomes = await asyncio.gather(
        *(postgres_store.append(new_reading()) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert all("not answering" in str(o) for o in outcomes)


async def test_a_command_on_the_loop_past_its_deadline_hears_unavailable_and_is_not_saved(
    postgres_store: EventStore, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first command's batch waits for the table lock (held here, as a long write of
    another process would); the second, queued behind it, gives up at its deadline and is
    dropped before its turn, while the first lands once the lock is let go."""
    store = postgres_store
    held = await psycopg.AsyncConnection.connect(postgres_url)
    try:
        await held.execute("LOCK TABLE almanac_events IN EXCLUSIVE MODE")
        first_reading, late_reading = new_reading(), new_reading()
        first = asyncio.ensure_future(store.append(first_reading))
        await _until_waiting_for_the_lock(postgres_url)
        monkeypatch.setattr(eventstore, "APPEND_TIMEOUT", 0.05)
        with pytest.raises(Unavailable, match=r"did not confirm the write within 0\.05 s"):
            await store.append(late_reading)
        await held.rollback()
        assert await first == 1
        assert [e.aggregate_id for e in await store.read(0, 10)] == [first_reading.id]
    finally:
        await held.close()


async def _until_waiting_for_the_lock(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:

        async def a_session_waits_for_a_lock() -> bool:
            cur = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            row = await cur.fetchone()
            return row is not None and row[0] > 0

        await eventually(
            a_session_waits_for_a_lock, within=10, what="the append waits for the lock"
        )


async def test_a_second_running_loop_appends_through_the_threads_and_leaves_the_first_alone(
    postgres_store: EventStore,
) -> None:
    mine = [asyncio.ensure_future(postgres_store.append(new_reading())) for _ in range(5)]
    await asyncio.sleep(0)  # each has queued its events with this loop's writer
    other = await asyncio.to_thread(asyncio.run, postgres_store.append(new_reading()))
    positions = await asyncio.wait_for(asyncio.gather(*mine), 10)
    assert sorted([*positions, other]) == list(range(1, 7))
    assert postgres_store.writer.batches == 1, "the other loop's append went through the thread"


async def test_stopping_gives_up_on_a_write_that_hangs_and_its_callers_hear_unavailable(
    postgres_store: EventStore, postgres_url: str
) -> None:
    """A shutdown is bounded: a batch stuck behind a lock another session holds is given
    up after the stop's timeout, and its caller told, not left waiting."""
    held = await psycopg.AsyncConnection.connect(postgres_url)
    try:
        await held.execute("LOCK TABLE almanac_events IN EXCLUSIVE MODE")
        stuck = asyncio.ensure_future(postgres_store.append(new_reading()))
        await _until_waiting_for_the_lock(postgres_url)
        writer = postgres_store._loop_writer
        assert writer is not None
        await asyncio.wait_for(writer.stop(timeout=0.1), 10)
        with pytest.raises(Unavailable, match="closing"):
            await stuck
    finally:
        await held.close()


async def test_a_stop_from_another_running_loop_leaves_the_owner_loops_appends_alone(
    postgres_store: EventStore,
) -> None:
    mine = [asyncio.ensure_future(postgres_store.append(new_reading())) for _ in range(5)]
    await asyncio.sleep(0)  # each has queued its events with this loop's writer
    await asyncio.to_thread(asyncio.run, postgres_store.stop_appending())
    positions = await asyncio.wait_for(asyncio.gather(*mine), 10)
    assert sorted(positions) == list(range(1, 6))
    writer = postgres_store._loop_writer
    assert writer is not None and writer.batches >= 1, "this loop's writer saved them"


async def test_after_a_stop_on_a_loop_that_never_appended_its_appends_go_to_the_thread(
    postgres_store: EventStore,
) -> None:
    await postgres_store.stop_appending()
    assert await postgres_store.append(new_reading()) == 1
    writer = postgres_store._loop_writer
    assert writer is not None and writer.batches == 0
    assert postgres_store.writer.batches == 1
