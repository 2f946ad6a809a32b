"""Many WebSocket clients at a few microseconds a frame, for the 10,000-connection benchmark.

A client built on the ``websockets`` library spends ~100 µs of Python on each frame it
receives; 10,000 of them in one process took over a second to take one broadcast in, so the
benchmark timed its own clients more than the server. These clients do only what the
measurement needs, on raw asyncio protocols: the opening handshake, then splitting the
server's (unmasked) frames and noting when the first frame of a wanted type arrives.
Nothing else of the protocol is spoken; they never send after the handshake, and a close
frame only marks the client closed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable, Iterable

_TEXT, _CLOSE = 0x1, 0x8


class LeanClient(asyncio.Protocol):
    """One connection: the handshake, then the arrival time of the next wanted frame."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = bytearray()
        self._upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.closed = False
        self._want = b""
        self.matched_bytes = 0  # the size of the last wanted frame's payload
        self._arrived: asyncio.Future[float] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in (self.opened, self._arrived):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def expect(self, marker: bytes) -> asyncio.Future[float]:
        """A future of the ``perf_counter`` time at which a frame holding ``marker`` arrives."""
        self._want = marker
        self._arrived = asyncio.get_running_loop().create_future()
        return self._arrived

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status:
                self.opened.set_exception(ConnectionError(status.decode("latin-1")))
                return
            self._upgraded = True
        while len(buffer) >= 2:
            opcode, length, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == _CLOSE:
            self.closed = True
            return
        if opcode != _TEXT:
            return
        self.frames += 1
        if not self.opened.done():
            self.opened.set_result(None)  # the welcome frame
            return
        arrived = self._arrived
        if arrived is not None and not arrived.done() and self._want in payload:
            arrived.set_result(time.perf_counter())
            self.matched_bytes = len(payload)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def handshake(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_clients(
    host: str, port: int, path: str, headers: dict[str, str], count: int, *, chunk: int = 500
) -> list[LeanClient]:
    """``count`` clients, opened ``chunk`` at a time, each past its welcome frame."""
    loop = asyncio.get_running_loop()
    clients: list[LeanClient] = []
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        batch = [LeanClient(handshake(host, port, path, headers)) for _ in range(size)]
        await asyncio.gather(*(loop.create_connection(_given(c), host, port) for c in batch))
        await asyncio.wait_for(asyncio.gather(*(c.opened for c in batch)), 60)
        clients.extend(batch)
        print(f"   {len(clients):,} connections open")
    return clients


def _given(client: LeanClient) -> Callable[[], LeanClient]:
    return lambda: client


def close_all(clients: Iterable[LeanClient]) -> None:
    for client in clients:
        client.close()
