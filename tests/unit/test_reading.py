"""The Reading aggregate: its state machine, its events and what they carry."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from eventsourcing.utils import get_topic
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from almanac.domain.chart import calculate_chart
from almanac.domain.events import EventMeta
from almanac.domain.interpretation import BuiltinGenerator, ReadingText
from almanac.domain.reading import BatchLink, DeadLetter, Reading, ReadingAlreadySettled
from almanac.errors import Conflict
from almanac.eventstore import MsgspecMapper, RecordedEvent
from tests.factories import birth, meta, new_reading

CHART = calculate_chart(birth())
TEXT: ReadingText = asyncio.run(BuiltinGenerator().generate(CHART, "natal", "Ada"))
CHART_OPTIONS = new_reading().options
ORDER = {"requested": 0, "chart_calculated": 1, "generated": 2, "failed": 2}


def event_types(reading: Reading) -> list[type[Any]]:
    return [type(e) for e in reading.pending_events]


def generated_reading() -> Reading:
    reading = new_reading()
    reading.record_chart(CHART, meta())
    reading.record_text(TEXT, meta())
    return reading


def failed_reading() -> Reading:
    reading = new_reading()
    reading.fail("the sky was overcast", meta())
    return reading


def test_a_new_reading_is_requested_with_its_inputs() -> None:
    m = meta("owner-q")
    reading = Reading.request(
        reading_id=new_reading().id,
        meta=m,
        birth=birth(),
        options=CHART_OPTIONS,
        kind="love",
        label="Ada",
        request_hash="f" * 64,
    )
    assert reading.status == "requested"
    assert reading.owner == "owner-q"
    assert (reading.kind, reading.label, reading.request_hash) == ("love", "Ada", "f" * 64)
    assert (reading.chart, reading.text, reading.failure) == (None, None, None)
    assert not reading.settled
    assert reading.version == 1
    assert event_types(reading) == [Reading.Requested]
    assert reading.pending_events[0].meta == m


@pytest.mark.parametrize("batch", [None, BatchLink(uuid4(), index=3, attempt=2)])
def test_a_requested_reading_equals_the_one_its_stored_event_rebuilds(
    batch: BatchLink | None,
) -> None:
    """``Reading.request`` builds the aggregate itself; loading it replays the event."""
    requested = Reading.request(
        reading_id=uuid4(),
        meta=meta("owner-r"),
        birth=birth(),
        options=CHART_OPTIONS,
        kind="love",
        label="Ada",
        request_hash="e" * 64,
        batch=batch,
    )
    (event,) = requested.pending_events
    stored = RecordedEvent.of(event, 1).event
    rebuilt = stored.mutate(None)
    assert isinstance(rebuilt, Reading)

    def state(reading: Reading) -> dict[str, Any]:
        return {k: v for k, v in vars(reading).items() if k != "_pending_events"}

    assert state(requested) == state(rebuilt)
    assert event.originator_topic == get_topic(Reading)
    assert (requested.created_on, requested.modified_on) == (event.timestamp, event.timestamp)


@pytest.mark.parametrize("batch", [None, BatchLink(uuid4(), index=1, attempt=1)])
def test_a_requested_event_equals_the_one_its_dataclass_builds(batch: BatchLink | None) -> None:
    """``Reading.request`` sets the event's fields without the dataclass's ``__init__``:
    every field, with the values the dataclass would hold, in the same order."""
    inputs: dict[str, Any] = {
        "meta": meta("owner-d"),
        "birth": birth(),
        "options": CHART_OPTIONS,
        "kind": "career",
        "label": None,
        "request_hash": "d" * 64,
        "batch": batch,
    }
    reading_id = uuid4()
    before = datetime.now(UTC)
    requested = Reading.request(reading_id=reading_id, **inputs)
    (event,) = requested.pending_events
    names = [f.name for f in dataclasses.fields(Reading.Requested)]
    assert list(vars(event)) == names
    assert before <= event.timestamp <= datetime.now(UTC)  # aware, and taken now
    built = Reading.Requested(  # type: ignore[call-arg]
        originator_id=reading_id,
        originator_version=1,
        timestamp=event.timestamp,
        originator_topic=get_topic(Reading),
        **inputs,
    )
    assert event == built
    assert MsgspecMapper().to_stored_event(event) == MsgspecMapper().to_stored_event(built)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.label = "changed"  # type: ignore[misc]


def test_a_chart_moves_a_requested_reading_on() -> None:
    reading = new_reading()
    reading.record_chart(CHART, meta())
    assert reading.status == "chart_calculated"
    assert reading.chart == CHART
    assert not reading.settled
    assert event_types(reading) == [Reading.Requested, Reading.ChartCalculated]


def test_a_text_after_the_chart_settles_the_reading_as_generated() -> None:
    reading = generated_reading()
    assert reading.status == "generated"
    assert reading.text == TEXT
    assert reading.settled
    assert reading.version == 3
    assert event_types(reading) == [Reading.Requested, Reading.ChartCalculated, Reading.Generated]


def test_failing_before_the_chart_is_a_chart_failure() -> None:
    reading = failed_reading()
    assert reading.status == "failed"
    assert reading.failure == "the sky was overcast"
    assert reading.settled
    [failed] = [e for e in reading.pending_events if isinstance(e, Reading.Failed)]
    assert failed.stage == "chart"


def test_failing_after_the_chart_is_a_text_failure() -> None:
    reading = new_reading()
    reading.record_chart(CHART, meta())
    reading.fail("the generator gave up", meta())
    assert reading.status == "failed"
    assert reading.chart == CHART, "the chart stays, for the record"
    [failed] = [e for e in reading.pending_events if isinstance(e, Reading.Failed)]
    assert failed.stage == "text"


def test_abandoning_fails_the_reading_with_the_dead_letter_and_its_reason() -> None:
    reading = new_reading()
    reading.record_chart(CHART, meta())
    dead = DeadLetter("reading-worker", position=7, deliveries=5, last_error="the store is down")
    reading.abandon(dead, meta())
    assert reading.status == "failed"
    assert reading.failure == "exhausted 5 deliveries: the store is down"
    [failed] = [e for e in reading.pending_events if isinstance(e, Reading.Failed)]
    assert (failed.stage, failed.dead_letter) == ("text", dead)
    once = DeadLetter("reading-worker", position=7, deliveries=1, last_error="boom")
    assert once.reason == "exhausted 1 delivery: boom"


def test_the_dead_letter_survives_storage_and_older_failures_have_none() -> None:
    abandoned = new_reading()
    dead = DeadLetter("reading-worker", position=1, deliveries=2, last_error="gone")
    abandoned.abandon(dead, meta())
    stored = RecordedEvent.of(abandoned.pending_events[-1], 2)
    assert stored.event.dead_letter == dead
    # A failure stored before dead letters existed has no such field at all.
    plain = RecordedEvent.of(failed_reading().pending_events[-1], 2)
    assert b"dead_letter" in plain.state
    old_state = plain.state.replace(b',"dead_letter":null', b"")
    assert b"dead_letter" not in old_state
    old = RecordedEvent(2, plain.type, plain.aggregate_key, 2, old_state, MsgspecMapper())
    assert old.event.dead_letter is None
    assert old.event.reason == "the sky was overcast"


def test_refuses_a_second_chart() -> None:
    reading = new_reading()
    reading.record_chart(CHART, meta())
    with pytest.raises(Conflict, match="already been calculated") as caught:
        reading.record_chart(CHART, meta())
    assert not isinstance(caught.value, ReadingAlreadySettled)
    assert (reading.version, reading.status) == (2, "chart_calculated")


def test_refuses_a_text_before_the_chart() -> None:
    reading = new_reading()
    with pytest.raises(Conflict, match="needs the chart first"):
        reading.record_text(TEXT, meta())
    assert (reading.version, reading.status) == (1, "requested")


@pytest.mark.parametrize("settle", [generated_reading, failed_reading], ids=["generated", "failed"])
@pytest.mark.parametrize("action", ["record_chart", "record_text", "fail", "abandon"])
def test_refuses_anything_after_settlement(settle: Any, action: str) -> None:
    reading = settle()
    before = (reading.status, reading.version, len(reading.pending_events))
    args: dict[str, tuple[Any, ...]] = {
        "record_chart": (CHART, meta()),
        "record_text": (TEXT, meta()),
        "fail": ("too late", meta()),
        "abandon": (DeadLetter("reading-worker", 1, 3, "too late"), meta()),
    }
    with pytest.raises(ReadingAlreadySettled, match=f"already {before[0]}"):
        getattr(reading, action)(*args[action])
    assert (reading.status, reading.version, len(reading.pending_events)) == before


def test_every_event_carries_the_meta_it_was_given() -> None:
    requested, charted, generated = (
        EventMeta.for_request("owner-m", "r1"),
        EventMeta("owner-m", "r1", "position:1"),
        EventMeta("owner-m", "r1", "position:2"),
    )
    reading = Reading.request(
        reading_id=new_reading().id,
        meta=requested,
        birth=birth(),
        options=CHART_OPTIONS,
        kind="natal",
        label=None,
        request_hash="0" * 64,
    )
    reading.record_chart(CHART, charted)
    reading.record_text(TEXT, generated)
    assert [e.meta for e in reading.collect_events()] == [requested, charted, generated]


def test_caused_by_keeps_owner_and_correlation_and_names_the_position() -> None:
    original = EventMeta.for_request("owner-c", "req-42")
    assert original.causation_id == "request:req-42"
    assert original.correlation_id == "req-42"
    follow_on = original.caused_by(17)
    assert follow_on == EventMeta("owner-c", "req-42", "position:17")
    assert follow_on.caused_by(18).correlation_id == "req-42"


def test_each_request_gets_its_own_correlation_id_unless_given_one() -> None:
    a, b = EventMeta.for_request("o"), EventMeta.for_request("o")
    assert a.correlation_id != b.correlation_id
    assert a.causation_id == f"request:{a.correlation_id}"


def replay(events: list[Any]) -> Reading:
    aggregate: Any = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Reading)
    return aggregate


class ReadingLifecycle(RuleBasedStateMachine):
    """Random sequences of commands never break the aggregate's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = new_reading()
        self.events: list[Any] = list(self.reading.collect_events())
        self.highest = 0

    def _collect(self) -> None:
        self.events.extend(self.reading.collect_events())

    @rule()
    def record_chart(self) -> None:
        expected: type[Exception] | None = None
        if self.reading.settled:
            expected = ReadingAlreadySettled
        elif self.reading.status != "requested":
            expected = Conflict
        self._attempt(lambda: self.reading.record_chart(CHART, meta()), expected)

    @rule()
    def record_text(self) -> None:
        expected: type[Exception] | None = None
        if self.reading.settled:
            expected = ReadingAlreadySettled
        elif self.reading.status != "chart_calculated":
            expected = Conflict
        self._attempt(lambda: self.reading.record_text(TEXT, meta()), expected)

    @rule(reason=st.text(min_size=1, max_size=20))
    def fail(self, reason: str) -> None:
        expected = ReadingAlreadySettled if self.reading.settled else None
        self._attempt(lambda: self.reading.fail(reason, meta()), expected)
        if expected is None:
            assert self.reading.failure == reason

    def _attempt(self, command: Any, expected: type[Exception] | None) -> None:
        version = self.reading.version
        if expected is None:
            command()
            assert self.reading.version == version + 1
        else:
            with pytest.raises(expected):
                command()
            assert self.reading.version == version
        self._collect()

    @invariant()
    def status_only_moves_forward(self) -> None:
        rank = ORDER[self.reading.status]
        assert rank >= self.highest
        self.highest = rank

    @invariant()
    def settles_at_most_once(self) -> None:
        endings = [e for e in self.events if isinstance(e, Reading.Generated | Reading.Failed)]
        assert len(endings) <= 1
        assert self.reading.settled == (len(endings) == 1)

    @invariant()
    def at_most_one_chart(self) -> None:
        charts = [e for e in self.events if isinstance(e, Reading.ChartCalculated)]
        assert len(charts) <= 1
        assert (self.reading.chart is not None) == (len(charts) == 1)

    @invariant()
    def version_counts_the_events(self) -> None:
        assert self.reading.version == len(self.events)
        assert [e.originator_version for e in self.events] == list(range(1, len(self.events) + 1))

    @invariant()
    def replaying_the_events_gives_the_same_state(self) -> None:
        again = replay(self.events)
        assert (again.status, again.chart, again.text, again.failure, again.version) == (
            self.reading.status,
            self.reading.chart,
            self.reading.text,
            self.reading.failure,
            self.reading.version,
        )


ReadingLifecycle.TestCase.settings = hypothesis_settings(max_examples=60, stateful_step_count=8)
test_reading_lifecycle = ReadingLifecycle.TestCase
