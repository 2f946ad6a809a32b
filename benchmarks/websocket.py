"""Command → WebSocket frame latency, and fan-out to many connections.

A server process (``almanac serve --roles api,relay``, services profile on a fresh database)
takes ``POST /api/v1/readings`` at a fixed offered rate from this process, which also
holds ``--clients`` WebSocket connections subscribed to every event. For each command the
latency is from just before its POST to the arrival of its ``reading.requested`` frame on
the first connection; every connection counts the frames it gets (fan-out).
Target (DESIGN): p50 <= 5 ms, p99 <= 25 ms at 1,000 commands/s.

Baseline: the same POSTs with no WebSocket client (the HTTP round trip alone), so the
figure shows what the stream adds.

Run: ``python -m benchmarks websocket --seconds 10`` (``--profile embedded`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import websockets

from benchmarks.appends import _database, _drop

NATS_URL = "nats://127.0.0.1:4222"

BODY = {
    "birth": {
        "date": "1990-04-12",
        "time": "14:30",
        "timezone": "Europe/London",
        "latitude": 51.5074,
        "longitude": -0.1278,
    }
}


def _server_env(profile: str, url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALMANAC_")}
    if profile == "services":
        # A stream of the run's own: a stream belongs to one event store.
        run = url.rsplit("/", 1)[1]
        env.update(
            ALMANAC_POSTGRES_URL=url,
            ALMANAC_REDIS_URL="redis://127.0.0.1:6379/0",
            ALMANAC_NATS_URL=NATS_URL,
            ALMANAC_NATS_STREAM=f"BENCH_{run}",
            ALMANAC_NATS_SUBJECT_PREFIX=f"bench.{run}.events",
        )
    else:
        env["ALMANAC_DATA_DIR"] = str(data_dir)
    env.update(ALMANAC_LOG_LEVEL="WARNING", ALMANAC_BOOTSTRAP_ADMIN="0")
    return env


async def _delete_stream(stream: str) -> None:
    client = await nats.connect(NATS_URL, connect_timeout=2)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await client.jetstream().delete_stream(stream)
    finally:
        await client.close()


def _admin_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "almanac", "keys", "create", "--name", "bench", "--role", "admin"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return next(word for word in out.split() if word.startswith("alm_"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=2) as http:
        for _ in range(300):
            assert server.poll() is None, "the server stopped while starting"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("the server did not become ready within 30 s")


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {
        "p50_ms": ordered[n // 2],
        "p99_ms": ordered[min(n - 1, int(n * 0.99))],
        "max_ms": ordered[-1],
    }


async def _offer(
    base: str, key: str, rate: int, seconds: float, sent: dict[str, float] | None
) -> tuple[float, list[float]]:
    """POST at ``rate``/s for ``seconds``; returns the achieved rate and HTTP latencies."""
    total = int(rate * seconds)
    interval = 1.0 / rate
    http_ms: list[float] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {key}"}
    # Open loop: a request waits for a free connection rather than fail, so an offered rate
    # above what the server (or this client) manages shows as latency and a lower rate.
    timeout = httpx.Timeout(30, pool=None)
    errors = 0
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:
        start = time.perf_counter()

        # httpx's pool slows down badly with thousands of queued requests: they queue here
        # instead (the latency still counts the wait, from the scheduled time).
        in_flight = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                async with in_flight:
                    response = await http.post("/api/v1/readings", json=BODY, headers=headers)
            except httpx.HTTPError:
                errors += 1
                return
            http_ms.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 202:
                errors += 1
            elif sent is not None:
                sent[response.headers["location"].rsplit("/", 1)[1]] = t0

        await asyncio.gather(*(one(i) for i in range(total)))
        if errors:
            print(f"   {errors} of {total} commands failed")
        return (total - errors) / (time.perf_counter() - start), http_ms


async def _measure(
    base: str, ws: str, key: str, *, rate: int, seconds: float, clients: int
) -> dict[str, Any]:
    # Baseline: the HTTP round trips alone.
    baseline_rate, baseline_http = await _offer(base, key, rate, min(seconds, 3.0), None)
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    all_arrived = asyncio.Event()
    counts = [0] * clients
    # Commands whose frames the first connection must see; known once the POSTs are done.
    expected = [int(rate * seconds) + 1]
    sockets = [
        await websockets.connect(
            f"{ws}/ws?topics=event:reading.requested",
            additional_headers={"Authorization": f"Bearer {key}"},
        )
        for _ in range(clients)
    ]
    for socket in sockets:
        json.loads(await socket.recv())  # welcome

    async def listen(index: int, socket: Any) -> None:
        async for raw in socket:
            now = time.perf_counter()
            frame = json.loads(raw)
            if frame["type"] != "event":
                continue
            counts[index] += 1
            if index == 0:
                arrived.setdefault(frame["aggregate_id"], now)
                if len(arrived) >= expected[0]:
                    all_arrived.set()

    listeners = [asyncio.create_task(listen(i, s)) for i, s in enumerate(sockets)]
    try:
        achieved, http_ms = await _offer(base, key, rate, seconds, sent)
        expected[0] = len(sent)
        if len(arrived) >= len(sent):
            all_arrived.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_arrived.wait(), 10)
    finally:
        for task in listeners:
            task.cancel()
        for socket in sockets:
            await socket.close()
    latencies = [(arrived[i] - t0) * 1000 for i, t0 in sent.items() if i in arrived]
    return {
        "offered_per_s": rate,
        "achieved_per_s": achieved,
        "clients": clients,
        "commands": len(sent),
        "frames_received": sum(counts),
        "frames_expected": len(sent) * clients,
        **_percentiles(latencies),
        "http": _percentiles(http_ms),
        "baseline_http": {"achieved_per_s": baseline_rate, **_percentiles(baseline_http)},
    }


@contextlib.contextmanager
def _server(profile: str) -> Iterator[tuple[str, str, str, int]]:
    """A server process on a fresh database and stream: (HTTP base, WS base, admin key, pid)."""
    name, url = _database()
    server: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = _server_env(profile, url, Path(tmp))
            key = _admin_key(env)
            port = _free_port()
            # On services the frames travel through NATS: the relay publishes what the API stored.
            roles = "api,relay" if profile == "services" else "api"
            server = subprocess.Popen(
                [sys.executable, "-m", "almanac", "serve", "--roles", roles, "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{port}"
            asyncio.run(_wait_ready(base, server))
            yield base, f"ws://127.0.0.1:{port}", key, server.pid
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        _drop(name)
        _drop(f"{name}_read")
        asyncio.run(_delete_stream(f"BENCH_{name}"))


def run(
    seconds: float = 10.0, profile: str = "services", rate: int = 1000, clients: int = 100
) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "websocket", "profile": profile}
    with _server(profile) as (base, ws, key, _):
        figures = asyncio.run(_measure(base, ws, key, rate=rate, seconds=seconds, clients=clients))
    result.update(figures, target_p50_ms=5, target_p99_ms=25)
    print(
        f"baseline POST round trip at {figures['baseline_http']['achieved_per_s']:,.0f}/s: "
        f"p50 {figures['baseline_http']['p50_ms']:.1f} ms, "
        f"p99 {figures['baseline_http']['p99_ms']:.1f} ms"
    )
    print(
        f"command -> WebSocket frame at {figures['achieved_per_s']:,.0f} commands/s, "
        f"{clients} connections: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms "
        f"(targets 5 / 25 ms; ratios {figures['p50_ms'] / 5:.2f} / {figures['p99_ms'] / 25:.2f}); "
        f"frames {figures['frames_received']:,} of {figures['frames_expected']:,}"
    )
    return result


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _broadcast(
    base: str, ws: str, key: str, *, pid: int, connections: int, rounds: int
) -> dict[str, Any]:
    """Open ``connections`` sockets, then post ``rounds`` commands one at a time; for each,
    the delay until every socket has its frame."""
    idle_rss = _rss_mb(pid)
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{ws}/ws?topics=event:reading.requested"
    sockets: list[Any] = []
    opened_at = time.perf_counter()
    for start in range(0, connections, 500):
        chunk = await asyncio.gather(
            *(
                websockets.connect(url, additional_headers=headers, open_timeout=60)
                for _ in range(min(500, connections - start))
            )
        )
        sockets.extend(chunk)
        print(f"   {len(sockets):,} connections open")
    for socket in sockets:
        await socket.recv()  # welcome
    open_seconds = time.perf_counter() - opened_at
    connected_rss = _rss_mb(pid)
    delays: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for _ in range(rounds):
            t0 = time.perf_counter()
            response = await http.post("/api/v1/readings", json=BODY, headers=headers)
            assert response.status_code == 202, response.text

            async def one(socket: Any, t0: float = t0) -> float:
                while True:
                    frame = json.loads(await asyncio.wait_for(socket.recv(), 60))
                    if frame["type"] == "event":
                        return (time.perf_counter() - t0) * 1000

            delays.extend(await asyncio.gather(*(one(s) for s in sockets)))
    loaded_rss = _rss_mb(pid)
    await asyncio.gather(*(s.close() for s in sockets))
    return {
        "connections": connections,
        "open_seconds": open_seconds,
        "rounds": rounds,
        "broadcast": _percentiles(delays),
        "rss_mb": {"idle": idle_rss, "connected": connected_rss, "after_broadcast": loaded_rss},
    }


def run_connections(
    seconds: float = 5.0, profile: str = "services", connections: int = 10_000, rounds: int = 5
) -> dict[str, Any]:
    """10k connections on one API process: broadcast delay and the process's memory.
    Target (DESIGN): broadcast p99 <= 100 ms, RSS <= 300 MB."""
    del seconds  # bounded by the number of connections and rounds
    result: dict[str, Any] = {"benchmark": "connections", "profile": profile}
    with _server(profile) as (base, ws, key, pid):
        figures = asyncio.run(
            _broadcast(base, ws, key, pid=pid, connections=connections, rounds=rounds)
        )
    result.update(figures, target_broadcast_p99_ms=100, target_rss_mb=300)
    b, rss = figures["broadcast"], figures["rss_mb"]
    print(
        f"{connections:,} connections (opened in {figures['open_seconds']:.1f} s): broadcast "
        f"p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms (target 100; ratio "
        f"{b['p99_ms'] / 100:.2f}); RSS idle {rss['idle']:.0f} MB, connected "
        f"{rss['connected']:.0f} MB, after {rss['after_broadcast']:.0f} MB (target 300)"
    )
    return result
