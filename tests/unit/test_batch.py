"""The Batch aggregate: outcomes once per item and attempt, completion, cancel, retry."""

from __future__ import annotations

from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.domain.batch import Batch, BatchFinished, BatchItem
from tests.factories import birth, meta


def new_batch(count: int = 3) -> Batch:
    return Batch.start(
        batch_id=uuid4(),
        meta=meta(),
        items=[BatchItem(birth()) for _ in range(count)],
        label=None,
        request_hash="0" * 64,
    )


def settle(batch: Batch, index: int, reason: str | None = None) -> bool:
    return batch.record_outcome(
        index=index,
        reading_id=batch.reading_id(index),
        attempt=batch.attempt_of(index),
        reason=reason,
        meta=meta(),
    )


def test_the_last_outcome_completes_the_batch() -> None:
    batch = new_batch(2)
    assert settle(batch, 0)
    assert batch.status == "running"
    assert settle(batch, 1, "no chart")
    assert batch.status == "completed"
    types = [type(e).__name__ for e in batch.collect_events()]
    assert types == ["Started", "ItemSucceeded", "ItemFailed", "Completed"]


def test_an_outcome_already_recorded_or_out_of_range_changes_nothing() -> None:
    batch = new_batch(2)
    settle(batch, 0)
    batch.collect_events()
    assert not settle(batch, 0)
    assert not settle(batch, 5)
    assert batch.collect_events() == []


def test_retry_failed_reopens_only_failed_items_with_a_new_reading_each() -> None:
    batch = new_batch(3)
    settle(batch, 0)
    settle(batch, 1, "boom")
    settle(batch, 2)
    old_reading = batch.reading_id(1)
    assert batch.retry_failed(meta()) == [1]
    assert batch.status == "running" and batch.pending() == [1]
    assert batch.reading_id(1) != old_reading
    stale = batch.record_outcome(
        index=1, reading_id=old_reading, attempt=0, reason=None, meta=meta()
    )
    assert not stale, "the outcome of a superseded attempt is ignored"
    assert settle(batch, 1)
    assert batch.status == "completed"


def test_a_cancelled_batch_still_records_running_items_but_does_not_complete() -> None:
    batch = new_batch(3)
    settle(batch, 0)
    batch.cancel(meta())
    assert settle(batch, 1)
    assert batch.status == "cancelled"
    batch.cancel(meta())  # again: nothing more to do
    with pytest.raises(BatchFinished):
        batch.retry_failed(meta())


def test_a_completed_batch_cannot_be_cancelled() -> None:
    batch = new_batch(1)
    settle(batch, 0)
    with pytest.raises(BatchFinished):
        batch.cancel(meta())


@given(st.lists(st.integers(min_value=0, max_value=9), max_size=40))
def test_each_item_gets_exactly_one_outcome_whatever_the_repeats(indexes: list[int]) -> None:
    batch = new_batch(10)
    recorded = [i for i in indexes if settle(batch, i)]
    assert sorted(recorded) == sorted(set(indexes))
    assert batch.status == ("completed" if len(set(indexes)) == 10 else "running")
