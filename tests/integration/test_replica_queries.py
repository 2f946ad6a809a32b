"""The API reading from a real hot standby of the read database (services profile)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from almanac.app import create_app
from almanac.bootstrap import bootstrap
from almanac.settings import Settings, StoreSettings
from tests.conftest import services_settings
from tests.factories import birth_json
from tests.integration.support_app import on_app_loop
from tests.integration.support_replica import StreamingPair, missing_prerequisites, streaming_pair


@pytest.fixture(scope="module")
def pair() -> Iterator[StreamingPair]:
    reason = missing_prerequisites()
    if reason is not None:
        if os.environ.get("ALMANAC_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (ALMANAC_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    with streaming_pair() as built:
        yield built


async def test_queries_are_served_by_a_fresh_replica_and_reads_stay_consistent(
    pair: StreamingPair, postgres_url: str
) -> None:
    base = services_settings(postgres_url)
    settings: Settings = msgspec.structs.replace(
        base,
        store=StoreSettings(
            postgres_url=postgres_url,
            read_postgres_url=pair.primary.url("almanac_read"),
            read_replica_urls=(pair.standby.url("almanac_read"),),
            replica_max_lag=0,
            pool_size=4,
        ),
    )
    container = bootstrap(settings)
    assert container.read_router is not None
    async with AsyncTestClient(create_app(settings, container)) as client:
        key = (
            await asyncio.to_thread(container.keyring.issue, name="a", role="client", owner="a")
        ).secret
        auth = {"Authorization": f"Bearer {key}"}
        posted = await client.post("/api/v1/readings", json={"birth": birth_json()}, headers=auth)
        assert posted.status_code == 202
        location = posted.headers["location"]
        # Read-your-writes holds whichever source answers.
        mine = await client.get(
            f"{location}?min_position={posted.headers['almanac-position']}", headers=auth
        )
        assert mine.status_code == 200, mine.text
        # Listings are not cached, so each one is routed: once the standby has replayed the
        # reading, the router sends them there.
        deadline = time.monotonic() + 30
        while True:
            listing = await client.get("/api/v1/readings", headers=auth)
            assert listing.status_code == 200, listing.text
            stats = {s.role: s for s in container.read_router.stats()}
            if stats["replica"].routed > 0 and listing.json()["data"]:
                break
            assert time.monotonic() < deadline, f"no listing served by the replica: {stats}"
            await on_app_loop(client, container.read_router.refresh)
        assert [r["id"] for r in listing.json()["data"]] == [posted.json()["id"]]
