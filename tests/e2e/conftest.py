"""An Almanac app per test, driven over HTTP like a client, on each profile."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from almanac.app import create_app
from almanac.bootstrap import bootstrap
from almanac.container import Container
from almanac.settings import Settings
from tests.integration.support_app import on_app_loop

T = TypeVar("T")


@dataclass
class Api:
    client: AsyncTestClient[Any]
    container: Container
    admin: str
    alice: str
    bob: str

    async def on_app(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await a coroutine of the container on the app's own loop (see ``on_app_loop``)."""
        return await on_app_loop(self.client, fn, *args)

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def post_reading(self, key: str, body: dict[str, Any], **headers: str) -> Any:
        return await self.client.post(
            "/api/v1/readings", json=body, headers={**self.auth(key), **headers}
        )

    async def wait_for_status(
        self, key: str, accepted: Any, statuses: set[str], deadline: float = 20.0
    ) -> dict[str, Any]:
        """Follow the 202 response's Location until the reading reaches one of ``statuses``.

        Starts from the command's own position (read-your-writes), then waits for each next
        projected position, bounded by ``deadline``.
        """
        location = accepted.headers["location"]
        position = int(accepted.headers["almanac-position"])
        end = time.monotonic() + deadline
        while True:
            response = await self.client.get(
                f"{location}?min_position={position}", headers=self.auth(key)
            )
            assert time.monotonic() < end, f"no {statuses} after {deadline}s: {response.text}"
            if response.status_code == 503:  # not projected within the server's own wait
                continue
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] in statuses:
                return body
            position = body["position"] + 1

    async def event_count(self) -> int:
        return await self.on_app(self.container.store.max_position)


@asynccontextmanager
async def serving(
    settings: Settings, *, min_position_timeout: float = 5.0, **overrides: Any
) -> AsyncIterator[Api]:
    """An app on ``settings`` with an admin and two client keys; ``overrides`` go to bootstrap.

    Reads with ``min_position`` wait up to ``min_position_timeout`` seconds: long enough for
    a loaded machine, unless a test wants to see the wait run out.
    """
    settings = msgspec.structs.replace(
        settings,
        http=msgspec.structs.replace(settings.http, min_position_timeout=min_position_timeout),
    )
    # Each test keeps its Redis keys and invalidation channel to itself.
    container = bootstrap(settings, cache_prefix=f"test-{uuid.uuid4().hex[:8]}:", **overrides)
    app = create_app(settings, container)
    async with AsyncTestClient(app) as client:
        keys = [
            await asyncio.to_thread(container.keyring.issue, name=n, role=r, owner=o)
            for n, r, o in (
                ("admin", "admin", "admin"),
                ("a", "client", "alice"),
                ("b", "client", "bob"),
            )
        ]
        yield Api(client, container, keys[0].secret, keys[1].secret, keys[2].secret)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serving(settings) as api:
        yield api


@pytest.fixture
async def impatient_api(settings: Settings) -> AsyncIterator[Api]:
    """An app whose ``min_position`` reads give up after 0.3 s."""
    async with serving(settings, min_position_timeout=0.3) as api:
        yield api


@pytest.fixture
async def api_without_projectors(settings: Settings) -> AsyncIterator[Api]:
    """An impatient app with the API role alone: its commands are stored, and no read model
    ever reaches their positions."""
    async with serving(settings, min_position_timeout=0.3, roles=("api",)) as api:
        yield api
