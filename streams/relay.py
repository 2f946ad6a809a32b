"""The relay: follows the event store's log and publishes every event to JetStream, once.

Every event goes to ``<prefix>.<aggregate>.<event>`` (from its stable topic) with its
position as ``Nats-Msg-Id``. Exactly once, in position order, with no gap, follows from
three rules rather than from the duplicate window alone:

- The resume point is the position in the stream's last message, which is never behind
  the relay's saved checkpoint (saved only after acknowledgements), so a crash between a
  publish and its checkpoint never republishes, however long the restart takes. Only an
  empty stream (new, or every message aged out) resumes from the checkpoint.
- Every publish carries ``Nats-Expected-Last-Sequence``: JetStream stores a message only
  directly after the one the relay expects. If one publish of a window is lost (NATS
  restarting, a timeout), every later one is refused instead of stored after a gap, and the
  relay resynchronises from the stream. The same guard stops an overlapping second relay
  (a lease is noticed lost only at the next check) from interleaving its messages.
- A republish that does reach JetStream within the duplicate window is dropped by it.

One relay publishes at a time, under a lease on the event store's database; others wait
as hot standbys and take over when the lease comes free.

An event too large for the NATS server (its message over the server's max_payload) is not
skipped, which would leave a gap: the relay stops at it, says so in its log
(``relay.event_too_large``) and health, and tries it again with its backoff until an
operator raises max_payload. The event store refuses such events in the first place
(``ALMANAC_MAX_EVENT_BYTES``); this is for a server whose max_payload is below that.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from typing import Any

import msgspec
import structlog
from nats.errors import MaxPayloadError
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from almanac.adapters.leadership import Lease, take_turns
from almanac.adapters.nats import NatsConnection
from almanac.container import Stoppable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.feed import EventFeed, Follower
from almanac.settings import RelaySettings
from almanac.timeouts import Backoff
from streams.envelope import encode_event

log = structlog.get_logger("almanac.relay")

# Headers every message carries; consumers filter and order by these without the payload.
POSITION = "Almanac-Position"
AGGREGATE_ID = "Almanac-Aggregate-Id"
AGGREGATE_VERSION = "Almanac-Aggregate-Version"
EVENT_TYPE = "Almanac-Event-Type"
OCCURRED_AT = "Almanac-Occurred-At"
OWNER = "Almanac-Owner"
CORRELATION_ID = "Almanac-Correlation-Id"
CAUSATION_ID = "Almanac-Causation-Id"
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"

_NOT_A_TOKEN = re.compile(r"[^a-z0-9_-]+")
# Saving the checkpoint is a transaction on the event store; once a second is plenty, as
# the stream itself holds the exact resume point.
CHECKPOINT_INTERVAL = 1.0
# What a message adds to an event's stored JSON: the envelope's own fields and the headers
# (both a few hundred bytes). An event store limit within this of max_payload is too close.
ENVELOPE_ROOM = 4096
# The longest pause between two tries after a failure.
MAX_PAUSE = 5.0
# More than the headers of a message take besides their values: names, separators, and the
# two numbers (Nats-Msg-Id, Nats-Expected-Last-Sequence) that are not in the payload.
HEADER_NAMES = 1024


def subject_for(prefix: str, event_type: str) -> str:
    """``reading.requested`` → ``<prefix>.reading.requested``: lowercase tokens, one per
    part of the topic, with anything a subject token cannot hold replaced by ``_``."""
    tokens = [_NOT_A_TOKEN.sub("_", part) for part in event_type.lower().split(".")]
    return ".".join([prefix, *(token or "_" for token in tokens)])


def headers_for(event: RecordedEvent) -> dict[str, str]:
    meta = event.meta
    return {
        MSG_ID: str(event.position),
        POSITION: str(event.position),
        AGGREGATE_ID: str(event.aggregate_id),
        AGGREGATE_VERSION: str(event.aggregate_version),
        EVENT_TYPE: event.type,
        OCCURRED_AT: _rfc3339(event.occurred_at),
        OWNER: meta.owner,
        CORRELATION_ID: meta.correlation_id,
        CAUSATION_ID: meta.causation_id,
    }


def header_bytes(headers: dict[str, str]) -> int:
    """How many bytes ``headers`` take in a message, as nats-py writes them (``NATS/1.0``,
    then ``key: value`` lines, then a blank line)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _rfc3339(moment: datetime) -> str:
    # As in the JSON payload (msgspec writes UTC as "Z").
    return msgspec.json.encode(moment).decode().strip('"')


