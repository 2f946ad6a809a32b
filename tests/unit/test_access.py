"""API keys: secrets, what is stored of them, and how a presented key is checked."""

from __future__ import annotations

import asyncio
import hashlib
import string
from collections.abc import Sequence
from typing import Any, TypeVar, cast
from uuid import UUID

import msgspec
import pytest
from eventsourcing.domain import Aggregate
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from almanac.auth import IssuedKey, KeyRing, Principal
from almanac.domain.access import (
    INSTALLATION_ID,
    KEY_PREFIX,
    ApiKey,
    Installation,
    hash_secret,
    key_id_for,
    new_secret,
)
from almanac.errors import Forbidden, Unauthorized
from almanac.eventstore import ConcurrencyConflict
from almanac.logs import REQUEST_ID
from tests.factories import Clock, meta

A = TypeVar("A", bound=Aggregate)
URLSAFE = set(string.ascii_letters + string.digits + "-_")


def issued(secret: str | None = None, role: Any = "client", owner: str = "owner-a") -> ApiKey:
    return ApiKey.issue(secret=secret or new_secret(), name="app", role=role, meta=meta(owner))


def test_secrets_start_with_the_prefix_and_carry_256_random_bits() -> None:
    secrets_ = [new_secret() for _ in range(500)]
    assert len(set(secrets_)) == len(secrets_)
    for secret in secrets_:
        assert secret.startswith(KEY_PREFIX)
        body = secret.removeprefix(KEY_PREFIX)
        assert len(body) >= 43, "32 random bytes in URL-safe base64"
        assert set(body) <= URLSAFE
    # Every position of the random part varies across keys: nothing fixed hides in it.
    for i in range(43):
        assert len({s[len(KEY_PREFIX) + i] for s in secrets_}) > 10


def test_only_the_hash_of_the_secret_is_in_the_issued_event() -> None:
    secret = new_secret()
    key = issued(secret)
    [event] = key.pending_events
    assert isinstance(event, ApiKey.Issued)
    assert event.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    for event in key.collect_events():
        state = vars(event)
        for name, value in state.items():
            assert secret not in repr(value), name
        assert secret.encode() not in msgspec.json.encode(state)


def test_the_hint_shows_the_prefix_and_four_characters_only() -> None:
    secret = new_secret()
    key = issued(secret)
    assert key.hint == secret[: len(KEY_PREFIX) + 4]
    assert len(key.hint) == 8


def test_the_key_id_is_derived_from_the_secret_deterministically() -> None:
    secret = new_secret()
    assert key_id_for(secret) == key_id_for(secret)
    assert key_id_for(secret) != key_id_for(new_secret())
    assert issued(secret).id == key_id_for(secret)
    assert isinstance(key_id_for(secret), UUID)


@given(a=st.text(max_size=60), b=st.text(max_size=60))
def test_different_secrets_never_share_an_id_or_hash(a: str, b: str) -> None:
    assert (key_id_for(a) == key_id_for(b)) == (a == b)
    assert (hash_secret(a) == hash_secret(b)) == (a == b)


def test_a_key_matches_its_own_secret_only() -> None:
    secret = new_secret()
    key = issued(secret)
    assert key.matches(secret)
    for wrong in [new_secret(), secret + "x", secret[:-1], secret.upper(), "", KEY_PREFIX]:
        assert not key.matches(wrong), wrong


def test_revoking_marks_the_key_once() -> None:
    key = issued()
    key.collect_events()
    key.revoke(meta("admin"))
    key.revoke(meta("admin"))
    assert key.revoked
    [event] = key.collect_events()
    assert isinstance(event, ApiKey.Revoked)
    assert event.meta.owner == "admin"


def test_the_installation_has_one_well_known_id() -> None:
    key = issued(role="admin")
    first = Installation.initialise(key.id, meta("admin"))
    second = Installation.initialise(issued(role="admin").id, meta("admin"))
    assert first.id == second.id == INSTALLATION_ID
    assert first.admin_key_id == key.id


class InMemoryStore:
    """The part of the event store that ``KeyRing`` uses, kept in a dict."""

    def __init__(self) -> None:
        self.events: dict[UUID, list[Any]] = {}

    def append_sync(self, *aggregates: Aggregate) -> int:
        pending = [(agg.id, agg.collect_events()) for agg in aggregates]
        for aggregate_id, events in pending:
            stored = len(self.events.get(aggregate_id, []))
            if events[0].originator_version != stored + 1:
                raise ConcurrencyConflict("the aggregate was changed by another command")
        for aggregate_id, events in pending:
            self.events.setdefault(aggregate_id, []).extend(events)
        return sum(len(e) for e in self.events.values())

    def load_sync(self, cls: type[A], aggregate_id: UUID) -> A | None:
        aggregate: Any = None
        for event in self.events.get(aggregate_id, []):
            aggregate = event.mutate(aggregate)
        return aggregate if isinstance(aggregate, cls) else None

    async def load(self, cls: type[A], aggregate_id: UUID) -> A | None:
        return self.load_sync(cls, aggregate_id)

    def stored(self) -> Sequence[Any]:
        return [e for events in self.events.values() for e in events]


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


