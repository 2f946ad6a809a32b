"""The WebSocket hub and session without a network: topics, routing, slow consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from nats.errors import ConnectionClosedError

from almanac.auth import Principal
from almanac.domain.access import ApiKey
from almanac.errors import Unauthorized, Unavailable
from almanac.eventstore import RecordedEvent
from almanac.settings import WebSocketSettings
from streams import websocket
from streams.websocket import (
    CLOSE_BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    BadTopic,
    Hub,
    Listener,
    LiveEvent,
    ReadAgain,
    Session,
    Topic,
    _Arrivals,
    live_event,
)
from streams.wsserver import DIRECT_SEND, text_frame
from tests.factories import meta, new_reading
from tests.integration.support_waiting import eventually

READING = str(uuid4())


def live(position: int, owner: str = "alice", type_: str = "reading.requested") -> LiveEvent:
    return LiveEvent(position, type_, READING, owner, json.dumps({"position": position}))


def principal(owner: str, role: str = "client") -> Principal:
    return Principal(key_id=str(uuid4()), name=owner, role=role, owner=owner)  # type: ignore[arg-type]


class NoStore:
    async def max_position(self) -> int:
        return 0

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        return []


class NoSource:
    async def events(self, after: int) -> AsyncIterator[list[RecordedEvent]]:
        await asyncio.Event().wait()
        yield []


def hub(store: Any = None, **settings: Any) -> Hub:
    """A started hub on ``store`` (by default one that holds nothing), fed by no live source."""
    held: Any = NoStore() if store is None else store
    started = Hub(held, NoSource(), WebSocketSettings(**settings))  # type: ignore[arg-type]
    started._started.set()
    return started


def nats_message(consumer_sequence: int) -> Any:
    """What ``_Arrivals`` reads of a JetStream message: its consumer sequence."""
    sequence = SimpleNamespace(consumer=consumer_sequence)
    return SimpleNamespace(metadata=SimpleNamespace(sequence=sequence))


async def test_arrivals_are_taken_all_at_once() -> None:
    arrivals = _Arrivals(limit=3)
    taking = asyncio.ensure_future(arrivals.take())
    await asyncio.sleep(0)  # one yield: the taker waits for a first message
    assert not taking.done()
    first, second = nats_message(1), nats_message(2)
    await arrivals.add(first)
    await arrivals.add(second)
    assert await taking == [first, second]


async def test_arrivals_are_handed_over_at_most_so_many_at_a_time() -> None:
    arrivals = _Arrivals(limit=10)
    messages = [nats_message(n) for n in (1, 2, 3)]
    for message in messages:
        await arrivals.add(message)
    assert await arrivals.take(most=2) == messages[:2]
    assert await arrivals.take(most=2) == messages[2:]


@pytest.mark.parametrize(
    ("limit", "sequences"),
    [
        (2, [1, 2, 3, 4]),  # a backlog past the limit: read the rest from the stream
        (10, [1, 2, 4, 5]),  # a message nats-py dropped (past its pending limits)
        (10, [1, 2, 1, 2]),  # a recreated ordered consumer (it may start after a drop)
    ],
    ids=["backlog", "gap", "restart"],
)
async def test_arrivals_end_after_the_messages_held_when_the_hub_must_read_again(
    limit: int, sequences: list[int]
) -> None:
    """Nothing is held unbounded or skipped unnoticed: the source takes what it holds, then
    subscribes again after the last message taken."""
    arrivals = _Arrivals(limit=limit)
    messages = [nats_message(n) for n in sequences]
    for message in messages:
        await arrivals.add(message)
    assert await arrivals.take() == messages[:2]
    with pytest.raises(ReadAgain):
        await arrivals.take()


async def test_arrivals_end_when_the_connection_closes() -> None:
    closed = False
    arrivals = _Arrivals(limit=10, closed=lambda: closed, check=0.01)
    taking = asyncio.ensure_future(arrivals.take())
    await asyncio.sleep(0)
    assert not taking.done()
    closed = True
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(taking, timeout=5)


def test_topics_parse_to_what_they_match() -> None:
    assert Topic.parse("*").matches(live(1))
    assert Topic.parse(f"reading:{READING}").matches(live(1))
    assert not Topic.parse(f"batch:{uuid4()}").matches(live(1))
    assert Topic.parse("event:reading.*").matches(live(1))
    assert not Topic.parse("event:reading.generated").matches(live(1))


@pytest.mark.parametrize("raw", ["", "reading:", "reading:nope", "event:", "event:a b", "x:1", 7])
def test_malformed_topics_are_refused_with_the_reason(raw: object) -> None:
    with pytest.raises(BadTopic) as refused:
        Topic.parse(raw)
    assert repr(raw) in str(refused.value) or "string" in str(refused.value)


@given(st.text(max_size=30))
def test_any_text_either_parses_or_is_refused_cleanly(raw: str) -> None:
    try:
        topic = Topic.parse(raw)
    except BadTopic:
        return
    assert Topic.parse(str(topic)) == topic


def test_events_go_to_listeners_of_their_owner_and_topic_and_to_admins() -> None:
    h = hub()
    alice = Listener(principal("alice"), 10, topics={Topic("all")})
    alices_reading = Listener(principal("alice"), 10, topics={Topic("aggregate", READING)})
    bob = Listener(principal("bob"), 10, topics={Topic("all")})
    admin = Listener(principal("root", "admin"), 10, topics={Topic("all")})
    for listener in (alice, alices_reading, bob, admin):
        h.attach(listener)
    h.publish(live(1, "alice"))
    h.publish(live(2, "bob"))
    assert alice.queue.qsize() == 1
    assert alices_reading.queue.qsize() == 1
    assert bob.queue.qsize() == 1
    assert admin.queue.qsize() == 2
    h.detach(bob)
    h.publish(live(3, "bob"))
    assert bob.queue.qsize() == 1
    assert admin.queue.qsize() == 3
    assert h.position == 3


def test_a_listener_skips_what_it_already_got_by_replay() -> None:
    h = hub()
    listener = Listener(principal("alice"), 10, topics={Topic("all")}, sent_through=5)
    h.attach(listener)
    for position in (4, 5, 6):
        h.publish(live(position))
    assert listener.queue.get_nowait().position == 6


def text_message(text: str) -> dict[str, Any]:
    """The ASGI message of a text frame from the client."""
    return {"type": "websocket.receive", "text": text}


class StuckSocket:
    """A client that reads the welcome frame, then nothing more."""

    def __init__(self, first: str | None = None) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str | None] | None = None
        self.first = first
        self._never = asyncio.Event()

    async def send_text(self, data: str) -> None:
        self.sent.append(data)
        if len(self.sent) > 1:
            await self._never.wait()

    async def receive(self) -> dict[str, Any]:
        if self.first is not None:
            first, self.first = self.first, None
            return text_message(first)
        await self._never.wait()
        raise AssertionError("unreachable")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


async def allow(key: str | None) -> Principal:
    if key != "good":
        raise Unauthorized("unknown API key")
    return principal("alice")


async def test_a_client_that_falls_behind_is_closed_with_4429_not_buffered() -> None:
    h = hub(queue_size=3)
    socket = StuckSocket()
    session = Session(socket, h, h.settings, allow, {Topic("all")}, key="good")
    task = asyncio.create_task(session.run())
    for _ in range(100):
        if session.listener is not None and session.listener in h._by_owner.get("alice", ()):
            break
        await asyncio.sleep(0)
    for position in range(1, 10):
        h.publish(live(position))
    await asyncio.wait_for(task, timeout=5)
    assert socket.closed is not None
    assert socket.closed[0] == CLOSE_SLOW_CONSUMER
    assert session.listener is not None
    assert session.listener.queue.qsize() <= 3
    assert h.connections == 0


async def test_a_wrong_key_in_the_first_message_closes_with_4401() -> None:
    h = hub()
    socket = StuckSocket(first=json.dumps({"type": "auth", "key": "bad"}))
    await asyncio.wait_for(Session(socket, h, h.settings, allow, set()).run(), timeout=5)
    assert socket.closed is not None
    assert socket.closed[0] == CLOSE_UNAUTHORIZED


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"after": "12"}, "after"), ({"after": 1.5}, "after"), ({"bogus": 1}, "bogus")],
)
@pytest.mark.parametrize("key", ["good", "bad"])
async def test_an_auth_message_malformed_besides_its_key_closes_with_4400_once_the_key_is_valid(
    extra: dict[str, object], named: str, key: str
) -> None:
    """The field is named to a client with a valid key; one without learns only 4401."""
    h = hub()
    socket = StuckSocket(first=json.dumps({"type": "auth", "key": key, **extra}))
    await asyncio.wait_for(Session(socket, h, h.settings, allow, set()).run(), timeout=5)
    assert socket.closed is not None
    code, reason = socket.closed
    if key == "good":
        assert code == CLOSE_BAD_REQUEST
        assert named in (reason or "")
    else:
        assert code == CLOSE_UNAUTHORIZED


async def store_down(key: str | None) -> Principal:
    raise Unavailable("the event store is not answering: connection refused")


async def test_an_event_store_outage_during_authentication_closes_with_1013_not_4401() -> None:
    """4401 tells a client its key is wrong, and it stops reconnecting; the key may be fine."""
    h = hub()
    socket = StuckSocket(first=json.dumps({"type": "auth", "key": "good"}))
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(Session(socket, h, h.settings, store_down, set()).run(), timeout=5)
    assert socket.closed is not None
    code, reason = socket.closed
    assert code == CLOSE_TRY_AGAIN_LATER
    assert "not answering" in (reason or "")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["websocket.unavailable"]


def test_credential_events_reach_admins_only_even_of_the_clients_own_owner() -> None:
    h = hub()
    alice = Listener(principal("alice"), 10, topics={Topic("all")})
    admin = Listener(principal("root", "admin"), 10, topics={Topic("all")})
    h.attach(alice)
    h.attach(admin)
    h.publish(live(1, "alice", "api_key.issued"))
    h.publish(live(2, "alice", "reading.requested"))
    assert [alice.queue.get_nowait().position] == [2]
    assert admin.queue.qsize() == 2


def test_a_broadcast_matches_each_distinct_topic_once_not_once_per_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = hub()
    calls: list[Topic] = []
    matches = Topic.matches

    def counted(topic: Topic, event: LiveEvent) -> bool:
        calls.append(topic)
        return matches(topic, event)

    monkeypatch.setattr(Topic, "matches", counted)
    wanted, other = Topic("event", "reading.*"), Topic("event", "batch.*")
    crowd = [Listener(principal("root", "admin"), 10, topics={wanted}) for _ in range(50)]
    crowd += [Listener(principal("root", "admin"), 10, topics={other}) for _ in range(50)]
    for listener in crowd:
        h.attach(listener)
    h.publish(live(1))
    assert sorted(map(str, calls)) == ["event:batch.*", "event:reading.*"]
    assert [listener.queue.qsize() for listener in crowd] == [1] * 50 + [0] * 50


def test_a_beat_sends_one_heartbeat_to_connections_quiet_for_an_interval() -> None:
    h = hub(heartbeat=15)
    busy, idle = (Listener(principal("alice"), 10, topics={Topic("all")}) for _ in range(2))
    for listener in (busy, idle):
        h.attach(listener)
    now = time.monotonic()
    busy.last_sent, idle.last_sent = now - 14, now - 15
    h.beat(now)
    assert (busy.queue.qsize(), idle.queue.qsize()) == (0, 1)
    h.beat(now + 1)  # its heartbeat has not gone out yet (a stalled client): not a second
    assert (busy.queue.qsize(), idle.queue.qsize()) == (1, 1)
    assert json.loads(idle.queue.get_nowait().frame) == {"type": "heartbeat", "position": 0}


class RecordingSocket:
    """A client that reads every frame as it comes and says nothing."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str | None] | None = None
        self._changed = asyncio.Event()
        self._never = asyncio.Event()

    async def send_text(self, data: str) -> None:
        self.sent.append(json.loads(data))
        self._changed.set()

    async def receive(self) -> dict[str, Any]:
        await self._never.wait()
        raise AssertionError("unreachable")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)

    async def frames(self, count: int) -> list[str]:
        """The types of the first ``count`` frames, once that many were sent (5 s at most)."""
        async with asyncio.timeout(5):
            while len(self.sent) < count:
                self._changed.clear()
                await self._changed.wait()
        # The events of ``live`` are bare ``{"position": n}`` frames.
        return [f.get("type", "event") for f in self.sent[:count]]


