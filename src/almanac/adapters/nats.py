"""NATS connection handling (services profile)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import structlog
from nats.errors import Error as NatsError

from almanac.errors import Unavailable

log = structlog.get_logger("almanac.nats")


class NatsConnection:
    """A connection that is made lazily and reconnects by itself."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Any = None
        self._lock = asyncio.Lock()

    async def connect(self) -> Any:
        async with self._lock:
            if self.client is None or self.client.is_closed:
                try:
                    self.client = await nats.connect(
                        self.url,
                        connect_timeout=2,
                        max_reconnect_attempts=-1,
                        allow_reconnect=True,
                        name="almanac",
                    )
                except (NatsError, OSError, TimeoutError) as exc:
                    raise Unavailable(f"NATS is not answering: {exc}") from exc
            return self.client

    async def ping(self) -> None:
        client = await self.connect()
        if not client.is_connected:
            raise Unavailable("NATS is reconnecting")
        try:
            await client.flush(timeout=2)
            await client.jetstream().account_info()
        except (NatsError, OSError, TimeoutError) as exc:
            raise Unavailable(f"NATS (JetStream) is not answering: {exc}") from exc

    async def close(self) -> None:
        if self.client is not None and not self.client.is_closed:
            await self.client.drain()
