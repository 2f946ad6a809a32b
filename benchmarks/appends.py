"""Event appends: the group-commit writer against row-at-a-time inserts, in one run.

Baseline: single-row INSERT transactions into a plain table from 1 and 8 clients, run by
``pgbench`` (a client process of its own, in C) where it is installed, else by psycopg from
as many threads of this process (which share one interpreter lock, and so understate what
8 clients do: say which in the output). Almanac: 1 and 64 concurrent writers appending new
one-event Reading aggregates through ``EventStore.append``.

Run: ``python -m benchmarks appends [--seconds N] [--profile services|embedded]``.
Needs Postgres on 127.0.0.1:5432 for the services profile and the baseline.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from almanac.domain.chart import BirthData, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore
from almanac.settings import Settings, StoreSettings

ADMIN_URL = os.environ.get(
    "ALMANAC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BIRTH = BirthData("1990-04-12", "14:30", "Europe/London", 51.5074, -0.1278)


def _database() -> tuple[str, str]:
    name = f"almanac_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


_INSERT = "INSERT INTO bench_rows (body) VALUES ('{\"a\": 1}')"


def baseline_tool() -> str:
    return "pgbench" if shutil.which("pgbench") else "psycopg threads"


def baseline_inserts(url: str, clients: int, seconds: float) -> float:
    """Single-row insert transactions per second from ``clients`` clients."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_rows (id bigserial PRIMARY KEY, body jsonb NOT NULL)"
        )
    if baseline_tool() == "pgbench":
        return _pgbench(url, clients, seconds)
    counts = [0] * clients
    deadline = time.perf_counter() + seconds

    def run(i: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while time.perf_counter() < deadline:
                conn.execute(_INSERT)
                counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _pgbench(url: str, clients: int, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(_INSERT + ";\n")
        script.flush()
        done = subprocess.run(
            [
                "pgbench", "--no-vacuum", "--client", str(clients), "--jobs", str(min(clients, 2)),
                "--time", str(max(1, round(seconds))), "--file", script.name, url,
            ],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
    found = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


def _reading() -> Reading:
    return Reading.request(
        reading_id=uuid.uuid4(),
        meta=EventMeta.for_request("bench"),
        birth=BIRTH,
        options=ChartOptions(),
        kind="natal",
        label=None,
        request_hash="0" * 64,
    )


async def almanac_appends(store: EventStore, writers: int, seconds: float) -> dict[str, float]:
    """Appends per second from ``writers`` concurrent coroutines, and latency percentiles."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        while time.perf_counter() < deadline:
            reading = _reading()
            t0 = time.perf_counter()
            await store.append(reading)
            latencies.append(time.perf_counter() - t0)

    batches_before = store.batches
    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    batches = store.batches - batches_before
    return {
        "events_per_s": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "events_per_txn": n / max(batches, 1),
    }


def run(seconds: float = 5.0, profile: str = "services") -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "appends", "profile": profile, "seconds": seconds}
    name, url = _database()
    try:
        result["baseline_1_client_tps"] = baseline_inserts(url, 1, seconds)
        result["baseline_8_clients_tps"] = baseline_inserts(url, 8, seconds)
        result["baseline_tool"] = baseline_tool()
        print(
            f"baseline single-row inserts ({result['baseline_tool']}): "
            f"1 client {result['baseline_1_client_tps']:,.0f}/s, "
            f"8 clients {result['baseline_8_clients_tps']:,.0f}/s"
        )
        with tempfile.TemporaryDirectory() as tmp:
            if profile == "services":
                settings = Settings(store=StoreSettings(postgres_url=url, pool_size=8))
            else:
                settings = Settings(store=StoreSettings(data_dir=Path(tmp)))
            store = EventStore(settings)
            try:
                for writers in (1, 64):
                    figures = asyncio.run(almanac_appends(store, writers, seconds))
                    result[f"almanac_{writers}_writers"] = figures
                    print(
                        f"almanac appends, {writers} writers: {figures['events_per_s']:,.0f}/s, "
                        f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
                        f"{figures['events_per_txn']:.1f} events per transaction"
                    )
            finally:
                store.close()
    finally:
        _drop(name)
    ratio = result["almanac_64_writers"]["events_per_s"] / result["baseline_8_clients_tps"]
    result["ratio_64_writers_to_8_client_baseline"] = ratio
    result["target"] = 1.0
    print(f"ratio (64 writers / 8-client baseline): {ratio:.2f} (target >= 1.0)")
    return result
