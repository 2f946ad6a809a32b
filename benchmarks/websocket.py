"""Command → WebSocket frame latency and fan-out, at fixed offered rates.

An API process (``almanac serve --roles api``; on the services profile, on a fresh database
and stream, with ``almanac serve --roles relay`` in a process of its own, as deployed)
takes ``POST /api/v1/readings`` from the open-loop load generator
(``benchmarks/loadgen.py``, its own process, 64 connections), which gives
each body a label of its own (``ws<rate>-<n>``) and logs when each request was due, written
and answered. This process (uvloop) holds WebSocket connections subscribed to
``event:reading.requested`` and notes when each frame arrives; the label in the frame's
payload names its command. Both processes read CLOCK_MONOTONIC, which on Linux is one clock
for the whole machine. The sweep runs once with 1 connection (the command's own way to a
frame) and once with 100 (the fan-out: a frame per command per connection, sent by the API
process and received by this one).

For each offered rate (each ``seconds`` long): the latency from the time each
command was due (the load generator's schedule, so a request kept waiting for a free
connection counts its wait) to its frame, over every frame on every connection and on the
first connection alone; frames expected (accepted commands times connections) and received;
and, as the baseline from the same run, the POST round trip of the same commands (the
load generator's own figures), so the reader sees what the command itself costs and what
the stream adds. Target (DESIGN): p50 <= 5 ms, p99 <= 25 ms at 1,000 commands/s.

Run: ``python -m benchmarks websocket --seconds 3`` (``--profile embedded`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import nats
import nats.js.errors
import uvloop
import websockets

from benchmarks import loadgen, wsclients
from benchmarks.appends import _database, _drop
from benchmarks.disk import FsyncProbe, describe

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


def _start(argv: list[str], env: dict[str, str] | None, port: int) -> subprocess.Popen[bytes]:
    """A server process, once it answers ``/health/ready`` on ``port``."""
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    asyncio.run(_wait_ready(f"http://127.0.0.1:{port}", server))
    return server


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


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


class _Data(msgspec.Struct):
    label: str | None = None


class _Payload(msgspec.Struct):
    data: _Data


class _Frame(msgspec.Struct):
    """What the benchmark reads of a frame; the decoder skips the rest."""

    type: str
    payload: _Payload | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode
RATES = (100, 250, 500, 1000)
EVENT_MARK = b'"type":"event"'
CONNECTIONS = 64  # the load generator's, as in the api benchmark
TARGET_P50_MS, TARGET_P99_MS = 5.0, 25.0


class _Clients:
    """WebSocket connections noting the label and arrival time of each frame they receive."""

    def __init__(self, sockets: list[Any]) -> None:
        self.sockets = sockets
        self.frames: list[list[tuple[str, float]]] = [[] for _ in sockets]
        self.closed: dict[int, str] = {}
        # Frames of the current rate (their labels start with ``prefix``) and how many make all.
        self.prefix = "\x00"
        self.matching = 0
        self.expected = float("inf")
        self.complete = asyncio.Event()
        self.tasks = [asyncio.create_task(self._listen(i, s)) for i, s in enumerate(sockets)]

    async def _listen(self, index: int, socket: Any) -> None:
        try:
            async for raw in socket:
                now = time.monotonic()
                frame = _decode_frame(raw)
                if frame.type == "event" and frame.payload and frame.payload.data.label:
                    label = frame.payload.data.label
                    self.frames[index].append((label, now))
                    if label.startswith(self.prefix):
                        self.matching += 1
                        if self.matching >= self.expected:
                            self.complete.set()
        except websockets.ConnectionClosed:
            pass
        self.closed[index] = str(socket.close_code)

    def take(self, prefix: str = "\x00") -> list[list[tuple[str, float]]]:
        """The frames noted so far, per connection; noting starts afresh, counting ``prefix``."""
        taken, self.frames = self.frames, [[] for _ in self.sockets]
        self.prefix, self.matching, self.expected = prefix, 0, float("inf")
        self.complete.clear()
        return taken

    async def all_of(self, expected: int, timeout: float) -> None:
        """Until ``expected`` frames of the current prefix are in, or ``timeout`` seconds."""
        self.expected = expected
        if self.matching >= expected:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.complete.wait(), timeout)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sockets), return_exceptions=True)


async def _connect(ws: str, key: str, clients: int) -> _Clients:
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{ws}/ws?topics=event:reading.requested"
    sockets = [await websockets.connect(url, additional_headers=headers) for _ in range(clients)]
    for socket in sockets:
        json.loads(await socket.recv())  # welcome
    return _Clients(sockets)


async def _loadgen(
    port: int, key: str, body: Path, log: Path, *, rate: int, seconds: float, label: str
) -> dict[str, Any]:
    """One fixed-rate run of benchmarks/loadgen.py, awaited without blocking the clients."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.loadgen", "--port", str(port)),
        *("--path", "/api/v1/readings", "--method", "POST", "--body-file", str(body)),
        *("--header", f"Authorization: Bearer {key}", "--label", label, "--send-log", str(log)),
        *("--rate", str(rate), "--seconds", str(seconds), "--connections", str(CONNECTIONS)),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
    assert process.returncode == 0, f"the load generator failed ({process.returncode})"
    result: dict[str, Any] = json.loads(out)
    return result


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(server: int) -> tuple[float, ...]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the awaited load generators
    return (
        time.monotonic(),
        _cpu_seconds(server),
        time.process_time(),
        children.ru_utime + children.ru_stime,
    )


