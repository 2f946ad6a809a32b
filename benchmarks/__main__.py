"""``python -m benchmarks [NAME ...] [--seconds N] [--profile P] [--events N] [--disk-probe]``.

``almanac bench NAME`` is the same (``almanac bench --list`` lists them). With no name every
benchmark runs; ``--profile all`` runs each on every profile where it means something (what
``make bench`` does, about 21 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import api, appends, batches, cpu, projections, relay, webhooks, websocket


@dataclass(frozen=True)
class Benchmark:
    run: Callable[..., dict[str, Any]]
    summary: str
    profiles: tuple[str, ...]
    # Rough wall time of one run at the default --seconds, for planning (2 cores).
    minutes: float
    # Takes --events (the size of what it seeds or sends).
    sized: bool = False
    # Takes --server and --pyspy.
    http: bool = False
    # A latency benchmark: takes --disk-probe.
    latency: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    "appends": Benchmark(
        appends.run,
        "group-commit appends, 1 and 64 writers, vs pgbench single-row inserts (1/8 clients)",
        ("services", "embedded"),
        0.5,
    ),
    "rebuild": Benchmark(
        projections.run_rebuild,
        "readings projection rebuilt from position 0 (events/s), vs executemany",
        ("services", "embedded"),
        2.0,
        sized=True,
    ),
    "lag": Benchmark(
        projections.run_lag,
        "command -> read model visible at 1k commands/s (p50/p99)",
        ("services", "embedded"),
        0.5,
        latency=True,
    ),
    "api": Benchmark(
        api.run,
        "POST and GET /api/v1/readings vs a bare Litestar app (wrk); latency vs load; RSS",
        ("services", "embedded"),
        2.0,
        http=True,
    ),
    "cpu": Benchmark(
        cpu.run,
        "CPU a POST in-process (vs the bare app), and the API's and relay's at 1k commands/s",
        ("services", "embedded"),
        1.0,
        sized=True,
    ),
    "relay": Benchmark(
        relay.run,
        "the relay publishing a stored log to JetStream vs a bare NATS publish loop",
        ("services",),
        0.5,
        sized=True,
    ),
    "websocket": Benchmark(
        websocket.run,
        "command -> WebSocket frame at 100-1,000 commands/s from loadgen, 100 clients",
        ("services", "embedded"),
        1.0,
        latency=True,
    ),
    "connections": Benchmark(
        websocket.run_connections,
        "10,000 WebSockets on one API process: broadcast delay and RSS",
        ("services",),
        3.0,
    ),
    "batches": Benchmark(
        batches.run,
        "batch items/s with 1 and 2 workers vs single readings",
        ("services",),
        1.5,
        sized=True,
    ),
    "webhooks": Benchmark(
        webhooks.run,
        "webhook deliveries to a local receiver vs bare httpx and aiohttp POST loops",
        ("services", "embedded"),
        1.0,
        sized=True,
    ),
}
RESULTS = Path(__file__).parent / "results"


def listing() -> str:
    rows = [
        f"{name:<12} {b.summary} [{', '.join(b.profiles)}; ~{b.minutes:g} min each]"
        for name, b in BENCHMARKS.items()
    ]
    total = sum(b.minutes * len(b.profiles) for b in BENCHMARKS.values())
    rows.append(f"every benchmark on every profile (make bench): ~{total:.0f} min")
    return "\n".join(rows)


def run_benchmarks(
    names: list[str],
    *,
    seconds: float | None = None,
    profile: str = "services",
    events: int | None = None,
    server: str = "uvicorn",
    pyspy: bool = False,
    disk_probe: bool = False,
) -> list[Path]:
    """Run each named benchmark on ``profile`` (or on each of its profiles, for "all").

    A benchmark that fails does not stop the others: the failures are listed at the end, and
    then the run exits non-zero. One that does not mean anything on ``profile`` is skipped.
    """
    RESULTS.mkdir(exist_ok=True)
    saved: list[Path] = []
    failures: list[str] = []
    for name in names or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        profiles = bench.profiles if profile == "all" else (profile,)
        for each in profiles:
            if each not in bench.profiles:
                print(f"== {name} ({each}): skipped, {' and '.join(bench.profiles)} profile only")
                continue
            options: dict[str, Any] = {"profile": each}
            if seconds is not None:
                options["seconds"] = seconds
            if events and bench.sized:
                options["events"] = events
            if bench.http:
                options.update(server=server, pyspy=pyspy)
            if bench.latency:
                options.update(disk_probe=disk_probe)
            length = f"{seconds:g}s per measurement" if seconds else "default lengths"
            print(f"== {name} ({each}, {length})")
            try:
                result = bench.run(**options)
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on to the next
                traceback.print_exc()
                failures.append(f"{name} ({each}): {type(exc).__name__}: {exc}")
                print(f"   {name} failed; going on with the next")
                continue
            result["machine"] = {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            }
            stamp = time.strftime("%Y%m%dT%H%M%S")
            path = RESULTS / f"{name}-{each}-{stamp}.json"
            path.write_text(json.dumps(result, indent=2))
            print(f"   saved {path}")
            saved.append(path)
    if failures:
        print(f"{len(failures)} failed:")
        for failure in failures:
            print(f"   {failure}")
        raise SystemExit(1)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []])
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--seconds", type=float, default=None, help="length of each measurement (default: each's)"
    )
    parser.add_argument("--profile", choices=["services", "embedded", "all"], default="services")
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help=(
            "size of the seeded log (rebuild, relay), items per batch (batches),"
            " events to deliver (webhooks), or POSTs per round (cpu)"
        ),
    )
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    parser.add_argument("--pyspy", action="store_true", help="profile the API process (api)")
    parser.add_argument(
        "--disk-probe",
        action="store_true",
        help="time an fsync every 10 ms beside the run and report the slow ones (lag, websocket)",
    )
    args = parser.parse_args()
    if args.list:
        print(listing())
        return
    run_benchmarks(
        args.names,
        seconds=args.seconds,
        profile=args.profile,
        events=args.events,
        server=args.server,
        pyspy=args.pyspy,
        disk_probe=args.disk_probe,
    )


if __name__ == "__main__":
    main()
