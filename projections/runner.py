"""Runs one projection: reads runs of events, commits their writes and the position together."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog

from almanac.eventstore import RecordedEvent
from almanac.feed import EventFeed
from almanac.readmodels import (
    POSITIONS_SCHEMA,
    SAVE_POSITION,
    BulkInsert,
    Dialect,
    PositionWatch,
    ReadDatabase,
    Write,
    projection_position,
)

log = structlog.get_logger("almanac.projection")

# Called with each committed batch's events, after the commit (e.g. to refresh caches).
AfterCommit = Callable[[list[RecordedEvent]], Awaitable[None]]


class Projection(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def schema(self) -> Mapping[Dialect, Sequence[str]]:
        """CREATE statements for each dialect (idempotent: IF NOT EXISTS)."""
        ...

    def handle(self, event: RecordedEvent) -> list[Write]:
        """The writes one event makes; an event the projection ignores makes none."""
        ...


def coalesce(writes: list[Write]) -> list[Write]:
    """Merge neighbouring writes of the same statement into one executemany."""
    merged: list[Write] = []
    for write in writes:
        if isinstance(write, BulkInsert):
            merged.append(write)
            continue
        sql, params = write
        last = merged[-1] if merged else None
        if last is not None and not isinstance(last, BulkInsert) and last[0] == sql:
            merged[-1] = (sql, [*last[1], *params])
        else:
            merged.append((sql, list(params)))
    return merged


class ProjectionRunner:
    def __init__(
        self,
        projection: Projection,
        feed: EventFeed,
        db: ReadDatabase,
        watch: PositionWatch,
        *,
        batch_size: int = 500,
        after_commit: Sequence[AfterCommit] = (),
    ) -> None:
        self.projection = projection
        self.name = f"projection:{projection.name}"
        self.feed = feed
        self.db = db
        self.watch = watch
        self.batch_size = batch_size
        self.after_commit = tuple(after_commit)
        self.position = 0
        self._stopping = asyncio.Event()

    async def prepare(self) -> None:
        await self.db.migrate(
            [*POSITIONS_SCHEMA[self.db.dialect], *self.projection.schema[self.db.dialect]]
        )

    async def run(self) -> None:
        name = self.projection.name
        follower = self.feed.follow()
        pause = 0.05
        try:
            self.position = await projection_position(self.db, name)
            log.info("projection.started", projection=name, position=self.position)
            while not self._stopping.is_set():
                try:
                    events = await follower.next_batch(self.position, self.batch_size, timeout=1.0)
                    if events:
                        await self._commit(events)
                    pause = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep following; the next try resumes
                    log.warning(
                        "projection.batch_failed",
                        projection=name,
                        position=self.position,
                        error=str(exc),
                    )
                    await self._sleep(pause)
                    pause = min(pause * 2, 5.0)
        finally:
            follower.close()
            log.info("projection.stopped", projection=name, position=self.position)

    async def _commit(self, events: list[RecordedEvent]) -> None:
        handle_batch = getattr(self.projection, "handle_batch", None)
        writes: list[Write] = (
            handle_batch(events)
            if handle_batch is not None
            else [w for event in events for w in self.projection.handle(event)]
        )
        last = events[-1].position
        writes.append(
            (
                SAVE_POSITION,
                [{"name": self.projection.name, "position": last, "updated_at": _now()}],
            )
        )
        await self.db.write(coalesce(writes))
        self.position = last
        self.watch.announce(self.projection.name, last)
        for hook in self.after_commit:
            try:
                await hook(events)
            except Exception as exc:  # noqa: BLE001 - the batch is committed; a hook cannot undo it
                log.warning(
                    "projection.after_commit_failed",
                    projection=self.projection.name,
                    position=last,
                    error=str(exc),
                )
        log.debug(
            "projection.batch_committed",
            projection=self.projection.name,
            position=last,
            events=len(events),
        )

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return

    def stop(self) -> None:
        self._stopping.set()


def _now() -> str:
    return datetime.now(UTC).isoformat()
