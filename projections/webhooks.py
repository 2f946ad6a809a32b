"""The ``webhook_endpoints`` read model: one row per endpoint, as it stands.

The deliverer matches events against it (after waiting until it has reached the event's
position) and the query side lists it. Sealed secrets are kept for the deliverer; queries
never return them.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from almanac.domain.webhook import WebhookEndpoint
from almanac.eventstore import RecordedEvent
from almanac.readmodels import Dialect, Write

_COLUMNS = (
    " id TEXT PRIMARY KEY, owner TEXT NOT NULL, url TEXT NOT NULL, event_types TEXT NOT NULL,"
    " description TEXT NOT NULL, rate_limit INTEGER, status TEXT NOT NULL,"
    " disabled_reason TEXT, secret_sealed TEXT NOT NULL, previous_secret_sealed TEXT,"
    " previous_until {real}, created_at {real} NOT NULL, updated_at {real} NOT NULL,"
    " position {int} NOT NULL"
)
SCHEMA: dict[Dialect, list[str]] = {
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS webhook_endpoints ("
        + _COLUMNS.format(real="REAL", int="INTEGER")
        + ")",
        "CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner, status)",
    ],
    "postgres": [
        "CREATE TABLE IF NOT EXISTS webhook_endpoints ("
        + _COLUMNS.format(real="DOUBLE PRECISION", int="BIGINT")
        + ")",
        "CREATE INDEX IF NOT EXISTS webhook_endpoints_owner ON webhook_endpoints (owner, status)",
    ],
}
TABLES = ("webhook_endpoints",)

_CREATE = (
    "INSERT INTO webhook_endpoints (id, owner, url, event_types, description, rate_limit,"
    " status, secret_sealed, created_at, updated_at, position) VALUES (:id, :owner, :url,"
    " :event_types, :description, :rate_limit, 'enabled', :secret_sealed, :at, :at, :position)"
    " ON CONFLICT (id) DO NOTHING"
)
# Each change applies once: a row already at (or past) the event's position is left alone.
_GUARD = " WHERE id = :id AND position < :position"
_CHANGED = (
    "UPDATE webhook_endpoints SET url = :url, event_types = :event_types,"
    " description = :description, rate_limit = :rate_limit, updated_at = :at,"
    " position = :position" + _GUARD
)
_ROTATED = (
    "UPDATE webhook_endpoints SET secret_sealed = :secret_sealed,"
    " previous_secret_sealed = :previous_secret_sealed, previous_until = :previous_until,"
    " updated_at = :at, position = :position" + _GUARD
)
_STATUS = (
    "UPDATE webhook_endpoints SET status = :status, disabled_reason = :reason,"
    " updated_at = :at, position = :position" + _GUARD
)

_encoder = msgspec.json.Encoder()


def _at(value: datetime) -> float:
    return value.timestamp()


class WebhookEndpointsProjection:
    name = "webhook_endpoints"
    version = 1
    schema = SCHEMA
    tables = TABLES

    def handle(self, event: RecordedEvent) -> list[Write]:
        if not event.type.startswith("webhook_endpoint."):
            return []
        e = event.event
        base = {"id": event.aggregate_key, "position": event.position, "at": _at(e.timestamp)}
        if isinstance(e, WebhookEndpoint.Created):
            row = {
                **base,
                "owner": e.meta.owner,
                "url": e.url,
                "event_types": _encoder.encode(e.event_types).decode(),
                "description": e.description,
                "rate_limit": e.rate_limit,
                "secret_sealed": e.secret_sealed,
            }
            return [(_CREATE, [row])]
        if isinstance(e, WebhookEndpoint.Changed):
            row = {
                **base,
                "url": e.url,
                "event_types": _encoder.encode(e.event_types).decode(),
                "description": e.description,
                "rate_limit": e.rate_limit,
            }
            return [(_CHANGED, [row])]
        if isinstance(e, WebhookEndpoint.SecretRotated):
            row = {
                **base,
                "secret_sealed": e.secret_sealed,
                "previous_secret_sealed": e.previous_secret_sealed,
                "previous_until": _at(e.overlap_until),
            }
            return [(_ROTATED, [row])]
        status = {
            WebhookEndpoint.Disabled: "disabled",
            WebhookEndpoint.Enabled: "enabled",
            WebhookEndpoint.Deleted: "deleted",
        }.get(type(e))
        if status is None:
            return []
        reason = e.reason if isinstance(e, WebhookEndpoint.Disabled) else None
        return [(_STATUS, [{**base, "status": status, "reason": reason}])]
