"""Webhook deliveries per second to a local receiver, against a bare httpx POST loop.

A receiver process (a bare ASGI app under uvicorn on 127.0.0.1) answers every POST with
200. The deliverer runs in this process (``deliver`` and ``projector`` roles, the relay
too on services): one endpoint is registered, ``--events`` ``reading.requested`` events are
appended at once, and the figure is messages delivered (signed, recorded, settled in the
delivery log) per second, from the first append to the last message settled. It runs on
uvloop, as under ``almanac serve --roles deliver``.

Baseline: an ``httpx.AsyncClient`` posting the same body to the same receiver from as many
concurrent tasks as the deliverer keeps in flight to one endpoint
(``ALMANAC_WEBHOOK_ENDPOINT_CONCURRENCY``), for ``--seconds``.
Target (DESIGN): >= 0.5 x the baseline.

Also measured, as the stricter reference: the same loop with an ``aiohttp.ClientSession``,
the client the deliverer itself sends with (httpx costs ~8 times its CPU a POST here, so
against httpx alone the deliverer's own costs would hide behind its client's).

Run: ``python -m benchmarks webhooks`` (``--profile embedded`` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import uvloop

from almanac.bootstrap import bootstrap
from almanac.domain.chart import BirthData, ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading
from almanac.readmodels import ReadDatabase
from almanac.settings import (
    CacheSettings,
    FeedSettings,
    LogSettings,
    RelaySettings,
    Settings,
    StoreSettings,
    WebhookSettings,
)
from benchmarks.appends import _database, _drop
from benchmarks.websocket import NATS_URL, _delete_stream
from commands.webhooks import RegisterWebhook, register_webhook

BIRTH = msgspec.convert(
    {
        "date": "1990-04-12",
        "time": "14:30",
        "timezone": "Europe/London",
        "latitude": 51.5074,
        "longitude": -0.1278,
    },
    BirthData,
)
OWNER = "bench"


async def receiver_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the body, answers 200: the cheapest receiver uvicorn can run."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_receiver(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "benchmarks.webhooks:receiver_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--lifespan", "off",
        ],
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the receiver did not start")


JSON = {"content-type": "application/json"}


async def _posts_per_second(
    post: Callable[[], Awaitable[None]], concurrency: int, seconds: float
) -> float:
    """Calls of ``post`` per second from ``concurrency`` tasks for ``seconds``."""
    done = 0
    end = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < end:
            await post()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def baseline(url: str, body: bytes, concurrency: int, seconds: float) -> float:
    """POSTs per second from ``concurrency`` tasks sharing one httpx client."""
    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency), trust_env=False
    ) as client:

        async def post() -> None:
            (await client.post(url, content=body, headers=JSON)).raise_for_status()

        return await _posts_per_second(post, concurrency, seconds)


async def baseline_aiohttp(url: str, body: bytes, concurrency: int, seconds: float) -> float:
    """The same loop through aiohttp, the deliverer's own client."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def post() -> None:
            async with session.post(url, data=body, headers=JSON) as response:
                await response.read()
                response.raise_for_status()

        return await _posts_per_second(post, concurrency, seconds)


def _settings(profile: str, data_dir: Path, url: str | None) -> Settings:
    hooks = WebhookSettings(
        secret_key="YmVuY2htYXJrLW9ubHktd2ViaG9vay1rZXktMzJieXQ=",  # noqa: S106 - benchmark
        allowed_networks=("127.0.0.0/8",),
        allow_http=True,
        poll_interval=0.05,
    )
    if profile == "embedded":
        return Settings(
            store=StoreSettings(data_dir=data_dir), log=LogSettings(level="WARNING"), webhooks=hooks
        )
    assert url is not None
    run = url.rsplit("/", 1)[1]
    return Settings(
        store=StoreSettings(postgres_url=url),
        cache=CacheSettings(redis_url="redis://127.0.0.1:6379/0"),
        feed=FeedSettings(nats_url=NATS_URL),
        relay=RelaySettings(stream=f"BENCH_{run}", subject_prefix=f"bench.{run}.events"),
        log=LogSettings(level="WARNING"),
        webhooks=hooks,
    )


# Bounds on the wait for every message to succeed, only there to end a run that is stuck
# (a message that never succeeds): a minute for the roles to get going, then 20 messages a
# second, a quarter of the slowest rate measured here on a loaded host.
SETTLE_GRACE = 60.0
SLOWEST_RATE = 20.0


