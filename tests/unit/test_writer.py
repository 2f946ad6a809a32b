"""The group-commit writer's contract, against an in-memory stand-in for the application."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError, OperationalError

from almanac import eventstore
from almanac.errors import Unavailable
from almanac.eventstore import (
    ConcurrencyConflict,
    EventStore,
    EventTooLarge,
    GroupCommitWriter,
    MsgspecMapper,
    append_columns,
)
from almanac.settings import Settings
from tests.factories import new_reading


class FakeApplication:
    """Saves events in memory; refuses a batch holding a marked event, like a unique index."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.saves: list[int] = []
        self.position = 0
        self.fail_with = fail_with
        self.conflicting: set[int] = set()
        self.too_large: set[int] = set()
        self.lock = threading.Lock()

    def record(self, events: Any) -> list[int]:
        if self.fail_with is not None:
            raise self.fail_with
        for event in events:
            if id(event) in self.too_large:
                raise EventTooLarge(event, size=2048, limit=1024)
        if any(id(e) in self.conflicting for e in events):
            raise IntegrityError("duplicate key")
        self.saves.append(len(events))
        start = self.position
        self.position += len(events)
        return list(range(start + 1, self.position + 1))


def queued(
    app: FakeApplication, count: int, *, marked: int | None = None, marks: set[int] | None = None
) -> tuple[GroupCommitWriter, list[Any], list[int]]:
    """A writer with ``count`` jobs queued before its thread starts (so they batch); the
    event of job ``marked`` goes into ``marks`` (one of ``app``'s sets of refused events)."""
    commits: list[int] = []
    writer = GroupCommitWriter(app, max_batch=64, on_commit=commits.append)  # type: ignore[arg-type]
    readings = [new_reading() for _ in range(count)]
    if marked is not None and marks is not None:
        marks.add(id(readings[marked].pending_events[0]))
    futures = [writer.submit([r]) for r in readings]
    return writer, futures, commits


def test_queued_commands_are_saved_in_one_transaction_and_each_gets_its_position() -> None:
    app = FakeApplication()
    writer, futures, commits = queued(app, 10)
    writer.start()
    positions = [f.result(timeout=5) for f in futures]
    writer.stop()
    assert app.saves == [10]
    assert positions == list(range(1, 11))
    assert commits == [10]


def test_batches_are_capped_at_max_batch() -> None:
    app = FakeApplication()
    writer = GroupCommitWriter(app, max_batch=4, on_commit=lambda _p: None)  # type: ignore[arg-type]
    futures = [writer.submit([new_reading()]) for _ in range(10)]
    writer.start()
    for f in futures:
        f.result(timeout=5)
    writer.stop()
    assert app.saves == [4, 4, 2]


def test_a_conflict_fails_only_its_own_command() -> None:
    app = FakeApplication()
    writer, futures, _ = queued(app, 5, marked=2, marks=app.conflicting)
    writer.start()
    with pytest.raises(ConcurrencyConflict):
        futures[2].result(timeout=5)
    others = [f.result(timeout=5) for i, f in enumerate(futures) if i != 2]
    writer.stop()
    assert len(set(others)) == 4
    assert writer.fallbacks == 1


def test_an_event_too_large_fails_only_its_own_command_and_the_rest_commit_together() -> None:
    app = FakeApplication()
    writer, futures, _ = queued(app, 5, marked=1, marks=app.too_large)
    writer.start()
    with pytest.raises(EventTooLarge):
        futures[1].result(timeout=5)
    others = [f.result(timeout=5) for i, f in enumerate(futures) if i != 1]
    writer.stop()
    assert others == [1, 2, 3, 4]
    assert app.saves == [4], "the others were saved in one transaction"


def test_an_unreachable_database_is_reported_as_unavailable_to_every_caller() -> None:
    app = FakeApplication(fail_with=OperationalError("connection refused"))
    writer, futures, commits = queued(app, 3)
    writer.start()
    for f in futures:
        with pytest.raises(Unavailable):
            f.result(timeout=5)
    writer.stop()
    assert commits == []


