"""Projection rebuild speed and live projection lag.

rebuild: seeds a fresh event store with complete readings (requested, chart calculated,
generated: the real event mix and sizes), then rebuilds the ``readings`` projection into a
fresh read database from position 0 and reports events per second.
Baseline: ``executemany`` of the same number of small rows in one transaction per 500
(the database's own ceiling for this write pattern).

lag: a running projector while commands arrive at a fixed rate from another process
(``benchmarks/appender.py``, through the group-commit writer); for each
``reading.requested`` after a one-second warm-up, the time from its durable append to the
projector's commit that includes it (both on CLOCK_MONOTONIC). Target: p99 <= 20 ms at
1,000 commands/s.

Run: ``python -m benchmarks rebuild --events 200000`` / ``python -m benchmarks lag``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.bootstrap import bootstrap
from almanac.domain.chart import ChartOptions, calculate_chart
from almanac.domain.events import EventMeta
from almanac.domain.interpretation import BuiltinGenerator
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore
from almanac.logs import configure_logging
from almanac.readmodels import PositionWatch, ReadDatabase, projection_position
from almanac.server import settle_heap
from almanac.settings import FeedSettings, LogSettings, Settings, StoreSettings
from benchmarks.appender import offer
from benchmarks.appends import BIRTH, _database, _drop
from benchmarks.disk import FsyncProbe, describe
from projections.readings import ReadingsProjection
from projections.runner import ProjectionRunner
from streams.logfeed import LogFeed


def _settings(profile: str, url: str | None, data_dir: Path) -> Settings:
    if profile == "services":
        return Settings(
            store=StoreSettings(postgres_url=url, pool_size=8),
            feed=FeedSettings(poll_interval=0.05, batch_size=2000),
            log=LogSettings(level="WARNING"),
        )
    return Settings(
        store=StoreSettings(data_dir=data_dir),
        feed=FeedSettings(poll_interval=0.05, batch_size=2000),
        log=LogSettings(level="WARNING"),
    )


def seed(store: EventStore, events: int) -> float:
    """Append ``events`` events (three per reading) in large transactions; events/s."""
    chart = calculate_chart(BIRTH)
    text = asyncio.run(BuiltinGenerator().generate(chart, "natal", "bench"))
    readings = events // 3
    start = time.perf_counter()
    done = 0
    while done < readings:
        batch = []
        for _ in range(min(500, readings - done)):
            meta = EventMeta.for_request(f"owner-{done % 50}")
            reading = Reading.request(
                reading_id=uuid.uuid4(),
                meta=meta,
                birth=BIRTH,
                options=ChartOptions(),
                kind="natal",
                label=None,
                request_hash="0" * 64,
            )
            reading.record_chart(chart, meta)
            reading.record_text(text, meta)
            batch.append(reading)
            done += 1
        store.app.save(*batch)
        if done % 30_000 < 500:
            print(f"   seeded {done * 3:,} events")
    return done * 3 / (time.perf_counter() - start)


def settle(url: str) -> None:
    """Vacuum the freshly seeded events table, as autovacuum will have done to any real
    history long before a rebuild reads it. Otherwise the rebuild's reads pay for setting
    the hint bits of every new row (a one-off write of the whole table: 15-20 % of the
    first rebuild's time here), which is the seeding's cost, not the rebuild's. Then a
    checkpoint, for the same reason: the seeding and the vacuum leave ~1.6 GB of dirty
    pages per 1M events, which the checkpointer would otherwise write out during the
    rebuild (a real history was written to disk long before it is rebuilt)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) almanac_events")
        started = time.perf_counter()
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            print("   no checkpoint after seeding: needs a superuser or pg_checkpoint")
        else:
            print(f"   checkpoint after seeding: {time.perf_counter() - started:.1f} s")


async def rebuild(store: EventStore, db: ReadDatabase, batch_size: int) -> tuple[int, float]:
    feed = LogFeed(store, poll_interval=0.05)
    watch = PositionWatch(lambda name: projection_position(db, name))
    runner = ProjectionRunner(ReadingsProjection(), feed, db, watch, batch_size=batch_size)
    await db.open()
    await runner.prepare()
    head = await store.max_position()
    settle_heap()  # as ``almanac serve`` does once started, while a projector rebuilds
    start = time.perf_counter()
    task = asyncio.create_task(runner.run())
    await watch.wait_for("readings", head, timeout=3600)
    # A rebuild is done when the indexes deferred while catching up are built too.
    await asyncio.wait_for(runner.caught_up.wait(), timeout=3600)
    elapsed = time.perf_counter() - start
    runner.stop()
    await task
    await db.close()
    return head, elapsed


def baseline_executemany(url: str, rows: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_many (id bigint PRIMARY KEY, v text)")
    start = time.perf_counter()
    with psycopg.connect(url) as conn:
        for offset in range(0, rows, 500):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench_many VALUES (%s, %s)",
                    [(i, "x" * 40) for i in range(offset, min(rows, offset + 500))],
                )
    return rows / (time.perf_counter() - start)


