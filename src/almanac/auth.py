"""Who is calling: API keys checked against their hashes in the event store."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from uuid import UUID

import msgspec
import structlog

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

log = structlog.get_logger("almanac.auth")


def raw_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` in an ASGI scope's headers (whose names servers
    give in lower case), without parsing the rest."""
    for key, value in headers:
        if key == name:
            return value
    return None


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key in ``Authorization: Bearer <key>``; None if there is no such header."""
    value = raw_header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


PRINCIPAL = "principal"


def principal_of(scope: Mapping[str, Any]) -> Principal:
    """The principal ``AuthMiddleware`` put in the scope's state; 401 if there is none
    (only routes behind that middleware have one)."""
    principal = scope["state"].get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    return principal


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


# A valid key's answer is checked again in the background once this share of its time in
# the cache has passed, so that a busy key's requests do not wait for its check. When its
# entry expired, every request in flight waited for the load: tens of ms under load, and
# the cached GET's p99 at half load (3,000/s for 3 s) was 7-22 ms in three rounds of ten;
# checked ahead, 2.3-3.8 ms in nine and 5.7 in one, as with the entry never expiring.
REFRESH_AFTER = 0.75
# After a check ahead failed, the next one waits this long (or for the entry to expire):
# with the store away, one check a second for a busy key rather than one each request.
RETRY_CHECK_AFTER = 1.0


class KeyRing:
    """Authenticates presented keys; keeps recent answers briefly to spare the store.

    An answer is used for at most ``cache_ttl`` seconds after it was read from the store;
    a valid key's is read again before then, while its requests go on being answered."""

    def __init__(
        self,
        store: EventStore,
        cache_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = cache_ttl
        self._clock = clock
        # secret -> (expires at, checked again from, the answer)
        self._cache: dict[str, tuple[float, float, Principal | None]] = {}
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}
        self._running: set[asyncio.Task[Principal | None]] = set()  # for ``stop``
        # Moves on with each ``forget``: a load begun before it is not kept.
        self._generation = 0

    async def authenticate(self, secret: str | None) -> Principal:
        if not secret:
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            raise Unauthorized("the API key is not valid")
        cached = self._cache.get(secret)
        now = self._clock()
        if cached is not None and now < cached[0]:
            principal = cached[2]
            if now >= cached[1] and secret not in self._loading:
                self._begin_load(secret)  # this request is answered from the entry
        else:
            principal = await self._look_up(secret)
        if principal is None:
            raise Unauthorized("the API key is not valid")
        return principal

    async def _look_up(self, secret: str) -> Principal | None:
        # When a key's entry expires, every request in flight misses at once; they share
        # one load instead of queueing one each for the store's few threads. One that has
        # ended (and failed: a success is in the cache) is not shared.
        pending = self._loading.get(secret)
        if pending is None or pending.done():
            pending = self._begin_load(secret)
        # Shielded: one caller giving up does not cancel the load the others wait for.
        return await asyncio.shield(pending)

    def _begin_load(self, secret: str) -> asyncio.Future[Principal | None]:
        # In a context of its own: it serves every request that shares it (or none), and
        # its log lines must not name the request that happened to start it.
        task = asyncio.get_running_loop().create_task(
            self._load(secret), context=contextvars.Context()
        )
        self._loading[secret] = task
        self._running.add(task)
        task.add_done_callback(lambda done: self._loaded(secret, done))
        return task

    def _loaded(self, secret: str, done: asyncio.Task[Principal | None]) -> None:
        self._running.discard(done)
        if self._loading.get(secret) is done:
            del self._loading[secret]
        if done.cancelled() or (exc := done.exception()) is None:
            return
        # Logged once per check, however many requests waited for it: a check ahead has
        # nobody else to tell. Its entry stands until it expires, checked again no sooner
        # than ``RETRY_CHECK_AFTER``.
        log.warning("auth.key_check_failed", key_id=str(key_id_for(secret)), error=repr(exc))
        entry = self._cache.get(secret)
        if entry is not None and entry[2] is not None:
            expires = entry[0]
            retry = min(expires, self._clock() + RETRY_CHECK_AFTER)
            self._cache[secret] = (expires, retry, entry[2])

    async def stop(self) -> None:
        """Cancel the checks still running (at shutdown, before the store closes)."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def forget(self, key_id: str) -> None:
        """Drop what is remembered of the key ``key_id`` (it was revoked): its next use is
        checked against the store, not taken on the strength of an earlier check."""
        self._generation += 1
        # Loads in flight may have read the key before: later checks must not share them.
        self._loading.clear()
        for secret, (_, _, principal) in list(self._cache.items()):
            if principal is not None and principal.key_id == key_id:
                del self._cache[secret]

    async def _load(self, secret: str) -> Principal | None:
        generation = self._generation
        key = await self._store.load(ApiKey, key_id_for(secret))
        valid = key is not None and not key.revoked and key.matches(secret)
        principal = _principal(key) if valid and key is not None else None
        if generation != self._generation:
            return principal  # a key was revoked meanwhile: this answer may predate it
        if len(self._cache) > 10_000:
            self._cache.clear()
        # A refusal is remembered only briefly (the key may be issued a moment later), and
        # is not checked ahead.
        now = self._clock()
        if principal is not None:
            self._cache[secret] = (now + self._ttl, now + self._ttl * REFRESH_AFTER, principal)
        else:
            expires = now + min(self._ttl, 1.0)
            self._cache[secret] = (expires, expires, None)
        return principal

    def issue(self, *, name: str, role: Role, owner: str) -> IssuedKey:
        """Create a key (blocking; for the command line and start-up)."""
        secret = new_secret()
        key = ApiKey.issue(secret=secret, name=name, role=role, meta=EventMeta.for_request(owner))
        self._store.append_sync(key)
        return IssuedKey(secret, _principal(key))

    def revoke(self, key_id: UUID) -> ApiKey | None:
        """Revoke a key (blocking; for the command line): the key, revoked (now or before),
        or None if there is no such key. Other processes ``forget`` it as the revocation
        reaches their WebSocket hub; one it does not reach may take the key for up to
        ``cache_ttl`` seconds more."""
        key = self._store.load_sync(ApiKey, key_id)
        if key is None or key.revoked:
            return key
        key.revoke(EventMeta.for_request(key.owner))
        try:
            self._store.append_sync(key)
        except ConcurrencyConflict:
            # Revoked by another at the same moment: so it is now (else this raises again).
            again = self._store.load_sync(ApiKey, key_id)
            if again is None or not again.revoked:
                raise
            return again
        self.forget(str(key_id))
        return key

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