async def test_a_revoked_key_closes_the_connections_it_opened_and_no_other() -> None:
    h = hub()
    keys = {
        "revoked": principal("alice"),
        "kept": principal("alice"),
        "admin": principal("admin", "admin"),
    }

    async def by_name(key: str | None) -> Principal:
        assert key is not None
        return keys[key]

    sockets = {name: RecordingSocket() for name in keys}
    tasks = {
        name: asyncio.create_task(
            Session(sockets[name], h, h.settings, by_name, {Topic("all")}, key=name).run()
        )
        for name in keys
    }
    try:
        for socket in sockets.values():
            await socket.frames(1)  # the welcome: each is attached
        revoked = keys["revoked"].key_id
        h.publish(LiveEvent(1, "api_key.revoked", revoked, "alice", json.dumps({"position": 1})))
        await asyncio.wait_for(tasks["revoked"], timeout=5)
        assert sockets["revoked"].closed == (CLOSE_UNAUTHORIZED, "the API key was revoked")
        assert await sockets["admin"].frames(2) == ["welcome", "event"]  # it hears of it
        assert sockets["kept"].closed is None and sockets["admin"].closed is None
        assert h.connections == 2
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_a_connection_let_in_as_its_key_is_revoked_is_closed_once_attached() -> None:
    """The key was checked, then revoked before the connection joined the hub."""
    h = hub()
    alice = principal("alice")
    h.publish(LiveEvent(1, "api_key.revoked", alice.key_id, "alice", json.dumps({})))

    async def late(key: str | None) -> Principal:
        return alice

    socket = RecordingSocket()
    await asyncio.wait_for(Session(socket, h, h.settings, late, {Topic("all")}, key="k").run(), 5)
    assert socket.closed == (CLOSE_UNAUTHORIZED, "the API key was revoked")
    assert h.connections == 0


