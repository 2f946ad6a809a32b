"""Redis connection handling (services profile)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from almanac.errors import Unavailable

# What a call to Redis raises when Redis is away: its own errors, socket errors, timeouts.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)


class RedisConnection:
    def __init__(self, url: str, *, socket_timeout: float = 2.0) -> None:
        self.url = url
        # Keys live in this database; pub/sub channels are the server's, shared by all.
        self.db = int(parse_url(url).get("db", 0))
        self._socket_timeout = socket_timeout
        self.client: Any = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=socket_timeout,
            socket_timeout=socket_timeout,
            health_check_interval=30,
            # One quick retry replaces a pooled connection that broke since its last use
            # (Redis restarted); more would only delay the caller's fallback to Postgres.
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), 1),
        )
        self._subscriber: Any = None

    def pubsub(self) -> Any:
        """A pub/sub session on a client that never reconnects by itself.

        redis-py would otherwise reconnect and resubscribe silently, hiding from the caller
        that messages were published while it was away.
        """
        if self._subscriber is None:
            self._subscriber = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=self._socket_timeout,
                socket_timeout=self._socket_timeout,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 0),
            )
        return self._subscriber.pubsub()

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            raise Unavailable(f"Redis is not answering: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()
        if self._subscriber is not None:
            await self._subscriber.aclose()
            self._subscriber = None
