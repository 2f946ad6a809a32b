"""A probe of the disk's flush latency, run beside a latency benchmark.

Every commit Almanac acknowledges has waited for Postgres's (or SQLite's) fsync, so a disk
that stalls a flush for a tenth of a second stalls every command in flight with it, whatever
the code does. The probe writes 512 bytes to a file of its own and fsyncs it every 10 ms
in a thread, noting each flush slower than ``SLOW_MS``; a benchmark then reports the slow
flushes seen during each of its measurements, so a latency tail can be told apart from a
host whose disk stalled. It adds ~100 small flushes a second to the disk's work, which is
why benchmarks run it only when asked (``--disk-probe``).

It measures the disk under ``benchmarks/results/``; on the machines these figures come from
that is the device Postgres keeps its data on (``df`` tells).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

SLOW_MS = 20.0
INTERVAL_S = 0.010
RESULTS = Path(__file__).parent / "results"


class FsyncProbe:
    def __init__(self, directory: Path = RESULTS, *, interval: float = INTERVAL_S) -> None:
        self._path = directory / f".fsync-probe-{os.getpid()}"
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)
        # (monotonic start, seconds) of each flush slower than SLOW_MS; appended by the
        # probe's thread only, read after its measurement window has passed.
        self.slow: list[tuple[float, float]] = []
        self.flushes = 0

    def __enter__(self) -> FsyncProbe:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._path.unlink(missing_ok=True)

    def _run(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while not self._stop.wait(self._interval):
                started = time.monotonic()
                os.pwrite(fd, b"\0" * 512, 0)
                os.fsync(fd)
                took = time.monotonic() - started
                self.flushes += 1
                if took * 1000 > SLOW_MS:
                    self.slow.append((started, took))
        finally:
            os.close(fd)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The slow flushes that began between two ``time.monotonic()`` readings."""
        slow = [took * 1000 for at, took in self.slow if start <= at <= end]
        return {
            "slow_over_ms": SLOW_MS,
            "slow_fsyncs": len(slow),
            "slowest_ms": round(max(slow), 1) if slow else None,
            "stalled_ms": round(sum(slow), 1),
        }


def describe(window: dict[str, Any] | None) -> str:
    """``; disk: 2 fsyncs over 20 ms (slowest 139 ms)`` or nothing without a probe."""
    if not window:
        return ""
    if not window["slow_fsyncs"]:
        return f"; disk: no fsync over {window['slow_over_ms']:.0f} ms"
    return (
        f"; disk: {window['slow_fsyncs']} fsync(s) over {window['slow_over_ms']:.0f} ms "
        f"(slowest {window['slowest_ms']:.0f} ms)"
    )
