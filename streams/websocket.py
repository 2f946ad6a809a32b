"""The WebSocket gateway: live events to clients, filtered by topic and owner, resumable.

One ``Hub`` per API process takes every event once from its live source (the log in
embedded, NATS in services), encodes its frame once, and hands it to the connections that
asked for it and may see it. Each connection has a bounded queue: a client that falls
``queue_size`` frames behind is closed with 4429 rather than grow the process's memory.

A client that reconnects with the last position it saw first receives what it missed,
read from the event store, then the live frames, skipping any it already got: no gap, no
duplicate. Further back than ``max_replay`` positions it is told the position is too old
(close 4410) and should reload through the query API. Live events that would overflow its
queue while it catches up are let go rather than end the connection: they are in the store,
and the replay reads on from where it got to until it meets the live stream (a client
that keeps falling more than ``max_replay`` behind meanwhile is closed with 4429).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn, Protocol
from uuid import UUID

import msgspec
import structlog
from nats.errors import ConnectionClosedError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from almanac.adapters.nats import NatsConnection
from almanac.auth import Principal
from almanac.errors import AlmanacError, Unavailable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.feed import EventFeed
from almanac.settings import WebSocketSettings
from almanac.timeouts import Backoff, cancel_and_wait, wait_event, within
from streams.envelope import encode_event
from streams.mailbox import Mailbox
from streams.relay import AGGREGATE_ID, EVENT_TYPE, OWNER, POSITION
from streams.wsserver import DirectSend, direct_send, text_frame

log = structlog.get_logger("almanac.websocket")

# Close codes (4000-4999 are the application's; each mirrors an HTTP status).
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_OLD = 4410
CLOSE_SLOW_CONSUMER = 4429

# Events about credentials stay with operators, even those of the client's own owner.
ADMIN_ONLY = ("api_key.", "installation.")
# Closes every connection made with the key it names.
KEY_REVOKED = "api_key.revoked"
# How many aggregates a connection remembers it may follow, at least (see ``Hub.hidden``).
FOLLOWABLE_KEPT = 512


class LiveEvent(msgspec.Struct, frozen=True):
    """An event as the hub routes it: what filters need, and the frame, encoded once.

    Also a frame that is no event (a reply, a progress report, a heartbeat): its position
    is then the hub's when it was made, where it belongs among the events."""

    position: int
    type: str
    aggregate_id: str
    owner: str
    frame: str


class _Owner(msgspec.Struct):
    owner: str


class _Owned(msgspec.Struct):
    """Of a stored event, only its owner: the rest of it is skipped, not decoded."""

    meta: _Owner


def visible(principal: Principal, event_type: str, owner: str) -> bool:
    """Whether ``principal`` may see an event of ``event_type`` and ``owner``."""
    if event_type.startswith(ADMIN_ONLY) and not principal.is_admin:
        return False
    return principal.may_see(owner)


def may_see_stored(principal: Principal, event: RecordedEvent) -> bool:
    """``visible`` of a stored event, decoding no more of it than its owner (and not even
    that for an admin)."""
    return principal.is_admin or visible(principal, event.type, event.view(_Owned).meta.owner)


def live_event(event: RecordedEvent) -> LiveEvent:
    return event_frame(
        event.position, event.type, str(event.aggregate_id), event.meta.owner, encode_event(event)
    )


def event_frame(
    position: int, event_type: str, aggregate_id: str, owner: str, envelope: bytes
) -> LiveEvent:
    """The frame around an encoded envelope, built without decoding it again."""
    frame = b"".join(
        (
            b'{"type":"event","position":',
            str(position).encode(),
            b',"event_type":',
            msgspec.json.encode(event_type),
            b',"aggregate_id":',
            msgspec.json.encode(aggregate_id),
            b',"payload":',
            envelope,
            b"}",
        )
    )
    return LiveEvent(position, event_type, aggregate_id, owner, frame.decode())


# -- topics -------------------------------------------------------------------------------


class BadTopic(ValueError):
    pass


# Event types are a few words; a glob of them need not be longer.
MAX_TOPIC_LENGTH = 200


class TooManyTopics(BadTopic):
    pass


def check_topic_count(count: int, limit: int) -> None:
    """Refuse ``count`` topics on one connection if they are more than ``limit``."""
    if count > limit:
        raise TooManyTopics(f"too many topics: {count}, at most {limit} on one connection")


def parse_topics(raw: Sequence[object], limit: int) -> set[Topic]:
    """The topics of a URL or a message: more than ``limit`` are refused before any is
    parsed; a malformed one raises ``BadTopic``."""
    check_topic_count(len(raw), limit)
    return {Topic.parse(t) for t in raw}


class BadAfter(ValueError):
    """A resume position that is not one: refused rather than ignored, or the client would
    believe it resumed when it did not."""


def resume_position(value: str | int) -> int:
    """``after`` as given in the URL (text) or the auth message (a number): a position, 0
    or more, else ``BadAfter``."""
    # ASCII digits only: ``str.isdigit`` also passes "²", which ``int`` refuses.
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise BadAfter(f"after must be a position (a whole number, 0 or more), got {value!r}")
        return int(value)
    if value < 0:
        raise BadAfter(f"after must be a position (0 or more), got {value}")
    return value


