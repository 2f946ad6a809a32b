"""WebSocket routes: ``/ws`` (subscribe by message) and shortcuts for one reading or batch."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from litestar import WebSocket, websocket
from litestar.di import NamedDependency
from litestar.params import FromPath

from almanac.auth import Principal, bearer_token
from almanac.container import Container
from almanac.errors import NotFound
from queries.batches import get_batch
from queries.routing import reads_of
from streams.websocket import (
    CLOSE_BAD_REQUEST,
    CLOSE_NOT_FOUND,
    BadAfter,
    BadTopic,
    Closed,
    Hub,
    Progress,
    Session,
    Topic,
    close_reason,
    parse_topics,
    resume_position,
)

# How long ``/ws/batches/{id}`` reports a batch it cannot see (not projected yet, or not
# the client's) before closing with 4404.
BATCH_NOT_FOUND_GRACE = 10.0


def hub_of(container: Container) -> Hub:
    """The process's hub, which runs with the api role."""
    return next(role for role in container.background.get("api", []) if isinstance(role, Hub))


def _key(socket: WebSocket[Any, Any, Any]) -> str | None:
    """The API key from the Authorization header or, for browsers, ``?key=``."""
    # From the raw headers: ``socket.headers`` would keep a parsed copy for the connection's
    # whole life (2 kB each, 20 MB for 10,000 connections).
    return bearer_token(socket.scope["headers"]) or socket.query_params.get("key") or None


def _after(socket: WebSocket[Any, Any, Any]) -> int | None:
    """``?after=<position>``, or None without one; anything else raises ``BadAfter`` (a
    client must not believe it resumed when it did not)."""
    raw = socket.query_params.get("after")
    return None if raw is None else resume_position(raw)


async def _serve(
    socket: WebSocket[Any, Any, Any],
    container: Container,
    topics: set[Topic],
    progress: Progress | None = None,
    vouched: frozenset[Topic] = frozenset(),
) -> None:
    await socket.accept()
    raw_topics = [t for t in socket.query_params.get("topics", "").split(",") if t]
    try:
        topics |= parse_topics(raw_topics, container.settings.websocket.max_topics)
        after = _after(socket)
    except (BadTopic, BadAfter) as exc:
        await socket.close(CLOSE_BAD_REQUEST, close_reason(str(exc)))
        return
    session = Session(
        socket=socket,
        hub=hub_of(container),
        settings=container.settings.websocket,
        authenticate=container.keyring.authenticate,
        topics=topics,
        after=after,
        key=_key(socket),
        vouched=vouched,
        progress=progress,
    )
    await session.run()


@websocket("/ws")
async def events_socket(
    socket: WebSocket[Any, Any, Any], container: NamedDependency[Container]
) -> None:
    await _serve(socket, container, set())


@websocket("/ws/readings/{reading_id:uuid}")
async def reading_socket(
    socket: WebSocket[Any, Any, Any],
    container: NamedDependency[Container],
    reading_id: FromPath[UUID],
) -> None:
    # A reading of another owner, or none, closes with 4404 before the welcome (the session
    # checks every aggregate's topic): its first event is stored before its id is known.
    await _serve(socket, container, {Topic("aggregate", str(reading_id))})


@websocket("/ws/batches/{batch_id:uuid}")
async def batch_socket(
    socket: WebSocket[Any, Any, Any],
    container: NamedDependency[Container],
    batch_id: FromPath[UUID],
) -> None:
    missing_since: float | None = None
    # Progress polls the primary: a standby's copy may trail what the events already said.
    primary = reads_of(container).on_primary()

    async def progress(principal: Principal) -> dict[str, object] | None:
        nonlocal missing_since
        try:
            view = await get_batch(batch_id, reads=primary, principal=principal, min_position=None)
        except NotFound:  # not projected yet (or not the client's): it may yet appear
            now = time.monotonic()
            missing_since = now if missing_since is None else missing_since
            if now - missing_since >= BATCH_NOT_FOUND_GRACE:
                # Not a read-model query twice a second for as long as the socket stays.
                raise Closed(CLOSE_NOT_FOUND, close_reason(f"no batch {batch_id}")) from None
            return {"batch_id": str(batch_id), "status": "not_found"}
        return {
            "batch_id": str(view.id),
            "status": view.status,
            "total": view.total,
            "succeeded": view.succeeded,
            "failed": view.failed,
            "pending": view.pending,
            "progress": view.progress,
            "throughput": view.throughput,
            "eta_seconds": view.eta_seconds,
        }

    # The progress report says whether the key may see the batch (``not_found``, then 4404
    # after the grace period), so its topic is not checked again as the session begins.
    topic = Topic("aggregate", str(batch_id))
    await _serve(socket, container, {topic}, progress, vouched=frozenset({topic}))


handlers = [events_socket, reading_socket, batch_socket]
