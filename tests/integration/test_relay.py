"""The relay, checked from outside: a plain nats-py subscriber reading the stream from
sequence 1 sees every stored event exactly once, in position order, with no gap, in normal
flow and across a killed relay, a restarted NATS and a standby taking over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import msgspec
import nats
import pytest
import structlog
from nats.js.api import StreamConfig

from almanac.app import health_ready
from almanac.bootstrap import bootstrap
from almanac.domain.access import hash_secret
from almanac.domain.batch import Batch, BatchItem
from almanac.eventstore import EventStore, RecordedEvent
from almanac.settings import Profile, Settings
from streams.relay import Relay, RelayOutOfStep, subject_for
from tests.conftest import NATS_URL, embedded_settings, services_settings
from tests.factories import birth, meta, new_reading
from tests.integration.support_containers import running, settled
from tests.integration.support_eventlog import (
    CHART_CALCULATED,
    GENERATED,
    REQUESTED,
    whole_log,
)
from tests.integration.support_nats import (
    PrivateNats,
    Received,
    StreamReader,
    stream_message_count,
)
from tests.integration.support_processes import RoleProcess, RoleProcesses
from tests.integration.support_waiting import eventually

# Each test kills or stops something once this many messages are in the stream, and lets
# the flow go on until as many more have arrived after it.
MID_FLOW = 500


@pytest.fixture
def settings(postgres_url: str) -> Settings:
    """Services only: the relay needs NATS. Stream and subjects are this test's own."""
    return services_settings(postgres_url)


def reader_of(settings: Settings, url: str = NATS_URL) -> StreamReader:
    relay = settings.relay
    return StreamReader(url, relay.stream, f"{relay.subject_prefix}.>")


class Flow:
    """Appends readings in small transactions, as commands would, until stopped (bounded)."""

    def __init__(self, store: EventStore, *, batch: int = 10, max_batches: int = 3000) -> None:
        self.store = store
        self.batch = batch
        self.max_batches = max_batches
        self.appended = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for _ in range(self.max_batches):
            if self._stopping.is_set():
                return
            await self.store.append(*(new_reading() for _ in range(self.batch)))
            self.appended += self.batch

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def appended_at_least(self, count: int) -> None:
        async def enough() -> bool:
            assert self._task is not None
            if self._task.done():
                self._task.result()
            return self.appended >= count

        await eventually(enough, within=60, what=f"{count} events appended")

    @contextlib.asynccontextmanager
    async def going(self) -> AsyncIterator[Flow]:
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._stopping.set()
            await self._task


@contextlib.asynccontextmanager
async def event_store(settings: Settings) -> AsyncIterator[EventStore]:
    store = EventStore(settings)
    try:
        yield store
    finally:
        await asyncio.to_thread(store.close)


async def assert_every_event_once_in_order(
    received: list[Received], store: EventStore, settings: Settings, url: str = NATS_URL
) -> None:
    log = await whole_log(store)
    assert log, "nothing was appended"
    assert [m.position for m in received] == [e.position for e in log], (
        "positions in the stream differ from the event store's log"
    )
    assert [m.sequence for m in received] == list(range(1, len(log) + 1))
    assert await stream_message_count(url, settings.relay.stream) == len(log)
    prefix = settings.relay.subject_prefix
    by_position = {event.position: event for event in log}
    checked_at = datetime.now(UTC)
    for message, event in zip(received, log, strict=True):
        assert message.subject == subject_for(prefix, event.type)
        assert message.headers["Nats-Msg-Id"] == str(event.position)
        assert message.headers["Almanac-Aggregate-Id"] == str(event.aggregate_id)
        assert message.headers["Almanac-Aggregate-Version"] == str(event.aggregate_version)
        assert message.headers["Almanac-Event-Type"] == event.type
        assert message.payload["position"] == event.position
        assert message.payload["type"] == event.type
        assert message.payload["aggregate_id"] == str(event.aggregate_id)
        assert message.payload["metadata"] == msgspec.to_builtins(event.meta)
        assert_owner_and_time(message, event, checked_at)
        assert_caused_by_a_request_or_an_earlier_event(message, event, by_position)