def keyring(store: InMemoryStore, ttl: float = 0) -> KeyRing:
    return KeyRing(cast("Any", store), ttl)


async def test_an_issued_key_authenticates_as_its_principal(store: InMemoryStore) -> None:
    ring = keyring(store)
    new = ring.issue(name="mobile", role="client", owner="owner-k")
    principal = await ring.authenticate(new.secret)
    assert principal == new.principal
    assert (principal.owner, principal.role, principal.name) == ("owner-k", "client", "mobile")
    assert principal.key_id == str(key_id_for(new.secret))
    assert all(new.secret not in repr(vars(e)) for e in store.stored())


@pytest.mark.parametrize(
    "presented",
    [None, "", "not-a-key", KEY_PREFIX + "x" * 300],
    ids=["none", "empty", "no-prefix", "too-long"],
)
async def test_refuses_malformed_keys(store: InMemoryStore, presented: str | None) -> None:
    with pytest.raises(Unauthorized):
        await keyring(store).authenticate(presented)


async def test_refuses_an_unknown_key(store: InMemoryStore) -> None:
    with pytest.raises(Unauthorized, match="not valid"):
        await keyring(store).authenticate(new_secret())


async def test_refuses_a_revoked_key(store: InMemoryStore) -> None:
    ring = keyring(store)
    new = ring.issue(name="old", role="client", owner="owner-r")
    key = store.load_sync(ApiKey, key_id_for(new.secret))
    assert key is not None
    key.revoke(meta("admin"))
    store.append_sync(key)
    with pytest.raises(Unauthorized):
        await ring.authenticate(new.secret)


async def test_a_refused_key_works_once_issued_when_nothing_is_cached(
    store: InMemoryStore,
) -> None:
    ring = keyring(store, ttl=0)
    secret = new_secret()
    with pytest.raises(Unauthorized):
        await ring.authenticate(secret)
    store.append_sync(ApiKey.issue(secret=secret, name="late", role="admin", meta=meta("o")))
    assert (await ring.authenticate(secret)).is_admin


class GatedStore(InMemoryStore):
    """Loads wait for the gate to open, and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.loads = 0

    async def load(self, cls: type[A], aggregate_id: UUID) -> A | None:
        self.loads += 1
        await self.gate.wait()
        return self.load_sync(cls, aggregate_id)


async def test_requests_that_miss_together_share_one_load() -> None:
    """When a busy key's entry expires, its requests in flight do not each load the key."""
    store = GatedStore()
    ring = keyring(store, ttl=30)
    new = ring.issue(name="busy", role="client", owner="owner-b")
    waiting = [asyncio.ensure_future(ring.authenticate(new.secret)) for _ in range(50)]
    await asyncio.sleep(0)  # let every request reach the lookup
    store.gate.set()
    assert await asyncio.gather(*waiting) == [new.principal] * 50
    assert store.loads == 1


async def test_a_caller_giving_up_does_not_cancel_the_shared_load() -> None:
    store = GatedStore()
    ring = keyring(store, ttl=30)
    new = ring.issue(name="busy", role="client", owner="owner-b")
    impatient = asyncio.ensure_future(ring.authenticate(new.secret))
    patient = asyncio.ensure_future(ring.authenticate(new.secret))
    await asyncio.sleep(0)
    impatient.cancel()
    store.gate.set()
    assert await patient == new.principal
    assert impatient.cancelled()
    assert store.loads == 1


async def test_a_shared_refusal_refuses_every_caller() -> None:
    store = GatedStore()
    ring = keyring(store, ttl=30)
    secret = new_secret()
    waiting = [asyncio.ensure_future(ring.authenticate(secret)) for _ in range(3)]
    await asyncio.sleep(0)
    store.gate.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, Unauthorized) for o in outcomes)
    assert store.loads == 1


def test_the_first_admin_key_is_issued_once(store: InMemoryStore) -> None:
    ring = keyring(store)
    first = ring.issue_first_admin()
    assert first is not None
    assert first.principal.is_admin
    assert ring.issue_first_admin() is None
    installation = store.load_sync(Installation, INSTALLATION_ID)
    assert installation is not None
    assert installation.admin_key_id == key_id_for(first.secret)