@dataclass(frozen=True)
class Topic:
    """``*`` (all the key may see), ``reading:<id>``, ``batch:<id>``, ``event:<type glob>``."""

    kind: Literal["all", "aggregate", "event"]
    value: str = ""

    @classmethod
    def parse(cls, raw: object) -> Topic:
        if not isinstance(raw, str):
            raise BadTopic(f"a topic is a string, got {raw!r}")
        if len(raw) > MAX_TOPIC_LENGTH:
            raise BadTopic(f"a topic is at most {MAX_TOPIC_LENGTH} characters, got {len(raw)}")
        if raw == "*":
            return cls("all")
        kind, _, value = raw.partition(":")
        if kind in {"reading", "batch", "aggregate"}:
            try:
                return cls("aggregate", str(UUID(value)))
            except ValueError:
                raise BadTopic(f"{raw!r}: {kind}: needs a UUID") from None
        if kind == "event" and value and all(c.isalnum() or c in "._*-" for c in value):
            return cls("event", value)
        raise BadTopic(
            f"unknown topic {raw!r}: use '*', 'reading:<id>', 'batch:<id>' or 'event:<type>'"
            " (wildcards like 'event:reading.*')"
        )

    def matches(self, event: LiveEvent) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "aggregate":
            return event.aggregate_id == self.value
        return fnmatch.fnmatchcase(event.type, self.value)

    def __str__(self) -> str:
        if self.kind == "all":
            return "*"
        return f"{'aggregate' if self.kind == 'aggregate' else 'event'}:{self.value}"


# -- listeners and the hub ----------------------------------------------------------------


def _nothing() -> None:
    pass


@dataclass(eq=False)
class Listener:
    """One connection's subscriptions and its bounded queue of frames to send."""

    principal: Principal
    queue_size: int
    topics: set[Topic] = field(default_factory=set)
    # Frames at or below this position were already sent (or replayed): skip them.
    sent_through: int = 0
    queue: Mailbox[LiveEvent] = field(default_factory=Mailbox)
    overflowed: bool = False
    # Its API key was revoked: the connection is closed (4401).
    revoked: bool = False
    # When the connection was last sent a frame (time.monotonic()); heartbeats follow quiet.
    last_sent: float = field(default_factory=time.monotonic)
    # Ends the connection's session (it is then closed with the reason the session finds).
    interrupt: Callable[[], None] = _nothing
    # Whether frames must wait in the queue, in order: a task is sending them, or the
    # session has not yet begun to (its welcome frame goes first).
    sending: bool = True
    # Starts a task that sends what is queued (when none is ``sending``).
    wake: Callable[[], None] = _nothing
    # Writes an encoded frame at once, past the queue (the server's ``DIRECT_SEND``), when
    # nothing waits in it; None where the server offers no such path.
    direct: DirectSend | None = None
    # While a resume replays from the store (``catching_up``), live events wait in the queue
    # until it is full; then they are let go (``skipped``): the replay reads them again.
    # Frames that are not in the store (replies, progress) wait in ``held`` meanwhile and go
    # out right after the event at their position, so that they keep their place.
    catching_up: bool = False
    skipped: bool = False
    held: list[LiveEvent] = field(default_factory=list)

    def follows(self, event: LiveEvent, verdicts: dict[Topic, bool] | None = None) -> bool:
        """Whether one of its topics matches ``event``, whoever may see it; ``verdicts``
        remembers each topic's match for this event across listeners (a broadcast asks the
        same of thousands)."""
        if verdicts is None:
            verdicts = {}
        for topic in self.topics:
            match = verdicts.get(topic)
            if match is None:
                match = verdicts[topic] = topic.matches(event)
            if match:
                return True
        return False

    def already_sent(self, event: LiveEvent) -> bool:
        return positioned(event) and event.position <= self.sent_through

    def sent(self, event: LiveEvent) -> None:
        """``event``'s frame went out: the connection is not quiet, and is past its position."""
        self.last_sent = time.monotonic()
        if positioned(event):
            self.sent_through = event.position

    def offer(self, event: LiveEvent, wire: bytes | None = None) -> None:
        """Queue ``event`` for the sending task or, given its encoded frame ``wire`` while
        nothing waits in the queue, write it now; a full queue ends the connection (slow
        consumer)."""
        if self.overflowed:
            return
        if self.catching_up:
            self._offer_catching_up(event)
            return
        if wire is not None and self.direct is not None and not self.sending:
            if self.already_sent(event):
                return
            if self.direct(wire):
                self.sent(event)
                return
        if self.queue.qsize() >= self.queue_size:
            self.overflowed = True
            self.interrupt()
            return
        self.queue.put_nowait(event)
        if not self.sending:
            self.sending = True
            self.wake()

    def offer_event(self, event: LiveEvent, wire: bytes, now: float) -> None:
        """``offer`` of a stored event the hub found this connection wants and has not been
        sent, with its encoded frame, at ``now``, without ``offer``'s checks and calls again
        (with ``visible`` asked for each connection, they cost a 10,000-connection broadcast
        11-18 ms of the loop here)."""
        if self.direct is not None and not (self.sending or self.overflowed or self.catching_up):
            if self.direct(wire):
                self.last_sent = now
                self.sent_through = event.position
                return
            self.offer(event)  # not written: it waits in the queue
            return
        self.offer(event, wire)

    def _offer_catching_up(self, event: LiveEvent) -> None:
        full = self.queue.qsize() + len(self.held) >= self.queue_size
        if positioned(event):
            if self.skipped or full:
                # It, and every event queued, is read from the store by the next pass.
                self.skipped = True
                self.queue.clear()
            else:
                self.queue.put_nowait(event)
            return
        if full and self.queue.qsize():
            self.skipped = True  # the queued events make room, and are read again
            self.queue.clear()
        elif full:  # held frames alone fill it: a client flooding the server with messages
            self.overflowed = True
            self.interrupt()
            return
        self.held.append(event)

    def catch_up(self) -> None:
        """A replay begins. What queued meanwhile (while the welcome went out) is sorted
        as it would have been: events stay queued, other frames are held."""
        self.catching_up = True
        waiting = self.queue.items()
        self.queue.clear()
        for queued in waiting:
            if positioned(queued):
                self.queue.put_nowait(queued)
            else:
                self.held.append(queued)

    def release(self, through: int) -> list[LiveEvent]:
        """The held frames whose place comes once every event up to ``through`` is sent."""
        due = 0
        while due < len(self.held) and self.held[due].position <= through:
            due += 1
        released = self.held[:due]
        del self.held[:due]
        return released

    def caught_up(self) -> None:
        """The replay is over: the frames still held join the queue, each after its event."""
        self.catching_up = False
        if not self.held:
            return
        waiting = self.queue.items()
        self.queue.clear()
        for event in waiting:
            for held in self.release(event.position - 1):
                self.queue.put_nowait(held)
            self.queue.put_nowait(event)
        for held in self.held:
            self.queue.put_nowait(held)
        self.held.clear()