def assert_owner_and_time(message: Received, event: RecordedEvent, before: datetime) -> None:
    """``Almanac-Owner`` and ``Almanac-Occurred-At`` say what the event and its payload say:
    the owner it belongs to, and when it was recorded as an RFC 3339 UTC timestamp."""
    headers, metadata = message.headers, message.payload["metadata"]
    assert headers["Almanac-Owner"] == event.meta.owner == metadata["owner"], event.position
    occurred_at = headers["Almanac-Occurred-At"]
    assert occurred_at == message.payload["occurred_at"], event.position
    assert occurred_at.endswith("Z"), occurred_at
    moment = datetime.fromisoformat(occurred_at)
    assert moment.utcoffset() == timedelta(0), occurred_at
    assert moment == event.occurred_at, event.position
    assert moment <= before, f"{occurred_at} is after the stream was read"


def assert_caused_by_a_request_or_an_earlier_event(
    message: Received, event: RecordedEvent, log: dict[int, RecordedEvent]
) -> None:
    """``Almanac-Correlation-Id`` and ``Almanac-Causation-Id`` are the event's, and the
    causation names a request of that correlation or an earlier event of the same chain."""
    correlation_id = message.headers["Almanac-Correlation-Id"]
    causation_id = message.headers["Almanac-Causation-Id"]
    assert (correlation_id, causation_id) == (event.meta.correlation_id, event.meta.causation_id)
    assert correlation_id, event.position
    kind, _, cause = causation_id.partition(":")
    # A request, or a webhook message (the deliverer disabling an endpoint), starts a chain.
    if kind in {"request", "webhook"}:
        assert cause == correlation_id, causation_id
        return
    assert kind == "position", causation_id
    assert int(cause) < event.position, causation_id
    caused_by = log.get(int(cause))
    assert caused_by is not None, f"{causation_id} is not in the log"
    chain = (caused_by.meta.correlation_id, caused_by.meta.owner)
    assert chain == (correlation_id, event.meta.owner), causation_id


async def until_in_stream(reader: StreamReader, count: int, *processes: RoleProcess) -> int:
    """Wait until the reader has ``count`` messages, failing early if a relay process ended."""

    async def enough() -> bool:
        for process in processes:
            process.ensure_running()
        return len(reader.received) >= count

    await eventually(enough, within=60, what=f"{count} messages read from the stream")
    return len(reader.received)


async def test_every_event_reaches_a_subscriber_once_in_position_order(
    settings: Settings,
) -> None:
    begun = datetime.now(UTC)
    async with (
        running(settings, roles=("worker", "relay")) as container,
        reader_of(settings) as reader,
    ):
        issued = await asyncio.to_thread(
            container.keyring.issue, name="ops", role="admin", owner="own_ops"
        )
        readings = [new_reading(owner=f"owner-{i % 3}") for i in range(30)]
        for reading in readings:
            await container.store.append(reading)
        await settled(container, [r.id for r in readings])
        count = await container.store.max_position()
        received = await reader.until_count(count)
        await assert_every_event_once_in_order(received, container.store, settings)

    assert {m.headers["Almanac-Owner"] for m in received} == {
        "own_ops",
        *(f"owner-{i}" for i in range(3)),
    }
    occurred = [datetime.fromisoformat(m.headers["Almanac-Occurred-At"]) for m in received]
    assert min(occurred) >= begun, "recorded before the test began"
    types = [m.payload["type"] for m in received]
    assert types.count(REQUESTED) == types.count(CHART_CALCULATED) == types.count(GENERATED) == 30
    [key] = [m for m in received if m.payload["type"] == "api_key.issued"]
    assert key.subject == f"{settings.relay.subject_prefix}.api_key.issued"
    assert key.payload["data"]["key_hash"] == hash_secret(issued.secret)
    assert issued.secret not in str(key.payload)
    generated = next(m for m in received if m.payload["type"] == GENERATED)
    assert generated.payload["data"]["text"]["generator"] == "builtin"
    assert generated.payload["metadata"]["causation_id"].startswith("position:")