async def test_a_quiet_session_gets_heartbeats_and_a_busy_one_does_not() -> None:
    h = hub(heartbeat=60)  # beats are given by hand below, with their clock
    socket = RecordingSocket()
    session = Session(socket, h, h.settings, allow, {Topic("all")}, key="good")
    task = asyncio.create_task(session.run())
    try:
        assert await socket.frames(1) == ["welcome"]
        h.beat(time.monotonic() + 30)  # half an interval after the welcome: nothing
        h.beat(time.monotonic() + 61)
        assert await socket.frames(2) == ["welcome", "heartbeat"]
        h.publish(live(1))
        assert await socket.frames(3) == ["welcome", "heartbeat", "event"]
        h.beat(time.monotonic() + 59)  # the event went out just now: no heartbeat
        h.publish(live(2))
        assert await socket.frames(4) == ["welcome", "heartbeat", "event", "event"]
        assert socket.sent[1]["position"] == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class DirectSocket(RecordingSocket):
    """A client whose server offers the direct path; it takes a frame there only while
    ``open`` (else the frame must wait in the connection's queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = True
        self.direct: list[int] = []  # positions written through the direct path
        self.scope = {"extensions": {DIRECT_SEND: self._write}}

    def _write(self, data: bytes) -> bool:
        if not self.open:
            return False
        assert data == text_frame(data[2:])  # one whole frame (the test frames are short)
        frame = json.loads(data[2:])
        self.direct.append(frame.get("position", 0))
        self.sent.append(frame)
        self._changed.set()
        return True


async def test_an_idle_connection_is_written_at_once_a_busy_one_in_order_through_its_queue() -> (
    None
):
    h = hub(heartbeat=60)
    socket = DirectSocket()
    session = Session(socket, h, h.settings, allow, {Topic("all")}, key="good")
    task = asyncio.create_task(session.run())
    try:
        assert await socket.frames(1) == ["welcome"]
        listener = session.listener
        assert listener is not None

        async def handed_over() -> bool:  # the queue is empty: frames go out directly
            return not listener.sending

        await eventually(handed_over, within=5, what="the session's start")
        h.publish(live(1))
        assert socket.direct == [1] and listener.queue.qsize() == 0
        socket.open = False  # the transport is full: the frame waits its turn
        h.publish(live(2))
        socket.open = True
        h.publish(live(3))  # the queue is not empty: behind 2, not before it
        assert listener.queue.qsize() == 2
        await socket.frames(4)
        h.publish(live(3))  # already sent
        h.publish(live(4))
        await socket.frames(5)
        assert [f["position"] for f in socket.sent[1:]] == [1, 2, 3, 4]
        assert socket.direct == [1, 4]
        assert listener.sent_through == 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_frame_written_directly_keeps_its_connection_from_a_heartbeat() -> None:
    h = hub(heartbeat=10)
    written: list[bytes] = []

    def direct(wire: bytes) -> bool:
        written.append(wire)
        return True

    listener = Listener(principal("alice"), 10, topics={Topic("all")}, sending=False)
    listener.direct, listener.last_sent = direct, time.monotonic() - 60  # quiet for a minute
    h.attach(listener)

    def kinds() -> list[str]:
        return ["heartbeat" if b'"type":"heartbeat"' in w else "event" for w in written]

    h.publish(live(1))
    h.beat(time.monotonic() + 5)  # half an interval after the frame: not quiet
    assert kinds() == ["event"]
    h.beat(time.monotonic() + 11)
    assert kinds() == ["event", "heartbeat"]


def test_frames_wait_in_the_queue_without_a_direct_path_or_until_the_session_begins() -> None:
    h = hub()
    plain = Listener(principal("alice"), 10, topics={Topic("all")}, sending=False)
    written: list[bytes] = []
    starting = Listener(principal("alice"), 10, topics={Topic("all")}, direct=written.append)
    woken: list[int] = []
    plain.wake = lambda: woken.append(1)
    for listener in (plain, starting):
        h.attach(listener)
    h.publish(live(1))  # ``starting``'s welcome frame has not gone out yet
    h.publish(live(2))
    assert (plain.queue.qsize(), starting.queue.qsize(), written) == (2, 2, [])
    assert woken == [1] and plain.sending  # one sending task, for both


class WelcomeGate(RecordingSocket):
    """A client whose welcome frame takes until the test opens the gate; optionally, its
    connection fails on the first frame after the welcome."""

    def __init__(self, *, fail_after_welcome: bool = False) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail_after_welcome = fail_after_welcome
        self.closed: tuple[int, str | None] | None = None
        self.gone = False  # its disconnect is already there to be read

    async def receive(self) -> dict[str, Any]:
        if self.gone:
            raise ConnectionResetError("the client went")
        return await super().receive()

    async def send_text(self, data: str) -> None:
        if not self.sent:
            await self.gate.wait()
        elif self.fail_after_welcome:
            raise ConnectionResetError("the client went")
        await super().send_text(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


async def attached(
    h: Hub, socket: WelcomeGate, **options: Any
) -> tuple[Session, asyncio.Task[None]]:
    """A session of ``socket`` running, once the hub has its listener."""
    session = Session(socket, h, h.settings, allow, {Topic("all")}, key="good", **options)
    task = asyncio.create_task(session.run())

    async def listening() -> bool:
        return session.listener is not None and h.connections == 1

    await eventually(listening, within=5, what="the session attached")
    return session, task


async def test_a_server_stopping_during_the_welcome_closes_with_going_away() -> None:
    h = hub()
    socket = WelcomeGate()
    reports: list[int] = []

    async def progress(_: Principal) -> dict[str, object]:
        reports.append(1)
        return {}  # nothing to report yet: asked again at once (interval 0)

    _, task = await attached(h, socket, progress=progress, progress_interval=0)
    h.stop()
    socket.gone = True  # and the client hung up meanwhile
    socket.gate.set()
    await asyncio.wait_for(task, timeout=5)  # ends, not cancelled
    assert socket.closed is not None and socket.closed[0] == CLOSE_GOING_AWAY
    assert h.connections == 0
    asked = len(reports)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(reports) == asked  # the reporter ended with the session


async def test_falling_behind_during_the_welcome_closes_with_4429() -> None:
    h = hub(queue_size=2)
    socket = WelcomeGate()
    _, task = await attached(h, socket)
    for position in range(1, 5):
        h.publish(live(position))
    socket.gate.set()
    await asyncio.wait_for(task, timeout=5)
    assert socket.closed is not None and socket.closed[0] == CLOSE_SLOW_CONSUMER


async def test_a_stop_while_serving_closes_with_going_away() -> None:
    h = hub()
    socket = WelcomeGate()
    socket.gate.set()
    _, task = await attached(h, socket)
    await socket.frames(1)
    h.stop()
    await asyncio.wait_for(task, timeout=5)
    assert socket.closed is not None and socket.closed[0] == CLOSE_GOING_AWAY


async def test_an_outside_cancellation_meeting_an_interrupt_is_not_swallowed() -> None:
    h = hub()
    socket = WelcomeGate()
    socket.gate.set()
    _, task = await attached(h, socket)
    await socket.frames(1)
    h.stop()  # interrupts the session's task...
    task.cancel()  # ...which its server cancels in the same moment
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


async def test_a_failed_send_ends_the_session_and_lets_it_go() -> None:
    h = hub()
    socket = WelcomeGate(fail_after_welcome=True)
    socket.gate.set()
    session, task = await attached(h, socket)
    await socket.frames(1)
    h.publish(live(1))  # no direct path here: queued, and its send fails
    await asyncio.wait_for(task, timeout=5)
    assert h.connections == 0
    assert session._failure is None and session._task is None  # no cycle kept


class GrowingStore:
    """An event store whose log the test appends to: what a resume replays."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []

    def append(self, count: int, owner: str = "alice") -> list[LiveEvent]:
        """Store ``count`` more readings of ``owner`` (alice's unless said); each event as the
        hub then gets it live."""
        return [self.add(new_reading(owner=owner).pending_events[0]) for _ in range(count)]

    def add(self, domain_event: Any) -> LiveEvent:
        event = RecordedEvent.of(domain_event, len(self.events) + 1)
        self.events.append(event)
        return live_event(event)

    async def max_position(self) -> int:
        return len(self.events)

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        return self.events[after : after + limit]

    async def first_events(self, aggregate_ids: Sequence[UUID]) -> dict[UUID, RecordedEvent]:
        wanted = {str(a) for a in aggregate_ids}
        firsts: dict[UUID, RecordedEvent] = {}
        for e in self.events:
            if e.aggregate_key in wanted:
                firsts.setdefault(UUID(e.aggregate_key), e)
        return firsts


