"""The HTTP baseline: a bare Litestar app serving the bodies Almanac serves, with no work.

``POST /api/v1/readings`` decodes and validates the same body into the same command Struct
(``GenerateReading``) and answers 202 with a ``ReadingAccepted`` and the same headers;
``GET /api/v1/readings/{id}`` returns the same ``ReadingView`` Struct (read once from a file
the benchmark saved from the real server) with the same headers. No authentication, event
store, cache or middleware: what is left is the framework and the server.

For the ``connections`` benchmark, ``WS /ws`` accepts a connection and sends it one frame
(a welcome); ``POST /bare/broadcast`` writes its body as one text frame to every connection
open, encoded once and written through the server's direct path (streams/wsserver.py), in
one pass: the least a broadcast can cost on this server and this machine's network stack.

Run: ``python -m benchmarks.bare_app --port 8001 [--reading FILE] [--server granian]``.
Under uvicorn it is served by ``almanac.server.serve``, the function ``almanac serve`` uses,
so both run with the same server settings.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
from litestar import Litestar, Request, Response, WebSocket, get, post, websocket
from litestar.config.compression import CompressionConfig
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath, JSONBody

from almanac.views import ReadingView
from commands.readings import GenerateReading, ReadingAccepted
from streams.wsserver import DirectSend, direct_send, text_frame

READING_FILE = "ALMANAC_BENCH_READING"


def create_bare_app(reading: bytes | None = None) -> Litestar:
    """``reading``: the JSON of a GET /api/v1/readings/{id} response to serve."""
    view = msgspec.json.decode(reading, type=ReadingView) if reading else None
    positions = itertools.count(1)

    @post("/api/v1/readings", status_code=202)
    async def post_reading(data: JSONBody[GenerateReading]) -> Response[ReadingAccepted]:
        accepted = ReadingAccepted(id=uuid.uuid4(), status="requested", position=next(positions))
        headers = {
            "Location": f"/api/v1/readings/{accepted.id}",
            "Almanac-Position": str(accepted.position),
        }
        return Response(accepted, status_code=202, headers=headers)

    @get("/api/v1/readings/{reading_id:uuid}")
    async def get_reading(reading_id: FromPath[UUID]) -> Response[Any]:
        del reading_id
        if view is None:
            return Response({"detail": "no reading given"}, status_code=404)
        headers = {
            "ETag": f'W/"r-{view.id}-{view.position}"',
            "Almanac-Position": str(view.position),
            "Cache-Control": "private",
        }
        return Response(view, headers=headers)

    @get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    connections: set[DirectSend] = set()

    @websocket("/ws")
    async def listen(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        await socket.send_text('{"type":"welcome"}')
        direct = direct_send(socket.scope)
        if direct is None:
            raise RuntimeError("the bare fan-out needs almanac.server's WebSocket protocol")
        connections.add(direct)
        try:
            with contextlib.suppress(WebSocketDisconnect):
                await socket.receive_data("text")  # until the client goes
        finally:
            connections.discard(direct)

    @post("/bare/broadcast", status_code=202)
    async def broadcast(request: Request[Any, Any, Any]) -> dict[str, int]:
        frame = text_frame(await request.body())
        sent = sum(direct(frame) for direct in tuple(connections))
        return {"connections": len(connections), "sent": sent}

    return Litestar(
        route_handlers=[post_reading, get_reading, ready, listen, broadcast],
        # As in almanac.app: compression is configured (it applies only above 1 KiB to
        # clients that ask for it, which the load generators do not).
        compression_config=CompressionConfig(
            backend="brotli", minimum_size=1024, brotli_gzip_fallback=True
        ),
        debug=False,
        logging_config=None,
    )


def app_from_env() -> Litestar:
    """Factory for servers that import their app (granian): the body file from the env."""
    path = os.environ.get(READING_FILE)
    return create_bare_app(Path(path).read_bytes() if path else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reading", type=Path, default=None)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    args = parser.parse_args()
    if args.reading is not None:
        os.environ[READING_FILE] = str(args.reading)
    if args.server == "granian":
        from benchmarks.servers import serve_granian

        serve_granian("benchmarks.bare_app:app_from_env", port=args.port)
    else:
        from almanac.server import serve

        serve(app_from_env(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