def test_principals_see_their_own_owner_and_admins_see_all() -> None:
    client = Principal(key_id="k1", owner="owner-a", role="client", name="app")
    admin = Principal(key_id="k2", owner="admin", role="admin", name="admin")
    assert client.may_see("owner-a")
    assert not client.may_see("owner-b")
    assert admin.may_see("owner-b")
    admin.require_admin()
    with pytest.raises(Forbidden):
        client.require_admin()


def revoke_elsewhere(store: InMemoryStore, secret: str) -> None:
    """As ``almanac keys revoke`` does, in another process."""
    assert keyring(store).revoke(key_id_for(secret)) is not None


async def test_a_revoked_key_is_refused_once_forgotten_and_not_before() -> None:
    store = GatedStore()
    store.gate.set()
    ring = keyring(store, ttl=30)
    revoked, kept = (ring.issue(name=n, role="client", owner="o") for n in ("a", "b"))
    for new in (revoked, kept):
        assert await ring.authenticate(new.secret) == new.principal
    revoke_elsewhere(store, revoked.secret)
    assert await ring.authenticate(revoked.secret) == revoked.principal  # remembered
    ring.forget(revoked.principal.key_id)
    with pytest.raises(Unauthorized):
        await ring.authenticate(revoked.secret)
    loads = store.loads
    assert await ring.authenticate(kept.secret) == kept.principal
    assert store.loads == loads  # another key's check is still remembered


class LoadedStore(GatedStore):
    """A gated store that also counts the loads it has finished."""

    def __init__(self) -> None:
        super().__init__()
        self.finished = 0
        self.request_ids: list[str | None] = []  # the request id each load ran under

    async def load(self, cls: type[A], aggregate_id: UUID) -> A | None:
        self.request_ids.append(REQUEST_ID.get())
        try:
            return await super().load(cls, aggregate_id)
        finally:
            self.finished += 1


async def settled(store: LoadedStore, loads: int) -> None:
    """Until ``loads`` loads have finished, turn by turn of the loop (a bounded number)."""
    for _ in range(100):
        if store.finished >= loads:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{store.finished} loads finished, not {loads}")


async def checked_once(name: str) -> tuple[LoadedStore, Clock, KeyRing, IssuedKey]:
    """A key issued and checked once, on a ring with a 30 s cache and a hand-moved clock."""
    store, clock = LoadedStore(), Clock()
    store.gate.set()
    ring = KeyRing(cast("Any", store), 30, clock=clock)
    new = ring.issue(name=name, role="client", owner="o")
    assert await ring.authenticate(new.secret) == new.principal
    return store, clock, ring, new


async def test_a_valid_keys_answer_is_checked_again_before_it_expires_and_nobody_waits() -> None:
    store, clock, ring, new = await checked_once("busy")
    clock.now += 20  # two thirds of its time: answered from the cache, no check begun
    assert await ring.authenticate(new.secret) == new.principal
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.loads == 1
    store.gate.clear()  # a check from now on waits at the gate
    clock.now += 3  # past three quarters: checked again, in the background
    answers = [await ring.authenticate(new.secret) for _ in range(5)]
    assert answers == [new.principal] * 5
    for _ in range(10):  # the check's task starts on a later turn of the loop
        await asyncio.sleep(0)
    assert store.loads == 2  # one check for the five
    store.gate.set()
    await settled(store, 2)
    clock.now += 29  # 52 s after the first check, 29 after the second: still cached
    assert await ring.authenticate(new.secret) == new.principal
    assert store.loads == 2


async def test_a_revocation_found_by_the_check_ahead_refuses_the_key_from_then_on() -> None:
    store, clock, ring, new = await checked_once("soon-revoked")
    revoke_elsewhere(store, new.secret)
    clock.now += 25
    assert await ring.authenticate(new.secret) == new.principal  # the entry, still in time
    await settled(store, 2)
    with pytest.raises(Unauthorized):
        await ring.authenticate(new.secret)


async def test_an_answer_is_never_used_past_its_time_in_the_cache() -> None:
    """Not even while a check ahead has not come back: requests then wait for it."""
    store, clock, ring, new = await checked_once("slow")
    store.gate.clear()
    clock.now += 25
    assert await ring.authenticate(new.secret) == new.principal  # begins the check ahead
    clock.now += 5  # expired, with the check still at the gate
    waiting = asyncio.ensure_future(ring.authenticate(new.secret))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiting.done()
    store.gate.set()
    assert await waiting == new.principal
    assert store.loads == 2  # the waiting request shared the check ahead


