"""Who is calling: API keys checked against their hashes in the event store."""

from __future__ import annotations

import time

import msgspec

from almanac.domain.access import (
    INSTALLATION_ID,
    KEY_PREFIX,
    ApiKey,
    Installation,
    Role,
    key_id_for,
    new_secret,
)
from almanac.domain.events import EventMeta
from almanac.errors import Forbidden, Unauthorized
from almanac.eventstore import ConcurrencyConflict, EventStore


class Principal(msgspec.Struct, frozen=True):
    key_id: str
    owner: str
    role: Role
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.owner

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this needs an admin key")


class IssuedKey(msgspec.Struct, frozen=True):
    secret: str
    principal: Principal


class KeyRing:
    """Authenticates presented keys; keeps recent answers briefly to spare the store."""

    def __init__(self, store: EventStore, cache_ttl: float) -> None:
        self._store = store
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(self, secret: str | None) -> Principal:
        if not secret:
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            raise Unauthorized("the API key is not valid")
        now = time.monotonic()
        cached = self._cache.get(secret)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            key = await self._store.load(ApiKey, key_id_for(secret))
            valid = key is not None and not key.revoked and key.matches(secret)
            principal = _principal(key) if valid and key is not None else None
            if len(self._cache) > 10_000:
                self._cache.clear()
            # A refusal is remembered only briefly: the key may be issued a moment later.
            ttl = self._ttl if principal is not None else min(self._ttl, 1.0)
            self._cache[secret] = (now + ttl, principal)
        if principal is None:
            raise Unauthorized("the API key is not valid")
        return principal

    def issue(self, *, name: str, role: Role, owner: str) -> IssuedKey:
        """Create a key (blocking; for the command line and start-up)."""
        secret = new_secret()
        key = ApiKey.issue(secret=secret, name=name, role=role, meta=EventMeta.for_request(owner))
        self._store.append_sync(key)
        return IssuedKey(secret, _principal(key))

    def issue_first_admin(self) -> IssuedKey | None:
        """On a new installation, create the admin key and return it; otherwise None."""
        if self._store.load_sync(Installation, INSTALLATION_ID) is not None:
            return None
        secret = new_secret()
        meta = EventMeta.for_request("admin")
        key = ApiKey.issue(secret=secret, name="admin", role="admin", meta=meta)
        installation = Installation.initialise(key.id, meta)
        try:
            # Both in one transaction: a second process starting at once gets a conflict.
            self._store.append_sync(key, installation)
        except ConcurrencyConflict:
            return None
        return IssuedKey(secret, _principal(key))


def _principal(key: ApiKey) -> Principal:
    return Principal(key_id=str(key.id), owner=key.owner, role=key.role, name=key.name)
