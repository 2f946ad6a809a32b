"""Live batch progress over ``WS /ws/batches/{id}`` with a real client, on both profiles."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import msgspec
import pytest
import websockets

import streams.http
from almanac.settings import BatchSettings, Settings
from tests.e2e.support_server import live_server, next_frame
from tests.e2e.test_batches_api import GatedGenerator, items


async def test_batch_socket_sends_each_outcome_and_progress_on_a_cadence(
    settings: Settings,
) -> None:
    """Progress comes while nothing changes (the items held back), then follows the batch to
    its end, its counts only ever moving forward."""
    settings = msgspec.structs.replace(settings, batch=BatchSettings(window=4))
    generator = GatedGenerator(open_=False)
    async with live_server(settings, generator=generator) as server:
        response = await server.http.post(
            "/api/v1/batches", json={"items": items(60)}, headers=server.auth(server.alice)
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        try:
            async with server.connect(f"/ws/batches/{batch_id}", server.alice) as socket:
                assert (await next_frame(socket))["type"] == "welcome"
                events: list[dict[str, Any]] = []
                progress: list[dict[str, Any]] = []
                while_held: list[dict[str, Any]] = []
                for _ in range(10_000):
                    frame = await next_frame(socket, timeout=20)
                    if frame["type"] == "event":
                        events.append(frame)
                    elif frame["type"] == "progress" and frame["status"] != "not_found":
                        progress.append(frame)
                        if frame["status"] == "completed":
                            break
                        if not generator.gate.is_set():
                            while_held.append(frame)
                            if len(while_held) == 2:
                                generator.gate.set()
        finally:
            generator.gate.set()
    assert [(f["status"], f["succeeded"]) for f in while_held] == [("running", 0)] * 2
    outcomes = [e for e in events if e["event_type"] == "batch.item_succeeded"]
    assert sorted(e["payload"]["data"]["index"] for e in outcomes) == list(range(60))
    assert {e["aggregate_id"] for e in events} == {batch_id}
    for before, after in itertools.pairwise(progress):
        assert after["position"] >= before["position"], progress
        assert after["succeeded"] >= before["succeeded"], progress
        assert after["pending"] <= before["pending"], progress
    final = progress[-1]
    assert (final["succeeded"], final["pending"], final["progress"]) == (60, 0, 100.0)


async def frames_until_closed(socket: Any) -> None:
    for _ in range(100):
        await next_frame(socket, timeout=10)


async def test_batch_socket_for_a_batch_the_client_cannot_see_closes_with_4404(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reported as not found for a grace period (it may not be projected yet), then closed,
    instead of a read-model query twice a second for as long as the socket stays open."""
    monkeypatch.setattr(streams.http, "BATCH_NOT_FOUND_GRACE", 1.0)
    async with live_server(settings) as server:
        response = await server.http.post(
            "/api/v1/batches", json={"items": items(1)}, headers=server.auth(server.alice)
        )
        assert response.status_code == 202, response.text
        for path in (f"/ws/batches/{uuid.uuid4()}", f"/ws/batches/{response.json()['id']}"):
            # Someone else's batch is as invisible to bob as one that does not exist.
            async with server.connect(path, server.bob) as socket:
                assert (await next_frame(socket))["type"] == "welcome"
                assert (await next_frame(socket))["status"] == "not_found"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await frames_until_closed(socket)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4404
            assert "no batch" in closed.value.rcvd.reason
