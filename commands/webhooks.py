"""Commands on webhook endpoints: register, change, rotate the secret, delete, and ask the
deliverer to send a test message, resend one message or recover the failed ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import msgspec

from almanac.adapters.secretbox import SecretBox
from almanac.adapters.webhook_targets import TargetGuard, TargetRefused
from almanac.auth import Principal
from almanac.domain.events import EventMeta
from almanac.domain.webhook import (
    MAX_DESCRIPTION,
    MAX_RATE_LIMIT,
    WebhookEndpoint,
    new_signing_secret,
)
from almanac.errors import FieldError, NotFound, ValidationFailed
from almanac.eventstore import EventStore
from almanac.ids import new_uuid

Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2000, description="https URL.")]
EventTypes = Annotated[
    list[str],
    msgspec.Meta(
        max_length=50,
        description="Event types to receive; `reading.*` style wildcards; empty for all.",
    ),
]
Description = Annotated[str, msgspec.Meta(max_length=MAX_DESCRIPTION)]
RateLimit = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_RATE_LIMIT, description="Deliveries per second at most.")
]


class RegisterWebhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Url
    event_types: EventTypes = msgspec.field(default_factory=list)
    description: Description = ""
    rate_limit: RateLimit | None = None


class ChangeWebhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Only the fields given change; ``rate_limit: null`` removes the limit."""

    url: Url | msgspec.UnsetType = msgspec.UNSET
    event_types: EventTypes | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    rate_limit: RateLimit | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class EndpointState(msgspec.Struct, frozen=True):
    """An endpoint as a command left it (the command side answers from the aggregate)."""

    id: UUID
    url: str
    event_types: list[str]
    description: str
    rate_limit: int | None
    status: str
    disabled_reason: str | None
    position: int


class EndpointWithSecret(msgspec.Struct, frozen=True):
    """The answer to a registration or rotation: the only time the secret is shown."""

    id: UUID
    url: str
    event_types: list[str]
    description: str
    rate_limit: int | None
    status: str
    secret: str
    position: int


class Accepted(msgspec.Struct, frozen=True):
    id: str
    position: int


def _state(endpoint: WebhookEndpoint, position: int) -> EndpointState:
    return EndpointState(
        id=endpoint.id,
        url=endpoint.url,
        event_types=endpoint.event_types,
        description=endpoint.description,
        rate_limit=endpoint.rate_limit,
        status=endpoint.status,
        disabled_reason=endpoint.disabled_reason,
        position=position,
    )


async def _check_url(guard: TargetGuard, url: str) -> None:
    try:
        await guard.check(url)
    except TargetRefused as exc:
        raise ValidationFailed([FieldError("url", exc.detail)]) from None


async def _owned(store: EventStore, endpoint_id: UUID, principal: Principal) -> WebhookEndpoint:
    endpoint = await store.load(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.status == "deleted" or not principal.may_see(endpoint.owner):
        raise NotFound(f"no webhook endpoint {endpoint_id}")
    return endpoint


async def register_webhook(
    command: RegisterWebhook,
    *,
    store: EventStore,
    guard: TargetGuard,
    box: SecretBox,
    meta: EventMeta,
) -> EndpointWithSecret:
    await _check_url(guard, command.url)
    secret = new_signing_secret()
    endpoint = WebhookEndpoint.create(
        endpoint_id=new_uuid(),
        meta=meta,
        url=command.url,
        event_types=command.event_types,
        description=command.description,
        rate_limit=command.rate_limit,
        secret_sealed=box.seal(secret),
    )
    position = await store.append(endpoint)
    return _with_secret(endpoint, secret, position)


def _with_secret(endpoint: WebhookEndpoint, secret: str, position: int) -> EndpointWithSecret:
    """The endpoint as created or rotated: the one answer that shows its secret."""
    return EndpointWithSecret(
        id=endpoint.id,
        url=endpoint.url,
        event_types=endpoint.event_types,
        description=endpoint.description,
        rate_limit=endpoint.rate_limit,
        status=endpoint.status,
        secret=secret,
        position=position,
    )


async def change_webhook(
    endpoint_id: UUID,
    command: ChangeWebhook,
    *,
    store: EventStore,
    guard: TargetGuard,
    principal: Principal,
    meta: EventMeta,
) -> EndpointState:
    endpoint = await _owned(store, endpoint_id, principal)
    url = endpoint.url if isinstance(command.url, msgspec.UnsetType) else command.url
    if url != endpoint.url:
        await _check_url(guard, url)
    endpoint.change(
        meta,
        url=url,
        event_types=(
            endpoint.event_types
            if isinstance(command.event_types, msgspec.UnsetType)
            else command.event_types
        ),
        description=(
            endpoint.description
            if isinstance(command.description, msgspec.UnsetType)
            else command.description
        ),
        rate_limit=(
            endpoint.rate_limit
            if isinstance(command.rate_limit, msgspec.UnsetType)
            else command.rate_limit
        ),
    )
    if command.enabled is True:
        endpoint.enable(meta)
    elif command.enabled is False:
        endpoint.disable(meta, "disabled by request")
    position = await _append(store, endpoint)
    return _state(endpoint, position)


async def rotate_webhook_secret(
    endpoint_id: UUID,
    *,
    store: EventStore,
    box: SecretBox,
    principal: Principal,
    meta: EventMeta,
    overlap: float,
) -> EndpointWithSecret:
    endpoint = await _owned(store, endpoint_id, principal)
    secret = new_signing_secret()
    endpoint.rotate_secret(meta, box.seal(secret), datetime.now(UTC) + timedelta(seconds=overlap))
    position = await store.append(endpoint)
    return _with_secret(endpoint, secret, position)


async def delete_webhook(
    endpoint_id: UUID, *, store: EventStore, principal: Principal, meta: EventMeta
) -> int:
    endpoint = await _owned(store, endpoint_id, principal)
    endpoint.delete(meta)
    return await store.append(endpoint)


async def send_test_message(
    endpoint_id: UUID, *, store: EventStore, principal: Principal, meta: EventMeta
) -> Accepted:
    endpoint = await _owned(store, endpoint_id, principal)
    message_id = f"msg_{new_uuid().hex}"
    endpoint.request_test(meta, message_id)
    return Accepted(message_id, await store.append(endpoint))


async def resend_delivery(
    endpoint_id: UUID,
    delivery_id: str,
    *,
    store: EventStore,
    principal: Principal,
    meta: EventMeta,
) -> Accepted:
    endpoint = await _owned(store, endpoint_id, principal)
    endpoint.request_resend(meta, delivery_id)
    return Accepted(delivery_id, await store.append(endpoint))


async def recover_failed(
    endpoint_id: UUID,
    since: datetime,
    *,
    store: EventStore,
    principal: Principal,
    meta: EventMeta,
) -> Accepted:
    if since.tzinfo is None:
        raise ValidationFailed([FieldError("since", "must carry a time zone")])
    endpoint = await _owned(store, endpoint_id, principal)
    endpoint.request_recovery(meta, since)
    return Accepted(str(endpoint_id), await store.append(endpoint))


async def _append(store: EventStore, endpoint: WebhookEndpoint) -> int:
    if endpoint.pending_events:
        return await store.append(endpoint)
    # Nothing changed: the answer carries the position of the endpoint's latest event.
    position = await store.position_of(endpoint.id, endpoint.version)
    return position or 0
