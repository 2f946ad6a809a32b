"""Webhook endpoints: where an owner wants events delivered, and every change to that wish.

The signing secret never appears in an event in the clear: events carry it encrypted
(``secret_sealed``), and the envelope that leaves the process leaves those fields out.
"""

from __future__ import annotations

import base64
import fnmatch
import re
import secrets
from datetime import datetime
from typing import Literal
from uuid import UUID

from eventsourcing.domain import Aggregate

from almanac.domain.events import EventMeta
from almanac.errors import Conflict, FieldError, ValidationFailed

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret
SECRET_BYTES = 24
TEST_EVENT_TYPE = "webhook.test"
# Internal events never go to customer endpoints.
PRIVATE_EVENT_PREFIXES = ("api_key.", "installation.", "webhook_endpoint.")
Status = Literal["enabled", "disabled", "deleted"]

_EVENT_PATTERN = re.compile(r"(\*|[a-z0-9_]+(\.([a-z0-9_]+|\*))*)")
MAX_EVENT_TYPES = 50
MAX_DESCRIPTION = 500
MAX_RATE_LIMIT = 10_000


def new_signing_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_event_types(event_types: list[str]) -> list[str]:
    """Event types or patterns (``reading.*``, ``*``); an empty list means every event."""
    if len(event_types) > MAX_EVENT_TYPES:
        raise ValidationFailed([FieldError("event_types", f"at most {MAX_EVENT_TYPES} entries")])
    bad = [
        FieldError(
            f"event_types.{i}", "expected an event type such as reading.generated or reading.*"
        )
        for i, pattern in enumerate(event_types)
        if len(pattern) > 200 or not _EVENT_PATTERN.fullmatch(pattern)
    ]
    if bad:
        raise ValidationFailed(bad)
    return sorted(set(event_types))


def matches(event_types: list[str] | tuple[str, ...], event_type: str) -> bool:
    if event_type.startswith(PRIVATE_EVENT_PREFIXES):
        return False
    return not event_types or any(fnmatch.fnmatchcase(event_type, p) for p in event_types)


class EndpointGone(Conflict):
    """The endpoint was deleted; nothing more can change it."""


class WebhookEndpoint(Aggregate):
    TOPIC = "webhook_endpoint"

    class Event(Aggregate.Event):
        TOPIC = "webhook_endpoint.event"
        meta: EventMeta

    class Created(Event, Aggregate.Created):
        TOPIC = "webhook_endpoint.created"
        url: str
        event_types: list[str]
        description: str
        rate_limit: int | None
        secret_sealed: str

    class Changed(Event):
        """The endpoint's settings as they now stand (all of them, not a diff)."""

        TOPIC = "webhook_endpoint.changed"
        url: str
        event_types: list[str]
        description: str
        rate_limit: int | None

        def apply(self, aggregate: WebhookEndpoint) -> None:
            aggregate.url = self.url
            aggregate.event_types = list(self.event_types)
            aggregate.description = self.description
            aggregate.rate_limit = self.rate_limit

    class SecretRotated(Event):
        """A new secret signs from now on; the previous one also signs until ``overlap_until``."""

        TOPIC = "webhook_endpoint.secret_rotated"
        secret_sealed: str
        previous_secret_sealed: str
        overlap_until: datetime

        def apply(self, aggregate: WebhookEndpoint) -> None:
            aggregate.secret_sealed = self.secret_sealed

    class Disabled(Event):
        TOPIC = "webhook_endpoint.disabled"
        reason: str

        def apply(self, aggregate: WebhookEndpoint) -> None:
            aggregate.status = "disabled"
            aggregate.disabled_reason = self.reason

    class Enabled(Event):
        TOPIC = "webhook_endpoint.enabled"

        def apply(self, aggregate: WebhookEndpoint) -> None:
            aggregate.status = "enabled"
            aggregate.disabled_reason = None

    class Deleted(Event):
        TOPIC = "webhook_endpoint.deleted"

        def apply(self, aggregate: WebhookEndpoint) -> None:
            aggregate.status = "deleted"

    class TestRequested(Event):
        """Send one ``webhook.test`` message to this endpoint."""

        TOPIC = "webhook_endpoint.test_requested"
        message_id: str

    class ResendRequested(Event):
        """Send one earlier message again, whatever became of it."""

        TOPIC = "webhook_endpoint.resend_requested"
        delivery_id: str

    class RecoveryRequested(Event):
        """Send again every message that failed since ``since``."""

        TOPIC = "webhook_endpoint.recovery_requested"
        since: datetime

    def __init__(  # noqa: PLR0917 - eventsourcing passes the Created event's fields
        self,
        meta: EventMeta,
        url: str,
        event_types: list[str],
        description: str,
        rate_limit: int | None,
        secret_sealed: str,
    ) -> None:
        self.owner = meta.owner
        self.url = url
        self.event_types = list(event_types)
        self.description = description
        self.rate_limit = rate_limit
        self.secret_sealed = secret_sealed
        self.status: Status = "enabled"
        self.disabled_reason: str | None = None

    @classmethod
    def create(
        cls,
        *,
        endpoint_id: UUID,
        meta: EventMeta,
        url: str,
        event_types: list[str],
        description: str,
        rate_limit: int | None,
        secret_sealed: str,
    ) -> WebhookEndpoint:
        return cls._create(
            cls.Created,
            id=endpoint_id,
            meta=meta,
            url=url,
            event_types=check_event_types(event_types),
            description=description,
            rate_limit=rate_limit,
            secret_sealed=secret_sealed,
        )

    def _alive(self) -> None:
        if self.status == "deleted":
            raise EndpointGone("the webhook endpoint was deleted")

    def change(
        self,
        meta: EventMeta,
        *,
        url: str,
        event_types: list[str],
        description: str,
        rate_limit: int | None,
    ) -> None:
        self._alive()
        event_types = check_event_types(event_types)
        if (url, event_types, description, rate_limit) != (
            self.url,
            self.event_types,
            self.description,
            self.rate_limit,
        ):
            self.trigger_event(
                self.Changed,
                meta=meta,
                url=url,
                event_types=event_types,
                description=description,
                rate_limit=rate_limit,
            )

    def rotate_secret(self, meta: EventMeta, secret_sealed: str, overlap_until: datetime) -> None:
        self._alive()
        self.trigger_event(
            self.SecretRotated,
            meta=meta,
            secret_sealed=secret_sealed,
            previous_secret_sealed=self.secret_sealed,
            overlap_until=overlap_until,
        )

    def disable(self, meta: EventMeta, reason: str) -> None:
        self._alive()
        if self.status == "enabled":
            self.trigger_event(self.Disabled, meta=meta, reason=reason)

    def enable(self, meta: EventMeta) -> None:
        self._alive()
        if self.status == "disabled":
            self.trigger_event(self.Enabled, meta=meta)

    def delete(self, meta: EventMeta) -> None:
        if self.status != "deleted":
            self.trigger_event(self.Deleted, meta=meta)

    def request_test(self, meta: EventMeta, message_id: str) -> None:
        self._alive()
        self.trigger_event(self.TestRequested, meta=meta, message_id=message_id)

    def request_resend(self, meta: EventMeta, delivery_id: str) -> None:
        self._alive()
        self.trigger_event(self.ResendRequested, meta=meta, delivery_id=delivery_id)

    def request_recovery(self, meta: EventMeta, since: datetime) -> None:
        self._alive()
        self.trigger_event(self.RecoveryRequested, meta=meta, since=since)