async def test_the_stream_is_created_with_the_configured_limits_or_brought_up_to_them(
    settings: Settings,
) -> None:
    client = await nats.connect(NATS_URL)
    try:
        js = client.jetstream()
        # As left by an older version: other limits, a longer duplicate window.
        await js.add_stream(
            StreamConfig(
                name=settings.relay.stream,
                subjects=[f"{settings.relay.subject_prefix}.>"],
                duplicate_window=600,
                max_age=3600,
            )
        )
        async with running(settings, roles=("relay",)) as container:
            await container.store.append(new_reading())

            async def updated() -> bool:
                info = await js.stream_info(settings.relay.stream)
                return info.config.duplicate_window == settings.relay.duplicate_window

            await eventually(updated, what="the stream brought up to the configured settings")
        config = (await js.stream_info(settings.relay.stream)).config
        assert config.max_age == settings.relay.max_age
        assert (config.retention, config.storage) == ("limits", "file")
        assert config.max_bytes == -1
    finally:
        await client.close()


async def test_the_relay_role_is_inactive_on_the_embedded_profile(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "var")
    container = bootstrap(settings, roles=("relay",))
    assert settings.profile is Profile.EMBEDDED
    assert "relay" not in container.background
    try:
        await container.start()
        assert await container.readiness() == {"event_store": "ok", "read_models": "ok"}
    finally:
        await container.stop()


def test_the_services_profile_has_one_relay_for_the_configured_stream(
    settings: Settings,
) -> None:
    container = bootstrap(settings)
    try:
        [relay] = container.background["relay"]
        assert isinstance(relay, Relay)
        assert relay.name == f"relay:{settings.relay.stream}"
    finally:
        container.store.close()


async def test_a_relay_killed_mid_flow_publishes_every_event_once_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    """With a 1 s duplicate window, expired by the time the new relay starts: exactly once
    rests on resuming after the stream's last message, not on NATS dropping repeats."""
    async with event_store(settings) as store:
        await store.append(*(new_reading() for _ in range(200)))
        with RoleProcesses(settings, tmp_path, ALMANAC_NATS_DUPLICATE_WINDOW="1") as processes:
            first = processes.start("relay")
            async with reader_of(settings) as reader:
                async with Flow(store).going() as flow:
                    await until_in_stream(reader, MID_FLOW, first)
                    first.kill()
                    assert flow.running, "the relay was not killed mid-flow"
                    at_kill = len(reader.received)
                    second = processes.start("relay")
                    await until_in_stream(reader, at_kill + MID_FLOW, second)
                received = await reader.until_count(await store.max_position())
                await assert_every_event_once_in_order(received, store, settings)
            assert "relay.leading" in second.log_events()

            assert second.terminate(timeout=20) == 0, second.output()[-4000:]
            events = second.log_events()
            assert "relay.stopped" in events
            assert "almanac.stopped" in events


async def test_a_standby_relay_takes_over_when_the_leader_is_killed(
    settings: Settings, tmp_path: Path
) -> None:
    async with event_store(settings) as store:
        with RoleProcesses(settings, tmp_path, ALMANAC_RELAY_STANDBY_INTERVAL="0.2") as processes:
            leader = processes.start("relay")
            await eventually(
                lambda: _logged(leader, "relay.leading"), within=30, what="the first relay leads"
            )
            standby = processes.start("relay")
            await eventually(
                lambda: _logged(standby, "relay.standby"),
                within=30,
                what="the second relay waits as a standby",
            )
            async with reader_of(settings) as reader:
                async with Flow(store).going() as flow:
                    await until_in_stream(reader, MID_FLOW, leader, standby)
                    assert "relay.leading" not in standby.log_events()
                    leader.kill()
                    assert flow.running, "the leader was not killed mid-flow"
                    at_kill = len(reader.received)
                    await eventually(
                        lambda: _logged(standby, "relay.leading"),
                        within=30,
                        what="the standby takes over",
                    )
                    await until_in_stream(reader, at_kill + MID_FLOW, standby)
                received = await reader.until_count(await store.max_position())
                await assert_every_event_once_in_order(received, store, settings)