def mixed_store() -> GrowingStore:
    """Readings of alice and bob, interleaved, and an API key of alice's."""
    store = GrowingStore()
    for _ in range(3):
        store.append(2, owner="alice")
        store.append(2, owner="bob")
    key = ApiKey.issue(secret="alm_" + "x" * 40, name="k", role="client", meta=meta("alice"))
    store.add(key.pending_events[0])
    return store


def frames_built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The positions of the stored events the hub builds a frame of, from now on."""
    built: list[int] = []

    def counted(event: RecordedEvent) -> LiveEvent:
        built.append(event.position)
        return live_event(event)

    monkeypatch.setattr(websocket, "live_event", counted)
    return built


@pytest.mark.parametrize(
    "listener",
    [
        Listener(principal("alice"), 10, topics={Topic("all")}),
        Listener(principal("alice"), 10, topics={Topic("event", "api_key.*")}),
        Listener(principal("bob"), 10, topics={Topic("event", "reading.*")}),
        Listener(principal("carol"), 10, topics={Topic("all")}),
        Listener(principal("root", "admin"), 10, topics={Topic("all")}),
    ],
    ids=["alice all", "alice credentials", "bob readings", "carol all", "admin all"],
)
async def test_a_resume_sends_what_the_live_stream_would_and_frames_only_that(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Owner, topic and credential events filter the replay as they do live frames; an
    event that is not sent is never decoded whole and framed (the loop's time per position
    of a resume)."""
    store = mixed_store()
    h = hub(store)
    framed = frames_built(monkeypatch)
    replayed = [e.position async for e in h.missed(listener, 0, len(store.events))]
    live = hub()
    heard = Listener(listener.principal, 100, topics=set(listener.topics))
    live.attach(heard)
    for event in store.events:
        live.publish(live_event(event))
    live_would = [e.position for e in heard.queue.items()]
    assert replayed == live_would
    assert framed == replayed


