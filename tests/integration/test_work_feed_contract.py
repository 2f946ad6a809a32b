"""The WorkFeed contract, run against each implementation: the event store's log with a
tracked position (embedded) and a JetStream durable pull consumer (services).

Each ``open_feed()`` is a consumer of its own, as in another worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest
import structlog

import streams.jetstream
from almanac.adapters.nats import NatsConnection
from almanac.domain.chart import calculate_chart
from almanac.eventstore import EventStore
from almanac.feed import Delivery, FeedNotReady, WorkFeed
from almanac.settings import Settings, WorkerSettings
from streams.jetstream import JetStreamWorkFeed
from streams.logfeed import LogFeed
from streams.logwork import LogWorkFeed
from tests.conftest import embedded_settings, services_settings
from tests.factories import birth, new_reading
from tests.integration.support_containers import running
from tests.integration.support_eventlog import REQUESTED
from tests.integration.support_waiting import eventually

# Short, so that what is left unanswered comes back within a test's patience.
ACK_WAIT = 1.0
WORKER = WorkerSettings(ack_wait=ACK_WAIT, max_deliver=-1)


class Source(Protocol):
    store: EventStore

    async def open_feed(self, worker: WorkerSettings = WORKER) -> WorkFeed: ...


async def request(store: EventStore, count: int) -> list[int]:
    """Append ``count`` requested readings, each followed by an event of another type (which
    no feed of ``reading.requested`` may deliver); return the requests' positions."""
    positions = []
    for _ in range(count):
        reading = new_reading()
        meta = reading.pending_events[0].meta
        requested = await store.append(reading)
        reading.record_chart(calculate_chart(birth()), meta.caused_by(requested))
        await store.append(reading)
        positions.append(requested)
    return positions


async def take(
    feed: WorkFeed, count: int, *, ack: bool = True, within: float = 20
) -> list[Delivery]:
    """Fetch until ``count`` deliveries came (acknowledging each, unless told not to)."""
    got: list[Delivery] = []

    async def enough() -> bool:
        for delivery in await feed.fetch(count - len(got), timeout=0.2):
            got.append(delivery)
            if ack:
                await delivery.ack()
        return len(got) >= count

    try:
        await eventually(enough, within=within, what=f"{count} deliveries")
    except pytest.fail.Exception as failed:
        # What the server holds tells a stream that never got the events from a consumer
        # that did not hand them out.
        raise AssertionError(f"{failed}; {await state_of(feed)}") from None
    return got


async def state_of(feed: WorkFeed) -> str:
    """The stream and consumer as the server sees them (JetStream), for a failure message."""
    if not isinstance(feed, JetStreamWorkFeed):
        return "no server state to show"
    js = (await feed.nats.connect()).jetstream()
    stream = await js.stream_info(feed.relay.stream)
    consumer = await js.consumer_info(feed.relay.stream, feed.worker.consumer)
    return (
        f"stream {stream.state.messages} messages, last sequence {stream.state.last_seq}; "
        f"consumer pending {consumer.num_pending}, unacknowledged {consumer.num_ack_pending}, "
        f"redelivered {consumer.num_redelivered}, pull requests waiting {consumer.num_waiting}, "
        f"delivered up to stream sequence {consumer.delivered.stream_seq}; "
        f"{client_side(feed)}"
    )


def client_side(feed: JetStreamWorkFeed) -> str:
    """What reached this consumer's client: tells a message lost on the way from one the
    client holds but did not hand out."""
    client, subscription = feed.nats.client, feed._subscription
    if subscription is None:
        return "client: no subscription bound"
    return (
        f"client: {subscription.delivered} messages received on the subscription, "
        f"{subscription.pending_msgs} waiting in its queue; connected {client.is_connected}, "
        f"reconnects {client.stats['reconnects']}, errors {client.stats['errors_received']}"
    )


async def everything_within(feed: WorkFeed, seconds: float) -> list[Delivery]:
    """Every delivery in the next ``seconds`` (acknowledged), for "nothing else comes"."""
    got: list[Delivery] = []
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.1) + 2):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for delivery in await feed.fetch(10, timeout=min(remaining, 0.5)):
            got.append(delivery)
            await delivery.ack()
    return got


def positions_of(deliveries: list[Delivery]) -> list[int]:
    return [d.event.position for d in deliveries]


