"""A real Almanac server on a free port of 127.0.0.1, for clients that speak the network."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import uvicorn
import websockets

from almanac.app import create_app
from almanac.bootstrap import bootstrap
from almanac.container import Container
from almanac.server import config
from almanac.settings import Settings
from tests.factories import birth_json
from tests.integration.support_waiting import until_started


@dataclass
class LiveServer:
    http: httpx.AsyncClient
    container: Container
    ws_url: str
    admin: str
    alice: str
    bob: str

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def post_reading(self, key: str, **changes: Any) -> httpx.Response:
        response = await self.http.post(
            "/api/v1/readings", json={"birth": birth_json(), **changes}, headers=self.auth(key)
        )
        assert response.status_code == 202, response.text
        return response

    def connect(self, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = self.auth(key) if key else {}
        return websockets.connect(
            f"{self.ws_url}{path}", additional_headers=headers, open_timeout=10, **kwargs
        )


@asynccontextmanager
async def live_server(settings: Settings, **overrides: Any) -> AsyncIterator[LiveServer]:
    container = bootstrap(settings, cache_prefix=f"test-{uuid.uuid4().hex[:8]}:", **overrides)
    app = create_app(settings, container)
    server = uvicorn.Server(config(app, host="127.0.0.1", port=0))
    task = asyncio.create_task(server.serve())
    await until_started(server, task, within=20, what="the API server")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        keys = [
            await asyncio.to_thread(container.keyring.issue, name=n, role=r, owner=o)
            for n, r, o in (
                ("admin", "admin", "admin"),
                ("a", "client", "alice"),
                ("b", "client", "bob"),
            )
        ]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            yield LiveServer(http, container, f"ws://127.0.0.1:{port}", *(k.secret for k in keys))
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def next_frame(socket: Any, timeout: float = 10) -> dict[str, Any]:
    """The next frame that is not a heartbeat."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no frame within {timeout} s"
        raw = await asyncio.wait_for(socket.recv(), remaining)
        frame: dict[str, Any] = json.loads(raw)
        if frame["type"] != "heartbeat":
            return frame


async def events_until(
    socket: Any, done: Any, *, timeout: float = 20, limit: int = 1000
) -> list[dict[str, Any]]:
    """Event frames until ``done(frames)`` is true, bounded in time and count."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        if done(frames):
            return frames
        frame = await next_frame(socket, max(deadline - time.monotonic(), 0.001))
        if frame["type"] == "event":
            frames.append(frame)
    raise AssertionError(f"more than {limit} frames: {[f['event_type'] for f in frames]}")


def decode(raw: str | bytes) -> Any:
    return msgspec.json.decode(raw)
