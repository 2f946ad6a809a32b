"""NATS connection handling (services profile)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit


def _import_nats_without_aiohttp() -> None:
    """Import nats-py without the aiohttp it loads (~9 MB of RSS in every process) for
    servers reached over WebSocket, which a URL of ``ws``/``wss`` asks for
    (``_websocket_transport``). Only the first import of nats-py in a process decides, so
    the ``streams`` package imports this module before its own modules import nats-py; a
    process that delivers webhooks loads aiohttp for that, later, all the same."""
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment] # an import of it fails
    try:
        import nats.aio.transport  # noqa: F401 - its ``aiohttp`` is then None
    finally:
        del sys.modules["aiohttp"]


_import_nats_without_aiohttp()

import nats  # noqa: E402 - after the above
import structlog  # noqa: E402
from nats.errors import Error as NatsError  # noqa: E402

from almanac.errors import Unavailable  # noqa: E402

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
                if urlsplit(self.url).scheme in {"ws", "wss"}:
                    _websocket_transport()
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


def _websocket_transport() -> None:
    """Give nats-py the aiohttp it goes without since ``_import_nats_without_aiohttp``."""
    import aiohttp  # only for a NATS server reached over WebSocket
    import multidict  # for its headers; nats-py imports the two together
    from nats.aio import transport

    module: Any = transport  # its ``aiohttp`` is typed as always there
    if module.aiohttp is None:
        module.aiohttp, module.multidict = aiohttp, multidict
