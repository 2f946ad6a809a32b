"""The WebSocket hub's NATS source against a real JetStream stream: every message handed
over once and in order, also when the hub falls further behind than the subscription
holds, and a closed connection ends it instead of leaving the hub waiting for ever."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
import structlog
from nats.errors import ConnectionClosedError
from nats.js.api import StreamConfig

from almanac.adapters.nats import NatsConnection
from streams.relay import AGGREGATE_ID, EVENT_TYPE, OWNER, POSITION
from streams.websocket import LiveEvent, NatsSource
from tests.conftest import NATS_URL, delete_nats_stream

pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture
def stream() -> Iterator[tuple[str, str]]:
    """A stream of the test's own: (name, subject prefix)."""
    run = uuid.uuid4().hex[:10]
    name = f"TEST_WS_{run}"
    yield name, f"test.ws{run}.events"
    delete_nats_stream(NATS_URL, name)


async def publish(name: str, prefix: str, count: int) -> None:
    """``count`` events, as the relay publishes them, at positions 1..count."""
    client = await nats.connect(NATS_URL, connect_timeout=2)
    try:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        for position in range(1, count + 1):
            headers = {
                POSITION: str(position),
                EVENT_TYPE: "reading.requested",
                AGGREGATE_ID: str(uuid.uuid4()),
                OWNER: "alice",
            }
            await client.publish(f"{prefix}.reading.requested", b"{}", headers=headers)
        await client.flush()
        info = await js.stream_info(name)
        assert info.state.messages == count
    finally:
        await client.close()


async def positions(events: AsyncIterator[list[LiveEvent]], until: int) -> list[int]:
    seen: list[int] = []
    async for batch in events:
        seen.extend(event.position for event in batch)
        if seen and seen[-1] >= until:
            break
    return seen


async def test_every_message_is_handed_over_once_in_order(stream: tuple[str, str]) -> None:
    name, prefix = stream
    source = NatsSource(NatsConnection(NATS_URL), prefix)
    await publish(name, prefix, 500)
    events = source.events(after=0)
    try:
        assert await positions(events, 500) == list(range(1, 501))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await source.nats.close()


async def test_a_hub_far_behind_reads_the_rest_again_from_the_stream(
    stream: tuple[str, str],
) -> None:
    """Far more messages arrive at once than the source holds for the hub: it subscribes
    again after the last one taken, and the hub still sees each once, in order."""
    name, prefix = stream
    source = NatsSource(NatsConnection(NATS_URL), prefix, behind_limit=50)
    await publish(name, prefix, 1000)
    events = source.events(after=0)
    try:
        with structlog.testing.capture_logs() as logs:
            assert await positions(events, 1000) == list(range(1, 1001))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await source.nats.close()
    assert any(entry["event"] == "websocket.reading_again" for entry in logs)


async def test_a_closed_connection_ends_the_source(stream: tuple[str, str]) -> None:
    name, prefix = stream
    connection = NatsConnection(NATS_URL)
    source = NatsSource(connection, prefix)
    await publish(name, prefix, 3)
    events: Any = source.events(after=0)
    assert await positions(events, 3) == [1, 2, 3]
    await connection.client.close()
    with pytest.raises(ConnectionClosedError):
        await events.__anext__()
