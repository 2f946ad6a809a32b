"""Fixtures shared by every layer: settings for each profile, with isolated data.

Service tests need the local Postgres, Redis and NATS. Without them they skip with the
reason, unless ALMANAC_REQUIRE_SERVICES=1 (CI), where a missing engine fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import nats
import psycopg
import pytest
import stamina
import structlog
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from psycopg import sql

from almanac.settings import (
    CacheSettings,
    FeedSettings,
    LogSettings,
    RelaySettings,
    Settings,
    StoreSettings,
    WebhookSettings,
)

PG_ADMIN_URL = os.environ.get(
    "ALMANAC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ALMANAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("ALMANAC_TEST_NATS_URL", "nats://127.0.0.1:4222")
PROFILES = ["embedded", "services"]

# Two xdist workers share two cores with the services: generation speed and per-example time
# vary with the load, so neither is held against a property (the properties still run).
hypothesis_settings.register_profile(
    "almanac", suppress_health_check=[HealthCheck.too_slow], deadline=None
)
hypothesis_settings.load_profile("almanac")


@pytest.fixture
def restored() -> Iterator[None]:
    """Logging as it was, after a test (or a command it runs) configured it its own way."""
    root, access = logging.getLogger(), logging.getLogger("uvicorn.access")
    handlers, level, access_level = root.handlers[:], root.level, access.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
        access.setLevel(access_level)


@pytest.fixture(autouse=True, scope="session")
def _stamina_testing() -> Iterator[None]:
    # Retries happen at once in tests; the retry logic itself still runs.
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing_services() -> list[str]:
    missing = []
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            pass
    except psycopg.OperationalError:
        missing.append("Postgres at 127.0.0.1:5432")
    if not _port_open("127.0.0.1", 6379):
        missing.append("Redis at 127.0.0.1:6379")
    if not _port_open("127.0.0.1", 4222):
        missing.append("NATS at 127.0.0.1:4222")
    return missing


@pytest.fixture(scope="session")
def services() -> None:
    """Require the real engines; skip (or fail in CI) when they are not there."""
    missing = _missing_services()
    if missing:
        reason = "services not available: " + ", ".join(missing)
        if os.environ.get("ALMANAC_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (ALMANAC_REQUIRE_SERVICES=1)")
        pytest.skip(reason)


def _drop(names: list[str]) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def postgres_url(services: None) -> Iterator[str]:
    """A fresh, empty event-store database (its ``_read`` twin is made by the app)."""
    name = f"almanac_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _drop([name, f"{name}_read"])
    delete_nats_stream(NATS_URL, stream_name_for(name))


def stream_name_for(database: str) -> str:
    """The JetStream stream of the relay of one test database (each test has its own)."""
    return f"TEST_{database}"


def delete_nats_stream(url: str, name: str) -> None:
    """Delete a test's stream, if it exists (called outside any event loop)."""

    async def delete() -> None:
        client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jetstream().delete_stream(name)
        finally:
            await client.close()

    # Its own thread and loop: a sync teardown may run while a test's loop is still set.
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        contextlib.suppress(OSError, TimeoutError, nats.errors.Error),
    ):
        pool.submit(asyncio.run, delete()).result(timeout=15)


# Tests send webhooks to receivers on 127.0.0.1 over plain HTTP, with the retry schedule
# compressed a thousandfold (5 s → 5 ms, 5 min → 0.3 s) and a short circuit-breaker pause.
TEST_WEBHOOKS = WebhookSettings(
    secret_key="dGVzdC1vbmx5LXdlYmhvb2stc2VjcmV0LWtleS0zMmI=",  # noqa: S106 - tests only
    allowed_networks=("127.0.0.0/8",),
    allow_http=True,
    retry_scale=0.001,
    breaker_cooldown=0.2,
    poll_interval=0.05,
)


def embedded_settings(data_dir: Path) -> Settings:
    return Settings(
        store=StoreSettings(data_dir=data_dir),
        feed=FeedSettings(poll_interval=0.2),
        log=LogSettings(level="WARNING"),
        webhooks=TEST_WEBHOOKS,
    )


def services_settings(postgres_url: str) -> Settings:
    # The relay of every test publishes to a stream and subjects of its own, named after
    # the test's database (and deleted with it).
    database = urlsplit(postgres_url).path.lstrip("/")
    return Settings(
        store=StoreSettings(postgres_url=postgres_url, pool_size=4),
        cache=CacheSettings(redis_url=REDIS_URL),
        feed=FeedSettings(nats_url=NATS_URL, poll_interval=0.2),
        log=LogSettings(level="WARNING"),
        relay=RelaySettings(
            stream=stream_name_for(database), subject_prefix=f"test.{database}.events"
        ),
        webhooks=TEST_WEBHOOKS,
    )


@pytest.fixture(params=PROFILES)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for each profile in turn, each with its own empty data."""
    if request.param == "embedded":
        return embedded_settings(tmp_path / "var")
    url = request.getfixturevalue("postgres_url")
    return services_settings(url)
