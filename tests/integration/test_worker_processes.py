"""Worker processes on the services profile share the readings out through JetStream: each
reading is handled by one of them, and what a killed worker had taken goes to another."""

from __future__ import annotations

from pathlib import Path

import pytest

from almanac.eventstore import EventStore
from almanac.settings import Settings
from tests.conftest import services_settings
from tests.factories import new_reading
from tests.integration.support_eventlog import (
    CHART_CALCULATED,
    FAILED,
    GENERATED,
    REQUESTED,
    LogTally,
)
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_waiting import wait_until

SHARED_READINGS = 200
READINGS_TO_KILL = 300
# Little concurrency keeps each worker busy long enough for the other to get its share
# (and to be killed mid-run); a short ack wait hands the killed worker's readings on soon.
WORKER_ENV = {"ALMANAC_WORKER_CONCURRENCY": "2", "ALMANAC_WORKER_ACK_WAIT": "2"}


@pytest.fixture
def settings(postgres_url: str) -> Settings:
    """Services only: the workers share a JetStream consumer."""
    return services_settings(postgres_url)


def generated_by(worker: RoleProcess) -> list[str]:
    """The readings this worker process generated, from its log."""
    return [
        str(record["aggregate_id"])
        for record in worker.log_records()
        if record["event"] == "worker.reading_generated"
    ]


def start_relay_and_workers(processes: RoleProcesses) -> list[RoleProcess]:
    """A relay feeds the stream the workers consume; both workers ready before any work."""
    relay = processes.start("relay")
    workers = [processes.start("worker"), processes.start("worker")]

    def all_started() -> bool:
        relay.ensure_running()
        for worker in workers:
            worker.ensure_running()
        return all("worker.started" in worker.log_events() for worker in workers)

    wait_until(all_started, within=60, what="two worker processes bound to the consumer")
    return workers


def assert_each_generated_once(tally: LogTally, ids: list[str], count: int) -> None:
    tally.refresh()
    for reading_id, types in tally.per_reading.items():
        assert types == [REQUESTED, CHART_CALCULATED, GENERATED], (reading_id, types)
    assert sorted(str(i) for i in tally.per_reading) == sorted(ids)
    assert tally.types[FAILED] == 0
    assert sum(tally.types.values()) == 3 * count


def test_two_workers_share_the_readings_and_generate_each_once(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        tally = LogTally(store)
        with RoleProcesses(settings, tmp_path, **WORKER_ENV) as processes:
            workers = start_relay_and_workers(processes)
            readings = [new_reading() for _ in range(SHARED_READINGS)]
            store.append_sync(*readings)

            def all_generated() -> bool:
                for worker in workers:
                    worker.ensure_running()
                return tally.count(GENERATED) >= SHARED_READINGS

            wait_until(all_generated, within=90, what=f"{SHARED_READINGS} readings generated")
            ids = [str(r.id) for r in readings]
            assert_each_generated_once(tally, ids, SHARED_READINGS)

            def both_logged_all() -> tuple[list[str], list[str]] | None:
                first, second = generated_by(workers[0]), generated_by(workers[1])
                return (first, second) if len(first) + len(second) >= len(ids) else None

            first, second = wait_until(
                both_logged_all, within=10, what="each generated reading in a worker's log"
            )
            assert first, "the first worker did some of the work"
            assert second, "the second worker did some of the work"
            assert sorted(first + second) == sorted(ids), "each reading by one worker, once"
    finally:
        store.close()


# What the worker logs once a reading it charted is settled, before it acknowledges it.
SETTLED_AFTER_CHART = {
    "worker.reading_generated",
    "worker.reading_failed",
    "worker.generator_crashed",
}


def readings_in_hand(worker: RoleProcess) -> set[str]:
    """The readings whose chart this worker calculated but which it has not yet settled:
    taken and not yet acknowledged (the ack follows the settling)."""
    charted: set[str] = set()
    for record in worker.log_records():
        if record["event"] == "worker.chart_calculated":
            charted.add(str(record["aggregate_id"]))
        elif record["event"] in SETTLED_AFTER_CHART:
            charted.discard(str(record["aggregate_id"]))
    return charted


def kill_mid_reading(worker: RoleProcess) -> set[str]:
    """SIGKILL the worker at a moment it holds readings it has not acknowledged (frozen
    while its log is read, so that what the log says is what it holds); return them."""

    def caught_holding() -> set[str]:
        worker.ensure_running()
        worker.freeze()
        held = readings_in_hand(worker)
        if held:
            worker.kill()
        else:
            worker.thaw()
        return held

    return wait_until(caught_holding, within=60, what="the worker caught mid-reading")


def test_a_worker_killed_mid_run_leaves_its_readings_to_the_other(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        tally = LogTally(store)
        with RoleProcesses(settings, tmp_path, **WORKER_ENV) as processes:
            victim, survivor = start_relay_and_workers(processes)
            readings = [new_reading() for _ in range(READINGS_TO_KILL)]
            store.append_sync(*readings)

            def both_busy() -> bool:
                victim.ensure_running()
                return bool(generated_by(victim)) and tally.count(GENERATED) >= 60

            wait_until(both_busy, within=60, what="the workers generate 60 readings")
            held = kill_mid_reading(victim)
            assert tally.count(GENERATED) < READINGS_TO_KILL, "the worker was not killed mid-run"

            def all_generated() -> bool:
                survivor.ensure_running()
                return tally.count(GENERATED) >= READINGS_TO_KILL

            wait_until(all_generated, within=90, what=f"all {READINGS_TO_KILL} readings generated")

            # What the killed worker held comes to the survivor after the ack wait (even
            # once all is done, if only the victim's ack was lost), as a redelivery.
            def redelivered() -> set[str]:
                return {
                    str(record["aggregate_id"])
                    for record in survivor.log_records()
                    if record["event"] == "worker.redelivered"
                }

            wait_until(
                lambda: held <= redelivered(),
                within=30,
                what=f"the readings the killed worker held ({sorted(held)}) redelivered",
            )
            assert_each_generated_once(tally, [str(r.id) for r in readings], READINGS_TO_KILL)
            assert survivor.terminate(timeout=20) == 0, survivor.output()[-4000:]
    finally:
        store.close()
