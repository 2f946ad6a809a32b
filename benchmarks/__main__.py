"""``python -m benchmarks [NAME ...] [--seconds N] [--profile P] [--events N]``: run, save JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import appends, batches, projections, webhooks, websocket

BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "appends": appends.run,
    "rebuild": projections.run_rebuild,
    "lag": projections.run_lag,
    "websocket": websocket.run,
    "connections": websocket.run_connections,
    "batches": batches.run,
    "webhooks": webhooks.run,
}
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS), choices=[*BENCHMARKS, []])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--profile", choices=["services", "embedded"], default="services")
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help=(
            "size of the seeded log (rebuild), items per batch (batches),"
            " or events to deliver (webhooks)"
        ),
    )
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for name in args.names or list(BENCHMARKS):
        print(f"== {name} ({args.profile}, {args.seconds:g}s per measurement)")
        sized = name in {"rebuild", "batches", "webhooks"}
        sizes = {"events": args.events} if args.events and sized else {}
        result = BENCHMARKS[name](seconds=args.seconds, profile=args.profile, **sizes)
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = RESULTS / f"{name}-{args.profile}-{stamp}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"   saved {path}")


if __name__ == "__main__":
    main()