class LiveSource(Protocol):
    """Where the hub gets every event as it is stored, in order."""

    def events(self, after: int) -> AsyncIterator[list[LiveEvent]]: ...


class LogSource:
    """Follows the event store's log (the embedded profile: one process, no NATS)."""

    def __init__(self, feed: EventFeed, batch_size: int = 500) -> None:
        self.feed = feed
        self.batch_size = batch_size

    async def events(self, after: int) -> AsyncIterator[list[LiveEvent]]:
        follower = self.feed.follow()
        position = after
        try:
            while True:
                batch = await follower.next_batch(position, self.batch_size, timeout=1.0)
                if batch:
                    position = batch[-1].position
                    yield [live_event(event) for event in batch]
        finally:
            follower.close()


class ReadAgain(Exception):
    """The hub is to subscribe again after the last message it took: it fell too far
    behind, or the subscription dropped messages."""


class _Arrivals:
    """Messages handed over by a subscription's callback until the hub takes them all at
    once.

    With a callback nats-py answers the server's flow control as messages arrive, so the
    server is no longer held back by what the hub has not taken. Instead, at ``limit``
    untaken messages the hand-over ends: the hub takes what is held, then hears
    ``ReadAgain`` and subscribes again after it, leaving the rest on the server. The
    callback never waits, so nats-py's own queue holds only what arrived since the loop
    last ran it, far below the queue's limits (nats-py's defaults for JetStream: 512k
    messages, 256 MB), past which nats-py would drop messages. Should it drop any all the
    same, the gap in the consumer's sequence ends the hand-over the same way once the next
    message arrives, and so does an ordered consumer that recreates itself (its sequence
    starts again at 1, after the last message nats-py received, which may be one it
    dropped). A closed connection, found within ``check`` seconds, ends it with
    ``ConnectionClosedError``.
    """

    def __init__(
        self, limit: int, closed: Callable[[], bool] = lambda: False, check: float = 1.0
    ) -> None:
        self.limit = limit
        self._closed = closed
        self._check = check
        self._messages: list[Any] = []
        self._sequence = 0
        self._failure: ReadAgain | None = None
        self._waiting = asyncio.Event()

    async def add(self, message: Any) -> None:
        if self._failure is not None:
            return
        sequence = message.metadata.sequence.consumer
        if sequence != self._sequence + 1:
            # A restart at 1 too: nats-py recreates an ordered consumer after the last
            # message it received, which may be one it then dropped.
            self._fail(f"the subscription skipped from message {self._sequence} to {sequence}")
        elif len(self._messages) >= self.limit:
            self._fail(f"{self.limit} messages arrived that the hub has not taken")
        else:
            self._sequence = sequence
            self._messages.append(message)
            self._waiting.set()

    def _fail(self, reason: str) -> None:
        self._failure = ReadAgain(reason)
        self._waiting.set()

    async def take(self, most: int | None = None) -> list[Any]:
        """The messages that have arrived (the first ``most``), once there is at least one;
        ``ReadAgain`` or ``ConnectionClosedError`` once those held before the failure are
        taken."""
        while not self._messages:
            if self._failure is not None:
                raise self._failure
            if self._closed():
                raise ConnectionClosedError
            self._waiting.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiting.wait(), self._check)
        if most is None or len(self._messages) <= most:
            taken, self._messages = self._messages, []
        else:
            taken, self._messages = self._messages[:most], self._messages[most:]
        return taken