async def test_a_restarted_nats_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    with PrivateNats(tmp_path) as server:
        settings = msgspec.structs.replace(
            settings, feed=msgspec.structs.replace(settings.feed, nats_url=server.url)
        )
        stream = settings.relay.stream

        async def in_stream(count: int) -> None:
            async def enough() -> bool:
                relay.ensure_running()
                return await stream_message_count(server.url, stream) >= count

            await eventually(enough, within=60, what=f"{count} messages in the private stream")

        async with event_store(settings) as store:
            with RoleProcesses(settings, tmp_path, ALMANAC_RELAY_ACK_TIMEOUT="1") as processes:
                relay = processes.start("relay")
                async with Flow(store).going() as flow:
                    await in_stream(MID_FLOW)
                    server.kill()
                    assert flow.running, "NATS was not killed mid-flow"
                    # Commands go on while NATS is away; the relay catches up afterwards.
                    await flow.appended_at_least(flow.appended + 300)
                    server.start()
                    await in_stream(flow.appended + 300)
                total = await store.max_position()
                await in_stream(total)
                relay.ensure_running()
            async with reader_of(settings, server.url) as reader:
                received = await reader.until_count(total)
            await assert_every_event_once_in_order(received, store, settings, server.url)


async def _logged(process: RoleProcess, event: str) -> bool:
    process.ensure_running()
    return event in process.log_events()


async def test_a_stream_ahead_of_the_event_store_is_refused_not_skipped_over(
    settings: Settings,
) -> None:
    """A stream left by another event store must not make the relay skip this one's events."""
    container = bootstrap(settings, roles=("relay",))
    [relay] = container.background["relay"]
    assert isinstance(relay, Relay)
    client = await nats.connect(NATS_URL, connect_timeout=2)
    try:
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(
                name=settings.relay.stream, subjects=[f"{settings.relay.subject_prefix}.>"]
            )
        )
        await js.publish(
            subject_for(settings.relay.subject_prefix, REQUESTED),
            b"{}",
            headers={"Almanac-Position": "100", "Nats-Msg-Id": "100"},
        )
        await container.store.append(new_reading())
        with pytest.raises(RelayOutOfStep) as refused:
            await relay._synchronise()
        assert "another event store" in str(refused.value)
        assert relay.position == 0
    finally:
        await client.close()
        if container.nats is not None:
            await container.nats.close()
        container.store.close()


async def test_an_event_too_large_for_nats_stops_the_relay_at_it_loudly_until_nats_takes_it(
    settings: Settings, tmp_path: Path
) -> None:
    """An event stored under a limit above the server's max_payload: the relay publishes
    what comes before it, says why it stops (log and health), skips nothing, and goes on
    once the server is configured to take larger messages."""
    with PrivateNats(tmp_path) as server:  # max_payload: NATS's default, 1 MiB
        settings = msgspec.structs.replace(
            settings,
            feed=msgspec.structs.replace(settings.feed, nats_url=server.url),
            store=msgspec.structs.replace(settings.store, max_event_bytes=3 * 2**20 // 2),
        )
        items = [BatchItem(birth=birth())] * 7000  # ~1.2 MB as JSON
        big = Batch.start(batch_id=uuid4(), meta=meta(), items=items, label=None, request_hash="")
        with structlog.testing.capture_logs() as logs:
            async with running(settings, roles=("relay",)) as container:
                [relay] = container.background["relay"]
                assert isinstance(relay, Relay)
                before = await container.store.append(new_reading())
                at = await container.store.append(big)
                await container.store.append(new_reading())

                await eventually(lambda: _too_large_logged(logs, 2), what="two tries, logged")
                assert relay.position == before
                assert await stream_message_count(server.url, settings.relay.stream) == 1
                ready = await health_ready.fn(container)
                assert (ready.status_code, ready.content["degraded"]) == (200, [relay.name])
                problem = ready.content["checks"][relay.name]
                assert f"position {at}" in problem and "max_payload of 1,048,576" in problem

                server.kill()
                server.max_payload = "2MB"
                server.start()
                async with reader_of(settings, server.url) as reader:
                    received = await reader.until_count(3)
                    await assert_every_event_once_in_order(
                        received, container.store, settings, server.url
                    )
                assert container.role_problems() == {}
    [warning] = [e for e in logs if e["event"] == "relay.max_payload_below_event_limit"]
    assert warning["max_payload"] == 2**20
    entry = next(e for e in logs if e["event"] == "relay.event_too_large")
    assert (entry["position"], entry["event_type"], entry["max_payload"]) == (
        at,
        "batch.started",
        2**20,
    )
    assert entry["size"] > 2**20
    assert entry["aggregate_id"] == str(big.id)
    assert "relay.unblocked" in [e["event"] for e in logs]


async def _too_large_logged(logs: list[dict[str, object]], times: int) -> bool:
    return sum(e["event"] == "relay.event_too_large" for e in logs) >= times
