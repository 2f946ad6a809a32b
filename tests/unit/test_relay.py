"""What the relay puts on the wire: subjects, headers and the JSON envelope of each event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.domain.access import ApiKey, new_secret
from almanac.domain.chart import calculate_chart
from almanac.domain.events import EventMeta
from almanac.eventstore import RecordedEvent
from almanac.settings import RelaySettings
from streams.envelope import encode_event
from streams.relay import HEADER_NAMES, header_bytes, headers_for, stream_config, subject_for
from tests.factories import birth, new_reading

SUBJECT_TOKEN = st.from_regex(r"[a-z0-9_-]+", fullmatch=True)


def recorded(domain_event: Any, position: int) -> RecordedEvent:
    """A domain event as the event store hands it to the relay."""
    return RecordedEvent.of(domain_event, position)


@pytest.mark.parametrize(
    ("event_type", "subject"),
    [
        ("reading.requested", "almanac.events.reading.requested"),
        ("reading.chart_calculated", "almanac.events.reading.chart_calculated"),
        ("api_key.issued", "almanac.events.api_key.issued"),
        ("installation.initialised", "almanac.events.installation.initialised"),
        ("Reading.Requested", "almanac.events.reading.requested"),
    ],
)
def test_subject_is_the_prefix_then_the_lowercase_topic(event_type: str, subject: str) -> None:
    assert subject_for("almanac.events", event_type) == subject


def test_a_topic_that_is_not_a_subject_is_made_one() -> None:
    """Wildcards, spaces and empty parts would change what a subscription matches."""
    assert subject_for("p", "module:Thing Happened.*.>..x") == "p.module_thing_happened._._._.x"


@given(prefix=st.lists(SUBJECT_TOKEN, min_size=1, max_size=3), topic=st.text())
def test_every_subject_has_a_token_per_topic_part_and_no_wildcards(
    prefix: list[str], topic: str
) -> None:
    subject = subject_for(".".join(prefix), topic)
    tokens = subject.split(".")
    assert tokens[: len(prefix)] == prefix
    assert len(tokens) == len(prefix) + len(topic.split("."))
    assert all(token and "*" not in token and ">" not in token for token in tokens)
    assert subject == subject.lower()


def requested_event(position: int = 42) -> RecordedEvent:
    reading = new_reading(UUID("6f8bcba1-0015-5555-ac1f-30242823d162"), owner="own_1")
    [event] = reading.collect_events()
    return recorded(event, position)


def test_headers_carry_the_position_as_message_id_and_the_event_metadata() -> None:
    event = requested_event(position=42)
    headers = headers_for(event)
    assert headers == {
        "Nats-Msg-Id": "42",
        "Almanac-Position": "42",
        "Almanac-Aggregate-Id": "6f8bcba1-0015-5555-ac1f-30242823d162",
        "Almanac-Aggregate-Version": "1",
        "Almanac-Event-Type": "reading.requested",
        "Almanac-Occurred-At": headers["Almanac-Occurred-At"],
        "Almanac-Owner": "own_1",
        "Almanac-Correlation-Id": event.meta.correlation_id,
        "Almanac-Causation-Id": f"request:{event.meta.correlation_id}",
    }
    occurred = datetime.fromisoformat(headers["Almanac-Occurred-At"])
    assert occurred == event.occurred_at
    assert headers["Almanac-Occurred-At"].endswith("Z")


def test_the_payload_is_the_envelope_and_the_events_own_fields() -> None:
    event = requested_event(position=7)
    payload = msgspec.json.decode(encode_event(event))
    assert payload == {
        "position": 7,
        "type": "reading.requested",
        "aggregate_id": "6f8bcba1-0015-5555-ac1f-30242823d162",
        "aggregate_version": 1,
        "occurred_at": payload["occurred_at"],
        "metadata": {
            "owner": "own_1",
            "correlation_id": event.meta.correlation_id,
            "causation_id": event.meta.causation_id,
        },
        "data": {
            "birth": {
                "date": "1990-04-12",
                "time": "14:30",
                "timezone": "Europe/London",
                "latitude": 51.5074,
                "longitude": -0.1278,
            },
            "options": {"house_system": "equal"},
            "kind": "natal",
            "label": None,
            "request_hash": "0" * 64,
            "batch": None,
        },
    }
    assert datetime.fromisoformat(payload["occurred_at"]) == event.occurred_at


def test_a_follow_on_event_names_its_cause_and_carries_the_chart() -> None:
    reading = new_reading()
    requested_meta = reading.pending_events[0].meta
    chart = calculate_chart(birth())
    reading.record_chart(chart, requested_meta.caused_by(3))
    _, calculated = reading.collect_events()
    event = recorded(calculated, position=9)
    payload = msgspec.json.decode(encode_event(event))
    assert payload["type"] == "reading.chart_calculated"
    assert payload["aggregate_version"] == 2
    assert payload["metadata"]["causation_id"] == "position:3"
    assert payload["data"] == {"chart": msgspec.to_builtins(chart)}
    assert headers_for(event)["Almanac-Causation-Id"] == "position:3"


def test_an_api_key_event_never_carries_more_than_the_key_hash() -> None:
    secret = new_secret()
    key = ApiKey.issue(secret=secret, name="ops", role="admin", meta=EventMeta.for_request("admin"))
    [issued] = key.collect_events()
    encoded = encode_event(recorded(issued, position=1))
    assert set(msgspec.json.decode(encoded)["data"]) == {"name", "role", "key_hash", "hint"}
    assert secret not in encoded.decode()


def test_the_stream_has_explicit_limits_file_storage_and_a_duplicate_window() -> None:
    settings = RelaySettings(
        stream="S", subject_prefix="a.b", max_age=3600, max_bytes=2**30, duplicate_window=60
    )
    config = stream_config(settings).as_dict()
    assert config["name"] == "S"
    assert config["subjects"] == ["a.b.>"]
    assert (config["retention"], config["storage"], config["discard"]) == ("limits", "file", "old")
    assert config["max_age"] == 3600 * 10**9
    assert config["max_bytes"] == 2**30
    assert config["duplicate_window"] == 60 * 10**9


def test_occurred_at_is_written_in_utc() -> None:
    event = requested_event()
    assert event.occurred_at.tzinfo is not None
    assert event.occurred_at.utcoffset() == datetime.now(UTC).utcoffset()


@given(owner=st.text(min_size=1, max_size=300), sequence=st.integers(0, 2**63))
def test_a_messages_headers_take_no_more_than_its_payload_and_their_names(
    owner: str, sequence: int
) -> None:
    """What lets the relay count the headers of large messages only."""
    [requested] = new_reading(owner=owner).collect_events()
    event = recorded(requested, position=2**63 - 1)
    headers = {**headers_for(event), "Nats-Expected-Last-Sequence": str(sequence)}
    assert header_bytes(headers) <= len(encode_event(event)) + HEADER_NAMES
