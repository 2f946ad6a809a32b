"""Batch commands: ``start_batch`` (validate every item, then append ``batch.started``),
``cancel_batch`` and ``retry_failed``.

A batch is validated whole before anything is started: every bad item is reported by its
index (``items[3].birth.latitude``) and nothing is appended. A batch is stored as one
event, so besides its count of items (``MAX_ITEMS``) the event store's limit on the size
of an event (``ALMANAC_MAX_EVENT_BYTES``) bounds it too: with the default, about 5,200
items without labels (docs/batches.md, "Size").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated
from uuid import UUID, uuid5

import msgspec

from almanac.auth import Principal
from almanac.domain.batch import MAX_ITEMS, Batch, BatchItem
from almanac.domain.chart import resolve_birth
from almanac.domain.events import EventMeta
from almanac.errors import FieldError, NotFound, ValidationFailed
from almanac.eventstore import ConcurrencyConflict, EventStore, EventTooLarge
from almanac.ids import new_uuid
from commands.readings import (
    IDEMPOTENCY_HEADER,
    IdempotencyKeyReused,
    check_idempotency_key,
    has_control_characters,
)

_IDEMPOTENCY_NAMESPACE = UUID("6f1d2c8e-93a4-4b57-8e0a-5c2b7d9f1e36")
# Enough to fix a batch by; a batch with thousands of bad items need not list them all.
MAX_REPORTED_ERRORS = 100
Label = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, description="A name for the batch.")
]


class StartBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ask for a reading of each item (at most 10,000, and within the event size limit)."""

    items: list[msgspec.Raw]
    label: Label | None = None