async def test_a_resume_follows_one_aggregate_without_framing_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = mixed_store()
    one = store.events[3]  # bob's second reading
    h = hub(store)
    framed = frames_built(monkeypatch)
    listener = Listener(principal("bob"), 10, topics={Topic("aggregate", one.aggregate_key)})
    assert [e.position async for e in h.missed(listener, 0, len(store.events))] == [4]
    assert framed == [4]


async def test_only_an_aggregate_of_the_keys_own_owner_may_be_followed_and_any_by_an_admin() -> (
    None
):
    store = mixed_store()
    h = hub(store)
    alices, bobs, key = (store.events[i].aggregate_key for i in (0, 2, 12))
    alice, admin = principal("alice"), principal("root", "admin")

    def topics(*ids: str) -> set[Topic]:
        return {Topic("aggregate", i) for i in ids} | {Topic("all"), Topic("event", "x.*")}

    assert await h.hidden(alice, topics(alices)) is None
    assert await h.hidden(alice, topics(alices, bobs)) == Topic("aggregate", bobs)
    missing = str(uuid4())
    assert await h.hidden(alice, topics(missing)) == Topic("aggregate", missing)
    assert await h.hidden(alice, topics(key)) == Topic("aggregate", key)  # credentials
    assert await h.hidden(admin, topics(alices, bobs, missing, key)) is None


