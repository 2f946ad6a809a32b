"""Object graphs built by ``bootstrap`` for tests: started, and always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from almanac.bootstrap import bootstrap
from almanac.container import Container
from almanac.domain.reading import Reading
from almanac.settings import Settings
from tests.integration.support_waiting import eventually


@asynccontextmanager
async def running(settings: Settings, **overrides: Any) -> AsyncIterator[Container]:
    """A started container (every role); stopped on the way out, whatever happened."""
    container = bootstrap(settings, **overrides)
    try:
        await container.start()
        yield container
    finally:
        await container.stop()


async def settled(container: Container, ids: list[UUID]) -> list[Reading]:
    """Wait until every reading is generated or failed; return them all."""

    async def all_settled() -> list[Reading] | None:
        readings = [await container.store.load(Reading, i) for i in ids]
        if all(r is not None and r.settled for r in readings):
            return [r for r in readings if r is not None]
        return None

    return await eventually(all_settled, what=f"{len(ids)} readings settled")