def test_an_aggregate_without_pending_events_is_refused() -> None:
    app = FakeApplication()
    reading = new_reading()
    reading.collect_events()
    writer = GroupCommitWriter(app, max_batch=8, on_commit=lambda _p: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to save"):
        writer.submit([reading]).result(timeout=1)


def test_a_caller_that_gave_up_is_dropped_and_the_writer_keeps_serving_the_rest() -> None:
    app = FakeApplication()
    writer = GroupCommitWriter(app, max_batch=64, on_commit=lambda _p: None)  # type: ignore[arg-type]
    cancelled = writer.submit([new_reading()])
    kept = writer.submit([new_reading()])
    assert cancelled.cancel()
    writer.start()
    assert kept.result(timeout=5) == 1
    later = writer.submit([new_reading()])
    assert later.result(timeout=5) == 2, "the writer thread is still alive"
    writer.stop()
    assert app.saves == [1, 1], "the cancelled command's events were not saved"


async def test_coroutines_on_one_loop_hear_their_positions_with_one_wake_up_per_batch() -> None:
    app = FakeApplication()
    writer = GroupCommitWriter(app, max_batch=64, on_commit=lambda _p: None)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    wake_ups = 0
    plain = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal wake_ups
        wake_ups += 1
        return plain(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
    try:
        futures = [writer.submit_async([new_reading()]) for _ in range(10)]
        writer.start()
        positions = await asyncio.wait_for(asyncio.gather(*futures), 5)
    finally:
        writer.stop()
        del loop.call_soon_threadsafe
    assert positions == list(range(1, 11))
    assert app.saves == [10]
    assert wake_ups == 1


async def test_a_coroutine_that_gave_up_is_dropped_unsaved() -> None:
    app = FakeApplication()
    writer = GroupCommitWriter(app, max_batch=64, on_commit=lambda _p: None)  # type: ignore[arg-type]
    gave_up = writer.submit_async([new_reading()])
    kept = writer.submit_async([new_reading()])
    gave_up.cancel()
    writer.start()
    try:
        assert await asyncio.wait_for(kept, 5) == 1
    finally:
        writer.stop()
    assert app.saves == [1]


async def test_a_coroutine_hears_a_failed_save() -> None:
    app = FakeApplication(fail_with=OperationalError("connection refused"))
    writer = GroupCommitWriter(app, max_batch=64, on_commit=lambda _p: None)  # type: ignore[arg-type]
    writer.start()
    try:
        with pytest.raises(Unavailable, match="not answering"):
            await asyncio.wait_for(writer.submit_async([new_reading()]), 5)
    finally:
        writer.stop()


async def test_an_append_past_its_deadline_hears_unavailable_and_is_dropped_unsaved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EventStore(Settings.from_env({"ALMANAC_DATA_DIR": str(tmp_path)}))
    app = FakeApplication()
    entered, release = threading.Event(), threading.Event()
    record = app.record

    def held_record(events: Any) -> list[int]:
        entered.set()
        assert release.wait(10), "the test never released the writer"
        return record(events)

    app.record = held_record  # type: ignore[method-assign]
    store.writer._app = app  # type: ignore[assignment]
    try:
        first = asyncio.ensure_future(store.append(new_reading()))
        assert await asyncio.to_thread(entered.wait, 10), "the writer never took the first"
        # The second waits behind the first, past its (shortened) deadline.
        monkeypatch.setattr(eventstore, "APPEND_TIMEOUT", 0.05)
        with pytest.raises(Unavailable, match=r"did not confirm the write within 0\.05 s"):
            await store.append(new_reading())
        release.set()
        assert await first == 1
        assert await store.append(new_reading()) == 2
    finally:
        release.set()
        store.close()
    assert app.saves == [1, 1], "the caller told 'unavailable' before its turn was not saved"


def test_the_loop_writers_columns_are_those_of_the_stored_events() -> None:
    """The loop writer encodes straight into columns; the thread writer's recorder takes
    them from ``StoredEvent`` objects. Both must store the same rows."""
    events = [e for r in (new_reading(), new_reading()) for e in r.collect_events()]
    mapper = MsgspecMapper(max_state_bytes=64 * 1024)
    stored = [mapper.to_stored_event(e) for e in events]
    assert mapper.columns_of(events) == append_columns(stored)
    with pytest.raises(EventTooLarge):
        MsgspecMapper(max_state_bytes=16).columns_of(events)
