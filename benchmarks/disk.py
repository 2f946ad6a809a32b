"""A probe of the disk's flush latency, run beside a latency benchmark.

Every commit Almanac acknowledges has waited for Postgres's (or SQLite's) fsync, so a disk
that stalls a flush for a tenth of a second stalls every command in flight with it, whatever
the code does. The probe, a process of its own (so that neither its timing nor the
benchmark's waits on the other's GIL), writes 512 bytes to a file and fsyncs it every 10 ms,
and reports each flush slower than ``SLOW_MS`` and, once a second, how many flushes it
made. A benchmark then reports the slow flushes that began during each of its measurements
(both processes read CLOCK_MONOTONIC, one clock for the whole machine), so a latency tail
can be told apart from a host whose disk stalled. It adds ~100 small flushes a second to the
disk's work, which is why benchmarks run it only when asked (``--disk-probe``).

It measures the disk under ``benchmarks/results/``; on the machines these figures come from
that is the device Postgres keeps its data on (``df`` tells).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
        self._child: subprocess.Popen[str] | None = None
        self._reader = threading.Thread(target=self._read, name="fsync-probe", daemon=True)
        self._stopping = False
        # (monotonic start, seconds) of each flush slower than SLOW_MS, and (monotonic,
        # flushes in the second before it): appended by the reading thread.
        self.slow: list[tuple[float, float]] = []
        self.counts: list[tuple[float, int]] = []
        self.failure: str | None = None

    def __enter__(self) -> FsyncProbe:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._child = subprocess.Popen(
            [sys.executable, __file__, str(self._path), str(self._interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stopping = True
        if self._child is not None:
            self._child.terminate()
            try:
                self._child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        self._reader.join(timeout=5)
        self._path.unlink(missing_ok=True)

    def _read(self) -> None:
        assert self._child is not None
        assert self._child.stdout is not None
        for line in self._child.stdout:
            kind, at, value = line.split()
            if kind == "slow":
                self.slow.append((float(at), float(value)))
            else:
                self.counts.append((float(at), int(value)))
        if not self._stopping:
            assert self._child.stderr is not None
            self.failure = f"the probe ended early: {self._child.stderr.read()[-300:]}"

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The slow flushes that began between two ``time.monotonic()`` readings, and the
        flushes counted in the seconds that overlap them."""
        slow = [took * 1000 for at, took in self.slow if start <= at <= end]
        return {
            "slow_over_ms": SLOW_MS,
            "slow_fsyncs": len(slow),
            "slowest_ms": round(max(slow), 1) if slow else None,
            "stalled_ms": round(sum(slow), 1),
            "flushes": sum(n for at, n in self.counts if start < at <= end + 1),
            "failure": self.failure,
        }


def describe(window: dict[str, Any] | None) -> str:
    """``; disk: 2 fsyncs over 20 ms (slowest 139 ms)`` or nothing without a probe."""
    if not window:
        return ""
    if window["failure"] or not window["flushes"]:
        return f"; disk probe: no flushes measured ({window['failure'] or 'none reported'})"
    if not window["slow_fsyncs"]:
        return f"; disk: no fsync over {window['slow_over_ms']:.0f} ms of {window['flushes']}"
    return (
        f"; disk: {window['slow_fsyncs']} fsync(s) over {window['slow_over_ms']:.0f} ms "
        f"of {window['flushes']} (slowest {window['slowest_ms']:.0f} ms)"
    )


def _probe(path: str, interval: float) -> None:
    """The probe process: flush, time, report; until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    flushes, report_at = 0, time.monotonic() + 1
    try:
        while True:
            started = time.monotonic()
            os.pwrite(fd, b"\0" * 512, 0)
            os.fsync(fd)
            took = time.monotonic() - started
            flushes += 1
            if took * 1000 > SLOW_MS:
                print(f"slow {started} {took}", flush=True)
            now = time.monotonic()
            if now >= report_at:
                print(f"flushes {now} {flushes}", flush=True)
                flushes, report_at = 0, now + 1
            time.sleep(interval)
    finally:
        os.close(fd)
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    _probe(sys.argv[1], float(sys.argv[2]))
