"""Live events over WebSockets with a real client against a running server, on both profiles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import websockets

from almanac.auth import KeyRing
from almanac.domain.access import key_id_for
from almanac.errors import Unavailable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.settings import Settings
from streams.http import hub_of
from streams.websocket import event_frame
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


async def close_of(socket: Any) -> Any:
    """The close frame the server ends ``socket`` with (no frame but heartbeats before it)."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await next_frame(socket, timeout=15)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd


def with_small_queues(settings: Settings) -> Settings:
    """Eight unsent frames per connection at most: a slow client overflows quickly."""
    websocket = msgspec.structs.replace(settings.websocket, queue_size=8)
    return msgspec.structs.replace(settings, websocket=websocket)


async def subscribe(socket: Any, *topics: str) -> dict[str, Any]:
    await socket.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    return await next_frame(socket)


async def unsubscribe(socket: Any, *topics: str) -> dict[str, Any]:
    await socket.send(json.dumps({"type": "unsubscribe", "topics": list(topics)}))
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


async def test_a_resume_replays_only_the_clients_own_owners_events(server: LiveServer) -> None:
    """The replay from the log is filtered by owner as the live stream is."""
    async with server.connect("/ws?topics=*", server.alice) as alice:
        assert (await next_frame(alice))["type"] == "welcome"
        alices = await server.post_reading(server.alice)
        await events_until(alice, generated)
    async with server.connect("/ws?topics=*&after=0", server.bob) as bob:
        assert (await next_frame(bob))["type"] == "welcome"
        bobs = await server.post_reading(server.bob)
        bob_frames = await events_until(bob, generated)
    alice_id = alices.headers["location"].rsplit("/", 1)[1]
    bob_id = bobs.headers["location"].rsplit("/", 1)[1]
    assert alice_id not in {f["aggregate_id"] for f in bob_frames}
    assert {f["aggregate_id"] for f in bob_frames} == {bob_id}
    assert {f["payload"]["metadata"]["owner"] for f in bob_frames} == {"bob"}


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
        close = await close_of(socket)
    assert close.code == 4401


async def test_revoking_a_key_closes_the_connections_it_opened(server: LiveServer) -> None:
    taken = await server.http.get("/api/v1/readings", headers=server.auth(server.alice))
    assert taken.status_code == 200  # and remembered by the key ring for 30 s
    async with (
        server.connect("/ws", server.alice) as revoked,
        server.connect("/ws", server.bob) as kept,
    ):
        assert (await next_frame(revoked))["type"] == (await next_frame(kept))["type"] == "welcome"
        # As ``almanac keys revoke`` does, from a key ring of its own.
        elsewhere = KeyRing(server.container.store, cache_ttl=30)
        await asyncio.to_thread(elsewhere.revoke, key_id_for(server.alice))
        close = await close_of(revoked)
        assert (close.code, close.reason) == (4401, "the API key was revoked")
        await kept.send(json.dumps({"type": "ping"}))
        assert (await next_frame(kept))["type"] == "pong"
    # The process that heard of it refuses the key at once, not when its check expires.
    refused = await server.http.get("/api/v1/readings", headers=server.auth(server.alice))
    assert refused.status_code == 401


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


@pytest.mark.parametrize("how", ["query", "first message"])
async def test_rejects_a_malformed_topic_given_from_the_start_with_4400(
    server: LiveServer, how: str
) -> None:
    if how == "query":
        connection = server.connect("/ws?topics=galaxy:1", server.alice)
    else:
        connection = server.connect("/ws")
    async with connection as socket:
        if how == "first message":
            auth = {"type": "auth", "key": server.alice, "topics": ["galaxy:1"]}
            await socket.send(json.dumps(auth))
        close = await close_of(socket)
    assert close.code == 4400
    assert "galaxy:1" in close.reason


async def test_an_unknown_key_with_a_malformed_topic_is_refused_as_unauthorized(
    server: LiveServer,
) -> None:
    async with server.connect("/ws") as socket:
        await socket.send(json.dumps({"type": "auth", "key": "alm_wrong", "topics": ["galaxy:1"]}))
        close = await close_of(socket)
    assert close.code == 4401


class Collected(logging.Handler):
    """Every record a logger passes on, formatted with its traceback. (pytest's caplog sees
    nothing of a live server: its configuration replaces the root logger's handlers.)"""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record))