class NatsSource:
    """Reads the relay's stream (services): every API process gets every event through
    NATS, whichever process took the command.

    The first subscription starts at messages published shortly before the hub started (an
    event stored after that is published after it, however far the relay lags); positions
    up to ``after`` are dropped. A later one (after a failure) starts at the sequence after
    the last message seen. The ordered consumer itself recovers from reconnects.
    """

    # NATS stamps messages with its own clock; this much skew is tolerated.
    CLOCK_SKEW = timedelta(seconds=5)

    def __init__(
        self,
        nats: NatsConnection,
        subject_prefix: str,
        *,
        behind_limit: int = 10_000,
    ) -> None:
        self.nats = nats
        self.subject_prefix = subject_prefix
        # Untaken messages past which the hub reads the rest again from the stream (~10 MB
        # of events of ~1 kB).
        self.behind_limit = behind_limit
        self._next_sequence: int | None = None
        self._since = datetime.now(UTC) - self.CLOCK_SKEW

    def _config(self) -> ConsumerConfig:
        if self._next_sequence is not None:
            return ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_sequence
            )
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=self._since
        )

    async def events(self, after: int) -> AsyncIterator[list[LiveEvent]]:
        # Messages come through a callback, not ``next_msg``: nats-py runs each ``next_msg``
        # as a task of its own, so taking n waiting messages took n turns of the event loop,
        # which the API process shares with every request. At 1,000 commands/s the hub fell
        # behind by 20-60 ms in bursts (and, having not taken the messages, answered the
        # server's flow control late, which held back delivery too), while an outside
        # consumer of the same stream had each message within ~1 ms.
        while True:
            client = await self.nats.connect()

            def closed(client: Any = client) -> bool:
                return bool(client.is_closed)

            arrived = _Arrivals(self.behind_limit, closed=closed)
            subscription = await self._subscribe(client, arrived)
            try:
                while True:
                    # What has arrived goes out together, in one pass over the listeners.
                    messages = await arrived.take(most=1000)
                    self._next_sequence = messages[-1].metadata.sequence.stream + 1
                    batch = [self._live(message) for message in messages]
                    yield [event for event in batch if event.position > after]
            except ReadAgain as exc:
                log.warning(
                    "websocket.reading_again", next_sequence=self._next_sequence, reason=str(exc)
                )
            finally:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _subscribe(self, client: Any, arrived: _Arrivals) -> Any:
        js = client.jetstream()
        for attempt in itertools.count():
            try:
                return await js.subscribe(
                    f"{self.subject_prefix}.>",
                    cb=arrived.add,
                    ordered_consumer=True,
                    config=self._config(),
                )
            except NotFoundError:
                # The relay creates the stream; an API process may start first.
                if attempt == 0:
                    log.info("websocket.waiting_for_stream", subjects=f"{self.subject_prefix}.>")
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    @staticmethod
    def _live(message: Any) -> LiveEvent:
        headers = message.headers or {}
        return event_frame(
            int(headers.get(POSITION, 0)),
            headers.get(EVENT_TYPE, ""),
            headers.get(AGGREGATE_ID, ""),
            headers.get(OWNER, ""),
            message.data,
        )


