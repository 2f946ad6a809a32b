"""A fixed-rate, open-loop HTTP load generator, run as its own process.

wrk 4 has no fixed-rate mode (wrk2's ``-R``), and a ``delay()`` in its Lua script makes each
connection wait between its own requests, which is still a closed loop: when the server
stalls, requests are not sent, and the stall is not counted (coordinated omission). Here
requests are scheduled at ``start + i / rate`` whatever happens; ``--connections`` keep-alive
connections take them in turn, and each latency is measured from the scheduled time, so a
request that waited for a free connection counts its wait. Requests go out on time, within
tens of microseconds on a quiet machine (``Alarm``: uvloop's own timers count milliseconds).

It speaks just enough HTTP/1.1 (request bytes built once, responses parsed by httptools on
uvloop) to offer a few thousand requests per second from one core, where an httpx client
manages a few hundred.

With ``--label PREFIX`` each request's JSON body gets ``"label": "<PREFIX><n>"``, n its index
from 0, so every request is distinct and whatever it causes can be traced back to it. With
``--send-log FILE`` the generator writes, per request, its index, scheduled, written and
completed times and its status, read from CLOCK_MONOTONIC (system-wide on Linux, so another
process on the machine can compare its own readings of it with these).

Run: ``python -m benchmarks.loadgen --port 8000 --path /api/v1/readings --method POST
--body-file body.json --header 'Authorization: Bearer …' --rate 500 --seconds 3``.
Prints one JSON object: offered and achieved rate, status counts, latency percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httptools

# CLOCK_MONOTONIC on Linux (as perf_counter is): comparable across processes, never stepped.
_now = time.monotonic


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_TFD_TIMER_ABSTIME = 1
# The alarm goes off this long before a request is due, and the rest of the wait is spent
# in turns of the loop: waking a process that sleeps takes tens of microseconds. Never more
# than this share of the time between two requests, so that high rates do not spin a core.
SPIN = 0.0002
SPIN_SHARE = 0.1


class Alarm:
    """Wakes the event loop at a given ``_now()`` time, not on a millisecond step.

    uvloop's timers count whole milliseconds (a delay is rounded to one, and the loop's clock
    is read in them): requests went out ~0.7 ms late at the median at low rates, and a delay
    under half a millisecond is no delay at all, so from 2,000 requests/s on the loop spun a
    core. A Linux timerfd on CLOCK_MONOTONIC, watched by the loop like a socket, fires at its
    time with one wake-up per due request. Where there is none, the loop's own timer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        create = getattr(_libc, "timerfd_create", None)
        self._fd: int | None = None
        if create is not None:
            fd = create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "timerfd_create failed")
            self._fd = fd
            loop.add_reader(fd, self._fired)

    async def until(self, when: float) -> None:
        if self._fd is None:
            await asyncio.sleep(max(0.0, when - _now()))
            return
        seconds, fraction = divmod(when, 1.0)
        due = _Timespec(int(seconds), min(int(fraction * 1e9), 999_999_999))
        # A time already past fires at once.
        spec = _ITimerspec(_Timespec(0, 0), due)
        if _libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._waiter = self._loop.create_future()
        await self._waiter

    def _fired(self) -> None:
        assert self._fd is not None
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