class CountingStore(GrowingStore):
    """A store that notes the aggregates it is asked for the first events of, a list a query."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[list[str]] = []

    @property
    def asked(self) -> list[str]:
        return [aggregate for query in self.queries for aggregate in query]

    async def first_events(self, aggregate_ids: Sequence[UUID]) -> dict[UUID, RecordedEvent]:
        if aggregate_ids:
            self.queries.append([str(a) for a in aggregate_ids])
        return await super().first_events(aggregate_ids)


class TalkingSocket(RecordingSocket):
    """A client that sends ``messages`` one by one, each once the server has answered the
    one before (the welcome, first)."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        super().__init__()
        self.messages = messages
        self.said = 0

    async def receive(self) -> dict[str, Any]:
        if self.said == len(self.messages):
            return await super().receive()
        await self.frames(self.said + 1)
        self.said += 1
        return {"type": "websocket.receive", "text": json.dumps(self.messages[self.said - 1])}


async def test_subscribing_again_to_the_keys_own_aggregates_asks_the_store_once_per_aggregate() -> (
    None
):
    """Alternating unsubscribe and subscribe costs no store query once an aggregate was found
    to be the key's; one not found is asked about again (it may yet begin)."""
    store = CountingStore()
    own = [store.add(new_reading(owner="alice").pending_events[0]).aggregate_id for _ in range(5)]
    missing = str(uuid4())
    topics = [f"reading:{i}" for i in own]
    messages = [
        {"type": "subscribe", "topics": topics},
        {"type": "unsubscribe", "topics": topics},
        {"type": "subscribe", "topics": topics},
        {"type": "subscribe", "topics": [f"reading:{missing}"]},
        {"type": "subscribe", "topics": [f"reading:{missing}"]},
    ]
    h = hub(store)
    socket = TalkingSocket(messages)
    session = Session(socket, h, h.settings, allow, {Topic("all")}, key="good")
    task = asyncio.create_task(session.run())
    try:
        kinds = await socket.frames(1 + len(messages))
        assert kinds == ["welcome", "subscribed", "subscribed", "subscribed", "error", "error"]
        assert sorted(socket.sent[3]["topics"]) == sorted(["*", *(f"aggregate:{i}" for i in own)])
        assert sorted(store.asked) == sorted([*own, missing, missing])
        assert [len(query) for query in store.queries] == [5, 1, 1]  # one a message
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_connection_remembers_a_bounded_number_of_followable_aggregates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = CountingStore()
    own = [store.add(new_reading(owner="alice").pending_events[0]).aggregate_id for _ in range(3)]
    h = hub(store, max_topics=1)
    monkeypatch.setattr(websocket, "FOLLOWABLE_KEPT", 2)
    followable: dict[str, None] = {}
    for aggregate in (*own, own[1]):
        topic = Topic("aggregate", aggregate)
        assert await h.hidden(principal("alice"), {topic}, followable) is None
    assert list(followable) == [own[2], own[1]]  # the oldest went; the one used again is newest
    assert store.asked == own


