"""The relay (event store log -> JetStream) against a bare NATS publish loop, in one run.

A fresh event store is seeded with ``--events`` new readings (one ``reading.requested``
each); then the relay starts and publishes them all. Its figure is messages per second from
the first message in the stream to the last. Baselines, measured right after on a stream of
their own with the same payload and headers as the relay's first message:

- a bare nats-py loop that awaits each ``js.publish`` (one round trip per message), and
- a bare ``js.publish_async`` loop with as many publishes in flight as the relay allows
  (``RelaySettings.window``), which is how the relay publishes.

The ratio is the relay against the second. No target in DESIGN; it bounds how fast
WebSocket clients, webhooks and workers can be fed on the services profile.

Run: ``python -m benchmarks relay --events 20000``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import nats
import nats.js.errors
from nats.js.api import StreamConfig

from almanac.bootstrap import bootstrap
from almanac.domain.chart import ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading
from almanac.logs import configure_logging
from almanac.settings import (
    CacheSettings,
    FeedSettings,
    LogSettings,
    RelaySettings,
    Settings,
    StoreSettings,
)
from benchmarks.appends import BIRTH, _database, _drop
from benchmarks.websocket import NATS_URL, _delete_stream


async def _stream_count(js: Any, stream: str) -> int:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        return int((await js.stream_info(stream)).state.messages)
    return 0


async def _relay_rate(settings: Settings, events: int, timeout: float) -> tuple[float, Any]:
    """Relay messages/s, and the first message it published (for the baselines)."""
    seeder = bootstrap(settings, roles=())
    await seeder.start()
    try:
        meta = EventMeta.for_request("bench")
        for start in range(0, events, 500):
            await seeder.store.append(
                *(
                    Reading.request(
                        reading_id=uuid.uuid4(),
                        meta=meta,
                        birth=BIRTH,
                        options=ChartOptions(),
                        kind="natal",
                        label=f"bench {start + i}",
                        request_hash="0" * 64,
                    )
                    for i in range(min(500, events - start))
                )
            )
    finally:
        await seeder.stop()
    client = await nats.connect(NATS_URL, connect_timeout=2)
    js = client.jetstream()
    relay = bootstrap(settings, roles=("relay",))
    await relay.start()
    try:
        deadline = time.monotonic() + timeout
        first = last = None
        count = 0
        while count < events and time.monotonic() < deadline:
            count = await _stream_count(js, settings.relay.stream)
            now = time.perf_counter()
            if count and first is None:
                first = (now, count)
            last = (now, count)
            await asyncio.sleep(0.01)
        assert first is not None, "the relay published nothing"
        assert last is not None
        if count < events:
            print(f"   the relay published {count:,} of {events:,} within {timeout:.0f} s")
        rate = (last[1] - first[1]) / max(last[0] - first[0], 1e-9)
        sample = await js.get_msg(settings.relay.stream, seq=1)
        return rate, sample
    finally:
        await relay.stop()
        await client.close()


async def _baselines(
    sample: Any, messages: int, window: int, seconds: float
) -> tuple[float, float]:
    """Awaited publishes/s and publish_async/s of the relay's own message, on a new stream."""
    stream = f"BENCH_BASE_{uuid.uuid4().hex[:10]}"
    subject = f"bench.{stream.lower()}.msg"
    client = await nats.connect(NATS_URL, connect_timeout=2)
    js = client.jetstream(publish_async_max_pending=window)
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{subject}.>"]))
    headers = {k: v for k, v in (sample.headers or {}).items() if not k.startswith("Nats-")}
    try:
        done, end = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while done < messages and time.perf_counter() < end:
            await js.publish(f"{subject}.a", sample.data, headers=headers)
            done += 1
        awaited = done / (time.perf_counter() - started)
        done, started = 0, time.perf_counter()
        end = started + seconds
        while done < messages and time.perf_counter() < end:
            await js.publish_async(f"{subject}.b", sample.data, headers=headers)
            done += 1
        await js.publish_async_completed()
        windowed = done / (time.perf_counter() - started)
        return awaited, windowed
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await client.close()


def run(seconds: float = 5.0, profile: str = "services", events: int = 20_000) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "relay", "profile": profile, "events": events}
    if profile != "services":
        print("   the relay publishes to NATS JetStream: services profile only")
        return {**result, "skipped": "services profile only"}
    name, url = _database()
    run_id = url.rsplit("/", 1)[1]
    settings = Settings(
        store=StoreSettings(postgres_url=url),
        cache=CacheSettings(redis_url="redis://127.0.0.1:6379/0"),
        feed=FeedSettings(nats_url=NATS_URL),
        relay=RelaySettings(stream=f"BENCH_{run_id}", subject_prefix=f"bench.{run_id}.events"),
        log=LogSettings(level="WARNING"),
    )
    configure_logging(settings.log)
    try:
        rate, sample = asyncio.run(_relay_rate(settings, events, timeout=max(60.0, seconds)))
        awaited, windowed = asyncio.run(
            _baselines(sample, events, settings.relay.window, min(seconds, 5.0))
        )
    finally:
        _drop(name)
        _drop(f"{name}_read")
        asyncio.run(_delete_stream(f"BENCH_{run_id}"))
    result.update(
        message_bytes=len(sample.data),
        baseline_awaited_publish_per_s=awaited,
        baseline_publish_async_per_s=windowed,
        window=settings.relay.window,
        relay_per_s=rate,
        ratio_to_publish_async=rate / windowed,
    )
    print(
        f"bare NATS publish loop ({len(sample.data):,} B messages): awaited {awaited:,.0f}/s, "
        f"publish_async with {settings.relay.window} in flight {windowed:,.0f}/s"
    )
    print(
        f"relay, {events:,} stored events: {rate:,.0f}/s; ratio to the publish_async loop "
        f"{rate / windowed:.2f}"
    )
    return result
