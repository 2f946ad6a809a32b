"""Live events over WebSockets with a real client against a running server, on both profiles."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import websockets

from almanac.settings import Settings
from tests.e2e.support_server import LiveServer, events_until, live_server, next_frame

PROGRESS = ["reading.requested", "reading.chart_calculated", "reading.generated"]


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(settings) as running:
        yield running


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [f["event_type"] for f in frames]


def generated(frames: list[dict[str, Any]]) -> bool:
    return any(f["event_type"] == "reading.generated" for f in frames)


async def subscribe(socket: Any, *topics: str) -> dict[str, Any]:
    await socket.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    return await next_frame(socket)


async def test_a_readings_progress_arrives_live_in_order(server: LiveServer) -> None:
    async with server.connect("/ws", server.alice) as socket:
        welcome = await next_frame(socket)
        assert welcome["type"] == "welcome"
        assert welcome["owner"] == "alice"
        assert (await subscribe(socket, "event:reading.*"))["topics"] == ["event:reading.*"]
        accepted = await server.post_reading(server.alice, label="live")
        frames = await events_until(socket, generated)
    assert types(frames) == PROGRESS
    positions = [f["position"] for f in frames]
    assert positions == sorted(positions)
    assert positions[0] == int(accepted.headers["almanac-position"])
    reading_id = accepted.headers["location"].rsplit("/", 1)[1]
    for frame in frames:
        assert frame["aggregate_id"] == reading_id
        assert frame["payload"]["position"] == frame["position"]
        assert frame["payload"]["type"] == frame["event_type"]
        assert frame["payload"]["metadata"]["owner"] == "alice"
    assert frames[0]["payload"]["data"]["label"] == "live"
    assert frames[2]["payload"]["data"]["text"]["sections"]


async def test_the_reading_shortcut_resumes_from_a_position_then_goes_live(
    server: LiveServer,
) -> None:
    accepted = await server.post_reading(server.alice)
    position = int(accepted.headers["almanac-position"])
    reading_id = accepted.headers["location"].rsplit("/", 1)[1]
    # Connected after the request was stored: the resume replays it, then the rest is live.
    async with server.connect(f"/ws/readings/{reading_id}?after={position - 1}", server.alice) as s:
        assert (await next_frame(s))["type"] == "welcome"
        frames = await events_until(s, generated)
    assert types(frames) == PROGRESS
    assert frames[0]["position"] == position


async def test_clients_see_only_their_own_owners_events_and_admins_see_all(
    server: LiveServer,
) -> None:
    async with (
        server.connect("/ws?topics=*", server.bob) as bob,
        server.connect("/ws?topics=*", server.admin) as admin,
    ):
        for socket in (bob, admin):
            assert (await next_frame(socket))["type"] == "welcome"
        alices = await server.post_reading(server.alice)
        admin_frames = await events_until(admin, generated)
        bobs = await server.post_reading(server.bob)
        bob_frames = await events_until(bob, generated)
    alice_id = alices.headers["location"].rsplit("/", 1)[1]
    bob_id = bobs.headers["location"].rsplit("/", 1)[1]
    # Admins also see the key issuance of the test's set-up; of readings, alice's.
    assert {f["aggregate_id"] for f in admin_frames if f["event_type"] in PROGRESS} == {alice_id}
    assert {f["aggregate_id"] for f in bob_frames} == {bob_id}, "nothing of alice's"


@pytest.mark.parametrize("how", ["header", "query", "first message"])
async def test_a_key_is_accepted_by_header_query_or_first_message(
    server: LiveServer, how: str
) -> None:
    if how == "header":
        connection = server.connect("/ws", server.alice)
    elif how == "query":
        connection = server.connect(f"/ws?key={server.alice}")
    else:
        connection = server.connect("/ws")
    async with connection as socket:
        if how == "first message":
            await socket.send(json.dumps({"type": "auth", "key": server.alice, "topics": ["*"]}))
        welcome = await next_frame(socket)
    assert welcome["type"] == "welcome"
    assert welcome["owner"] == "alice"


@pytest.mark.parametrize(
    "first", [None, {"type": "auth", "key": "alm_wrong"}, {"type": "subscribe", "topics": ["*"]}]
)
async def test_no_valid_key_closes_with_4401(server: LiveServer, first: Any) -> None:
    async with server.connect("/ws") as socket:
        if first is not None:
            await socket.send(json.dumps(first))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await next_frame(socket, timeout=15)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


async def test_a_bad_message_gets_an_error_frame_and_the_connection_stays(
    server: LiveServer,
) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        await socket.send("{not json")
        assert (await next_frame(socket))["code"] == "bad_message"
        await socket.send(json.dumps({"type": "subscribe", "topics": ["galaxy:9"]}))
        bad_topic = await next_frame(socket)
        assert bad_topic["code"] == "bad_topic"
        assert "galaxy:9" in bad_topic["detail"]
        await socket.send(json.dumps({"type": "ping"}))
        assert (await next_frame(socket))["type"] == "pong"


async def test_unsubscribing_stops_the_frames_of_that_topic(server: LiveServer) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        await subscribe(socket, "event:reading.generated", "event:reading.requested")
        reply = await subscribe(socket, "event:reading.generated")
        assert reply["topics"] == ["event:reading.generated", "event:reading.requested"]
        await socket.send(
            json.dumps({"type": "unsubscribe", "topics": ["event:reading.requested"]})
        )
        assert (await next_frame(socket))["topics"] == ["event:reading.generated"]
        await server.post_reading(server.alice)
        frames = await events_until(socket, generated)
    assert types(frames) == ["reading.generated"]


async def test_a_reconnecting_client_gets_what_it_missed_once_then_live(
    server: LiveServer,
) -> None:
    async with server.connect("/ws?topics=event:reading.*", server.alice) as socket:
        await next_frame(socket)
        await server.post_reading(server.alice, label="first")
        seen = await events_until(socket, generated)
    last = seen[-1]["position"]
    missed = [await server.post_reading(server.alice, label=f"missed {i}") for i in range(2)]
    async with server.connect(f"/ws?topics=event:reading.*&after={last}", server.alice) as again:
        await next_frame(again)
        await server.post_reading(server.alice, label="after")

        def three_generated(frames: list[dict[str, Any]]) -> bool:
            return types(frames).count("reading.generated") == 3

        resumed = await events_until(again, three_generated)
    positions = [f["position"] for f in resumed]
    assert positions == sorted(set(positions)), "in order, no duplicate"
    assert positions[0] > last
    labels = [f["payload"]["data"]["label"] for f in resumed if f["event_type"] == PROGRESS[0]]
    assert labels == ["missed 0", "missed 1", "after"]
    assert int(missed[0].headers["almanac-position"]) == positions[0]


async def test_resuming_from_too_far_back_is_refused_with_4410(settings: Settings) -> None:
    tight = msgspec.structs.replace(
        settings, websocket=msgspec.structs.replace(settings.websocket, max_replay=3)
    )
    async with live_server(tight) as server:
        await server.post_reading(server.alice)
        async with server.connect("/ws?topics=*&after=0", server.alice) as socket:
            await next_frame(socket)
            error = await next_frame(socket)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await next_frame(socket)
    assert error["code"] == "position_too_old"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4410


async def test_an_idle_connection_gets_heartbeats(settings: Settings) -> None:
    quick = msgspec.structs.replace(
        settings, websocket=msgspec.structs.replace(settings.websocket, heartbeat=0.1)
    )
    async with live_server(quick) as server, server.connect("/ws", server.alice) as socket:
        position = (json.loads(await socket.recv()))["position"]
        heartbeat = json.loads(await socket.recv())
    assert heartbeat["type"] == "heartbeat"
    # The keys issued as the server started may be seen after the welcome.
    assert heartbeat["position"] >= position