def stream_config(settings: RelaySettings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.max_age,
        max_bytes=settings.max_bytes,
        max_msgs=-1,
        duplicate_window=settings.duplicate_window,
        num_replicas=settings.replicas,
    )


class RelayOutOfStep(Exception):
    """JetStream refused or did not acknowledge a publish; resynchronise from the stream."""


class EventTooLargeToPublish(Exception):
    """The event's message is over the NATS server's max_payload: nothing after it can be
    published until the server takes larger messages."""

    def __init__(self, event: RecordedEvent, size: int, max_payload: int) -> None:
        self.event = event
        self.size = size
        self.max_payload = max_payload
        super().__init__(
            f"the event at position {event.position} ({event.type}, aggregate "
            f"{event.aggregate_key}) is a message of {size:,} bytes, over the NATS server's "
            f"max_payload of {max_payload:,}: raise it in the server's configuration, then "
            "restart the server (docs/events.md, Event size)"
        )


def _out_of_step(event: RecordedEvent, future: asyncio.Future[Any], want: int) -> Exception | None:
    error = future.exception()
    if error is not None:
        return error if isinstance(error, Exception) else RelayOutOfStep(repr(error))
    ack = future.result()
    if ack.seq != want:
        return RelayOutOfStep(
            f"position {event.position} was stored at sequence {ack.seq}, not {want}"
        )
    return None


