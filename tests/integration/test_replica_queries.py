"""The API reading from a real hot standby of the read database (services profile)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from almanac.adapters.replicas import ReadRouter
from almanac.app import create_app
from almanac.bootstrap import bootstrap
from almanac.settings import Settings, StoreSettings
from tests.conftest import services_settings
from tests.factories import birth_json
from tests.integration.support_app import on_app_loop
from tests.integration.support_replica import (
    Server,
    StreamingPair,
    require_server_binaries,
    streaming_pair,
)
from tests.integration.support_waiting import eventually

DATABASE = "almanac_read"


@pytest.fixture(scope="module")
def pair() -> Iterator[StreamingPair]:
    require_server_binaries()
    with streaming_pair() as built:
        yield built


def replicated_settings(
    pair: StreamingPair, postgres_url: str, database: str = DATABASE, max_lag: int = 0
) -> Settings:
    """Services settings whose read database is ``database`` on the pair's primary, with its
    standby as the one replica, usable only within ``max_lag`` of the primary (by default
    only when level with it)."""
    return msgspec.structs.replace(
        services_settings(postgres_url),
        store=StoreSettings(
            postgres_url=postgres_url,
            read_postgres_url=pair.primary.url(database),
            read_replica_urls=(pair.standby.url(database),),
            replica_max_lag=max_lag,
            pool_size=4,
        ),
    )


async def test_queries_are_served_by_a_fresh_replica_and_reads_stay_consistent(
    pair: StreamingPair, postgres_url: str
) -> None:
    settings = replicated_settings(pair, postgres_url)
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


async def test_batch_job_webhook_and_dead_letter_queries_are_routed_to_a_fresh_replica(
    pair: StreamingPair, postgres_url: str
) -> None:
    """Each query is routed by its own projection's position on the standby, and with
    ``min_position`` a standby serves it only once it has replayed that far."""
    # A database of its own: the standby replays it from the start, as it does the first.
    settings = replicated_settings(pair, postgres_url, f"{DATABASE}_2")
    container = bootstrap(settings)
    router = container.read_router
    assert router is not None
    async with AsyncTestClient(create_app(settings, container)) as client:
        client_key, admin_key = [
            (await asyncio.to_thread(container.keyring.issue, name=n, role=n, owner=n)).secret
            for n in ("client", "admin")
        ]
        auth = {"Authorization": f"Bearer {client_key}"}
        batch = await client.post(
            "/api/v1/batches", json={"items": [{"birth": birth_json()}]}, headers=auth
        )
        assert batch.status_code == 202, batch.text
        hook = await client.post(
            "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=auth
        )
        assert hook.status_code == 201, hook.text
        batch_id, hook_id = batch.json()["id"], hook.json()["id"]
        after = max(int(r.headers["almanac-position"]) for r in (batch, hook))
        expected = {
            "/api/v1/batches": lambda body: [b["id"] for b in body["data"]] == [batch_id],
            f"/api/v1/batches/{batch_id}": lambda body: body["id"] == batch_id,
            f"/api/v1/batches/{batch_id}/results": lambda body: len(body["data"]) == 1,
            "/api/v1/jobs": lambda body: batch_id in [j["id"] for j in body["data"]],
            f"/api/v1/jobs/{batch_id}": lambda body: body["kind"] == "batch",
            "/api/v1/webhooks": lambda body: [w["id"] for w in body["data"]] == [hook_id],
            f"/api/v1/webhooks/{hook_id}": lambda body: body["url"].endswith("/hook"),
        }
        for path, holds in expected.items():
            await served_by_replica(
                client, router, path, min_position=after, headers=auth, holds=holds
            )
        admin = {"Authorization": f"Bearer {admin_key}"}
        assert (await client.get("/api/v1/monitoring/replicas", headers=auth)).status_code == 403
        report = await client.get("/api/v1/monitoring/replicas", headers=admin)
        assert report.status_code == 200, report.text
        primary, replica = report.json()["sources"]
        assert (primary["role"], replica["role"], replica["healthy"]) == (
            "primary",
            "replica",
            True,
        )
        # Every projection is reported, with the replica's lag behind the primary in each.
        assert {"readings", "batches", "webhook_endpoints"} <= set(replica["positions"])
        assert set(replica["lags"]) >= set(replica["positions"])
        assert replica["routed"] >= len(expected)
        await served_by_replica(
            client,
            router,
            "/api/v1/dead-letters",
            min_position=0,
            headers=admin,
            holds=lambda body: body["data"] == [],
        )


@contextlib.asynccontextmanager
async def replay_paused(standby: Server) -> AsyncIterator[None]:
    """The standby answering queries but replaying no more WAL: it stays where it is."""
    async with await psycopg.AsyncConnection.connect(standby.url(), autocommit=True) as conn:
        await conn.execute("SELECT pg_wal_replay_pause()")

        async def paused() -> bool:
            cursor = await conn.execute("SELECT pg_get_wal_replay_pause_state()")
            row = await cursor.fetchone()
            return row is not None and row[0] == "paused"

        await eventually(paused, what="the standby's replay paused")
        try:
            yield
        finally:
            await conn.execute("SELECT pg_wal_replay_resume()")


async def test_paging_on_never_reads_from_a_standby_behind_the_page_before(
    pair: StreamingPair, postgres_url: str
) -> None:
    """Page one is read from the primary while the standby's replay is paused behind it.
    The standby is within ``max_lag``, so reads naming no position may go there; had it
    served page two, the readings between its position and the cursor would be missing."""
    settings = replicated_settings(pair, postgres_url, f"{DATABASE}_3", max_lag=10_000)
    container = bootstrap(settings)
    router = container.read_router
    assert router is not None
    async with AsyncTestClient(create_app(settings, container)) as client:
        key = (
            await asyncio.to_thread(container.keyring.issue, name="a", role="client", owner="a")
        ).secret
        auth = {"Authorization": f"Bearer {key}"}

        async def post() -> Any:
            posted = await client.post(
                "/api/v1/readings", json={"birth": birth_json()}, headers=auth
            )
            assert posted.status_code == 202, posted.text
            return posted

        older = [await post() for _ in range(2)]
        await served_by_replica(
            client,
            router,
            "/api/v1/readings",
            min_position=int(older[-1].headers["almanac-position"]),
            headers=auth,
            holds=lambda body: len(body["data"]) == 2,
        )
        async with replay_paused(pair.standby):
            newer = [await post() for _ in range(3)]
            url = f"/api/v1/readings?limit=2&min_position={newer[-1].headers['almanac-position']}"
            seen: list[str] = []
            positions: list[int] = []
            while url:
                got = await client.get(url, headers=auth)
                assert got.status_code == 200, got.text
                page = got.json()
                seen += [r["id"] for r in page["data"]]
                positions.append(page["position"])
                cursor = page["next_cursor"]
                url = cursor and f"/api/v1/readings?limit=2&cursor={cursor}"
            standby = {s.role: s for s in router.stats()}["replica"]
            assert standby.healthy, "the standby answered all along; it was only behind"
        assert seen == [r.json()["id"] for r in reversed(older + newer)], "none skipped"
        assert positions == sorted(positions), "no page reads from further back than the one before"


async def served_by_replica(
    client: AsyncTestClient[Any],
    router: ReadRouter,
    path: str,
    *,
    min_position: int,
    headers: dict[str, str],
    holds: Callable[[Any], bool],
) -> None:
    """GET ``path`` until the replica answers it: every answer, from whichever source, must
    hold what ``holds`` checks, and a page must reflect at least ``min_position``."""
    deadline = time.monotonic() + 30
    while True:
        before = router.stats()[1].routed
        response = await client.get(path, params={"min_position": min_position}, headers=headers)
        assert response.status_code == 200, f"{path}: {response.text}"
        assert holds(response.json()), f"{path}: {response.text}"
        body = response.json()
        if "data" in body:  # a page reflects a read position (a resource shows its own)
            assert body["position"] >= min_position, f"{path}: {response.text}"
            assert response.headers["almanac-position"] == str(body["position"])
        if router.stats()[1].routed > before:
            return
        assert time.monotonic() < deadline, f"{path} never served by the replica: {router.stats()}"
        await on_app_loop(client, router.refresh)