def _request(method: str, path: str, port: int, headers: list[str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Requests:
    """The bytes of request ``n``: the same every time, or with a label of its own."""

    def __init__(
        self,
        method: str,
        path: str,
        port: int,
        headers: list[str],
        body: bytes,
        *,
        label: str | None,
    ) -> None:
        self.fixed = _request(method, path, port, headers, body)
        self.label = label
        if label is not None:
            marker = "\x00label\x00"
            text = json.dumps({**json.loads(body or b"{}"), "label": marker})
            head, tail = text.split(json.dumps(marker))
            self.body_head, self.body_tail = (head + '"' + label).encode(), ('"' + tail).encode()
            lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
            lines += ["Content-Type: application/json", "Content-Length: "]
            self.head = "\r\n".join(lines).encode()

    def __call__(self, n: int) -> bytes:
        if self.label is None:
            return self.fixed
        body = self.body_head + str(n).encode() + self.body_tail
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body


def percentiles(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    n = len(ordered)
    if not n:
        return {}
    pick = {"p50_ms": 0.50, "p90_ms": 0.90, "p99_ms": 0.99, "p999_ms": 0.999}
    out = {name: ordered[min(n - 1, int(n * q))] for name, q in pick.items()}
    out["max_ms"] = ordered[-1]
    return out


async def _open(port: int, connections: int) -> list[_Connection]:
    """Every connection, open before the clock starts: the first requests' latency is then
    the server's answer, not also the setting up of the generator's own connections."""
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
        return conn

    opening = [asyncio.ensure_future(connect()) for _ in range(connections)]
    try:
        return await asyncio.wait_for(asyncio.gather(*opening), 30)
    except BaseException:
        for task in opening:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().transport.close()
        raise


async def _schedule(
    queue: asyncio.Queue[tuple[int, float] | None], *, total: int, rate: float, start: float
) -> None:
    """Hand request ``i`` to the connections at its due time, ``start + i / rate``."""
    alarm = Alarm(asyncio.get_running_loop())
    early = min(SPIN, SPIN_SHARE / rate)
    sent = 0
    try:
        while sent < total:
            due_at = start + sent / rate
            await alarm.until(due_at - early)
            # Turns of the loop, which reads answers meanwhile: no event marks the time.
            while _now() < due_at:  # noqa: ASYNC110
                await asyncio.sleep(0)
            # Request ``sent`` is due; any after it that fell due meanwhile go too.
            due = min(total, max(sent + 1, int((_now() - start) * rate) + 1))
            for i in range(sent, due):
                queue.put_nowait((i, start + i / rate))
            sent = due
    finally:
        alarm.close()


async def offer(
    *,
    port: int,
    request: bytes | Requests,
    rate: float,
    seconds: float,
    connections: int,
    send_log: list[tuple[int, float, float, float, int]] | None = None,
) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``seconds``; ``send_log`` collects, per request, (index,
    scheduled, written, completed, status), times from ``_now``; status 0 when it failed."""
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * seconds))
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0

    opened = await _open(port, connections)

    async def worker(conn: _Connection) -> None:
        nonlocal errors
        try:
            while (item := await queue.get()) is not None:
                index, scheduled = item
                conn.waiter = loop.create_future()
                written = _now()
                conn.transport.write(request if isinstance(request, bytes) else request(index))
                try:
                    status = await conn.waiter
                except ConnectionError:
                    errors += 1
                    if send_log is not None:
                        send_log.append((index, scheduled, written, _now(), 0))
                    _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
                    continue
                completed = _now()
                latencies.append((completed - scheduled) * 1000)
                statuses[status] += 1
                if send_log is not None:
                    send_log.append((index, scheduled, written, completed, status))
        finally:
            if conn.transport is not None:
                conn.transport.close()

    workers = [asyncio.create_task(worker(conn)) for conn in opened]
    start = _now() + 0.05
    await _schedule(queue, total=total, rate=rate, start=start)
    for _ in workers:
        queue.put_nowait(None)
    # Bounded: what has not come back 10 s after the last request was due counts as an error.
    _, pending = await asyncio.wait(workers, timeout=10)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elapsed = _now() - start
    lost = total - len(latencies) - errors
    return {
        "offered_per_s": rate,
        "achieved_per_s": len(latencies) / elapsed,
        "requests": total,
        "completed": len(latencies),
        "errors": errors + lost,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connections": connections,
        **percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-file", type=Path, default=None)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--label", default=None, help='give each JSON body "label": "<LABEL><request index>"'
    )
    parser.add_argument(
        "--send-log", type=Path, default=None, help="write each request's times here (JSON)"
    )
    args = parser.parse_args()
    body = args.body_file.read_bytes() if args.body_file else b""
    request = Requests(args.method, args.path, args.port, args.header, body, label=args.label)
    send_log: list[tuple[int, float, float, float, int]] | None = (
        None if args.send_log is None else []
    )
    import uvloop

    result = uvloop.run(
        offer(
            port=args.port,
            request=request if args.label is not None else request.fixed,
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
            send_log=send_log,
        )
    )
    if args.send_log is not None:
        fields = ["index", "scheduled", "written", "completed", "status"]
        args.send_log.write_text(
            json.dumps({"clock": "CLOCK_MONOTONIC", "fields": fields, "requests": send_log})
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