class BatchAccepted(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    items: int
    position: int


class BatchChanged(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    position: int
    retried: int = 0


_item = msgspec.json.Decoder(BatchItem)
_start = msgspec.json.Decoder(StartBatch)
_PATH = re.compile(r"`\$((?:\.[A-Za-z_]\w*|\[\d+\])*)`")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _field_error(prefix: str, exc: msgspec.ValidationError) -> FieldError:
    """msgspec's ``Expected `float`, got `str` - at `$.birth.latitude``` under ``prefix``."""
    message = str(exc)
    match = _PATH.search(message)
    path = match.group(1) if match else ""
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group(1)}"
    return FieldError(f"{prefix}{path}", message.split(" - at ", maxsplit=1)[0])


def _too_many(count: int) -> ValidationFailed:
    return ValidationFailed(
        [FieldError("items", f"has {count} items or more; a batch takes at most {MAX_ITEMS}")]
    )


def _too_large(count: int, refused: EventTooLarge) -> ValidationFailed:
    fit = count * refused.limit // refused.size
    return ValidationFailed(
        [
            FieldError(
                "items",
                f"{count:,} items make a batch of {refused.size:,} bytes, and a batch may "
                f"hold at most {refused.limit:,}: about {fit:,} items like these fit in "
                "one; split it into several batches",
            )
        ]
    )


def check_item(index: int, raw: bytes) -> tuple[BatchItem | None, list[FieldError]]:
    """The item at ``index``, or what is wrong with it (paths start ``items[index]``)."""
    prefix = f"items[{index}]"
    try:
        item = _item.decode(raw)
    except msgspec.ValidationError as exc:
        return None, [_field_error(prefix, exc)]
    except msgspec.DecodeError:
        return None, [FieldError(prefix, "is not valid JSON")]
    errors: list[FieldError] = []
    try:
        resolve_birth(item.birth)
    except ValidationFailed as exc:
        errors.extend(exc.prefixed(f"{prefix}.birth").errors)
    if item.label is not None and has_control_characters(item.label):
        errors.append(FieldError(f"{prefix}.label", "must not contain control characters"))
    return (None if errors else item), errors


def _checked(raws: list[bytes]) -> list[BatchItem]:
    if not raws:
        raise ValidationFailed([FieldError("items", "must hold at least one item")])
    if len(raws) > MAX_ITEMS:
        raise _too_many(len(raws))
    items: list[BatchItem] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(raws):
        item, problems = check_item(index, raw)
        if item is not None:
            items.append(item)
        errors.extend(problems)
    if errors:
        raise ValidationFailed(errors[:MAX_REPORTED_ERRORS])
    return items


def parse_json_batch(body: bytes) -> tuple[list[BatchItem], str | None]:
    """``{"items": [...], "label": ...}``, validated whole."""
    try:
        command = _start.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([_field_error("", exc)]) from None
    return _checked([bytes(raw) for raw in command.items]), command.label


async def parse_ndjson_batch(chunks: AsyncIterator[bytes]) -> list[BatchItem]:
    """One item per line, read as it streams in; blank lines are skipped."""
    raws: list[bytes] = []
    rest = b""
    async for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        raws.extend(line for line in lines if line.strip())
        if len(raws) > MAX_ITEMS:
            raise _too_many(len(raws))
    if rest.strip():
        raws.append(rest)
    return _checked(raws)


def batch_hash(items: list[BatchItem], label: str | None) -> str:
    # Hash the decoded items, so whitespace and key order in the body do not matter.
    return hashlib.sha256(msgspec.json.encode([items, label])).hexdigest()


async def start_batch(
    items: list[BatchItem],
    label: str | None,
    *,
    store: EventStore,
    principal: Principal,
    meta: EventMeta,
    idempotency_key: str | None = None,
) -> tuple[BatchAccepted, bool]:
    """Append ``batch.started``; returns the response and whether it was a replay."""
    key = check_idempotency_key(idempotency_key)
    digest = batch_hash(items, label)
    batch_id = uuid5(_IDEMPOTENCY_NAMESPACE, f"{principal.owner}\n{key}") if key else new_uuid()
    batch = Batch.start(batch_id=batch_id, meta=meta, items=items, label=label, request_hash=digest)
    try:
        position = await store.append(batch)
    except EventTooLarge as exc:
        # The items are what makes a batch large (its label is at most 200 characters).
        raise _too_large(len(items), exc) from None
    except ConcurrencyConflict:
        if key is None:
            raise
        original = await store.load(Batch, batch_id)
        if original is None or original.request_hash != digest:
            raise IdempotencyKeyReused(
                [FieldError(IDEMPOTENCY_HEADER, "was already used with a different request body")]
            ) from None
        first = await store.position_of(batch_id, 1)
        assert first is not None, "a loaded aggregate has a stored first event"
        return BatchAccepted(batch_id, "running", len(items), first), True
    return BatchAccepted(batch_id, "running", len(items), position), False


async def _change(
    batch_id: UUID,
    change: Callable[[Batch], int],
    *,
    store: EventStore,
    principal: Principal,
) -> BatchChanged:
    """Load, change and append, again from the top if the process manager appended first."""
    for _ in range(10):
        batch = await store.load(Batch, batch_id)
        if batch is None or not principal.may_see(batch.owner):
            raise NotFound(f"no batch {batch_id}")
        count = change(batch)
        if not batch.pending_events:
            position = await store.max_position()
            return BatchChanged(batch_id, batch.status, position, count)
        try:
            position = await store.append(batch)
        except ConcurrencyConflict:
            continue
        return BatchChanged(batch_id, batch.status, position, count)
    raise ConcurrencyConflict(f"batch {batch_id} kept changing; try again")


async def cancel_batch(
    batch_id: UUID, *, store: EventStore, principal: Principal, meta: EventMeta
) -> BatchChanged:
    """No new items start; those running finish; the batch ends ``cancelled``."""

    def cancel(batch: Batch) -> int:
        batch.cancel(meta)
        return 0

    return await _change(batch_id, cancel, store=store, principal=principal)


async def retry_failed(
    batch_id: UUID, *, store: EventStore, principal: Principal, meta: EventMeta
) -> BatchChanged:
    """Try every failed item again, each as a new reading."""
    return await _change(
        batch_id, lambda batch: len(batch.retry_failed(meta)), store=store, principal=principal
    )
