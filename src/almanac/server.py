"""The ASGI server of every ``almanac serve`` process, with its settings in one place.

Benchmarks serve their bare baseline app through ``serve`` too, so that both run under the
same server with the same settings. Why uvicorn and not granian: benchmarks/README.md.
"""

from __future__ import annotations

import gc
import signal
import socket
import sys
from typing import Any

# The collector's thresholds for a serving process (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 100)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic garbage collector's sight, and make its
    collections rarer.

    Modules, the object graph and its connections live as long as the process, yet every
    full collection walks them all: in a projector at 1,000 commands/s, full collections
    stopped the event loop for 33-50 ms every few seconds, and those pauses were most of the
    projection lag's p99. Frozen, they are never walked again; what is collected is what was
    made since. Garbage left from start-up is collected first so that none of it is kept.

    What is made since can be large too: 10,000 WebSocket connections are ~1M tracked
    objects, and a full collection of them stopped the loop for 0.3-1 s, every few seconds
    while connections opened and during broadcasts. A full collection now waits for 100
    collections of the middle generation instead of 10 (and, as always, for the objects
    awaiting one to be a quarter of those that survived the last), and reference counting
    frees what holds no cycle at once.

    The young generation is collected after 10,000 allocations instead of 700. A command
    waits for its group commit with everything of its request alive, so 64 requests in
    flight kept the young generation full of live objects that each collection walked and
    promoted: ~6 % of a POST's instructions (callgrind, 617k against 582k a POST), for
    nothing freed. Under wrk a young collection then took 0.10 ms on average (0.14 with
    700), the longest 3 ms; one of the middle generation, ten times rarer now, 0.9-1.0 ms
    (0.4 with 700), the longest 1.9 ms (2.3).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def config(app: Any, *, host: str, port: int) -> Any:
    """The ``uvicorn.Config`` every Almanac server runs with (the e2e tests' too)."""
    import uvicorn

    from streams.wsserver import Protocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=20,
        # WebSockets: uvicorn's sans-I/O protocol, lighter and with a direct path for frames
        # many connections receive alike (streams/wsserver.py); no per-message deflate (its
        # zlib state costs ~60 kB a connection, frames are small, and the direct path needs
        # every connection's bytes alike); clients send at most small control messages; the
        # hub's own heartbeats keep idle connections alive, so the server sends no pings.
        ws=Protocol,
        ws_per_message_deflate=False,
        ws_max_size=64 * 1024,
        ws_max_queue=8,
        ws_ping_interval=None,
    )


def serve(app: Any, *, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT, then shut down gracefully."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # the app's lifespan: every role started
            settle_heap()

    server = Server(config(app, host=host, port=port))
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler
    # that was installed before it started; this one makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
