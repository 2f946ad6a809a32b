"""The WebSocket protocol Almanac's server runs (streams/wsserver.py), under uvicorn with the
settings of ``almanac serve``, spoken to by a real client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
import websockets

from almanac.server import config
from streams.wsserver import (
    DEAD_PEER_MS,
    DIRECT_SEND,
    KEEPALIVE_IDLE,
    Protocol,
    direct_send,
    text_frame,
)
from tests.integration.support_waiting import until_started


class App:
    """Accepts a WebSocket, then runs the test's ``script`` with the connection's direct path."""

    def __init__(self) -> None:
        self.ready: asyncio.Queue[tuple[Any, Any, Any]] = asyncio.Queue()
        self.done = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await self.ready.put((scope, receive, send))
        await self.done.wait()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[App, str]]:
    app = App()
    server = uvicorn.Server(config(app, host="127.0.0.1", port=0))
    task = asyncio.create_task(server.serve())
    await until_started(server, task, within=20, what="the server")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, f"ws://127.0.0.1:{port}/ws"
    finally:
        app.done.set()
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def test_frames_written_directly_arrive_whole_and_in_order_with_the_app_s_own() -> None:
    async with serving() as (app, url), websockets.connect(url, open_timeout=10) as client:
        scope, _, send = await asyncio.wait_for(app.ready.get(), 10)
        direct = direct_send(scope)
        assert direct is not None
        assert direct(text_frame(b"one"))
        await send({"type": "websocket.send", "text": "two"})
        assert direct(text_frame(("x" * 70_000).encode()))  # a 64-bit length
        received = [await asyncio.wait_for(client.recv(), 10) for _ in range(3)]
        assert received == ["one", "two", "x" * 70_000]


async def test_a_connection_that_cannot_take_a_frame_now_is_written_nothing() -> None:
    async with serving() as (app, url), websockets.connect(url, open_timeout=10) as client:
        scope, receive, send = await asyncio.wait_for(app.ready.get(), 10)
        direct = direct_send(scope)
        assert direct is not None
        protocol = direct.__self__  # type: ignore[attr-defined]
        assert isinstance(protocol, Protocol)
        # Accepted: the handshake is let go, and the parser's copy of the request emptied.
        assert protocol.response is None and protocol.request is None

        protocol.pause_writing()  # the transport's buffer went over its high-water mark
        assert not direct(text_frame(b"held back"))
        waiting = asyncio.ensure_future(send({"type": "websocket.send", "text": "after"}))
        await asyncio.sleep(0)
        assert not waiting.done()  # the app's own send waits for the buffer too
        protocol.resume_writing()
        await asyncio.wait_for(waiting, 10)
        assert await asyncio.wait_for(client.recv(), 10) == "after"

        await client.close()
        assert (await asyncio.wait_for(receive(), 10))["type"] == "websocket.disconnect"
        assert not direct(text_frame(b"too late"))
    # The connection is gone: its scope no longer holds it (no cycle left for the collector).
    assert DIRECT_SEND not in scope["extensions"]


async def test_a_client_that_vanishes_without_closing_is_dropped_within_about_a_minute() -> None:
    """Its host gone, it sends no FIN nor reset: only the kernel can tell, by the
    unacknowledged heartbeats (``TCP_USER_TIMEOUT``) or by keepalive probes."""
    async with serving() as (app, url), websockets.connect(url, open_timeout=10):
        scope, _, _ = await asyncio.wait_for(app.ready.get(), 10)
        direct = direct_send(scope)
        assert direct is not None
        protocol = direct.__self__  # type: ignore[attr-defined]
        sock = protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == DEAD_PEER_MS
