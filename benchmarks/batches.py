"""Batch throughput: items per second through the batch process manager and the workers.

For each run a fresh event store (services profile: Postgres, NATS JetStream) and worker
processes (``almanac serve --roles worker``, plus one relay), then one batch of ``items``
items with distinct birth data (every chart calculated), appended in-process; the clock runs
from the append until the batch is ``completed``.

- baseline: the same number of single readings appended at once, one worker: readings/s
  (what the workers do without batches in the way).
- batch, 1 worker and 2 workers: items/s; the ratios to the baseline and of 2 to 1 workers.

On a 2-core machine the second worker competes with the first, the relay and Postgres for
the same cores, so the 2-worker figure shows the cost of sharing out more than a speed-up.

Run: ``python -m benchmarks batches --events 1000`` (``--events``: items per batch).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from almanac.domain.batch import Batch, BatchItem
from almanac.domain.chart import BirthData, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore
from almanac.settings import Settings, StoreSettings
from benchmarks.appends import _database, _drop
from benchmarks.websocket import _delete_stream, _server_env

SERVE = [sys.executable, "-m", "almanac", "serve"]


def _births(count: int) -> list[BirthData]:
    return [
        BirthData("1990-04-12", "14:30", "Europe/London", -60 + (i % 12_000) / 100, -0.1278)
        for i in range(count)
    ]


def _start(roles: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [*SERVE, "--roles", roles, "--port", "0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _wait(done: Any, processes: list[subprocess.Popen[bytes]], within: float) -> float:
    """Seconds until ``done()``; fails if a process dies or ``within`` passes."""
    start = time.perf_counter()
    for _ in range(int(within / 0.02) + 1):
        if done():
            return time.perf_counter() - start
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a role process exited with {process.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"not done within {within} s")


def _measure(workers: int, items: int, *, batch: bool) -> float:
    """Items (or readings) per second with ``workers`` worker processes."""
    name, url = _database()
    env = _server_env("services", url, Path(tempfile.gettempdir()))
    env["ALMANAC_WORKER_CONCURRENCY"] = "8"
    store = EventStore(Settings(store=StoreSettings(postgres_url=url, pool_size=4)))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as logs:
            processes.append(_start("relay,worker", env, Path(logs) / "first.log"))
            processes.extend(
                _start("worker", env, Path(logs) / f"worker-{n}.log") for n in range(1, workers)
            )
            # Processes log at WARNING here, so there is no "started" line to wait for: give
            # them time to open the stream and bind the consumer before the clock starts.
            time.sleep(3)
            meta = EventMeta.for_request("bench")
            births = _births(items)
            if batch:
                started = Batch.start(
                    batch_id=uuid4(),
                    meta=meta,
                    items=[BatchItem(b) for b in births],
                    label=None,
                    request_hash="0" * 64,
                )
                store.append_sync(started)

                def done() -> bool:
                    loaded = store.load_sync(Batch, started.id)
                    return loaded is not None and loaded.status == "completed"

            else:
                readings = [
                    Reading.request(
                        reading_id=uuid4(),
                        meta=meta,
                        birth=b,
                        options=ChartOptions(),
                        kind="natal",
                        label=None,
                        request_hash="0" * 64,
                    )
                    for b in births
                ]
                for start in range(0, len(readings), 256):
                    store.append_sync(*readings[start : start + 256])
                last = readings[-1].id

                def done() -> bool:
                    # The workers take readings in order, a few at a time: the last is last.
                    loaded = store.load_sync(Reading, last)
                    return loaded is not None and loaded.settled

            seconds = _wait(done, processes, 600)
            return items / seconds
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        store.close()
        asyncio.run(_delete_stream(env["ALMANAC_NATS_STREAM"]))
        _drop(name)
        _drop(f"{name}_read")


def run(seconds: float = 5.0, profile: str = "services", events: int = 1000) -> dict[str, Any]:
    """``seconds`` is unused: each measurement runs until its work is done."""
    del seconds
    if profile != "services":
        print("   workers share batch work through JetStream: services profile only")
        return {"benchmark": "batches", "profile": profile, "skipped": "services profile only"}
    items = events
    baseline = _measure(1, items, batch=False)
    print(f"   baseline: {items} single readings, 1 worker: {baseline:,.0f} readings/s")
    one = _measure(1, items, batch=True)
    print(f"   batch, 1 worker:  {one:,.0f} items/s  ({one / baseline:.2f} x baseline)")
    two = _measure(2, items, batch=True)
    print(
        f"   batch, 2 workers: {two:,.0f} items/s  ({two / baseline:.2f} x baseline,"
        f" {two / one:.2f} x 1 worker)"
    )
    return {
        "benchmark": "batches",
        "profile": profile,
        "items": items,
        "cpus": os.cpu_count(),
        "baseline_readings_per_s": round(baseline, 1),
        "batch_items_per_s_1_worker": round(one, 1),
        "batch_items_per_s_2_workers": round(two, 1),
        "ratio_1_worker_to_baseline": round(one / baseline, 3),
        "ratio_2_workers_to_1": round(two / one, 3),
    }