async def _point(
    clients: _Clients,
    *,
    server: int,
    port: int,
    key: str,
    body: Path,
    tmp: Path,
    rate: int,
    seconds: float,
    probe: FsyncProbe | None = None,
) -> dict[str, Any]:
    """One offered rate: latencies from each command's due time to its frames."""
    label = f"ws{len(clients.sockets)}c{rate}-"
    log = tmp / f"sent-{rate}.json"
    clients.take(label)
    before = _cpu(server)
    http = await _loadgen(port, key, body, log, rate=rate, seconds=seconds, label=label)
    sent = json.loads(log.read_text())["requests"]
    # index -> (due, written), for the commands the server took (202: their events are stored).
    accepted = {i: (due, written) for i, due, written, _, status in sent if status == 202}
    expected = len(accepted) * len(clients.sockets)
    # Bounded: frames still missing 10 s after the last answer count as lost.
    await clients.all_of(expected, 10)
    disk = probe.window(before[0], time.monotonic()) if probe else None
    wall, *used = (b - a for a, b in zip(before, _cpu(server), strict=True))
    frames = clients.take()
    every: list[float] = []
    from_written: list[float] = []
    first: list[float] = []
    received = 0
    for connection, noted in enumerate(frames):
        for frame_label, arrived in noted:
            if not frame_label.startswith(label):
                continue  # a straggler from an earlier rate
            command = accepted.get(int(frame_label[len(label) :]))
            if command is None:
                continue
            received += 1
            due, written = command
            every.append((arrived - due) * 1000)
            from_written.append((arrived - written) * 1000)
            if connection == 0:
                first.append((arrived - due) * 1000)
    waits = [(written - due) * 1000 for _, due, written, _, _ in sent]
    round_trips = [(done - written) * 1000 for _, _, written, done, status in sent if status]
    return {
        "offered_per_s": rate,
        "achieved_per_s": http["achieved_per_s"],
        "seconds": seconds,
        "commands": http["requests"],
        "accepted": len(accepted),
        "http_statuses": http["statuses"],
        "http_errors": http["errors"],
        "disk": disk,
        "clients": len(clients.sockets),
        "frames_expected": expected,
        "frames_received": received,
        "frame": loadgen.percentiles(every),
        "frame_first_connection": loadgen.percentiles(first),
        "frame_from_written": loadgen.percentiles(from_written),
        # The baseline: the POST round trip of the same commands, from their due time (the
        # load generator's own figures) and from when each was written.
        "http": {k: v for k, v in http.items() if k.endswith("_ms")},
        "http_from_written": loadgen.percentiles(round_trips),
        "loadgen_wait": loadgen.percentiles(waits),
        # Cores each process kept busy over the point (2 on this machine, shared with the rest).
        "cores_used": {
            name: round(cpu / wall, 2)
            for name, cpu in zip(("server", "clients", "loadgen"), used, strict=True)
        },
    }


