"""The server side of a WebSocket connection: uvicorn's sans-I/O protocol, made lighter per
connection and given a direct path for frames that many connections receive alike.

A broadcast to 10,000 connections sends the same frame 10,000 times. Through ASGI, each
send wakes the connection's sending task and walks Litestar's, uvicorn's and websockets'
send chain to encode the same bytes again: ~30 us a connection, so the last of 10,000
clients heard of an event ~300 ms after the first. A server frame is not masked, so its
bytes are the same for every connection: the hub encodes it once (``text_frame``) and
writes it to each connection whose sending task is idle through the ASGI extension
``DIRECT_SEND``, which answers ``False`` (write nothing) when the connection cannot take
it now -- its buffer is over the high-water mark, or it is closing -- and the frame then
waits its turn in the connection's queue as before.

Per connection, what uvicorn and websockets keep for the connection's life is made
smaller: the handshake's request and response are let go once the connection is accepted
(websockets' parser still holds the request, so its headers are emptied), the queue of
received messages is a ``Mailbox`` rather than an ``asyncio.Queue``, and the write flag a
``Flag`` rather than an ``asyncio.Event``: ~5 kB less a connection, 50 MB at 10,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from streams.mailbox import Mailbox

# The scope extension: a callable taking the bytes of a whole frame (``text_frame``).
DIRECT_SEND = "almanac.websocket.direct_send"
DirectSend = Callable[[bytes], bool]


def text_frame(payload: bytes) -> bytes:
    """A server's (unmasked, unfragmented, uncompressed) text frame around ``payload``."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def direct_send(scope: Any) -> DirectSend | None:
    """The connection's direct path, if the server offers one (uvicorn with ``Protocol``)."""
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    return (extensions or {}).get(DIRECT_SEND)


class Flag:
    """``asyncio.Event`` as uvicorn's protocol uses it for ``writable`` (set, clear, wait),
    without its ~600-byte deque of waiters (a list, empty while nothing waits)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


# A client that vanished without closing (its host or network gone) is dropped once data
# sent to it has gone unacknowledged this long (``TCP_USER_TIMEOUT``; the hub's heartbeats
# keep sending), or, on a connection nothing is sent on, after keepalive probes: about a
# minute either way, where the kernel's defaults would keep it ~15 minutes or two hours.
DEAD_PEER_MS = 60_000
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


def notice_dead_peers(sock: Any) -> None:
    """Set ``sock`` (a TCP socket) to drop a peer that stopped answering within a minute."""
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), DEAD_PEER_MS),
    ]
    for level, option, value in options:
        if option is not None:
            # Not every platform has every option: what it has is set.
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


class Protocol(WebSocketsSansIOProtocol):
    """Configured as uvicorn's ``ws`` protocol by ``almanac.server``. Per-message deflate
    must stay off: with it, a frame's bytes would differ from one connection to the next."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Mailbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            notice_dead_peers(sock)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        event.headers.clear()  # copied into the scope; the parser keeps ``event`` meanwhile
        scope = getattr(self, "scope", None)
        if scope is not None and not self.conn.extensions:
            scope["extensions"][DIRECT_SEND] = self.send_frame

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.request = self.response = None  # type: ignore[assignment]

    def send_frame(self, data: bytes) -> bool:
        """Write a whole encoded frame now, if the connection is open, accepted, and its
        transport below the high-water mark; otherwise write nothing and answer False."""
        if (
            self.close_sent
            or self.disconnected
            or not self.handshake_complete
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(data)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # The scope refers to this protocol through the extension: part the cycle, so that
        # the connection's memory is freed now rather than at a full collection.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(DIRECT_SEND, None)
        super().connection_lost(exc)