@contextlib.contextmanager
def collected(*names: str) -> Iterator[Collected]:
    handler = Collected()
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def test_a_bad_first_message_closes_with_4401_and_nothing_after_the_close(
    server: LiveServer,
) -> None:
    with collected("", "uvicorn.error") as logged:
        async with server.connect("/ws") as socket:
            await socket.send("{not json")
            close = await close_of(socket)
        # Anything the server did wrong after the close has been logged by the time a next
        # connection is served on the same loop.
        async with server.connect("/ws") as socket:
            await socket.send("{not json")
            await close_of(socket)
    assert close.code == 4401
    # No error frame raced the close ("Unexpected ASGI message ... after sending close").
    assert not [t for t in logged.texts if "Unexpected ASGI message" in t]


async def test_rejects_a_flood_of_bad_frames_from_a_client_that_does_not_read_with_4429(
    settings: Settings,
) -> None:
    # Each bad frame's error reply waits in the connection's bounded queue like any frame,
    # so a client that sends them and reads nothing is closed as too slow instead of
    # growing the server's memory. The replies quote the bad type, so they are large and
    # the server's buffers fill fast.
    async with live_server(with_small_queues(settings)) as server:
        hub = hub_of(server.container)
        async with slow_reader(server) as client:
            await next_frame(client)
            bad = json.dumps({"type": "x" * 20_000})
            for _ in range(5000):  # bounded: the server gives up on this client long before
                if hub.connections == 0:
                    break
                with contextlib.suppress(websockets.ConnectionClosed):
                    await client.send(bad)
                await asyncio.sleep(0)
            assert hub.connections == 0, "the client was never found too slow"
            with contextlib.suppress(websockets.ConnectionClosed):
                for _ in range(10_000):
                    await asyncio.wait_for(client.recv(), 10)
            assert client.close_code == 4429


async def test_error_replies_come_in_the_order_of_the_messages(server: LiveServer) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        for message in ("{not json", '{"type": "ping"}', '{"type": "nope"}', '{"type": "ping"}'):
            await socket.send(message)
        replies = [await next_frame(socket) for _ in range(4)]
        assert [r.get("code", r["type"]) for r in replies] == [
            "bad_message",
            "pong",
            "bad_message",
            "pong",
        ]
        await socket.send(json.dumps({"type": "subscribe", "topics": ["*"]}))
        assert (await next_frame(socket))["topics"] == ["*"]


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


@pytest.mark.parametrize(
    "path", ["/ws?after=abc", "/ws?after=-1", "/ws?after=", "/ws?after=%C2%B2"]
)
async def test_rejects_a_malformed_after_in_the_url_with_4400(
    server: LiveServer, path: str
) -> None:
    async with server.connect(path, server.alice) as socket:
        close = await close_of(socket)
    assert close.code == 4400
    assert "after" in close.reason


async def test_rejects_a_negative_after_in_the_auth_message_with_4400(server: LiveServer) -> None:
    async with server.connect("/ws") as socket:
        await socket.send(json.dumps({"type": "auth", "key": server.alice, "after": -1}))
        close = await close_of(socket)
    assert close.code == 4400
    assert "after" in close.reason


async def refused_resume(server: LiveServer, *, after: int) -> tuple[dict[str, Any], Any]:
    """After a reading is stored, a resume from ``after``: the error frame that follows the
    welcome, and the close after it."""
    await server.post_reading(server.alice)
    async with server.connect(f"/ws?topics=*&after={after}", server.alice) as socket:
        await next_frame(socket)
        error = await next_frame(socket)
        close = await close_of(socket)
    return error, close


async def test_resuming_from_too_far_back_is_refused_with_4410(settings: Settings) -> None:
    tight = msgspec.structs.replace(
        settings, websocket=msgspec.structs.replace(settings.websocket, max_replay=3)
    )
    async with live_server(tight) as server:
        error, close = await refused_resume(server, after=0)
    assert error["code"] == "position_too_old"
    assert close.code == 4410


async def test_resuming_after_a_position_never_stored_is_refused_with_4400(
    server: LiveServer,
) -> None:
    """Not a silent stream that waits for the log to grow that far."""
    error, close = await refused_resume(server, after=1_000_000_000)
    assert error["code"] == "position_unknown"
    assert 0 < error["position"] < 1_000_000_000
    assert close.code == 4400


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