class Relay(Stoppable):
    def __init__(
        self,
        store: EventStore,
        feed: EventFeed,
        nats: NatsConnection,
        lease: Lease,
        settings: RelaySettings,
        *,
        batch_size: int = 500,
        max_event_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.feed = feed
        self.nats = nats
        self.lease = lease
        self.settings = settings
        self.batch_size = batch_size
        # The event store's limit, to compare with the server's max_payload.
        self.max_event_bytes = max_event_bytes
        self.name = f"relay:{settings.stream}"
        # The last position known to be in the stream, and the stream's last sequence.
        self.position = 0
        self.sequence = 0
        self.published = 0
        self.leading = False
        # Why the relay cannot go on (for health), or None.
        self.problem: str | None = None
        self._client: Any = None
        self._max_payload_seen = 0
        self._js: Any = None
        self._checkpointed = 0
        self._checkpointed_at = 0.0
        super().__init__()

    async def run(self) -> None:
        try:
            await take_turns(
                self.lease,
                self._leading,
                role="relay",
                interval=self.settings.standby_interval,
                stopping=self._stopping,
                stream=self.settings.stream,
            )
        finally:
            log.info(
                "relay.stopped",
                stream=self.settings.stream,
                position=self.position,
                published=self.published,
            )

    async def _leading(self) -> None:
        # Only the leader follows the log: a standby is woken by no commit.
        follower = self.feed.follow()
        self.leading = True
        log.info("relay.leading", stream=self.settings.stream)
        try:
            await self._lead(follower)
        finally:
            follower.close()
            self.leading = False
            self.problem = None
            await self._checkpoint(force=True)

    async def _lead(self, follower: Follower) -> None:
        synced = False
        backoff = Backoff(0.05, MAX_PAUSE)
        lease_checked = time.monotonic()
        while not self._stopping.is_set():
            try:
                if time.monotonic() - lease_checked >= self.settings.standby_interval:
                    lease_checked = time.monotonic()
                    if not await self.lease.held():
                        log.warning("relay.lease_lost", position=self.position)
                        return
                if not synced:
                    await self._synchronise()
                    synced = True
                events = await follower.next_batch(
                    self.position, self.batch_size, timeout=self.settings.standby_interval
                )
                if events:
                    await self._publish(events)
                    if self.problem is not None:
                        log.info("relay.unblocked", position=self.position)
                        self.problem = None
                await self._checkpoint()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except EventTooLargeToPublish as exc:
                # Everything before it is published and the relay is in step; skipping it
                # would leave a gap, so it is tried again until the server takes it.
                pause = backoff.next()
                self._stopped_at(exc, pause)
                await self._sleep(pause)
            except Exception as exc:  # noqa: BLE001 - the relay outlives NATS and Postgres outages
                log.warning(
                    "relay.publish_failed",
                    position=self.position,
                    sequence=self.sequence,
                    error=str(exc) or type(exc).__name__,
                )
                synced = False
                await self._sleep(backoff.next())

    def _stopped_at(self, refused: EventTooLargeToPublish, retry_in: float) -> None:
        self.problem = str(refused)
        log.error(
            "relay.event_too_large",
            position=refused.event.position,
            aggregate_id=refused.event.aggregate_key,
            event_type=refused.event.type,
            size=refused.size,
            max_payload=refused.max_payload,
            retry_in=retry_in,
            remedy="raise max_payload in the NATS server's configuration file and restart it",
        )

    async def _jetstream(self) -> Any:
        client = await self.nats.connect()
        if client is not self._client:
            # One context per connection: each one subscribes its own reply inbox.
            self._client = client
            self._js = client.jetstream(
                timeout=self.settings.ack_timeout,
                publish_async_max_pending=self.settings.window,
            )
        return self._js

    async def _synchronise(self) -> None:
        """Make sure the stream exists as configured; resume after its last message."""
        js = await self._jetstream()
        self._compare_max_payload()
        await self._ensure_stream(js)
        info = await js.stream_info(self.settings.stream)
        state = info.state
        in_stream = 0
        if state.messages and state.last_seq:
            try:
                last = await js.get_msg(self.settings.stream, seq=state.last_seq)
            except NotFoundError:
                last = None
            headers = (last.headers or {}) if last is not None else {}
            if POSITION not in headers:
                raise RelayOutOfStep(
                    f"the last message of stream {self.settings.stream} (sequence "
                    f"{state.last_seq}) has no {POSITION} header: is something else "
                    "publishing to its subjects?"
                )
            in_stream = int(headers[POSITION])
            head = await self.store.max_position()
            if in_stream > head:
                # Resuming "after" it would silently skip this store's first events.
                raise RelayOutOfStep(
                    f"stream {self.settings.stream} already holds position {in_stream}, but "
                    f"this event store ends at {head}: the stream belongs to another event "
                    "store (give each deployment its own ALMANAC_NATS_STREAM and "
                    "ALMANAC_NATS_SUBJECT_PREFIX)"
                )
        checkpoint = await self.store.consumer_position(self.name)
        self.sequence = state.last_seq
        if not in_stream:
            # New, purged, or every message aged out: only the checkpoint knows how far
            # publishing got, and what has aged out must not come back.
            self.position = checkpoint
        else:
            # The stream is the record of what was published; a checkpoint ahead of it means
            # NATS lost messages it had acknowledged, and those are published again.
            self.position = in_stream
            if checkpoint > in_stream:
                log.warning(
                    "relay.stream_behind_checkpoint",
                    stream=self.settings.stream,
                    stream_position=in_stream,
                    checkpoint=checkpoint,
                )
        self._checkpointed = max(self._checkpointed, checkpoint)
        log.info(
            "relay.resumed",
            stream=self.settings.stream,
            position=self.position,
            stream_position=in_stream,
            checkpoint=checkpoint,
            sequence=self.sequence,
        )

    def _compare_max_payload(self) -> None:
        """Warn, once per value the server gives, if the event store may hold events whose
        messages this server would refuse."""
        max_payload = int(self._client.max_payload)
        if max_payload == self._max_payload_seen:
            return
        self._max_payload_seen = max_payload
        if self.max_event_bytes is not None and self.max_event_bytes + ENVELOPE_ROOM > max_payload:
            log.warning(
                "relay.max_payload_below_event_limit",
                max_payload=max_payload,
                max_event_bytes=self.max_event_bytes,
                remedy=(
                    "raise max_payload in the NATS server's configuration file to at least "
                    f"{self.max_event_bytes + ENVELOPE_ROOM} and restart it, or lower "
                    "ALMANAC_MAX_EVENT_BYTES"
                ),
            )

    async def _ensure_stream(self, js: Any) -> None:
        config = stream_config(self.settings)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            # 10058: the stream exists with another configuration; bring it up to date.
            if exc.err_code != 10058:
                raise
            await js.update_stream(config)
            log.info("relay.stream_updated", stream=self.settings.stream)

    async def _publish(self, events: list[RecordedEvent]) -> None:
        """Publish in windows; positions move on only as a window is acknowledged in full."""
        window = self.settings.window
        start = 0
        while start < len(events):
            chunk = events[start : start + window]
            futures = await self._send(chunk, self.sequence)
            try:
                await self._settle(chunk[: len(futures)], futures)
            finally:
                # Unanswered publishes give their slots back; the resync decides anew.
                for future in futures:
                    if not future.done():
                        future.cancel()
            start += len(futures)
        log.debug(
            "relay.published",
            events=len(events),
            position=self.position,
            sequence=self.sequence,
        )

    async def _send(self, events: list[RecordedEvent], after: int) -> list[asyncio.Future[Any]]:
        """Publish ``events`` up to the first one too large for the server (raising
        ``EventTooLargeToPublish`` if that is the first): the ones before it are settled
        first, so the relay stops in step, right before it."""
        js = self._js if self._js is not None else await self._jetstream()
        prefix = self.settings.subject_prefix
        max_payload = int(self._client.max_payload)
        futures: list[asyncio.Future[Any]] = []
        too_large: EventTooLargeToPublish | None = None
        try:
            for expected, event in enumerate(events, start=after):
                headers = headers_for(event)
                headers[EXPECTED_LAST_SEQUENCE] = str(expected)
                payload = encode_event(event)
                # Checked here, headers included: nats-py checks the payload alone, and the
                # server closes the connection of a client whose message (headers and
                # payload) is over max_payload; and a publish_async that nats-py refuses
                # keeps its slot of the pending window for good. Every header's value is in
                # the payload too, so only a payload near half of max_payload needs its
                # headers counted (3 µs an event otherwise).
                size = len(payload)
                if 2 * size + HEADER_NAMES > max_payload:
                    size += header_bytes(headers)
                    if size > max_payload:
                        too_large = EventTooLargeToPublish(event, size, max_payload)
                        break
                # No stall timeout: one window is never more than nats-py's pending limit, so
                # this never waits; and without a timeout it does not yield to the loop either,
                # which lets the client write the whole window in a few socket sends.
                try:
                    future = await js.publish_async(
                        subject_for(prefix, event.type), payload, headers=headers
                    )
                except MaxPayloadError:
                    # The server's max_payload changed under the check (a reconnect).
                    size = len(payload) + header_bytes(headers)
                    too_large = EventTooLargeToPublish(event, size, int(self._client.max_payload))
                    # nats-py took a slot of the context's pending window for this publish
                    # and never gives it back: the next window starts on a fresh context.
                    self._client = self._js = None
                    break
                futures.append(future)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        if too_large is not None and not futures:
            raise too_large
        return futures

    async def _settle(
        self, events: list[RecordedEvent], futures: list[asyncio.Future[Any]]
    ) -> None:
        """Wait for a window's acks; each must be stored right after the one before."""
        _, pending = await asyncio.wait(futures, timeout=self.settings.ack_timeout)
        if pending:
            raise RelayOutOfStep(
                f"{len(pending)} of {len(futures)} publishes not acknowledged "
                f"within {self.settings.ack_timeout:g} s"
            )
        # Every outcome is looked at (an unread failure would be reported as lost);
        # the first one out of step decides.
        problems = [
            problem
            for want, (event, future) in enumerate(
                zip(events, futures, strict=True), start=self.sequence + 1
            )
            if (problem := _out_of_step(event, future, want)) is not None
        ]
        if problems:
            raise problems[0]
        self.sequence += len(futures)
        self.position = events[-1].position
        self.published += len(futures)

    async def _checkpoint(self, *, force: bool = False) -> None:
        if self.position <= self._checkpointed:
            return
        now = time.monotonic()
        if not force and now - self._checkpointed_at < CHECKPOINT_INTERVAL:
            return
        try:
            await self.store.save_consumer_position(self.name, self.position)
        except Exception as exc:
            if not force:
                raise
            # On the way out: the stream still holds the resume point.
            log.warning("relay.checkpoint_failed", position=self.position, error=str(exc))
            return
        self._checkpointed = self.position
        self._checkpointed_at = now
