"""docs/events.md against the code: every event type the relay can publish has exactly one
example there, and each example has exactly the fields the relay publishes for its type.

An example is a ```json block under a heading that names one event type (``### `x.y` ``).
It is the whole envelope; further blocks under the same heading that are not envelopes
show other forms of that type's ``data``. In the docs, a ``"…"`` element of a list stands for
more elements like those before it; every object lists all of its keys.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import msgspec
import pytest
from eventsourcing.domain import Aggregate

import almanac.domain
from almanac.domain.access import ApiKey, Installation, new_secret
from almanac.domain.batch import Batch, BatchItem
from almanac.domain.chart import ChartOptions, calculate_chart
from almanac.domain.events import EventMeta
from almanac.domain.interpretation import ReadingSection, ReadingText
from almanac.domain.reading import BatchLink, DeadLetter, Reading
from almanac.domain.webhook import WebhookEndpoint
from almanac.eventstore import RecordedEvent
from streams.envelope import encode_event
from tests.factories import birth

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
ELIDED = "…"
_HEADING = re.compile(r"#{1,6}\s+(.*?)\s*")
_TYPE_HEADING = re.compile(r"`([a-z0-9_]+(?:\.[a-z0-9_]+)+)`")


def published_types() -> set[str]:
    """Every event type the domain defines: an aggregate's nested event with a TOPIC of its
    own. The relay publishes every stored event, so each of these can reach the stream."""
    found = set()
    for info in pkgutil.iter_modules(almanac.domain.__path__):
        module = importlib.import_module(f"almanac.domain.{info.name}")
        for aggregate in vars(module).values():
            if not (
                inspect.isclass(aggregate)
                and issubclass(aggregate, Aggregate)
                and aggregate.__module__ == module.__name__
            ):
                continue
            for event in vars(aggregate).values():
                if (
                    inspect.isclass(event)
                    and issubclass(event, aggregate.Event)
                    and event is not aggregate.Event
                    # eventsourcing adds a ``Created`` of its own that nothing triggers.
                    and "TOPIC" in vars(event)
                ):
                    found.add(event.TOPIC)
    return found


def _meta() -> EventMeta:
    return EventMeta.for_request("own_sample")


def _reading(**fields: Any) -> Reading:
    return Reading.request(
        reading_id=uuid4(),
        meta=_meta(),
        birth=birth(),
        options=ChartOptions(),
        kind="natal",
        label="Ada",
        request_hash="0" * 64,
        **fields,
    )


def _reading_events() -> list[Any]:
    # Optional fields are set, so that their shape is checked: a null in the docs stands
    # for any value.
    reading = _reading(batch=BatchLink(uuid4(), 0, 0))
    reading.record_chart(calculate_chart(birth()), _meta())
    section = ReadingSection("sun", "Sun in Aries", "You are built to begin.")
    reading.record_text(ReadingText("A reading", "In short", [section], "builtin", "1"), _meta())
    failed = _reading()
    failed.abandon(DeadLetter("reading-worker", 3, 100, "the event store is unavailable"), _meta())
    return [*reading.collect_events(), *failed.collect_events()]


def _access_events() -> list[Any]:
    key = ApiKey.issue(secret=new_secret(), name="ops", role="admin", meta=_meta())
    installation = Installation.initialise(key.id, _meta())
    key.revoke(_meta())
    return [*key.collect_events(), *installation.collect_events()]


def _batch_events() -> list[Any]:
    items = [BatchItem(birth(), "natal", "first"), BatchItem(birth(), "love", None)]
    batch = Batch.start(
        batch_id=uuid4(), meta=_meta(), items=items, label="cohort", request_hash="0" * 64
    )
    batch.record_outcome(
        index=0, reading_id=batch.reading_id(0), attempt=0, reason=None, meta=_meta()
    )
    batch.record_outcome(
        index=1, reading_id=batch.reading_id(1), attempt=0, reason="busy", meta=_meta()
    )
    batch.retry_failed(_meta())
    batch.cancel(_meta())
    return batch.collect_events()


SEALED = "gAAAAABsealed-secret-as-stored"


def _webhook_events() -> list[Any]:
    endpoint = WebhookEndpoint.create(
        endpoint_id=uuid4(),
        meta=_meta(),
        url="https://example.com/hooks",
        event_types=["reading.generated"],
        description="orders",
        rate_limit=10,
        secret_sealed=SEALED,
    )
    endpoint.change(
        _meta(), url="https://example.com/v2", event_types=[], description="", rate_limit=None
    )
    now = datetime.now(UTC)
    endpoint.rotate_secret(_meta(), SEALED + "-2", now + timedelta(hours=24))
    endpoint.request_test(_meta(), f"msg_{uuid4().hex}")
    endpoint.request_resend(_meta(), f"msg_{uuid4().hex}")
    endpoint.disable(_meta(), "the endpoint answered 410 Gone")
    endpoint.enable(_meta())
    endpoint.request_recovery(_meta(), now - timedelta(days=1))
    endpoint.delete(_meta())
    return endpoint.collect_events()


SAMPLE_BUILDERS: tuple[Callable[[], list[Any]], ...] = (
    _reading_events,
    _access_events,
    _batch_events,
    _webhook_events,
)


@functools.cache
def published_samples() -> dict[str, dict[str, Any]]:
    """One event of each type, encoded as the relay encodes it, keyed by type."""
    samples: dict[str, dict[str, Any]] = {}
    for build in SAMPLE_BUILDERS:
        for position, event in enumerate(build(), start=1):
            payload = msgspec.json.decode(encode_event(RecordedEvent.of(event, position)))
            samples[payload["type"]] = payload
    return samples


class Block(msgspec.Struct, frozen=True):
    line: int
    heading: str
    event_type: str | None
    value: Any


@functools.cache
def json_blocks() -> tuple[Block, ...]:
    """Every ```json block of the doc with the event type its nearest heading names."""
    blocks: list[Block] = []
    heading, event_type = "", None
    lines = DOC.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            start = index
            index += 1
            while not lines[index].startswith("```"):
                index += 1
            if line.strip() == "```json":
                text = "\n".join(lines[start + 1 : index])
                blocks.append(Block(start + 1, heading, event_type, json.loads(text)))
        elif match := _HEADING.fullmatch(line):
            heading = match.group(1)
            named = _TYPE_HEADING.fullmatch(heading)
            event_type = named.group(1) if named else None
        index += 1
    return tuple(blocks)