def slow_reader(server: LiveServer) -> Any:
    """Alice's client on ``/ws?topics=*`` that takes in one frame at a time, through a 4 kB
    receive buffer, and only when the test reads: the server's buffers fill quickly."""
    host, port = server.ws_url.removeprefix("ws://").split(":")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect((host, int(port)))
    return server.connect("/ws?topics=*", server.alice, sock=raw, max_queue=1)


async def test_a_client_that_stops_reading_gets_what_was_sent_in_order_then_4429(
    settings: Settings,
) -> None:
    # A small queue, and a client with a small receive buffer that takes in one frame and
    # then stops reading: the server's socket buffer fills, frames then wait in the queue,
    # and the queue overflows. Until then, every frame (sent at once or after waiting) goes
    # out once, in order. The events are the hub's own, large, so that buffers fill fast.
    async with live_server(with_small_queues(settings)) as server:
        hub = hub_of(server.container)
        published: list[int] = []
        async with slow_reader(server) as client:
            welcome = await next_frame(client)
            padding = "x" * 60_000
            for n in range(1, 2001):  # bounded: the server gives up on this client long before
                if hub.connections == 0:
                    break
                position = welcome["position"] + 1_000_000 + n
                envelope = json.dumps({"position": position, "padding": padding}).encode()
                hub.publish(event_frame(position, "reading.requested", "r", "alice", envelope))
                published.append(position)
                await asyncio.sleep(0)  # the server's loop writes what it can
            assert hub.connections == 0, "the client was never found too slow"
            received = [p async for p in event_positions(client)]
            assert client.close_code == 4429
    assert received, "nothing was sent before the close"
    assert received == published[: len(received)]  # a prefix: no gap, no duplicate, in order


async def test_frames_that_waited_for_a_slow_client_and_those_after_arrive_in_order(
    server: LiveServer,
) -> None:
    # The client stops reading until frames wait in its queue on the server, then reads
    # again while more events come: those must go out behind the waiting ones, not past them.
    hub = hub_of(server.container)
    published: list[int] = []
    async with slow_reader(server) as client:
        welcome = await next_frame(client)
        [listener] = hub._by_owner["alice"]
        padding = "x" * 8_000

        def publish() -> None:
            position = welcome["position"] + 1_000_000 + len(published) + 1
            envelope = json.dumps({"position": position, "padding": padding}).encode()
            hub.publish(event_frame(position, "reading.requested", "r", "alice", envelope))
            published.append(position)

        for _ in range(2000):  # bounded: frames wait long before
            if listener.queue.qsize() >= 5:
                break
            publish()
            await asyncio.sleep(0)
        assert listener.queue.qsize() >= 5, "no frame ever had to wait"
        received: list[int] = []
        last: list[int] = []  # the position of the final frame, once it is known

        async def read() -> None:
            while not (last and received and received[-1] >= last[0]):
                frame = json.loads(await asyncio.wait_for(client.recv(), 10))
                if frame["type"] == "event":
                    received.append(frame["position"])

        reader = asyncio.ensure_future(read())
        for _ in range(200):  # while the queue drains, and after
            publish()
            await asyncio.sleep(0)
        last.append(welcome["position"] + 1_000_000 + len(published) + 1)
        publish()
        await asyncio.wait_for(reader, 30)
    assert received == published


async def event_positions(client: Any) -> AsyncIterator[int]:
    """The positions of the event frames a client is sent until its connection closes."""
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(10_000):
            frame = json.loads(await asyncio.wait_for(client.recv(), 10))
            if frame["type"] == "event":
                yield frame["position"]


def some_topics(count: int) -> list[str]:
    """Distinct topics that need no aggregate of the key's (those of others are refused)."""
    return [f"event:reading.{uuid.uuid4().hex}" for _ in range(count)]


