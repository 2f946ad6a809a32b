"""CPU per command: what the command path costs the processes that serve it.

Throughput under wrk swings with the host (the same code served 375-591 µs of CPU a POST in
one hour here); CPU per request moves less, and shows where a change went. Two parts:

- In-process: the API app (``almanac.app.create_app``, the ``api`` role, on a fresh
  database) and the bare app of ``benchmarks/bare_app.py`` called directly as ASGI apps on
  uvloop: ``--events`` POSTs, each with a label of its own, 64 at a time, each in a task of
  its own as uvicorn runs them; rounds alternate between the two apps. Reported: the
  process's CPU per request (``time.process_time``), and the event loop thread's. No
  server, no client: what is left out is the HTTP parsing and the sockets, the same for
  both.
- At a fixed rate: ``almanac serve --roles api`` and, on services, ``--roles relay`` in
  processes of their own, while ``benchmarks/loadgen.py`` sends 1,000 POSTs a second for
  ``--seconds``: each process's CPU per command, from ``/proc``.

Run: ``python -m benchmarks cpu [--profile embedded] [--events 6000] [--seconds 5]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.appends import _database, _drop
from benchmarks.websocket import (
    BODY,
    _admin_key,
    _delete_stream,
    _free_port,
    _server_env,
    _start,
    _stop,
)

CONCURRENCY = 64
ROUNDS = 3
RATE = 1000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user and system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Posts:
    """POSTs of ``/api/v1/readings`` sent straight to an ASGI app."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.template = json.dumps({**BODY, "label": "cpu-%d"}).encode()
        self.headers = [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ]
        self.sent = 0
        self.statuses: dict[int, int] = {}

    async def one(self) -> None:
        self.sent += 1
        body = self.template % self.sent
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/v1/readings",
            "raw_path": b"/api/v1/readings",
            "query_string": b"",
            "root_path": "",
            "headers": [*self.headers, (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        delivered = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not delivered.is_set():
                delivered.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                self.statuses[status] = self.statuses.get(status, 0) + 1

        await self.app(scope, receive, send)

    async def run(self, count: int) -> dict[str, float]:
        """``count`` POSTs, ``CONCURRENCY`` at a time; CPU per request in µs."""
        loop = asyncio.get_running_loop()
        each = max(1, count // CONCURRENCY)

        async def client() -> None:
            for _ in range(each):
                await loop.create_task(self.one())

        process, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        done = each * CONCURRENCY
        return {
            "requests": done,
            "process_us": (time.process_time() - process) / done * 1e6,
            "loop_thread_us": (time.thread_time() - thread) / done * 1e6,
            "requests_per_s": done / (time.perf_counter() - wall),
        }


async def start_lifespan(app: Any) -> tuple[asyncio.Queue[Any], asyncio.Task[Any]]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")
    return inbox, task


async def _in_process(env: dict[str, str], key: str, count: int) -> dict[str, Any]:
    from almanac.app import create_app
    from almanac.server import settle_heap
    from almanac.settings import Settings
    from benchmarks.bare_app import create_bare_app

    apps = {
        "bare": create_bare_app(),
        "almanac": create_app(Settings.from_env(env), roles=("api",)),
    }
    lifespans = {name: await start_lifespan(app) for name, app in apps.items()}
    settle_heap()
    posts = {name: Posts(app, key) for name, app in apps.items()}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    try:
        for name in apps:  # warm-up: imports, pools, prepared statements
            await posts[name].run(CONCURRENCY * 10)
        for round_ in range(ROUNDS):
            for name in apps:
                rounds[name].append(await posts[name].run(count))
            print(
                f"   round {round_ + 1}: bare {rounds['bare'][-1]['process_us']:.0f} µs,"
                f" almanac {rounds['almanac'][-1]['process_us']:.0f} µs of CPU a POST"
            )
    finally:
        for inbox, task in lifespans.values():
            await inbox.put({"type": "lifespan.shutdown"})
            await task
    for name, sent in posts.items():
        if set(sent.statuses) != {202}:
            raise RuntimeError(f"{name} answered {sent.statuses}")
    medians = {
        name: statistics.median(r["process_us"] for r in runs) for name, runs in rounds.items()
    }
    return {
        "rounds": rounds,
        "bare_us": medians["bare"],
        "almanac_us": medians["almanac"],
        "almanac_loop_thread_us": statistics.median(r["loop_thread_us"] for r in rounds["almanac"]),
    }


def _at_rate(env: dict[str, str], key: str, profile: str, seconds: float) -> dict[str, Any]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    roles = ["api", "relay"] if profile == "services" else ["api"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body:
        json.dump(BODY, body)
    try:
        port = 0
        for role in roles:
            role_port = _free_port()
            port = port or role_port
            argv = [sys.executable, "-m", "almanac", "serve", "--roles", role]
            started[role] = _start([*argv, "--port", str(role_port)], env, role_port)

        def load(rate: int, length: float) -> dict[str, Any]:
            out = subprocess.run(
                [
                    *(sys.executable, "-m", "benchmarks.loadgen", "--port", str(port)),
                    *("--path", "/api/v1/readings", "--method", "POST"),
                    *("--body-file", body.name, "--rate", str(rate), "--seconds", str(length)),
                    *("--header", f"Authorization: Bearer {key}"),
                    *("--header", "Content-Type: application/json"),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=length + 60,
            )
            loaded: dict[str, Any] = json.loads(out.stdout)
            return loaded

        load(RATE // 2, 1)  # warm-up
        before = {role: process_cpu(p.pid) for role, p in started.items()}
        wall = time.perf_counter()
        http = load(RATE, seconds)
        wall = time.perf_counter() - wall
        commands = RATE * seconds
        cpu = {role: process_cpu(p.pid) - before[role] for role, p in started.items()}
        return {
            "rate": RATE,
            "post": http,
            **{
                role: {"cores": used / wall, "us_per_command": used / commands * 1e6}
                for role, used in cpu.items()
            },
        }
    finally:
        for process in started.values():
            _stop(process)
        Path(body.name).unlink(missing_ok=True)


def run(profile: str = "services", events: int = 6000, seconds: float = 5.0) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "cpu", "profile": profile}
    name, url = _database() if profile == "services" else ("", "")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = _server_env(profile, url, Path(tmp))
            key = _admin_key(env)
            import uvloop

            result["in_process"] = uvloop.run(_in_process(env, key, events))
            inside = result["in_process"]
            print(
                f"POST in-process: bare {inside['bare_us']:.0f} µs, almanac"
                f" {inside['almanac_us']:.0f} µs of CPU a request (loop thread"
                f" {inside['almanac_loop_thread_us']:.0f}); medians of {ROUNDS} rounds"
            )
            result["at_rate"] = at = _at_rate(env, key, profile, seconds)
            roles = ", ".join(
                f"{role} {at[role]['us_per_command']:.0f} µs ({at[role]['cores']:.2f} cores)"
                for role in ("api", "relay")
                if role in at
            )
            print(
                f"at {RATE:,} POSTs/s for {seconds:g} s: CPU a command: {roles};"
                f" POST p50 {at['post']['p50_ms']:.1f} ms, p99 {at['post']['p99_ms']:.1f} ms"
            )
    finally:
        if name:
            _drop(name)
            _drop(f"{name}_read")
            asyncio.run(_delete_stream(f"BENCH_{name}"))
    return result
