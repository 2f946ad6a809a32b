"""Live batch progress over ``WS /ws/batches/{id}`` with a real client, on both profiles."""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgspec

from almanac.settings import BatchSettings, Settings
from tests.e2e.support_server import live_server, next_frame
from tests.e2e.test_batches_api import SlowGenerator, items


async def test_batch_socket_sends_each_outcome_and_progress_every_second(
    settings: Settings,
) -> None:
    settings = msgspec.structs.replace(settings, batch=BatchSettings(window=4))
    async with live_server(settings, generator=SlowGenerator()) as server:
        response = await server.http.post(
            "/api/v1/batches", json={"items": items(60)}, headers=server.auth(server.alice)
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        async with server.connect(f"/ws/batches/{batch_id}", server.alice) as socket:
            assert (await next_frame(socket))["type"] == "welcome"
            events: list[dict[str, Any]] = []
            progress: list[tuple[float, dict[str, Any]]] = []
            for _ in range(10_000):
                frame = await next_frame(socket, timeout=20)
                if frame["type"] == "event":
                    events.append(frame)
                elif frame["type"] == "progress":
                    progress.append((time.monotonic(), frame))
                    if frame["status"] == "completed":
                        break
    outcomes = [e for e in events if e["event_type"] == "batch.item_succeeded"]
    assert sorted(e["payload"]["data"]["index"] for e in outcomes) == list(range(60))
    assert {e["aggregate_id"] for e in events} == {batch_id}
    final = progress[-1][1]
    assert (final["succeeded"], final["pending"], final["progress"]) == (60, 0, 100.0)
    running = [t for t, f in progress if f["status"] == "running"]
    assert running, "progress frames came while the batch ran"
    # Sent twice a second; the bound leaves room for a loaded test machine.
    gaps = [b - a for a, b in itertools.pairwise(running)]
    assert all(gap < 1.5 for gap in gaps), gaps