async def all_succeeded(db: ReadDatabase, events: int, *, within: float) -> None:
    """Wait until ``events`` messages have succeeded; past ``within`` seconds, fail with how
    many had and where the rest were."""
    deadline = time.monotonic() + within
    while True:
        row = await db.fetch_one(
            "SELECT COUNT(*) AS n FROM webhook_messages WHERE status = 'succeeded'", {}
        )
        if row is not None and int(row["n"]) >= events:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    rows = await db.fetch_all(
        "SELECT status, COUNT(*) AS n FROM webhook_messages GROUP BY status ORDER BY status", {}
    )
    counts = {str(r["status"]): int(r["n"]) for r in rows}
    if counts.get("succeeded", 0) >= events:
        return  # the last of them, just now
    others = [f"{status} {n:,}" for status, n in counts.items() if status != "succeeded"]
    if sum(counts.values()) < events:
        others.append(f"not in the log yet {events - sum(counts.values()):,}")
    raise RuntimeError(
        f"{counts.get('succeeded', 0):,} of {events:,} webhook messages succeeded within"
        f" {within:g} s; the others: {', '.join(others)}"
    )


async def deliveries(settings: Settings, url: str, events: int) -> tuple[float, str]:
    """Messages delivered per second, and one of the bodies sent (for the baseline)."""
    roles = ("projector", "deliver", "relay")
    container = bootstrap(settings, roles=roles, cache_prefix=f"bench-{uuid.uuid4().hex[:8]}:")
    await container.start()
    try:
        guard, box = container.webhooks
        await register_webhook(
            RegisterWebhook(url=url, event_types=["reading.*"]),
            store=container.store,
            guard=guard,
            box=box,
            meta=EventMeta.for_request(OWNER),
        )
        readings = [
            Reading.request(
                reading_id=uuid.uuid4(),
                meta=EventMeta.for_request(OWNER),
                birth=BIRTH,
                options=ChartOptions(),
                kind="natal",
                label=f"bench {i}",
                request_hash="0" * 64,
            )
            for i in range(events)
        ]
        started = time.monotonic()
        for start in range(0, events, 256):
            await container.store.append(*readings[start : start + 256])
        db = container.read_db
        await all_succeeded(db, events, within=SETTLE_GRACE + events / SLOWEST_RATE)
        elapsed = time.monotonic() - started
        sample = await db.fetch_one("SELECT payload FROM webhook_messages LIMIT 1", {})
        assert sample is not None
        return events / elapsed, str(sample["payload"])
    finally:
        await container.stop()


def run(
    seconds: float = 5.0, profile: str = "services", events: int | None = None
) -> dict[str, Any]:
    events = events or 5000
    port = _free_port()
    url = f"http://127.0.0.1:{port}/hook"
    receiver = _start_receiver(port)
    name: str | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db_url = None
            if profile == "services":
                name, db_url = _database()
            settings = _settings(profile, Path(tmp) / "var", db_url)
            # Both on uvloop, the loop of every ``almanac serve`` process.
            rate, sample = uvloop.run(deliveries(settings, url, events))
            concurrency = settings.webhooks.per_endpoint_concurrency
            base = uvloop.run(baseline(url, sample.encode(), concurrency, seconds))
            lean = uvloop.run(baseline_aiohttp(url, sample.encode(), concurrency, seconds))
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        if name is not None:
            asyncio.run(_delete_stream(f"BENCH_{name}"))
            _drop(name)
            _drop(f"{name}_read")
    ratio = rate / base
    print(f"   bare httpx POST loop:   {base:,.0f} req/s")
    print(f"   bare aiohttp POST loop: {lean:,.0f} req/s (the deliverer's client)")
    print(f"   webhook deliveries:     {rate:,.0f} msg/s ({events} events)")
    print(f"   ratio: {ratio:.2f} (target >= 0.5); to the aiohttp loop {rate / lean:.2f}")
    return {
        "benchmark": "webhooks",
        "profile": profile,
        "events": events,
        "baseline_posts_per_s": base,
        "aiohttp_posts_per_s": lean,
        "deliveries_per_s": rate,
        "ratio": ratio,
        "ratio_to_aiohttp": rate / lean,
        "target": 0.5,
    }
