"""The work feed on JetStream (services profile): a durable pull consumer of the relay's
stream that competing workers share.

Every worker process binds to the same durable consumer, filtered to the subject of one
event type, so each message goes to one worker at a time. A message is acknowledged only
once its work is done; one that is handed back (``nak``) or left unacknowledged past the
ack wait, because its worker died, is delivered again, to whichever worker asks next, up
to the configured max deliveries, then once more marked exhausted (the consumer's own
``max_deliver`` is one higher). The consumer is created, or updated to the configured
settings, when a worker opens the feed.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import msgspec
import nats.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from almanac.adapters.nats import NatsConnection
from almanac.domain.events import EventMeta
from almanac.feed import Delivery, FeedNotReady
from almanac.settings import RelaySettings, WorkerSettings
from streams.relay import (
    AGGREGATE_ID,
    CAUSATION_ID,
    CORRELATION_ID,
    EVENT_TYPE,
    OWNER,
    POSITION,
    subject_for,
)

log = structlog.get_logger("almanac.jetstream")

# A stream still missing after this long is no longer a deployment starting: a warning.
MISSING_WARNING_AFTER = 30.0

# How long a JetStream API call (creating the consumer, a synchronous ack) may take.
API_TIMEOUT = 5.0


class StreamEvent(msgspec.Struct, frozen=True):
    """A stored event as its message's headers describe it (the worker reloads the rest)."""

    position: int
    type: str
    aggregate_id: UUID
    meta: EventMeta


def event_of(headers: dict[str, str]) -> StreamEvent:
    """The event a message of the relay's stream carries; ``ValueError`` if it is not one."""
    try:
        return StreamEvent(
            position=int(headers[POSITION]),
            type=headers[EVENT_TYPE],
            aggregate_id=UUID(headers[AGGREGATE_ID]),
            meta=EventMeta(headers[OWNER], headers[CORRELATION_ID], headers[CAUSATION_ID]),
        )
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]} header") from None


def consumer_config(
    worker: WorkerSettings, relay: RelaySettings, event_type: str | None
) -> ConsumerConfig:
    """The durable consumer of ``event_type`` messages, or of every message (``None``)."""
    return ConsumerConfig(
        durable_name=worker.consumer,
        description=f"Almanac {worker.consumer}: {event_type or 'every event'}",
        # From the stream's first message: a request stored before any worker ran is work too.
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=worker.ack_wait,
        # One delivery more than the work gets: the last is marked exhausted, for the
        # consumer to record the event as given up (see ``JetStreamDelivery.exhausted``).
        max_deliver=worker.max_deliver + 1 if worker.max_deliver != -1 else -1,
        filter_subject=(
            subject_for(relay.subject_prefix, event_type)
            if event_type is not None
            else f"{relay.subject_prefix}.>"
        ),
    )


class JetStreamDelivery:
    def __init__(self, message: Any, event: StreamEvent, max_deliver: int) -> None:
        self._message = message
        self._event = event
        self._max_deliver = max_deliver

    @property
    def event(self) -> StreamEvent:
        return self._event

    @property
    def attempt(self) -> int:
        return int(self._message.metadata.num_delivered)

    @property
    def exhausted(self) -> bool:
        return self._max_deliver != -1 and self.attempt > self._max_deliver

    async def ack(self) -> None:
        # Acknowledged by the server before the caller moves on: a lost ack would only
        # mean a redelivery, but a confirmed one makes "done is never delivered again" firm.
        await self._message.ack_sync(timeout=API_TIMEOUT)

    async def nak(self, delay: float = 0.0) -> None:
        await self._message.nak(delay=delay or None)

    async def in_progress(self) -> None:
        await self._message.in_progress()


class JetStreamWorkFeed:
    def __init__(
        self,
        nats: NatsConnection,
        relay: RelaySettings,
        worker: WorkerSettings,
        *,
        event_type: str | None,
    ) -> None:
        self.nats = nats
        self.relay = relay
        self.worker = worker
        self.event_type = event_type
        self._client: Any = None
        self._subscription: Any = None
        # Since when the stream has been missing (None: it was there at the last open).
        self._missing_since: float | None = None
        self._missing_warned = False

    def _stream_missing(self) -> None:
        """Said once as a deployment starts; a warning once it has lasted (no relay?)."""
        now = time.monotonic()
        if self._missing_since is None:
            self._missing_since = now
            log.info("workfeed.waiting_for_stream", stream=self.relay.stream)
        elif not self._missing_warned and now - self._missing_since > MISSING_WARNING_AFTER:
            self._missing_warned = True
            log.warning(
                "workfeed.stream_missing",
                stream=self.relay.stream,
                seconds=round(now - self._missing_since),
                hint="a relay creates it: is one running on this stream?",
            )

    async def open(self) -> None:
        client = await self.nats.connect()
        js = client.jetstream(timeout=API_TIMEOUT)
        config = consumer_config(self.worker, self.relay, self.event_type)
        try:
            # Creates the durable consumer, or brings an existing one up to this config.
            info = await js.add_consumer(self.relay.stream, config)
        except nats.js.errors.NotFoundError as exc:
            # The relay creates the stream; a worker may well start first.
            self._stream_missing()
            raise FeedNotReady(
                f"stream {self.relay.stream} does not exist yet (a relay creates it)"
            ) from exc
        # A subscription bound before (on a replaced connection, or before a failed fetch)
        # goes first: the server would deliver to a pull request it left waiting, into an
        # inbox nobody reads, and that message would wait out the ack wait.
        await self._unbind()
        self._subscription = await js.pull_subscribe_bind(
            durable=self.worker.consumer, stream=self.relay.stream
        )
        self._client = client
        self._missing_since, self._missing_warned = None, False
        log.info(
            "workfeed.consumer_ready",
            stream=self.relay.stream,
            consumer=self.worker.consumer,
            subject=config.filter_subject,
            ack_wait=info.config.ack_wait,
            max_deliver=info.config.max_deliver,
            pending=info.num_pending,
        )

    async def fetch(self, limit: int, timeout: float) -> list[Delivery]:
        if self._subscription is None or self._client is not await self.nats.connect():
            # First use, or the connection was replaced: bind anew.
            await self.open()
        try:
            messages = await self._subscription.fetch(limit, timeout=max(timeout, 0.01))
        except TimeoutError:
            # Nothing came (nats-py raises its own subclass, or asyncio's, depending on when).
            return []
        except Exception:
            # Bind anew on the next fetch: the consumer may have been deleted, say.
            self._client = None
            raise
        deliveries: list[Delivery] = []
        for message in messages:
            try:
                event = event_of(dict(message.headers or {}))
            except ValueError as exc:
                # Not the relay's (the relay is the stream's only publisher): never work.
                log.exception(
                    "workfeed.message_refused",
                    subject=message.subject,
                    sequence=message.metadata.sequence.stream,
                    error=str(exc),
                )
                await message.term()
                continue
            deliveries.append(JetStreamDelivery(message, event, self.worker.max_deliver))
        return deliveries

    async def close(self) -> None:
        await self._unbind()

    async def _unbind(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except nats.errors.ConnectionClosedError:
                pass  # its inbox went with the connection
            except Exception as exc:  # noqa: BLE001 - unbinding must not fail a fetch or a shutdown
                log.warning("workfeed.unsubscribe_failed", error=str(exc))