async def test_topics_beyond_the_connections_limit_are_refused_and_the_rest_kept(
    settings: Settings,
) -> None:
    """Every event is matched against each of a connection's topics: they are bounded."""
    few = msgspec.structs.replace(
        settings, websocket=msgspec.structs.replace(settings.websocket, max_topics=3)
    )
    async with live_server(few) as server:
        async with server.connect("/ws?topics=event:reading.*", server.alice) as socket:
            await next_frame(socket)
            held = await subscribe(socket, *some_topics(2))
            assert len(held["topics"]) == 3
            refused = await subscribe(socket, *some_topics(1))
            assert refused["code"] == "too_many_topics"
            assert "at most 3" in refused["detail"]
            # Nothing of the refused message was taken; unsubscribing makes room again.
            left = await unsubscribe(socket, held["topics"][0])
            assert left["topics"] == held["topics"][1:]
            assert len((await subscribe(socket, *some_topics(1)))["topics"]) == 3
            # Counted before any is parsed: four malformed topics are four too many.
            counted = await subscribe(socket, *["galaxy:9"] * 4)
            assert counted["code"] == "too_many_topics"
        for how in ("query", "first message"):
            if how == "query":
                url = f"/ws?topics={','.join(some_topics(4))}"
                connection = server.connect(url, server.alice)
            else:
                connection = server.connect("/ws")
            async with connection as socket:
                if how == "first message":
                    auth = {"type": "auth", "key": server.alice, "topics": some_topics(4)}
                    await socket.send(json.dumps(auth))
                close = await close_of(socket)
            assert close.code == 4400, how
            assert "too many topics: 4" in close.reason, how


async def test_a_topic_longer_than_any_event_type_glob_is_refused(server: LiveServer) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        refused = await subscribe(socket, "event:" + "a" * 300)
    assert refused["code"] == "bad_topic"
    assert "at most 200 characters" in refused["detail"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"after": "41"}, "after"), ({"after": 4.5}, "after"), ({"topic": "*"}, "topic")],
    ids=["after as text", "after not whole", "unknown field"],
)
async def test_an_auth_message_malformed_besides_a_valid_key_closes_with_4400_naming_the_field(
    server: LiveServer, extra: dict[str, Any], named: str
) -> None:
    async with server.connect("/ws") as socket:
        await socket.send(json.dumps({"type": "auth", "key": server.alice, **extra}))
        close = await close_of(socket)
    assert close.code == 4400
    assert named in close.reason
    # Without a valid key, the same message says nothing but that.
    async with server.connect("/ws") as socket:
        await socket.send(json.dumps({"type": "auth", "key": "alm_wrong", **extra}))
        close = await close_of(socket)
    assert close.code == 4401


async def test_a_message_over_64_kib_closes_with_1009(server: LiveServer) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        ping = json.dumps({"type": "ping", "padding": "x" * 64 * 1024})
        with contextlib.suppress(websockets.ConnectionClosed):
            await socket.send(ping)
        close = await close_of(socket)
    assert close.code == 1009


async def test_after_in_a_later_message_gets_an_error_frame_naming_it_not_ignored(
    server: LiveServer,
) -> None:
    """Only the first message or the URL resumes; a client must not believe it resumed."""
    async with server.connect("/ws", server.alice) as socket:
        welcome = await next_frame(socket)
        later = {"type": "subscribe", "topics": ["*"], "after": welcome["position"]}
        await socket.send(json.dumps(later))
        refused = await next_frame(socket)
        assert refused["type"] == "error"
        assert refused["code"] == "bad_message"
        assert "`after`" in refused["detail"]
        # Refused whole: the subscription did not change.
        assert (await subscribe(socket, "event:reading.*"))["topics"] == ["event:reading.*"]


async def test_a_binary_frame_gets_an_error_frame_saying_so_and_the_connection_stays(
    server: LiveServer,
) -> None:
    async with server.connect("/ws", server.alice) as socket:
        await next_frame(socket)
        await socket.send(json.dumps({"type": "ping"}).encode())
        refused = await next_frame(socket)
        assert refused["code"] == "bad_message"
        assert "binary frames are not accepted" in refused["detail"]
        await socket.send(json.dumps({"type": "ping"}))
        assert (await next_frame(socket))["type"] == "pong"


async def test_a_binary_first_message_closes_with_4401(server: LiveServer) -> None:
    async with server.connect("/ws") as socket:
        await socket.send(json.dumps({"type": "auth", "key": server.alice}).encode())
        close = await close_of(socket)
    assert close.code == 4401
    assert "text frame" in close.reason


