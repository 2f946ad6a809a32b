"""The JSON form of a stored event that leaves the process: NATS messages, WebSocket frames.

docs/events.md describes the envelope and each event type's ``data``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from almanac.domain.events import EventMeta
from almanac.eventstore import RecordedEvent

# Fields of a stored event that are envelope, not the event's own facts.
_ENVELOPE = frozenset(
    {"originator_id", "originator_version", "originator_topic", "timestamp", "meta"}
)
# Fields that never leave the process, even encrypted (webhook signing secrets).
_PRIVATE = frozenset({"secret_sealed", "previous_secret_sealed"})
_LEFT_OUT = _ENVELOPE | _PRIVATE


class EventEnvelope(msgspec.Struct, frozen=True):
    position: int
    type: str
    aggregate_id: UUID
    aggregate_version: int
    occurred_at: datetime
    metadata: EventMeta
    data: dict[str, Any]


_encoder = msgspec.json.Encoder()


def envelope_of(event: RecordedEvent) -> EventEnvelope:
    state = vars(event.event)
    return EventEnvelope(
        position=event.position,
        type=event.type,
        aggregate_id=event.aggregate_id,
        aggregate_version=event.aggregate_version,
        occurred_at=event.occurred_at,
        metadata=event.meta,
        data={k: v for k, v in state.items() if k not in _LEFT_OUT},
    )


def encode_event(event: RecordedEvent) -> bytes:
    return _encoder.encode(envelope_of(event))
