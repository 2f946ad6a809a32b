"""Webhooks without I/O: event-type filters, the SSRF rules, signing, the retry schedule,
the circuit breaker and secrets at rest."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import uuid4

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from standardwebhooks.webhooks import Webhook

from almanac.adapters.secretbox import SecretBox, SecretUnreadable
from almanac.adapters.webhook_targets import TargetGuard, TargetRefused, is_public
from almanac.domain.events import EventMeta
from almanac.domain.webhook import (
    WebhookEndpoint,
    check_event_types,
    matches,
    new_signing_secret,
)
from almanac.errors import Unavailable, ValidationFailed
from almanac.eventstore import RecordedEvent
from almanac.readmodels import ReadDatabase
from almanac.settings import WebhookSettings
from streams.envelope import envelope_of
from streams.webhook_log import Claimed, DeliveryLog
from streams.webhooks import (
    Breaker,
    WebhookDeliverer,
    message_id_for,
    retry_after,
    retry_delay,
    sign,
)

META = EventMeta.for_request("alice")


def test_a_signing_secret_is_whsec_and_24_random_bytes() -> None:
    secret = new_signing_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert new_signing_secret() != secret


@pytest.mark.parametrize(
    ("patterns", "event_type", "expected"),
    [
        ([], "reading.generated", True),
        (["reading.*"], "reading.generated", True),
        (["reading.generated"], "reading.requested", False),
        (["*"], "reading.failed", True),
        (["reading.*"], "api_key.issued", False),
        ([], "webhook_endpoint.created", False),
    ],
)
def test_event_type_filters_match_with_wildcards(
    patterns: list[str], event_type: str, expected: bool
) -> None:
    assert matches(patterns, event_type) is expected


def test_rejects_event_types_that_are_not_names_or_patterns() -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_event_types(["reading.*", "Bad Type", "a..b"])
    assert [e.field for e in caught.value.errors] == ["event_types.1", "event_types.2"]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "224.0.0.1", "240.0.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1",  # noqa: S104 - an address under test
    ],
)  # fmt: skip
def test_private_and_reserved_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_internet_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


async def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]

    guard = TargetGuard(WebhookSettings(), resolver=resolver)
    with pytest.raises(TargetRefused, match=r"resolves to 10\.0\.0\.7"):
        await guard.check("https://sneaky.example/hook")


async def test_allowed_networks_and_http_are_opt_in() -> None:
    strict = TargetGuard(WebhookSettings())
    with pytest.raises(TargetRefused, match="https://"):
        await strict.check("http://93.184.216.34/")
    with pytest.raises(TargetRefused, match="private"):
        await strict.check("https://127.0.0.1/")
    relaxed = TargetGuard(WebhookSettings(allowed_networks=("127.0.0.0/8",), allow_http=True))
    assert await relaxed.check("http://127.0.0.1:8080/hook") == ["127.0.0.1"]
    with pytest.raises(TargetRefused, match="credentials"):
        await relaxed.check("http://user:pw@127.0.0.1/")


def test_signatures_verify_with_the_standardwebhooks_library() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    at = datetime.now(UTC)
    body = '{"type":"webhook.test"}'
    header = sign([new, old], "msg_1", at, body)
    assert header.count("v1,") == 2
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": header,
    }
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "webhook.test"}


def test_the_webhook_id_is_stable_per_event_and_endpoint() -> None:
    assert message_id_for("e1", 7) == message_id_for("e1", 7)
    assert len({message_id_for("e1", 7), message_id_for("e2", 7), message_id_for("e1", 8)}) == 3


@given(st.integers(min_value=1, max_value=7))
def test_retry_delays_follow_the_schedule_with_jitter(attempts: int) -> None:
    settings = WebhookSettings()
    delay = retry_delay(settings, attempts)
    base = settings.retry_schedule[attempts - 1]
    assert delay is not None
    assert 0.8 * base <= delay <= 1.2 * base


def test_the_schedule_is_spent_after_seven_retries_and_scales() -> None:
    assert retry_delay(WebhookSettings(), 8) is None
    scaled = retry_delay(WebhookSettings(retry_scale=0.001), 2)
    assert scaled is not None and 0.24 <= scaled <= 0.36


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(CIMultiDict({"Retry-After": "7"})) == 7.0
    later = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    value = retry_after(CIMultiDict({"retry-after": later}))
    assert value is not None and 55 <= value <= 61
    assert retry_after(CIMultiDict()) is None


def test_the_breaker_opens_after_a_run_of_failures_then_lets_one_probe_through() -> None:
    breaker = Breaker()
    for _ in range(3):
        assert breaker.blocked(0.0, 10.0, 3) is None
        breaker.record(ok=False, now=0.0, cooldown=10.0, threshold=3)
    assert breaker.blocked(5.0, 10.0, 3) == 10.0
    assert breaker.blocked(10.0, 10.0, 3) is None  # the probe
    assert breaker.blocked(11.0, 10.0, 3) == 20.0  # the rest wait for its answer
    breaker.record(ok=True, now=12.0, cooldown=10.0, threshold=3)
    assert breaker.blocked(12.0, 10.0, 3) is None


def test_secrets_are_sealed_and_a_foreign_key_cannot_open_them() -> None:
    box = SecretBox(Fernet.generate_key())
    sealed = box.seal("whsec_abc")
    assert "whsec_abc" not in sealed
    assert box.open(sealed) == "whsec_abc"
    with pytest.raises(SecretUnreadable):
        SecretBox(Fernet.generate_key()).open(sealed)


def test_the_envelope_leaves_sealed_secrets_out() -> None:
    endpoint = WebhookEndpoint.create(
        endpoint_id=uuid4(),
        meta=META,
        url="https://example.com/hook",
        event_types=["reading.*"],
        description="",
        rate_limit=None,
        secret_sealed="sealed-secret",  # noqa: S106 - a stand-in
    )
    endpoint.rotate_secret(META, "sealed-2", datetime.now(UTC))
    for i, event in enumerate(endpoint.collect_events(), start=1):
        data = envelope_of(RecordedEvent.of(event, i)).data
        assert "secret_sealed" not in data
        assert "previous_secret_sealed" not in data


class RefusingDb:
    """A read database that refuses any write holding the message ``bad``, and keeps the
    settles it took."""

    dialect = "sqlite"

    def __init__(self) -> None:
        self.settled: list[str] = []
        self.writes = 0
        self.down = False

    async def write(self, writes: list[Any]) -> None:
        self.writes += 1
        if self.down:
            raise Unavailable("the read database is not answering")
        ids = [row["id"] for sql, rows in writes if sql.startswith("UPDATE") for row in rows]
        if "bad" in ids:
            raise ValueError("a row the database refuses")
        self.settled += ids


def claimed(message_id: str, *, leased_until: float = 1e12) -> Claimed:
    return Claimed(
        id=message_id,
        endpoint_id="e",
        owner="alice",
        event_type="reading.requested",
        payload="{}",
        attempts=0,
        created_at=0.0,
        claim="token",
        leased_until=leased_until,
    )


async def settled_together(db: RefusingDb, ids: Sequence[str]) -> list[Any]:
    """The outcomes of settling messages ``ids`` at once (so in one transaction, if any)."""
    deliveries = DeliveryLog(cast("ReadDatabase", db))
    return await asyncio.gather(
        *(
            deliveries.settle(
                claimed(i), status="succeeded", attempts=1, next_attempt_at=None, attempt=None
            )
            for i in ids
        ),
        return_exceptions=True,
    )


async def test_settles_written_together_fail_only_for_the_row_the_database_refuses() -> None:
    db = RefusingDb()
    outcomes = await settled_together(db, ("one", "bad", "two"))
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "ValueError", "NoneType"]
    assert sorted(db.settled) == ["one", "two"]


async def test_settles_written_together_while_the_database_is_away_fail_at_once() -> None:
    """Not row by row: each would wait out the pool's timeout on its own."""
    db = RefusingDb()
    db.down = True
    outcomes = await settled_together(db, ("one", "two", "three"))
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert db.writes == 1


async def test_an_attempt_whose_lease_would_run_out_first_is_handed_back_unsent() -> None:
    """Sent this late, it could also be sent by whoever claims it once the lease runs out."""
    db = RefusingDb()
    settings = WebhookSettings(timeout=15.0)
    deliverer = WebhookDeliverer(
        cast("Any", None),
        cast("Any", None),
        DeliveryLog(cast("ReadDatabase", db)),
        cast("Any", None),
        cast("Any", None),
        TargetGuard(settings),
        settings,
    )
    answered: list[bool] = []
    late = claimed("late", leased_until=time.time() + 10.0)
    # No endpoint, store or client is set up: anything past the lease check would fail.
    await deliverer._attempt_now(late, lambda: answered.append(True))
    assert db.settled == ["late"] and not answered
