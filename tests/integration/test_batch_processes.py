"""A batch in worker processes on the services profile: killing one of two workers midway
(whichever leads the batch process manager) loses and duplicates no item's outcome."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from uuid import UUID, uuid4

import msgspec
import pytest

from almanac.domain.batch import Batch, BatchItem
from almanac.domain.events import EventMeta
from almanac.eventstore import EventStore, RecordedEvent
from almanac.settings import Settings
from tests.conftest import services_settings
from tests.factories import birth
from tests.integration.support_eventlog import GENERATED, REQUESTED, LogTally
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_waiting import wait_until
from tests.integration.test_worker_processes import start_relay_and_workers

ITEMS = 1000
SUCCEEDED = Batch.ItemSucceeded.TOPIC
ITEM_FAILED = Batch.ItemFailed.TOPIC
WORKER_ENV = {
    "ALMANAC_WORKER_CONCURRENCY": "4",
    "ALMANAC_WORKER_ACK_WAIT": "2",
    "ALMANAC_BATCH_STANDBY_INTERVAL": "0.2",
}


@pytest.fixture
def settings(postgres_url: str) -> Settings:
    """Services only: the workers share a JetStream consumer."""
    return services_settings(postgres_url)


def leads_the_batches(worker: RoleProcess) -> bool:
    return "batches.leading" in worker.log_events()


def test_a_batch_completes_with_exactly_one_outcome_per_item_when_a_worker_is_killed(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        tally = LogTally(store)
        with RoleProcesses(settings, tmp_path, **WORKER_ENV) as processes:
            workers = start_relay_and_workers(processes)
            # A few distinct births: identical birth data gives identical charts.
            items = [BatchItem(birth(latitude=float(i % 50))) for i in range(ITEMS)]
            batch = Batch.start(
                batch_id=uuid4(),
                meta=EventMeta.for_request("alice"),
                items=items,
                label="kill",
                request_hash="0" * 64,
            )
            store.append_sync(batch)

            def midway() -> bool:
                for worker in workers:
                    worker.ensure_running()
                return tally.count(SUCCEEDED) >= ITEMS // 3

            wait_until(midway, within=120, what="a third of the items done")
            victim = next((w for w in workers if leads_the_batches(w)), workers[0])
            survivor = workers[1] if victim is workers[0] else workers[0]
            victim.kill()
            assert tally.count(SUCCEEDED) < ITEMS, "the worker was not killed midway"

            def completed() -> bool:
                survivor.ensure_running()
                loaded = store.load_sync(Batch, batch.id)
                return loaded is not None and loaded.status == "completed"

            wait_until(completed, within=240, what=f"all {ITEMS} items done")
            tally.refresh()
            outcomes = [
                event.view(_Index).index
                for event in _batch_events(store, batch.id)
                if event.type in {SUCCEEDED, ITEM_FAILED}
            ]
            assert sorted(outcomes) == list(range(ITEMS)), "exactly one outcome per item"
            assert tally.types[ITEM_FAILED] == 0
            readings = [r for r, types in tally.per_reading.items() if types[0] == REQUESTED]
            assert len(readings) == ITEMS, "one reading per item, however often released"
            assert Counter(tally.per_reading[r].count(GENERATED) for r in readings) == {1: ITEMS}
            assert survivor.terminate(timeout=20) == 0, survivor.output()[-4000:]
    finally:
        store.close()


class _Index(msgspec.Struct):
    index: int


def _batch_events(store: EventStore, batch_id: UUID) -> list[RecordedEvent]:
    found: list[RecordedEvent] = []
    position = 0
    for _ in range(1000):
        page = store.read_sync(position, 1000)
        found.extend(e for e in page if e.aggregate_id == batch_id)
        if len(page) < 1000:
            return found
        position = page[-1].position
    raise AssertionError("the log is longer than expected")