class WorkFeedContract:
    @pytest.fixture
    def source(self) -> Source:
        raise NotImplementedError

    async def test_delivers_every_event_of_its_type_and_no_other(self, source: Source) -> None:
        requested = await request(source.store, 12)
        feed = await source.open_feed()
        got = await take(feed, 12)
        assert sorted(positions_of(got)) == requested
        assert {d.event.type for d in got} == {REQUESTED}
        assert {d.attempt for d in got} == {1}
        assert {d.exhausted for d in got} == {False}
        # Each delivery names its event as stored.
        for delivery in got:
            [stored] = await source.store.read(delivery.event.position - 1, 1)
            assert delivery.event.aggregate_id == stored.aggregate_id
            assert delivery.event.meta == stored.meta
        await feed.close()

    async def test_a_single_consumer_gets_first_deliveries_in_position_order(
        self, source: Source
    ) -> None:
        requested = await request(source.store, 15)
        feed = await source.open_feed()
        got = await take(feed, 15)
        assert positions_of(got) == requested
        await feed.close()

    async def test_a_handed_back_event_is_delivered_again(self, source: Source) -> None:
        [position] = await request(source.store, 1)
        feed = await source.open_feed()
        [first] = await take(feed, 1, ack=False)
        await first.nak()
        [again] = await take(feed, 1)
        assert (again.event.position, again.attempt) == (position, 2)
        await feed.close()

    async def test_an_event_left_unanswered_is_delivered_again_after_the_ack_wait(
        self, source: Source
    ) -> None:
        [position] = await request(source.store, 1)
        feed = await source.open_feed()
        started = time.monotonic()
        await take(feed, 1, ack=False)
        [again] = await take(feed, 1, within=ACK_WAIT + 20)
        assert time.monotonic() - started >= ACK_WAIT * 0.9
        assert (again.event.position, again.attempt) == (position, 2)
        await feed.close()

    async def test_what_a_closed_consumer_left_unacknowledged_goes_to_the_next(
        self, source: Source
    ) -> None:
        requested = await request(source.store, 5)
        first = await source.open_feed()
        got = await take(first, 5, ack=False)
        for delivery in got[:2]:
            await delivery.ack()
        await first.close()
        second = await source.open_feed()
        again = await take(second, 3, within=ACK_WAIT + 20)
        assert sorted(positions_of(again)) == requested[2:]
        await second.close()

    async def test_after_max_deliver_tries_an_event_comes_once_more_marked_exhausted(
        self, source: Source
    ) -> None:
        """Handed back every time, even on the exhausted delivery: then it never comes again."""
        [position] = await request(source.store, 1)
        feed = await source.open_feed(msgspec.structs.replace(WORKER, max_deliver=2))
        seen = []
        for _ in range(3):
            [delivery] = await take(feed, 1, ack=False)
            seen.append((delivery.event.position, delivery.attempt, delivery.exhausted))
            await delivery.nak()
        assert seen == [(position, 1, False), (position, 2, False), (position, 3, True)]
        assert await everything_within(feed, ACK_WAIT * 2) == []
        await feed.close()

    async def test_a_last_try_left_unanswered_comes_once_more_marked_exhausted(
        self, source: Source
    ) -> None:
        """As when the worker holding the last try dies: the dead letter is still recorded."""
        [position] = await request(source.store, 1)
        feed = await source.open_feed(msgspec.structs.replace(WORKER, max_deliver=1))
        [only_try] = await take(feed, 1, ack=False)
        assert (only_try.attempt, only_try.exhausted) == (1, False)
        [last] = await take(feed, 1, ack=False, within=ACK_WAIT + 20)
        assert (last.event.position, last.attempt, last.exhausted) == (position, 2, True)
        await last.ack()
        assert await everything_within(feed, ACK_WAIT * 2) == []
        await feed.close()

    async def test_acknowledged_events_are_not_delivered_again(self, source: Source) -> None:
        await request(source.store, 6)
        first = await source.open_feed()
        await take(first, 6)
        await first.close()
        second = await source.open_feed()
        [later] = await request(source.store, 1)
        [next_one] = await take(second, 1)
        assert next_one.event.position == later
        assert await everything_within(second, ACK_WAIT * 2) == []
        await second.close()


class TestLogWorkFeed(WorkFeedContract):
    @pytest.fixture
    async def source(self, tmp_path: Path) -> AsyncIterator[Source]:
        settings = embedded_settings(tmp_path / "var")
        store = EventStore(settings)
        log = LogFeed(store, poll_interval=0.05)
        await log.start()
        opened: list[WorkFeed] = []

        class LogSource:
            def __init__(self) -> None:
                self.store = store

            async def open_feed(self, worker: WorkerSettings = WORKER) -> WorkFeed:
                # Small batches: the feed reads the log in several pages.
                feed = LogWorkFeed(store, log, worker, event_type=REQUESTED, batch_size=4)
                await feed.open()
                opened.append(feed)
                return feed

        try:
            yield LogSource()
        finally:
            for feed in opened:
                await feed.close()
            await log.stop()
            store.close()