def run_rebuild(
    seconds: float = 5.0, profile: str = "services", events: int = 200_000
) -> dict[str, Any]:
    del seconds  # the size of the log bounds this benchmark
    result: dict[str, Any] = {"benchmark": "rebuild", "profile": profile, "events": events}
    name, url = _database()
    read_name = f"{name}_rebuild"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = _settings(profile, url, Path(tmp))
            configure_logging(settings.log)
            store = EventStore(settings)
            try:
                result["seed_events_per_s"] = seed(store, events)
                if profile == "services":
                    settle(url)
                base = url.rsplit("/", 1)[0]
                result["baseline_executemany_rows_per_s"] = baseline_executemany(url, events)
                print(
                    f"baseline executemany: {result['baseline_executemany_rows_per_s']:,.0f} rows/s"
                )
                db: ReadDatabase = (
                    PostgresReadDatabase(f"{base}/{read_name}")
                    if profile == "services"
                    else SqliteReadDatabase(Path(tmp) / "rebuild.sqlite3")
                )
                count, elapsed = asyncio.run(rebuild(store, db, batch_size=2000))
            finally:
                store.close()
        rate = count / elapsed
        result.update(rebuilt_events=count, seconds=elapsed, events_per_s=rate, target=50_000)
        print(
            f"rebuild: {count:,} events in {elapsed:.1f} s = {rate:,.0f} events/s "
            f"(target >= 50,000; ratio {rate / 50_000:.2f})"
        )
    finally:
        _drop(name)
        _drop(read_name)
    return result


def _appender_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALMANAC_")}
    if settings.store.postgres_url:
        env.update(
            ALMANAC_POSTGRES_URL=settings.store.postgres_url,
            ALMANAC_REDIS_URL="redis://127.0.0.1:6379/0",
            ALMANAC_NATS_URL="nats://127.0.0.1:4222",
        )
    else:
        env["ALMANAC_DATA_DIR"] = str(settings.store.data_dir)
    return env


# Commands of the first second are sent at the full rate but not measured: they meet a
# projector whose connections, prepared statements and caches are all still cold (their
# lags reached 40-100 ms, ~1-2 % of a 10 s run, which alone decided its p99).
LAG_WARM_UP = 1.0
# DESIGN: command -> read model visible, p99 <= 20 ms at 1,000 commands/s.
LAG_TARGET_P99_MS = 20


async def _append_elsewhere(settings: Settings, rate: int, seconds: float) -> dict[str, Any]:
    appender = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.appender",
        str(rate),
        str(seconds),
        env=_appender_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(appender.communicate(), timeout=seconds * 10 + 60)
    report: dict[str, Any] = json.loads(out)
    return report


async def measure_lag(settings: Settings, rate: int, seconds: float) -> dict[str, float]:
    configure_logging(settings.log)  # as a deployed projector's: no debug lines rendered
    # On the services profile the projector is alone in this process; commands come from
    # another process, as from the API in a deployment, so load generation does not share
    # the projector's loop.
    container = bootstrap(settings, roles=("projector",))
    seen: dict[int, float] = {}
    announce = container.watch.announce

    def timed_announce(name: str, position: int) -> None:
        if name == "readings":
            seen.setdefault(position, time.monotonic())
        announce(name, position)

    container.watch.announce = timed_announce  # type: ignore[method-assign]
    await container.start()
    settle_heap()  # as ``almanac serve`` does once started
    try:
        if settings.store.postgres_url is None:
            # The embedded profile is one process: commands come from the projector's own
            # process, as under ``almanac serve``, whose commits wake it in-process (across
            # processes, SQLite has no notification and the projector would be polling).
            started = time.monotonic()
            committed = await offer(container.store, rate, seconds + LAG_WARM_UP)
            achieved = len(committed) / (time.monotonic() - started)
        else:
            report = await _append_elsewhere(settings, rate, seconds + LAG_WARM_UP)
            committed = {int(p): t for p, t in report["committed"].items()}
            achieved = report["achieved_per_s"]
        await container.watch.wait_for("readings", max(committed), timeout=30)
    finally:
        await container.stop()
    # A commit announces its last position; the events before it were visible at that time.
    announced = sorted(seen.items())
    measured_from = min(committed.values()) + LAG_WARM_UP
    lags = []
    for position, at in committed.items():
        if at < measured_from:
            continue
        index = bisect.bisect_left(announced, (position, -1.0))
        if index < len(announced):
            lags.append((announced[index][1] - at) * 1000)
    lags.sort()
    n = len(lags)
    return {
        "offered_per_s": rate,
        "achieved_per_s": achieved,
        "warm_up_s": LAG_WARM_UP,
        "measured": n,
        "p50_ms": lags[n // 2],
        "p99_ms": lags[min(n - 1, int(n * 0.99))],
        "max_ms": lags[-1],
    }


def run_lag(
    seconds: float = 10.0, profile: str = "services", rate: int = 1000, disk_probe: bool = False
) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "lag", "profile": profile}
    name, url = _database()
    try:
        probing = FsyncProbe() if disk_probe else contextlib.nullcontext()
        with tempfile.TemporaryDirectory() as tmp, probing as probe:
            settings = _settings(profile, url, Path(tmp))
            started = time.monotonic()
            figures = asyncio.run(measure_lag(settings, rate, seconds))
            disk = probe.window(started, time.monotonic()) if probe else None
        ratio = figures["p99_ms"] / LAG_TARGET_P99_MS
        result.update(figures, target_p99_ms=LAG_TARGET_P99_MS, ratio_p99=ratio, disk=disk)
        print(
            f"projection lag at {figures['achieved_per_s']:,.0f} commands/s: "
            f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"max {figures['max_ms']:.1f} ms (target p99 <= {LAG_TARGET_P99_MS} ms; "
            f"ratio {ratio:.2f}){describe(disk)}"
        )
    finally:
        _drop(name)
        _drop(f"{name}_read")
    return result