class Hub:
    name = "websocket-hub"

    def __init__(
        self,
        store: EventStore,
        source: LiveSource,
        settings: WebSocketSettings,
        on_key_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.settings = settings
        # Told each revoked key's id (the process's key ring forgets the key at once).
        self.on_key_revoked = on_key_revoked
        # Keys revoked since the hub started: a connection that was being let in with one
        # as the revocation came is closed as it attaches (one id a revocation).
        self._revoked_keys: set[str] = set()
        self.position = 0
        self._by_owner: dict[str, set[Listener]] = {}
        self._admins: set[Listener] = set()
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()

    @property
    def connections(self) -> int:
        return len(self._admins) + sum(len(s) for s in self._by_owner.values())

    async def run(self) -> None:
        backoff = Backoff(0.05, 5.0)
        beats = asyncio.ensure_future(self._beat())
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                try:
                    await self._follow()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the source dropped; resume there
                    log.warning("websocket.source_failed", position=self.position, error=repr(exc))
                    # Following for a while before, it is a new failure, not the same one.
                    await wait_event(self._stopping, backoff.after(time.monotonic() - started))
        finally:
            await cancel_and_wait(beats)
        log.info("websocket.hub_stopped", position=self.position, connections=self.connections)

    async def _follow(self) -> None:
        if not self._started.is_set():
            # Live from now on; anything earlier is a resume, served from the store.
            self.position = await self.store.max_position()
            self._started.set()
            log.info("websocket.hub_started", position=self.position)
        events = self.source.events(self.position)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                batch_task = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait(
                    {batch_task, stop}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    batch_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await batch_task
                    return
                for event in batch_task.result():
                    if event.position > self.position:
                        self.publish(event)
        finally:
            stop.cancel()
            await events.aclose()  # type: ignore[attr-defined]

    def publish(self, event: LiveEvent) -> None:
        self.position = max(self.position, event.position)
        if event.type == KEY_REVOKED:
            self._revoked(event.aggregate_id)
        # The candidates are the connections of the event's owner and the admins', which
        # may all see it unless only admins may: ``visible``, asked once an event rather
        # than once a connection (a broadcast reaches thousands).
        if event.type.startswith(ADMIN_ONLY):
            candidates: Iterable[Listener] = tuple(self._admins)
        else:
            candidates = self._candidates(event.owner)
        verdicts: dict[Topic, bool] = {}
        wire: bytes | None = None
        position, now = event.position, time.monotonic()
        for listener in candidates:
            if listener.sent_through < position and listener.follows(event, verdicts):
                if wire is None:
                    wire = text_frame(event.frame.encode())
                listener.offer_event(event, wire, now)

    def _revoked(self, key_id: str) -> None:
        """End every connection authenticated with the key ``key_id``: it was let in by a key
        that no longer works, and would otherwise go on hearing events for as long as it
        stays open."""
        self._revoked_keys.add(key_id)
        if self.on_key_revoked is not None:
            try:
                self.on_key_revoked(key_id)
            except Exception:  # the connections below are closed whatever befell the ring
                log.exception("websocket.key_forget_failed", key_id=key_id)
        for listener in self._every_listener():
            if listener.principal.key_id == key_id:
                listener.revoked = True
                listener.interrupt()

    def _every_listener(self) -> list[Listener]:
        """Every connection's listener as of now (ending one's session may detach it)."""
        return [one for group in (self._admins, *self._by_owner.values()) for one in group]

    async def _beat(self) -> None:
        # One timer for the process, not one a connection: it looks four times an interval,
        # so a quiet connection hears a heartbeat 1 to 1.25 intervals after its last frame.
        while not await wait_event(self._stopping, self.settings.heartbeat / 4):
            try:
                self.beat()
            except Exception:  # heartbeats must go on whatever one beat met
                log.exception("websocket.beat_failed")

    def beat(self, now: float | None = None) -> None:
        """A heartbeat frame to each connection that was sent nothing for ``heartbeat``
        seconds, unless one is already waiting in its queue (a stalled client collects at
        most one, not one a beat until it is closed as a slow consumer)."""
        now = time.monotonic() if now is None else now
        due = now - self.settings.heartbeat
        beat: LiveEvent | None = None
        wire = b""
        for listeners in (self._admins, *self._by_owner.values()):
            for listener in listeners:
                if listener.last_sent <= due and not listener.queue.qsize():
                    if beat is None:
                        position = self.position
                        beat = LiveEvent(
                            position, HEARTBEAT, "", "", frame(type=HEARTBEAT, position=position)
                        )
                        wire = text_frame(beat.frame.encode())
                    listener.offer(beat, wire)

    def _candidates(self, owner: str) -> Iterable[Listener]:
        mine = self._by_owner.get(owner)
        if not mine:
            return tuple(self._admins)
        return (*mine, *self._admins) if self._admins else tuple(mine)

    async def started(self) -> int:
        await self._started.wait()
        return self.position

    def attach(self, listener: Listener) -> None:
        if listener.principal.key_id in self._revoked_keys:
            listener.revoked = True  # closed by its session, after the welcome
        if listener.principal.is_admin:
            self._admins.add(listener)
        else:
            self._by_owner.setdefault(listener.principal.owner, set()).add(listener)

    def detach(self, listener: Listener) -> None:
        self._admins.discard(listener)
        owners = self._by_owner.get(listener.principal.owner)
        if owners is not None:
            owners.discard(listener)
            if not owners:
                del self._by_owner[listener.principal.owner]

    async def missed(self, listener: Listener, after: int, until: int) -> AsyncIterator[LiveEvent]:
        """What ``listener`` wants of the events after ``after`` up to ``until``, from the store.

        The store reads in its own threads; what is left to the loop is sorting the events
        out. Each is matched by what its row says (type, aggregate), then by its owner, decoded
        alone; only the events that go out are decoded whole and framed (~45 us each: for all
        of 10,000 missed positions, ~0.5 s of the loop for every resuming client, whatever it
        followed)."""
        principal = listener.principal
        position = after
        while position < until:
            batch = await self.store.read(position, min(500, until - position))
            if not batch:
                return
            for event in batch:
                if event.position > until:
                    return
                row = LiveEvent(event.position, event.type, event.aggregate_key, "", "")
                if listener.follows(row) and may_see_stored(principal, event):
                    yield live_event(event)
            position = batch[-1].position

    async def hidden(
        self,
        principal: Principal,
        topics: Iterable[Topic],
        followable: dict[str, None] | None = None,
    ) -> Topic | None:
        """The first of ``topics`` naming an aggregate that ``principal`` may not follow: one
        of another owner, or none at all (the two are not told apart). Admins follow any.

        ``followable`` is the connection's memory of the aggregates already found followable
        (oldest first): one the client subscribes to again costs no query. Only those are
        kept: an aggregate's owner never changes, but one not found may yet begin, and
        remembering another owner's while still asking about missing ones would tell the two
        apart by how long the answer takes. A message costs one query at most, for all its
        aggregates not checked before."""
        if principal.is_admin:
            return None
        aggregates = sorted((t for t in topics if t.kind == "aggregate"), key=str)
        # Taken before any is remembered: remembering one may let an older one go.
        known = {t.value for t in aggregates if followable is not None and t.value in followable}
        unchecked = [UUID(t.value) for t in aggregates if t.value not in known]
        firsts = await self.store.first_events(unchecked) if unchecked else {}
        for topic in aggregates:
            if topic.value not in known:
                first = firsts.get(UUID(topic.value))
                if first is None or not may_see_stored(principal, first):
                    return topic
            if followable is not None:
                followable.pop(topic.value, None)
                followable[topic.value] = None  # the newest end: kept longest
                # Enough for every topic a connection may hold, twice over.
                while len(followable) > max(FOLLOWABLE_KEPT, 2 * self.settings.max_topics):
                    del followable[next(iter(followable))]
        return None

    def stop(self) -> None:
        self._stopping.set()
        for listener in self._every_listener():
            listener.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()


# -- the protocol spoken on one connection --------------------------------------------------


class ClientMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: Literal["auth", "subscribe", "unsubscribe", "ping"]
    key: str | None = None
    topics: list[str] = []
    # Resume after this position (the last one the client saw); first message only.
    after: int | None = None


# Fields read from the first (auth) message only: in a later one they would do nothing, and
# the client would believe it had resumed (or authenticated again) when it had not.
FIRST_MESSAGE_ONLY = ("key", "after")

_decode_message = msgspec.json.Decoder(ClientMessage).decode
_encode = msgspec.json.Encoder().encode


def auth_key(raw: str) -> str | None:
    """The key of a first message that is an auth message, whatever its other fields: a
    client with a valid key is told what else is wrong with it (4400), one without is not."""
    try:
        fields = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(fields, dict) or fields.get("type") != "auth":
        return None
    key = fields.get("key")
    return key if isinstance(key, str) and key else None


def frame(**fields: object) -> str:
    return _encode(fields).decode()


PROGRESS = "progress"
HEARTBEAT = "heartbeat"
# Answers to the client's own messages (pong, subscribed, error).
REPLY = "reply"


def positioned(event: LiveEvent) -> bool:
    """Heartbeats, progress reports and replies are not events: no position of their own."""
    return event.type not in (HEARTBEAT, PROGRESS, REPLY)


# Reports on something running (a batch): its fields as a frame, or None once it has ended.
Progress = Callable[[Principal], Awaitable[dict[str, object] | None]]


class Socket(Protocol):
    """What a session needs of a WebSocket (Litestar's, in the app)."""

    async def send_text(self, data: str) -> Any: ...

    # The next ASGI message: ``websocket.receive`` (with ``text``, or ``bytes`` for a binary
    # frame) or ``websocket.disconnect``.
    def receive(self) -> Awaitable[Any]: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> Any: ...


Authenticate = Callable[[str | None], Awaitable[Principal]]


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame carries (123 bytes of UTF-8)."""
    return text.encode()[:120].decode(errors="ignore")


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientGone(Exception):
    """The connection ended on the client's side (or failed under a send): nothing more can
    be sent on it, not even a close frame."""


BINARY_REFUSED = "binary frames are not accepted: send each message as JSON in a text frame"


@dataclass
class Session:
    """One client connection, from authentication to close."""

    socket: Socket
    hub: Hub
    settings: WebSocketSettings
    authenticate: Authenticate
    topics: set[Topic]
    after: int | None = None
    key: str | None = None
    # Topics the route itself decides whether the key may follow (a batch's, by its progress
    # report); every other aggregate's is checked as the session begins.
    vouched: frozenset[Topic] = frozenset()
    listener: Listener | None = None
    # Sent as a ``progress`` frame every ``progress_interval`` seconds while it reports: twice
    # a second, so that a client sees one at least every second even on a busy server.
    progress: Progress | None = None
    progress_interval: float = 0.5
    # The task serving the connection (it reads the client's messages), and the task that
    # sends what is queued while there is something to send.
    _task: asyncio.Task[Any] | None = field(default=None, init=False, repr=False)
    _sender: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _interrupted: bool = field(default=False, init=False, repr=False)
    _failure: BaseException | None = field(default=None, init=False, repr=False)
    # The aggregates this connection's key was found to follow (see ``Hub.hidden``).
    _followable: dict[str, None] = field(default_factory=dict, init=False, repr=False)

    async def run(self) -> None:
        try:
            principal = await self._principal()
            # The session's topics are the listener's from now on (one set, not two).
            listener = Listener(principal, self.settings.queue_size, topics=self.topics)
            self.listener = listener
            await self.hub.started()
            self.hub.attach(listener)
            try:
                await self._serve(listener)
            finally:
                self.hub.detach(listener)
        except Closed as closed:
            await self._close(closed.code, closed.reason)
        except ClientGone as gone:
            log.debug("websocket.client_gone", owner=self._owner(), reason=str(gone))
        except Unavailable as exc:
            # Not the client's fault, nor the key's: it is to reconnect later, not give up.
            log.warning("websocket.unavailable", owner=self._owner(), detail=exc.detail)
            reason = f"try again in {exc.retry_after} s: {exc.detail}"
            await self._close(CLOSE_TRY_AGAIN_LATER, close_reason(reason))
        except Exception:
            log.exception("websocket.session_failed", owner=self._owner())
            reason = "internal error: reconnect with after=<position>"
            await self._close(CLOSE_INTERNAL_ERROR, reason)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # the client may be gone meanwhile
            await self.socket.close(code, reason)

    def _owner(self) -> str | None:
        return None if self.listener is None else self.listener.principal.owner

    async def _principal(self) -> Principal:
        key = self.key
        message: ClientMessage | None = None
        malformed: str | None = None  # what is wrong with an auth message besides its key
        if key is None:
            key, message, malformed = await self._first_message()
        try:
            principal = await self.authenticate(key)
        except Unavailable:
            raise  # the store did not answer: not a wrong key (see ``run``)
        except AlmanacError as exc:
            raise Closed(CLOSE_UNAUTHORIZED, close_reason(exc.detail)) from None
        # After the key: a client without a valid one learns nothing but 4401.
        if malformed is not None:
            raise Closed(CLOSE_BAD_REQUEST, close_reason(malformed))
        if message is not None:
            try:
                self._apply(message)
            except (BadTopic, BadAfter) as exc:  # as a malformed one in the URL is
                raise Closed(CLOSE_BAD_REQUEST, close_reason(str(exc))) from None
        try:
            check_topic_count(len(self.topics), self.settings.max_topics)
        except TooManyTopics as exc:  # the URL's and the auth message's together
            raise Closed(CLOSE_BAD_REQUEST, close_reason(str(exc))) from None
        hidden = await self.hub.hidden(principal, self.topics - self.vouched, self._followable)
        if hidden is not None:
            raise Closed(CLOSE_NOT_FOUND, close_reason(f"not found: {hidden}"))
        return principal

    async def _first_message(self) -> tuple[str, ClientMessage | None, str | None]:
        """The key the first message gives, with the message or, if it is not a valid one,
        why not; without a key, ``Closed`` (4401)."""
        try:
            raw = await within(self._read(), self.settings.auth_timeout)
        except TimeoutError:
            raise Closed(CLOSE_UNAUTHORIZED, "no API key: send {type: auth, key}") from None
        # No error frame here: the close's reason says it, and nothing may be sent after it.
        if isinstance(raw, bytes):
            raise Closed(CLOSE_UNAUTHORIZED, "the first message must be a text frame")
        decoded = self._decode(raw)
        if isinstance(decoded, str):
            key = auth_key(raw)
            if key is not None:
                return key, None, decoded
        elif decoded.type == "auth" and decoded.key:
            return decoded.key, decoded, None
        raise Closed(CLOSE_UNAUTHORIZED, "the first message must be {type: auth, key}")

    async def _read(self) -> str | bytes:
        """The client's next message: its text, or the bytes of a binary frame."""
        try:
            message = await self.socket.receive()
        except Exception as exc:
            raise ClientGone(repr(exc)) from exc
        if message["type"] != "websocket.receive":
            raise ClientGone(f"closed by the client ({message.get('code')})")
        text: str | None = message.get("text")
        return (message.get("bytes") or b"") if text is None else text

    async def _write(self, text: str) -> None:
        try:
            await self.socket.send_text(text)
        except Exception as exc:
            raise ClientGone(repr(exc)) from exc

    async def _serve(self, listener: Listener) -> None:
        await self._write(
            frame(
                type="welcome",
                position=self.hub.position,
                owner=listener.principal.owner,
                topics=sorted(map(str, listener.topics)),
            )
        )
        # No task of its own for an idle connection (10,000 of them are many tasks): this one
        # reads the client's messages; frames are written at once by the hub, or, when they
        # must wait, sent by a task that ends once the queue is empty. Overflow, shutdown and
        # a failed send end the session through ``interrupt``.
        task = self._task = asyncio.current_task()
        assert task is not None
        listener.interrupt = self._interrupt
        listener.wake = self._start_sending
        listener.direct = direct_send(getattr(self.socket, "scope", None))
        self._start_sending(replay=self.after)  # what waited for the welcome
        reporter = None
        if self.progress is not None:
            reporter = asyncio.ensure_future(self._report(listener, self.progress))
        try:
            # Overflowed or stopped while the welcome went out: straight to the close.
            if not (listener.overflowed or listener.revoked or self.hub.stopping):
                await self._receive(listener)
        except asyncio.CancelledError:
            # Ours (``_interrupt``) is taken back; one from outside as well goes on.
            if not self._interrupted or task.uncancel():
                raise
        finally:
            # Nothing may interrupt the clean-up below; a failed send or replay (the sending
            # task's) is in ``_failure``.
            self._interrupted = True
            self._task = None
            listener.interrupt = listener.wake = _nothing
            helpers = [t for t in (self._sender, reporter) if t is not None]
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(Exception):
                    await cancel_and_wait(helper)
            # The failure's traceback holds this session: let go of it before raising.
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure  # closed as ``run`` decides, and never without a word
        if listener.revoked:
            log.info("websocket.key_revoked", owner=listener.principal.owner)
            raise Closed(CLOSE_UNAUTHORIZED, "the API key was revoked")
        if listener.overflowed:
            log.warning("websocket.slow_consumer", owner=listener.principal.owner)
            raise Closed(CLOSE_SLOW_CONSUMER, "too far behind: reconnect with after=<position>")
        if self.hub.stopping:
            raise Closed(CLOSE_GOING_AWAY, "server shutting down: reconnect with after=<position>")

    def _interrupt(self) -> None:
        if not self._interrupted and self._task is not None:
            self._interrupted = True
            self._task.cancel()

    def _start_sending(self, replay: int | None = None) -> None:
        listener = self.listener
        assert listener is not None
        listener.sending = True
        self._sender = asyncio.ensure_future(self._send(listener, replay))
        self._sender.add_done_callback(self._sent)

    def _sent(self, sender: asyncio.Task[None]) -> None:
        if self._sender is sender:
            self._sender = None  # a done task is ~1.5 kB, kept for nothing
        if not sender.cancelled() and sender.exception() is not None:
            self._failure = sender.exception()
            self._interrupt()

    async def _send(self, listener: Listener, replay: int | None) -> None:
        """Send what is queued, in order, then hand back to the direct path."""
        if replay is not None:
            await self._replay(listener, replay)
            if listener.overflowed:
                return
        queue = listener.queue
        while queue.qsize():
            event = queue.get_nowait()
            if listener.already_sent(event):
                continue
            await self._write(event.frame)
            listener.sent(event)
        listener.sending = False

    async def _report(self, listener: Listener, progress: Progress) -> None:
        """Queue a progress frame every interval until the report ends, then the last one;
        the frames go out in turn with the events, never interleaved mid-frame."""
        owner = listener.principal.owner
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                fields = await progress(listener.principal)
            except Closed as exc:  # the report says the socket has nothing to follow
                self._failure = exc
                self._interrupt()
                return
            except Exception as exc:  # noqa: BLE001 - a failed report skips a beat, not the socket
                log.warning("websocket.progress_failed", error=repr(exc))
                fields = {}
            if fields is None:
                break
            if fields:
                fields = {"type": PROGRESS, "position": self.hub.position, **fields}
                listener.offer(LiveEvent(self.hub.position, PROGRESS, "", owner, frame(**fields)))
                if fields.get("status") in {"completed", "cancelled"}:
                    break
            # On a fixed cadence: the time a report takes does not stretch the interval.
            due = max(due + self.progress_interval, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _replay(self, listener: Listener, after: int) -> None:
        until = await self.hub.store.max_position()
        if after > until:
            # Never sent by this installation (every frame's event is stored first): a client
            # of another one, or of a store restored from an older backup. Followed as given,
            # it would hear nothing until the log grew past it.
            await self._refuse_resume(
                "position_unknown",
                f"after={after} is past the last stored position ({until}): resume from a"
                " position this server sent, or connect without after",
                until,
                Closed(CLOSE_BAD_REQUEST, "after is past the last stored position"),
            )
        if until - after > self.settings.max_replay:
            await self._refuse_resume(
                "position_too_old",
                f"{until - after} events were missed, more than the"
                f" {self.settings.max_replay} a resume replays: reload through the API",
                until,
                Closed(CLOSE_TOO_OLD, "position too old"),
            )
        listener.catch_up()
        await self._replay_to(listener, after, until)
        # Live events let go meanwhile (the queue was full) are read from the store too,
        # until a pass ends with nothing let go: then the queue holds the rest, in order.
        # A client reading exactly as fast as events come may take many passes: each sends
        # only events it has not had, read from the store rather than taken live.
        while listener.skipped:
            listener.skipped = False
            after, until = listener.sent_through, await self.hub.store.max_position()
            if until - after > self.settings.max_replay:
                listener.overflowed = True  # it falls behind faster than it reads
                listener.interrupt()
                return
            await self._replay_to(listener, after, until)
        listener.caught_up()

    async def _refuse_resume(self, code: str, detail: str, last: int, close: Closed) -> NoReturn:
        """The error frame saying why a resume cannot be served (with the last stored
        position), then the close: nothing may follow it."""
        await self._write(frame(type="error", code=code, detail=detail, position=last))
        raise close

    async def _replay_to(self, listener: Listener, after: int, until: int) -> None:
        async for event in self.hub.missed(listener, after, until):
            for held in listener.release(event.position - 1):
                await self._write(held.frame)
            await self._write(event.frame)
            listener.sent(event)
        listener.sent_through = max(listener.sent_through, until)
        for held in listener.release(listener.sent_through):
            await self._write(held.frame)

    async def _receive(self, listener: Listener) -> None:
        while True:
            message = self._decode(await self._read())
            if isinstance(message, str):
                self._reply(listener, type="error", code="bad_message", detail=message)
            elif message.type == "auth":
                self._reply(listener, type="error", code="already_authenticated")
            elif misplaced := [f for f in FIRST_MESSAGE_ONLY if getattr(message, f) is not None]:
                detail = (
                    f"`{misplaced[0]}` is read from the first (auth) message only;"
                    " to resume from a position, reconnect with after=<position>"
                )
                self._reply(listener, type="error", code="bad_message", detail=detail)
            elif message.type == "ping":
                self._reply(listener, type="pong", position=self.hub.position)
            else:
                limit = self.settings.max_topics
                try:
                    topics = parse_topics(message.topics, limit)
                    if message.type == "subscribe":
                        check_topic_count(len(listener.topics | topics), limit)
                except TooManyTopics as exc:
                    # Refused whole, as a bad topic is: the subscriptions stay as they were.
                    self._reply(listener, type="error", code="too_many_topics", detail=str(exc))
                    continue
                except BadTopic as exc:
                    self._reply(listener, type="error", code="bad_topic", detail=str(exc))
                    continue
                if message.type == "subscribe":
                    hidden = await self.hub.hidden(
                        listener.principal, topics - listener.topics, self._followable
                    )
                    if hidden is not None:
                        # Refused whole too; said alike whether it is another owner's or none.
                        detail = f"not found: {hidden}"
                        self._reply(listener, type="error", code="not_found", detail=detail)
                        continue
                    listener.topics |= topics
                else:
                    listener.topics -= topics
                self._reply(listener, type="subscribed", topics=sorted(map(str, listener.topics)))

    def _reply(self, listener: Listener, **fields: object) -> None:
        """Queue an answer to the client's message behind the frames already waiting, in
        the order of the messages. Through the bounded queue, not a task or a wait of its
        own: a client that sends and never reads overflows it and is closed (4429) rather
        than grow the server's memory."""
        owner = listener.principal.owner
        listener.offer(LiveEvent(self.hub.position, REPLY, "", owner, frame(**fields)))

    def _apply(self, message: ClientMessage) -> None:
        """Topics and resume point given with the first (auth) message."""
        self.topics |= parse_topics(message.topics, self.settings.max_topics)
        if message.after is not None:
            self.after = resume_position(message.after)

    @staticmethod
    def _decode(raw: str | bytes) -> ClientMessage | str:
        """The client's message, or why it is not one."""
        if isinstance(raw, bytes):
            return BINARY_REFUSED
        try:
            return _decode_message(raw)
        except msgspec.ValidationError as exc:
            return str(exc)
        except msgspec.DecodeError:
            return "not JSON"