async def test_an_aggregate_found_followable_stays_so_when_a_new_one_pushes_it_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Remembering a new aggregate may let an older one go in the middle of a message; the
    older one was found followable all the same, and is not asked about again."""
    store = CountingStore()
    first, second, third = sorted(
        store.add(new_reading(owner="alice").pending_events[0]).aggregate_id for _ in range(3)
    )
    h = hub(store, max_topics=1)
    monkeypatch.setattr(websocket, "FOLLOWABLE_KEPT", 2)
    followable: dict[str, None] = {}
    alice = principal("alice")
    for aggregate in (third, second):
        assert await h.hidden(alice, {Topic("aggregate", aggregate)}, followable) is None
    # ``first`` is checked (and remembered) before ``third``, which then goes from the memory.
    both = {Topic("aggregate", first), Topic("aggregate", third)}
    assert await h.hidden(alice, both, followable) is None
    assert store.queries == [[third], [second], [first]]
    assert list(followable) == [first, third]


class FailingStore(GrowingStore):
    """A store whose reads fail with ``error`` (a resume's replay meets it)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "logged"),
    [
        (RuntimeError("a bug"), CLOSE_INTERNAL_ERROR, ("error", "websocket.session_failed")),
        (
            Unavailable("the event store is not answering: test"),
            CLOSE_TRY_AGAIN_LATER,
            ("warning", "websocket.unavailable"),
        ),
    ],
    ids=["unexpected", "store unavailable"],
)
async def test_a_resume_that_fails_is_logged_and_closed_with_a_code_never_dropped_silently(
    error: Exception, code: int, logged: tuple[str, str]
) -> None:
    store = FailingStore(error)
    store.append(3)
    h = hub(store)
    socket = WelcomeGate()
    socket.gate.set()
    session = Session(socket, h, h.settings, allow, {Topic("all")}, after=0, key="good")
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(session.run(), timeout=5)
    assert socket.closed is not None and socket.closed[0] == code
    [entry] = [e for e in logs if e["log_level"] in {"warning", "error"}]
    assert (entry["log_level"], entry["event"]) == logged
    assert entry["owner"] == "alice"
    if code == CLOSE_INTERNAL_ERROR:
        assert entry["exc_info"] is True  # with the exception and its traceback
    assert h.connections == 0
    assert session._failure is None


class ResumingSocket(RecordingSocket):
    """A client that reads promptly; when its ``at``-th frame arrives, ``meanwhile`` runs
    (events stored and published live while it is still being replayed to)."""

    def __init__(self, at: int, meanwhile: Callable[[], None]) -> None:
        super().__init__()
        self.at = at
        self.meanwhile = meanwhile
        self.closed: tuple[int, str | None] | None = None

    async def send_text(self, data: str) -> None:
        await super().send_text(data)
        if len(self.sent) == self.at:
            self.meanwhile()
        await asyncio.sleep(0)  # a network write lets the loop run

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


def resuming(h: Hub, store: GrowingStore, *, at: int, burst: int) -> ResumingSocket:
    def publish_burst() -> None:
        for event in store.append(burst):
            h.publish(event)

    return ResumingSocket(at, publish_burst)


async def test_live_events_overflowing_the_queue_during_a_resume_are_replayed_not_fatal() -> None:
    """A prompt client resuming far back is not closed as slow when more live events arrive
    during its replay than its queue holds: it gets every event once, in order."""
    store = GrowingStore()
    store.append(30)
    h = hub(store, queue_size=5, max_replay=1000)
    socket = resuming(h, store, at=10, burst=20)  # 20 live events, 9 frames into the replay
    session = Session(socket, h, h.settings, allow, {Topic("all")}, after=0, key="good")
    task = asyncio.create_task(session.run())
    try:
        await socket.frames(1 + 50)
        for event in store.append(3):  # and live afterwards, as usual
            h.publish(event)
        await socket.frames(1 + 53)
        assert [f["position"] for f in socket.sent[1:]] == list(range(1, 54))
        assert socket.closed is None
        assert session.listener is not None and not session.listener.catching_up
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_resuming_client_falling_further_behind_than_max_replay_is_closed_4429() -> None:
    store = GrowingStore()
    store.append(10)
    h = hub(store, queue_size=5, max_replay=20)
    socket = resuming(h, store, at=3, burst=30)
    session = Session(socket, h, h.settings, allow, {Topic("all")}, after=0, key="good")
    await asyncio.wait_for(session.run(), timeout=5)
    assert socket.closed is not None and socket.closed[0] == CLOSE_SLOW_CONSUMER
    assert h.connections == 0