async def test_a_check_ahead_that_fails_leaves_the_entry_until_it_expires() -> None:
    """And is tried again a second later at the soonest, not on every request."""
    store, clock, ring, new = await checked_once("flaky")
    failing = store.load_sync

    def broken(cls: Any, aggregate_id: UUID) -> Any:
        raise OSError("the store is away")

    store.load_sync = broken  # type: ignore[method-assign]
    clock.now += 25
    with capture_logs() as logged:
        token = REQUEST_ID.set("trace-started-it")
        assert await ring.authenticate(new.secret) == new.principal
        REQUEST_ID.reset(token)
        await settled(store, 2)
        assert store.request_ids[-1] is None  # not the id of the request that started it
        for _ in range(20):  # within the second: the entry stands, nothing is checked
            assert await ring.authenticate(new.secret) == new.principal
            await asyncio.sleep(0)
        assert store.loads == 2
        clock.now += 1  # a second on: checked again, once
        for _ in range(20):
            assert await ring.authenticate(new.secret) == new.principal
            await asyncio.sleep(0)
        await settled(store, 3)
        assert store.loads == 3
    assert [e["event"] for e in logged] == ["auth.key_check_failed"] * 2
    assert logged[0]["key_id"] == str(new.principal.key_id)
    assert "the store is away" in logged[0]["error"]
    clock.now += 5  # expired: the next request waits for a check of its own, and hears it
    with pytest.raises(OSError, match="away"):
        await ring.authenticate(new.secret)
    store.load_sync = failing  # type: ignore[method-assign]
    assert await ring.authenticate(new.secret) == new.principal


async def test_stopping_cancels_the_checks_still_running() -> None:
    store, clock, ring, new = await checked_once("stopping")
    store.gate.clear()
    clock.now += 25
    assert await ring.authenticate(new.secret) == new.principal  # begins a check ahead
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.loads == 2
    await asyncio.wait_for(ring.stop(), timeout=5)  # a deadline: the gate stays shut
    assert store.finished == 2  # ended, at the gate, by its cancellation


async def checking(ring: KeyRing, store: GatedStore, secret: str) -> asyncio.Future[Any]:
    """A check of ``secret`` whose load has begun, and waits at the gate."""
    check = asyncio.ensure_future(ring.authenticate(secret))
    for _ in range(100):
        if store.loads:
            break
        await asyncio.sleep(0)
    assert store.loads == 1
    return check


async def test_a_check_begun_before_a_revocation_is_not_remembered() -> None:
    """Its answer may have been read before the revocation was stored."""
    store = GatedStore()
    ring = keyring(store, ttl=30)
    new = ring.issue(name="racing", role="client", owner="o")
    early = await checking(ring, store, new.secret)
    ring.forget(new.principal.key_id)
    store.gate.set()
    assert await early == new.principal
    revoke_elsewhere(store, new.secret)
    with pytest.raises(Unauthorized):
        await ring.authenticate(new.secret)
    assert store.loads == 2


class ReadThenGatedStore(GatedStore):
    """Loads read the key at once, then wait for the gate to hand it over."""

    async def load(self, cls: type[A], aggregate_id: UUID) -> A | None:
        self.loads += 1
        read = self.load_sync(cls, aggregate_id)
        await self.gate.wait()
        return read


async def test_a_check_after_a_revocation_does_not_share_a_load_begun_before_it() -> None:
    store = ReadThenGatedStore()
    ring = keyring(store, ttl=30)
    new = ring.issue(name="racing", role="client", owner="o")
    early = await checking(ring, store, new.secret)
    revoke_elsewhere(store, new.secret)
    ring.forget(new.principal.key_id)
    later = asyncio.ensure_future(ring.authenticate(new.secret))
    await asyncio.sleep(0)
    store.gate.set()
    assert await early == new.principal  # it was asked before the revocation
    with pytest.raises(Unauthorized):
        await later
    assert store.loads == 2


def test_revoking_a_key_revoked_by_another_at_the_same_moment_succeeds(
    store: InMemoryStore,
) -> None:
    ring = keyring(store)
    new = ring.issue(name="twice", role="client", owner="o")
    loaded = store.load_sync

    def raced(cls: type[A], aggregate_id: UUID) -> A | None:
        key = loaded(cls, aggregate_id)
        store.load_sync = loaded  # type: ignore[method-assign]
        revoke_elsewhere(store, new.secret)  # between this load and the append
        return key

    store.load_sync = raced  # type: ignore[method-assign]
    revoked = ring.revoke(key_id_for(new.secret))
    assert revoked is not None and revoked.revoked
    assert len(store.events[key_id_for(new.secret)]) == 2


def test_a_revocation_that_keeps_conflicting_is_an_error_not_a_loop(
    store: InMemoryStore,
) -> None:
    """A conflict that is no other revocation (an integrity error the store reports as one)."""
    ring = keyring(store)
    new = ring.issue(name="stuck", role="client", owner="o")

    def refusing(*aggregates: Aggregate) -> int:
        raise ConcurrencyConflict("the aggregate was changed by another command")

    store.append_sync = refusing  # type: ignore[method-assign]
    with pytest.raises(ConcurrencyConflict):
        ring.revoke(key_id_for(new.secret))