@pytest.mark.parametrize("whose", ["another owner's", "none"])
@pytest.mark.parametrize("path", ["/ws/readings/{id}", "/ws?topics=reading:{id}"])
async def test_following_a_reading_that_is_not_the_keys_own_closes_with_4404(
    server: LiveServer, whose: str, path: str
) -> None:
    """As for a batch: nothing says whether it is another owner's or none at all."""
    bobs = await server.post_reading(server.bob)
    reading_id = bobs.headers["location"].rsplit("/", 1)[1] if whose != "none" else uuid.uuid4()
    async with server.connect(path.format(id=reading_id), server.alice) as socket:
        close = await close_of(socket)
    assert close.code == 4404
    assert close.reason == f"not found: aggregate:{reading_id}"


async def test_subscribing_to_a_reading_that_is_not_the_keys_own_is_refused_as_not_found(
    server: LiveServer,
) -> None:
    bobs = await server.post_reading(server.bob)
    bob_id = bobs.headers["location"].rsplit("/", 1)[1]
    alices = await server.post_reading(server.alice)
    alice_id = alices.headers["location"].rsplit("/", 1)[1]
    async with server.connect("/ws?topics=event:batch.*", server.alice) as socket:
        await next_frame(socket)
        for other in (bob_id, str(uuid.uuid4())):
            # Refused whole, her own reading with it: the subscriptions stay as they were.
            refused = await subscribe(socket, f"reading:{alice_id}", f"reading:{other}")
            assert refused["type"] == "error"
            assert refused["code"] == "not_found"
            assert refused["detail"] == f"not found: aggregate:{other}"
        held = await subscribe(socket, f"reading:{alice_id}")
    assert held["topics"] == [f"aggregate:{alice_id}", "event:batch.*"]


async def test_an_admin_may_follow_any_owners_reading(server: LiveServer) -> None:
    bobs = await server.post_reading(server.bob)
    bob_id = bobs.headers["location"].rsplit("/", 1)[1]
    position = int(bobs.headers["almanac-position"])
    path = f"/ws/readings/{bob_id}?after={position - 1}"
    async with server.connect(path, server.admin) as socket:
        assert (await next_frame(socket))["type"] == "welcome"
        frames = await events_until(socket, generated)
        assert types(frames) == PROGRESS
        assert {f["aggregate_id"] for f in frames} == {bob_id}
        assert (await subscribe(socket, f"reading:{uuid.uuid4()}"))["type"] == "subscribed"


class OutageStore(EventStore):
    """The event store, not answering ``load`` or ``read`` while they are in ``down`` (as
    while Postgres restarts)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.down: set[str] = set()

    def _answer(self, what: str) -> None:
        if what in self.down:
            raise Unavailable("the event store is not answering: the test's outage")

    async def load(self, cls: Any, aggregate_id: uuid.UUID) -> Any:
        self._answer("load")
        return await super().load(cls, aggregate_id)

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        self._answer("read")
        return await super().read(after, limit)


@pytest.fixture
async def outage(settings: Settings) -> AsyncIterator[tuple[LiveServer, OutageStore]]:
    store = OutageStore(settings)
    async with live_server(settings, store=store) as running:
        yield running, store
        store.down.clear()  # for the server's shutdown


@pytest.mark.parametrize("how", ["header", "first message"])
async def test_an_event_store_outage_while_authenticating_closes_with_1013_not_4401(
    outage: tuple[LiveServer, OutageStore], how: str
) -> None:
    """4401 would tell the client its key is wrong, and it would stop reconnecting."""
    server, store = outage
    store.down.add("load")  # the key is not known yet: it must be loaded
    async with server.connect("/ws", server.alice if how == "header" else None) as socket:
        if how == "first message":
            await socket.send(json.dumps({"type": "auth", "key": server.alice}))
        close = await close_of(socket)
    assert close.code == 1013
    assert "not answering" in close.reason
    store.down.clear()
    async with server.connect("/ws", server.alice) as socket:
        assert (await next_frame(socket))["type"] == "welcome"


async def test_an_event_store_outage_during_a_resume_closes_with_1013_not_silently(
    outage: tuple[LiveServer, OutageStore],
) -> None:
    server, store = outage
    await server.post_reading(server.alice)
    async with server.connect("/ws?topics=*", server.alice) as socket:
        assert (await next_frame(socket))["type"] == "welcome"  # the key is known now
    store.down.add("read")
    async with server.connect("/ws?topics=*&after=0", server.alice) as socket:
        assert (await next_frame(socket))["type"] == "welcome"
        close = await close_of(socket)
    assert close.code == 1013
    assert "not answering" in close.reason