async def test_replies_during_a_resume_keep_their_place_among_the_events() -> None:
    """A reply queued after event 32 arrives right after event 32, though the events around
    it overflowed the queue and were replayed from the store."""
    store = GrowingStore()
    store.append(30)
    h = hub(store, queue_size=5, max_replay=1000)
    sessions: list[Session] = []

    def meanwhile() -> None:
        for event in store.append(2):  # 31 and 32 wait in the queue
            h.publish(event)
        assert sessions[0].listener is not None
        sessions[0]._reply(sessions[0].listener, type="pong", position=32)
        for event in store.append(20):  # 33..52 overflow it
            h.publish(event)

    socket = ResumingSocket(10, meanwhile)
    session = Session(socket, h, h.settings, allow, {Topic("all")}, after=0, key="good")
    sessions.append(session)
    task = asyncio.create_task(session.run())
    try:
        await socket.frames(1 + 52 + 1)
        kinds = [f.get("type", "event") for f in socket.sent]
        assert kinds.index("pong") == 1 + 32  # the welcome, events 1..32, then the pong
        events = [f["position"] for f in socket.sent[1:] if f.get("type", "event") == "event"]
        assert events == list(range(1, 53))
        assert socket.closed is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_replies_are_not_held_back_while_a_resume_takes_pass_after_pass() -> None:
    """Replies filling the queue during a resume do not keep it replaying: each goes out
    after the event it followed, while live events keep coming one per frame sent."""
    store = GrowingStore()
    store.append(10)
    h = hub(store, queue_size=3, max_replay=1000)
    sessions: list[Session] = []

    class Steady(ResumingSocket):
        async def send_text(self, data: str) -> None:
            await RecordingSocket.send_text(self, data)
            if 3 <= len(self.sent) < 60:
                for event in store.append(1):
                    h.publish(event)
            if len(self.sent) == 3:
                listener = sessions[0].listener
                assert listener is not None
                for number in range(3):
                    sessions[0]._reply(listener, type="pong", position=number)
            await asyncio.sleep(0)

    socket = Steady(0, lambda: None)
    session = Session(socket, h, h.settings, allow, {Topic("all")}, after=0, key="good")
    sessions.append(session)
    task = asyncio.create_task(session.run())
    try:
        await socket.frames(1 + 67 + 3)  # 10 events, then one a frame from the 3rd to the 59th
        total = len(store.events)
        kinds = [f.get("type", "event") for f in socket.sent]
        # The three pongs follow the event that was offered just before them (11).
        assert [i for i, k in enumerate(kinds) if k == "pong"] == [12, 13, 14]
        events = [f["position"] for f in socket.sent[1:] if f.get("type", "event") == "event"]
        assert events == list(range(1, total + 1))
        assert socket.closed is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@given(
    stored=st.integers(0, 40),
    queue_size=st.integers(1, 8),
    script=st.lists(
        st.one_of(st.tuples(st.just("events"), st.integers(1, 12)), st.just(("reply", 0))),
        max_size=40,
    ),
)
def test_a_resume_under_any_interleaving_sends_events_once_in_order_and_replies_in_place(
    stored: int, queue_size: int, script: list[tuple[str, int]]
) -> None:
    """Whatever arrives while a client resumes from 0 (live events, its own messages'
    replies), and whatever its queue holds: events 1, 2, 3 ... once each, in order, each
    reply right after the last event stored before it was asked for, and all of it unless
    the client is closed as slow once it has caught up (a burst can overflow a small queue
    then, as for any connection)."""

    async def scenario() -> None:
        store = GrowingStore()
        store.append(stored)
        settings = WebSocketSettings(queue_size=queue_size, max_replay=10_000)
        h = Hub(store, NoSource(), settings)  # type: ignore[arg-type]
        h._started.set()
        h.position = stored  # the hub has seen what was stored before the client came
        steps = list(script)
        replies: list[int] = []  # per reply: how many events were stored when it was asked
        sessions: list[Session] = []

        class Scripted(ResumingSocket):
            async def send_text(self, data: str) -> None:
                await RecordingSocket.send_text(self, data)
                if steps:
                    kind, count = steps.pop(0)
                    if kind == "events":
                        for event in store.append(count):
                            h.publish(event)
                    elif (listener := sessions[0].listener) is not None:
                        replies.append(len(store.events))
                        sessions[0]._reply(listener, type="pong", position=len(replies) - 1)
                await asyncio.sleep(0)  # a network write lets the loop run

        socket = Scripted(0, lambda: None)
        session = Session(socket, h, settings, allow, {Topic("all")}, after=0, key="good")
        sessions.append(session)
        task = asyncio.create_task(session.run())

        def done() -> bool:
            expected = 1 + len(store.events) + len(replies)
            return task.done() or (not steps and len(socket.sent) == expected)

        async def played_out() -> bool:
            return done()

        try:
            await eventually(played_out, within=10, what="the script played out")
            frames = socket.sent[1:]
            events = [f["position"] for f in frames if f.get("type", "event") == "event"]
            assert events == list(range(1, len(events) + 1))
            for at, frame in enumerate(frames):
                if frame.get("type") == "pong":
                    asked_after = replies[frame["position"]]
                    assert (
                        sum(f.get("type", "event") == "event" for f in frames[:at]) == asked_after
                    )
            if socket.closed is not None:
                # Slow: a burst beyond the queue once caught up, or more replies waiting
                # than it holds (they are not in the store), never the events of a resume.
                assert socket.closed[0] == CLOSE_SLOW_CONSUMER
                listener = session.listener
                assert listener is not None
                assert not listener.catching_up or len(listener.held) >= queue_size
            else:
                assert len(events) == len(store.events)
                assert sorted(f["position"] for f in frames if f.get("type") == "pong") == list(
                    range(len(replies))
                )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