async def _sweep(
    server: int,
    http_port: int,
    ws: str,
    key: str,
    *,
    rates: Sequence[int],
    seconds: float,
    clients: int,
    probe: FsyncProbe | None = None,
) -> dict[str, Any]:
    """Every rate in turn with ``clients`` connections open throughout."""
    print(f"   {clients} WebSocket connection{'s' if clients > 1 else ''}:")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        body = tmp / "command.json"
        body.write_text(json.dumps(BODY))
        connected = await _connect(ws, key, clients)
        try:
            # Warm-up (imports, pools, the relay's first publishes); not reported.
            where: dict[str, Any] = {
                "server": server,
                "port": http_port,
                "key": key,
                "body": body,
                "tmp": tmp,
                "probe": probe,
            }
            await _point(connected, **where, rate=min(rates), seconds=1)
            points = []
            for rate in rates:
                point = await _point(connected, **where, rate=rate, seconds=seconds)
                point["ratio_p50"] = point["frame"].get("p50_ms", float("nan")) / TARGET_P50_MS
                point["ratio_p99"] = point["frame"].get("p99_ms", float("nan")) / TARGET_P99_MS
                _print_point(point)
                points.append(point)
        finally:
            await connected.close()
    return {"clients": clients, "points": points, "closed_connections": connected.closed}


def _print_point(p: dict[str, Any]) -> None:
    f, one, h = p["frame"], p["frame_first_connection"], p["http"]
    nan = float("nan")
    print(
        f"   {p['offered_per_s']:,}/s offered, {p['achieved_per_s']:,.0f}/s achieved: frame p50 "
        f"{f.get('p50_ms', nan):.1f} ms, p99 {f.get('p99_ms', nan):.1f} ms, max "
        f"{f.get('max_ms', nan):.0f} ms (first connection p99 {one.get('p99_ms', nan):.1f} ms); "
        f"POST p50 {h.get('p50_ms', nan):.1f} ms, p99 {h.get('p99_ms', nan):.1f} ms; cores used "
        f"{', '.join(f'{k} {v:.2f}' for k, v in p['cores_used'].items())}; frames "
        f"{p['frames_received']:,} of {p['frames_expected']:,}{describe(p.get('disk'))}"
    )


@contextlib.contextmanager
def _server(profile: str) -> Iterator[tuple[str, str, str, int]]:
    """A server process on a fresh database and stream: (HTTP base, WS base, admin key, pid)."""
    name, url = _database()
    started: list[subprocess.Popen[bytes]] = []

    def serve(roles: str) -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        argv = [sys.executable, "-m", "almanac", "serve", "--roles", roles, "--port", str(port)]
        process = _start(argv, env, port)
        started.append(process)
        return process, f"http://127.0.0.1:{port}"

    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = _server_env(profile, url, Path(tmp))
            key = _admin_key(env)
            if profile == "services":
                # The frames travel through NATS: a relay process (as in compose.yaml, its
                # own service) publishes what the API stored.
                serve("relay")
            server, base = serve("api")
            yield base, base.replace("http://", "ws://"), key, server.pid
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=60)
        _drop(name)
        _drop(f"{name}_read")
        asyncio.run(_delete_stream(f"BENCH_{name}"))


