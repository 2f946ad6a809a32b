"""The webhook delivery log's claims, on SQLite and on Postgres."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from almanac.settings import Settings
from streams.webhook_log import DeliveryLog, NewMessage
from tests.integration.support_databases import fresh_read_database

LEASE = 60.0


@pytest.fixture
async def deliveries(settings: Settings, tmp_path: Path) -> AsyncIterator[DeliveryLog]:
    async with fresh_read_database(settings, tmp_path) as db:
        log = DeliveryLog(db)
        await log.prepare()
        yield log


async def queue(log: DeliveryLog, endpoint_id: str, count: int) -> None:
    await log.add(
        [
            NewMessage(f"{endpoint_id}-{i}", endpoint_id, "alice", "reading.requested", i, "{}")
            for i in range(count)
        ]
    )


async def test_a_claim_takes_no_more_of_an_endpoint_than_its_share_less_what_is_held(
    deliveries: DeliveryLog,
) -> None:
    for endpoint_id in ("a", "b", "c", "d"):
        await queue(deliveries, endpoint_id, 10)
    held = {"a": 2, "b": 6, "c": 9}  # d: none held
    claimed = await deliveries.claim(100, 6, LEASE, held, "token-1")
    assert Counter(m.endpoint_id for m in claimed) == {"a": 4, "d": 6}
    # What one claim took, no other claim takes while its lease runs.
    again = await deliveries.claim(100, 6, LEASE, {}, "token-2")
    assert not {m.id for m in claimed} & {m.id for m in again}
    assert Counter(m.endpoint_id for m in again) == {"a": 6, "b": 6, "c": 6, "d": 4}


async def test_a_claim_takes_the_earliest_due_first_up_to_its_limit(
    deliveries: DeliveryLog,
) -> None:
    await queue(deliveries, "a", 3)
    await queue(deliveries, "b", 3)  # queued later: due later
    claimed = await deliveries.claim(4, 10, LEASE, {}, "token")
    assert Counter(m.endpoint_id for m in claimed) == {"a": 3, "b": 1}
    assert {m.claim for m in claimed} == {"token"}
