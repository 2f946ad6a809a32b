"""API keys and the installation they are first issued in.

Only a key's SHA-256 is stored. The aggregate id is derived from that hash, so a presented
key is found by loading one aggregate, with no lookup table and no read-model lag: a key
works the moment ``keys create`` returns. Keys carry 256 random bits, so a fast hash is
enough; there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from almanac.domain.events import EventMeta

Role = Literal["admin", "client"]
ROLES: tuple[Role, ...] = ("admin", "client")
KEY_PREFIX = "alm_"
_NAMESPACE = UUID("6f1d3c52-5b0e-4c53-9d1e-8a4b2f0c7a11")
INSTALLATION_ID = uuid5(_NAMESPACE, "installation")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_for(secret: str) -> UUID:
    return uuid5(_NAMESPACE, hash_secret(secret))


class ApiKey(Aggregate):
    TOPIC = "api_key"

    class Event(Aggregate.Event):
        TOPIC = "api_key.event"
        meta: EventMeta

    class Issued(Event, Aggregate.Created):
        """A key was issued; ``meta.owner`` is the owner whose data it reaches."""

        TOPIC = "api_key.issued"
        name: str
        role: Role
        key_hash: str
        hint: str

    class Revoked(Event):
        TOPIC = "api_key.revoked"

        def apply(self, aggregate: ApiKey) -> None:
            aggregate.revoked = True

    def __init__(self, meta: EventMeta, name: str, role: Role, key_hash: str, hint: str) -> None:
        self.owner = meta.owner
        self.name = name
        self.role = role
        self.key_hash = key_hash
        self.hint = hint
        self.revoked = False

    @classmethod
    def issue(cls, *, secret: str, name: str, role: Role, meta: EventMeta) -> ApiKey:
        return cls._create(
            cls.Issued,
            id=key_id_for(secret),
            meta=meta,
            name=name,
            role=role,
            key_hash=hash_secret(secret),
            # Enough to recognise a key in a list, far too little to guess it.
            hint=secret[: len(KEY_PREFIX) + 4],
        )

    def matches(self, secret: str) -> bool:
        return secrets.compare_digest(self.key_hash, hash_secret(secret))

    def revoke(self, meta: EventMeta) -> None:
        if not self.revoked:
            self.trigger_event(self.Revoked, meta=meta)


class Installation(Aggregate):
    """One per event store; its creation marks that the first admin key was issued."""

    TOPIC = "installation"

    class Event(Aggregate.Event):
        TOPIC = "installation.event"
        meta: EventMeta

    class Initialised(Event, Aggregate.Created):
        TOPIC = "installation.initialised"
        admin_key_id: UUID

    def __init__(self, meta: EventMeta, admin_key_id: UUID) -> None:
        self.admin_key_id = admin_key_id

    @classmethod
    def initialise(cls, admin_key_id: UUID, meta: EventMeta) -> Installation:
        return cls._create(
            cls.Initialised, id=INSTALLATION_ID, meta=meta, admin_key_id=admin_key_id
        )