def examples() -> dict[str, list[Block]]:
    found: dict[str, list[Block]] = {}
    for block in json_blocks():
        if block.event_type is not None and _is_envelope(block.value):
            found.setdefault(block.event_type, []).append(block)
    return found


def _is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value and "data" in value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def differences(documented: Any, published: Any, path: str = "") -> list[str]:
    """Where the documented value's shape departs from the published one: keys missing or
    extra at any depth, or another JSON type. A null on either side stands for any value."""
    where = path or "the example"
    if documented is None or published is None:
        return []
    if isinstance(documented, dict) and isinstance(published, dict):
        found = [
            f"{path}.{key}".lstrip(".") + " is published but not documented"
            for key in published.keys() - documented.keys()
        ]
        found += [
            f"{path}.{key}".lstrip(".") + " is documented but not published"
            for key in documented.keys() - published.keys()
        ]
        for key in documented.keys() & published.keys():
            found += differences(documented[key], published[key], f"{path}.{key}".lstrip("."))
        return sorted(found)
    if isinstance(documented, list) and isinstance(published, list):
        if not published:
            return []
        found = []
        for i, element in enumerate(documented):
            if element != ELIDED:
                found += differences(element, published[min(i, len(published) - 1)], f"{path}[{i}]")
        return found
    if _kind(documented) != _kind(published):
        return [
            f"{where} is a {_kind(documented)} in the docs but a {_kind(published)} when published"
        ]
    return []


def test_the_samples_cover_every_event_type_the_domain_defines() -> None:
    """A new event type needs a sample here (and then an example in the docs)."""
    missing = published_types() - set(published_samples())
    assert not missing, f"no sample of {sorted(missing)}: build one in SAMPLE_BUILDERS"
    assert set(published_samples()) <= published_types()


def test_every_published_event_type_has_exactly_one_example() -> None:
    counts = {event_type: len(blocks) for event_type, blocks in examples().items()}
    wrong = {t: counts.get(t, 0) for t in sorted(published_types()) if counts.get(t) != 1}
    assert not wrong, f"examples per type in {DOC.name}, where not exactly one: {wrong}"


def test_no_example_is_for_a_type_that_is_never_published() -> None:
    assert set(examples()) - published_types() == set()


def test_every_json_block_is_under_the_heading_of_its_event_type() -> None:
    for block in json_blocks():
        assert block.event_type is not None, f"line {block.line}: under {block.heading!r}"
        if _is_envelope(block.value):
            assert block.value["type"] == block.event_type, f"line {block.line}"


@pytest.mark.parametrize("event_type", sorted(published_types()))
def test_the_example_has_exactly_the_fields_the_relay_publishes(event_type: str) -> None:
    published = published_samples().get(event_type)
    assert published is not None, f"no sample of {event_type}: build one in SAMPLE_BUILDERS"
    for block in json_blocks():
        if block.event_type != event_type:
            continue
        if _is_envelope(block.value):
            found = differences(block.value, published)
        else:
            found = differences(block.value, published["data"], "data")
        assert not found, f"{DOC.name} line {block.line}: " + "; ".join(found)


def test_the_differences_name_every_field_added_removed_or_retyped() -> None:
    """The check above fails for a renamed, added or retyped field, at any depth."""
    published = {"data": {"chart": {"sun": {"house": 8}}, "items": [{"kind": "natal"}]}}
    assert differences(published, published) == []
    assert (
        differences({"data": {"chart": {"sun": {"house": 8}}, "items": [ELIDED]}}, published) == []
    )
    assert differences(
        {"data": {"chart": {"sun": {"house": "8"}}, "items": [{"kind": "natal", "x": 1}]}},
        published,
    ) == [
        "data.chart.sun.house is a str in the docs but a number when published",
        "data.items[0].x is documented but not published",
    ]
    assert differences({"data": {"chart": {"sun": {}}, "items": []}}, published) == [
        "data.chart.sun.house is published but not documented"
    ]


def test_no_published_event_carries_a_secret() -> None:
    """Webhook secrets are sealed in the stored event and left out of what is published."""
    for payload in published_samples().values():
        assert not [key for key in payload["data"] if "secret" in key], payload["type"]
        assert SEALED not in json.dumps(payload), payload["type"]


def test_the_ids_and_times_of_every_example_parse() -> None:
    """Placeholder-looking values are still valid ones: an example can be fed to a consumer."""
    for blocks in examples().values():
        for block in blocks:
            UUID(block.value["aggregate_id"])
            assert datetime.fromisoformat(block.value["occurred_at"]).utcoffset() == timedelta(0)
