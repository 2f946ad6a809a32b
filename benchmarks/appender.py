"""A load process for the lag benchmark: appends new readings at a fixed rate.

``python -m benchmarks.appender RATE SECONDS`` reads the event store's location from the
``ALMANAC_*`` environment, requests one reading per 1/RATE s for SECONDS s through the
group-commit writer, and prints one JSON document: each position with the monotonic time
its append was durable (CLOCK_MONOTONIC is shared by the processes of one machine).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

from almanac.domain.chart import ChartOptions
from almanac.domain.events import EventMeta
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore
from almanac.server import settle_heap
from almanac.settings import Settings
from benchmarks.appends import BIRTH


async def offer(store: EventStore, rate: int, seconds: float) -> dict[int, float]:
    committed: dict[int, float] = {}
    interval = 1.0 / rate
    start = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
        reading = Reading.request(
            reading_id=uuid.uuid4(),
            meta=EventMeta.for_request("bench"),
            birth=BIRTH,
            options=ChartOptions(),
            kind="natal",
            label=None,
            request_hash="0" * 64,
        )
        position = await store.append(reading)
        committed[position] = time.monotonic()

    await asyncio.gather(*(one(i) for i in range(int(rate * seconds))))
    return committed


def main() -> None:
    rate, seconds = int(sys.argv[1]), float(sys.argv[2])
    store = EventStore(Settings.from_env())
    settle_heap()  # as an ``almanac serve`` process does once started
    try:
        started = time.monotonic()
        committed = asyncio.run(offer(store, rate, seconds))
        achieved = len(committed) / (time.monotonic() - started)
    finally:
        store.close()
    json.dump({"achieved_per_s": achieved, "committed": committed}, sys.stdout)


if __name__ == "__main__":
    main()