def run(
    seconds: float = 3.0,
    profile: str = "services",
    rates: Sequence[int] = RATES,
    clients: Sequence[int] = (1, 100),
    disk_probe: bool = False,
) -> dict[str, Any]:
    """The sweep of ``rates`` once per number of ``clients``, on one server: one connection
    shows the command's way to a frame; 100 add the fan-out (the API process sends, and this
    process receives, a frame per command per connection)."""
    result: dict[str, Any] = {"benchmark": "websocket", "profile": profile}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    probing = FsyncProbe() if disk_probe else contextlib.nullcontext()
    with _server(profile) as (base, ws, key, pid), probing as probe:
        port = int(base.rsplit(":", 1)[1])
        import uvloop  # as in the load generator: it costs the receiving clients less

        sweeps = [
            uvloop.run(
                _sweep(pid, port, ws, key, rates=rates, seconds=seconds, clients=n, probe=probe)
            )
            for n in clients
        ]
    result.update(
        seconds_per_rate=seconds,
        loadgen_connections=CONNECTIONS,
        sweeps=sweeps,
        highest_achieved_per_s={
            str(s["clients"]): max(p["achieved_per_s"] for p in s["points"]) for s in sweeps
        },
        loadavg_before=load_before,
        loadavg_after=Path("/proc/loadavg").read_text().split()[:3],
        target_p50_ms=TARGET_P50_MS,
        target_p99_ms=TARGET_P99_MS,
    )
    _report(result)
    return result