class TestJetStreamWorkFeed(WorkFeedContract):
    @pytest.fixture
    async def source(self, postgres_url: str) -> AsyncIterator[Source]:
        settings: Settings = services_settings(postgres_url)
        assert settings.feed.nats_url is not None
        url = settings.feed.nats_url
        connections: list[NatsConnection] = []
        opened: list[WorkFeed] = []

        # The stream is fed as in production: by the relay, from the event store's log.
        async with running(settings, roles=("relay",)) as container:

            class JetStreamSource:
                def __init__(self) -> None:
                    self.store = container.store

                async def open_feed(self, worker: WorkerSettings = WORKER) -> WorkFeed:
                    # A connection of its own, as a worker process has.
                    nats = NatsConnection(url)
                    connections.append(nats)
                    feed = JetStreamWorkFeed(nats, settings.relay, worker, event_type=REQUESTED)
                    await opened_when_the_stream_exists(feed)
                    opened.append(feed)
                    return feed

            try:
                yield JetStreamSource()
            finally:
                for feed in opened:
                    await feed.close()
                for nats in connections:
                    await nats.close()

    async def test_competing_consumers_share_the_events_each_once(self, source: Source) -> None:
        requested = await request(source.store, 40)
        first, second = await source.open_feed(), await source.open_feed()
        got: dict[str, list[Delivery]] = {"first": [], "second": []}

        async def all_taken() -> bool:
            # A few at a time, as a worker takes only what it has hands for.
            for name, feed in (("first", first), ("second", second)):
                for delivery in await feed.fetch(3, timeout=0.1):
                    got[name].append(delivery)
                    await delivery.ack()
            return len(got["first"]) + len(got["second"]) >= len(requested)

        await eventually(all_taken, what="every request taken by one consumer or the other")
        firsts, seconds = set(positions_of(got["first"])), set(positions_of(got["second"]))
        assert firsts and seconds, "both consumers got some of the work"
        assert not firsts & seconds
        assert sorted(firsts | seconds) == requested
        assert await everything_within(first, ACK_WAIT * 2) == []

    async def test_binding_anew_leaves_no_inbox_behind_to_take_the_next_event(
        self, source: Source
    ) -> None:
        """A pull request that the replaced subscription left waiting at the server must not
        take the next event into an inbox nobody reads (it would wait out the ack wait)."""
        worker = msgspec.structs.replace(WORKER, ack_wait=60.0)
        feed: Any = await source.open_feed(worker)
        js = (await feed.nats.connect()).jetstream()
        left_waiting = asyncio.create_task(feed.fetch(1, timeout=30))

        async def pull_request_waiting() -> bool:
            info = await js.consumer_info(feed.relay.stream, worker.consumer)
            return bool(info.num_waiting)

        await eventually(pull_request_waiting, what="the first pull request waits at the server")
        left_waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await left_waiting
        await feed.open()
        [position] = await request(source.store, 1)
        [delivery] = await take(feed, 1, within=20)
        assert (delivery.event.position, delivery.attempt) == (position, 1)
        await feed.close()

    async def test_opening_updates_the_consumer_to_the_configured_settings(
        self, source: Source
    ) -> None:
        first = await source.open_feed()
        await first.close()
        changed = msgspec.structs.replace(WORKER, ack_wait=7.0, max_deliver=4)
        second: Any = await source.open_feed(changed)
        client = await second.nats.connect()
        info = await client.jetstream().consumer_info(second.relay.stream, changed.consumer)
        # One more than configured: the delivery marked exhausted.
        assert (info.config.ack_wait, info.config.max_deliver) == (7.0, 5)


async def opened_when_the_stream_exists(feed: WorkFeed) -> None:
    """The relay creates the stream when it starts; until then, opening fails."""

    async def opened() -> bool:
        try:
            await feed.open()
        except Exception:  # noqa: BLE001 - not yet: the stream is still being created
            return False
        return True

    await eventually(opened, within=30, what="the work feed opens on the relay's stream")


async def test_a_feed_on_a_stream_no_relay_has_created_is_not_ready(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its consumers wait for it without warning (see the worker's tests): the feed says so
    once, and warns once when the wait has lasted."""
    monkeypatch.setattr(streams.jetstream, "MISSING_WARNING_AFTER", 0.0)
    settings: Settings = services_settings(postgres_url)
    assert settings.feed.nats_url is not None
    relay = msgspec.structs.replace(settings.relay, stream=f"NEVER_{uuid.uuid4().hex[:8]}")
    nats = NatsConnection(settings.feed.nats_url)
    try:
        feed = JetStreamWorkFeed(nats, relay, WORKER, event_type=REQUESTED)
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(FeedNotReady, match=f"stream {relay.stream} does not exist"):
                    await feed.open()
        said = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("workfeed.")]
        assert said == [
            ("workfeed.waiting_for_stream", "info"),
            ("workfeed.stream_missing", "warning"),
        ]
    finally:
        await nats.close()