def _report(r: dict[str, Any]) -> None:
    nan = float("nan")
    print(
        f"command -> WebSocket frame ({r['profile']}), latency from each command's due time; "
        f"targets p50 {TARGET_P50_MS:g} ms, p99 {TARGET_P99_MS:g} ms at 1,000/s"
    )
    print(
        "   clients  offered  achieved | frame p50    p99    max  p99/25 ms"
        " | POST p50    p99 | frames received/expected"
    )
    for sweep in r["sweeps"]:
        for p in sweep["points"]:
            f, h = p["frame"], p["http"]
            print(
                f"   {sweep['clients']:>7} {p['offered_per_s']:>8,} {p['achieved_per_s']:>9,.0f}"
                f" | {f.get('p50_ms', nan):>9.1f} {f.get('p99_ms', nan):>6.1f}"
                f" {f.get('max_ms', nan):>6.0f} {p['ratio_p99']:>10.2f}"
                f" | {h.get('p50_ms', nan):>8.1f} {h.get('p99_ms', nan):>6.1f}"
                f" | {p['frames_received']:,}/{p['frames_expected']:,}"
            )
        if sweep["closed_connections"]:
            print(f"   connections the server closed: {sweep['closed_connections']}")
    print(
        f"   load average {' '.join(r['loadavg_before'])} before, "
        f"{' '.join(r['loadavg_after'])} after"
    )


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _broadcast(
    base: str,
    ws: str,
    headers: dict[str, str],
    trigger: Callable[[httpx.AsyncClient], Awaitable[None]],
    *,
    pid: int,
    connections: int,
    rounds: int,
    path: str = "/ws?topics=event:reading.requested",
) -> dict[str, Any]:
    """Open ``connections`` sockets, then ``trigger`` a broadcast ``rounds`` times, one at a
    time; for each, the delay until every socket has its frame."""
    idle_rss = _rss_mb(pid)
    address = urlsplit(ws)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    opened_at = time.perf_counter()
    clients = await wsclients.open_clients(host, port, path, headers, connections)
    open_seconds = time.perf_counter() - opened_at
    connected_rss = _rss_mb(pid)
    delays: list[float] = []
    server_cpu = 0.0
    per_round: list[dict[str, float]] = []
    lost = 0  # frames that never came: their connection was closed or dropped
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for _ in range(rounds):
            arrivals = [client.expect(EVENT_MARK) for client in clients]
            cpu = _cpu_seconds(pid)
            t0 = time.perf_counter()
            await trigger(http)
            outcomes = await asyncio.wait_for(
                asyncio.gather(*arrivals, return_exceptions=True), 120
            )
            server_cpu += _cpu_seconds(pid) - cpu
            times = [t for t in outcomes if isinstance(t, float)]
            lost += len(outcomes) - len(times)
            if not times:
                break
            round_ms = sorted((t - t0) * 1000 for t in times)
            delays.extend(round_ms)
            per_round.append(
                {
                    "first_ms": round_ms[0],
                    "p50_ms": round_ms[len(round_ms) // 2],
                    "last_ms": round_ms[-1],
                }
            )
    loaded_rss = _rss_mb(pid)
    closed = sum(client.closed for client in clients)
    frame_bytes = max((client.matched_bytes for client in clients), default=0)
    wsclients.close_all(clients)
    return {
        "connections": connections,
        "open_seconds": open_seconds,
        "rounds": rounds,
        "closed_by_server": closed,
        "frames_lost": lost,
        "frame_bytes": frame_bytes,
        # The server process's CPU (all its threads) per frame it sent: the trigger and the
        # fan-out (on services the relay is a process of its own), spread over the frames.
        "server_cpu_us_per_frame": server_cpu / (rounds * connections) * 1e6,
        "broadcast": _percentiles(delays),
        "per_round": per_round,
        "rss_mb": {"idle": idle_rss, "connected": connected_rss, "after_broadcast": loaded_rss},
    }


@contextlib.contextmanager
def _bare_server() -> Iterator[tuple[str, int]]:
    """The bare app (benchmarks/bare_app.py) in a process of its own: (HTTP base, pid)."""
    port = _free_port()
    process = _start([sys.executable, "-m", "benchmarks.bare_app", "--port", str(port)], None, port)
    try:
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        _stop(process)


def _bare_frame(size: int) -> bytes:
    """A frame the clients take for an event, of ``size`` bytes."""
    head = b'{"type":"event","payload":"'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def run_connections(
    seconds: float = 5.0, profile: str = "services", connections: int = 10_000, rounds: int = 5
) -> dict[str, Any]:
    """10k connections on one API process: broadcast delay and the process's memory.
    Target (DESIGN): broadcast p99 <= 100 ms, RSS <= 300 MB."""
    del seconds  # bounded by the number of connections and rounds
    result: dict[str, Any] = {"benchmark": "connections", "profile": profile}
    with (
        _server(profile) as (base, ws, key, pid),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        headers = {"Authorization": f"Bearer {key}"}

        async def command(http: httpx.AsyncClient) -> None:
            response = await http.post("/api/v1/readings", json=BODY, headers=headers)
            assert response.status_code == 202, response.text

        figures = runner.run(
            _broadcast(base, ws, headers, command, pid=pid, connections=connections, rounds=rounds)
        )
    result.update(figures, target_broadcast_p99_ms=100, target_rss_mb=300)
    b, rss = figures["broadcast"], figures["rss_mb"]
    print(
        f"{connections:,} connections (opened in {figures['open_seconds']:.1f} s): broadcast "
        f"p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms (target 100; ratio "
        f"{b['p99_ms'] / 100:.2f}), server CPU {figures['server_cpu_us_per_frame']:.1f} µs a "
        f"frame; RSS idle {rss['idle']:.0f} MB, connected "
        f"{rss['connected']:.0f} MB, after {rss['after_broadcast']:.0f} MB (target 300); "
        f"frames lost {figures['frames_lost']:,}"
    )
    # The baseline: the same clients and frame size on the bare app, whose broadcast is one
    # pass of writes (the floor this server and this machine's network stack set).
    frame = _bare_frame(figures["frame_bytes"])
    with (
        _bare_server() as (bare_base, bare_pid),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):

        async def broadcast(http: httpx.AsyncClient) -> None:
            response = await http.post("/bare/broadcast", content=frame)
            assert response.status_code == 202, response.text

        bare = runner.run(
            _broadcast(
                bare_base,
                bare_base.replace("http://", "ws://"),
                {},
                broadcast,
                pid=bare_pid,
                connections=connections,
                rounds=rounds,
                path="/ws",
            )
        )
    result["baseline"] = bare
    bb = bare["broadcast"]
    print(
        f"   baseline, the bare app writing the same {len(frame):,}-byte frame to each: "
        f"p50 {bb['p50_ms']:.0f} ms, p99 {bb['p99_ms']:.0f} ms, server CPU "
        f"{bare['server_cpu_us_per_frame']:.1f} µs a frame, RSS connected "
        f"{bare['rss_mb']['connected']:.0f} MB; Almanac's p99 is "
        f"{b['p99_ms'] / bb['p99_ms']:.2f} x the bare one"
    )
    return result
