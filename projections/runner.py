"""Runs one projection: reads runs of events, commits their writes and the position together.

One runner per projection is active across all processes: it holds the projection's
lease (an advisory lock or a file lock); the others wait as hot standbys and take over
when the holder dies. The active runner

- rebuilds the projection's tables from position 0 when its schema version changed;
- retries a failing batch with backoff; when the database answers but the batch keeps
  failing, it commits the batch event by event and parks the event that fails, with the
  error, and waits there until an operator asks to retry or skip it;
- survives lost connections: every failure is followed by a resume from the tracked
  position, and every write is idempotent, so nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, cast

import structlog

from almanac.adapters.leadership import Lease, take_turns
from almanac.container import Stoppable
from almanac.eventstore import RecordedEvent
from almanac.feed import EventFeed, Follower
from almanac.readmodels import (
    FORGET_POSITION,
    SAVE_POSITION,
    BulkInsert,
    Dialect,
    PositionWatch,
    ReadDatabase,
    Write,
    projection_position,
)
from almanac.retries import retried
from almanac.settings import ProjectionSettings
from projections.status import (
    PARK,
    RESOLVE,
    SAVE_LEASE,
    SAVE_SCHEMA_VERSION,
    STOP_LEASE,
    State,
    bookkeeping_schema,
    now,
    open_parking,
    schema_version,
)

log = structlog.get_logger("almanac.projection")

# A batch that writes nothing (events the projection ignores) saves its position only if
# none was saved for this long; otherwise the position is saved with the next batch that
# writes, or this long after the last save when the log goes quiet. Every projection reads
# every event, and most ignore most of them: a transaction for each of those batches, in
# every projection, cost more of the projector's time than the batches that write.
QUIET_SAVE_INTERVAL = 0.05

# Called with each committed batch's events, after the commit (e.g. to refresh caches). A
# hook may also have ``take_over(position)``, awaited when a lead begins at ``position`` (to
# catch up with what an earlier lead committed and the hook never saw through), and
# ``aclose()``, awaited when the lead ends.
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


class OwnLease:
    """The lease of a process that is the only one running the projection (tests, tools)."""

    async def acquire(self) -> bool:
        return True

    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class Parked(Exception):
    """The runner stopped at a poison event and waits for an operator."""


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


class ProjectionRunner(Stoppable):
    def __init__(
        self,
        projection: Projection,
        feed: EventFeed,
        db: ReadDatabase,
        watch: PositionWatch,
        *,
        batch_size: int = 500,
        after_commit: Sequence[AfterCommit] = (),
        lease: Lease | None = None,
        settings: ProjectionSettings | None = None,
    ) -> None:
        self.projection = projection
        self.name = f"projection:{projection.name}"
        self.feed = feed
        self.db = db
        self.watch = watch
        self.batch_size = batch_size
        self.after_commit = tuple(after_commit)
        self.lease: Lease = lease or OwnLease()
        self.settings = settings or ProjectionSettings()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.position = 0
        self.state: State = "standby"
        self._detail: str | None = None
        super().__init__()
        self._last_beat = 0.0
        # When the position was last saved, and the position announced since but not saved.
        self._saved_at = 0.0
        self._unsaved: int | None = None
        self._hooks_backlog: list[list[RecordedEvent]] = []
        self._hooks_task: asyncio.Task[None] | None = None
        # The indexes are built (IF NOT EXISTS) once per lead, when it has caught up.
        self._indexes_due = False
        # Catching up from position 0 (state "rebuilding") until the indexes are built.
        self._rebuilding = False
        self._follower: Follower | None = None
        # Set once the active runner has applied the log it found and built its indexes.
        self.caught_up = asyncio.Event()

    @property
    def version(self) -> int:
        return int(getattr(self.projection, "version", 1))

    async def prepare(self) -> None:
        """Create the bookkeeping tables, and the projection's own unless a rebuild is due
        (then the active runner recreates them in their new shape).

        Every process prepares every projection at start-up, but only tables: the plain
        indexes are the active runner's to build, once it has caught up with the log
        (``_build_indexes``). After a start from position 0 that is one build over the
        caught-up rows, which costs far less than maintaining the indexes row by row on
        the way (a rebuild's inserts ran 10-15 % faster without the ``readings`` ones); on
        any other start the statements find the indexes there and do nothing.
        """
        await self.db.migrate(bookkeeping_schema(self.db.dialect))
        if not await self._rebuild_due():
            await self.db.migrate(self._schema()[0])

    def _schema(self) -> tuple[list[str], list[str]]:
        """The projection's statements: tables and the rest first, then its plain indexes
        (a unique index is a constraint, and is never deferred)."""
        statements = list(self.projection.schema[self.db.dialect])
        indexes = [s for s in statements if s.lstrip().upper().startswith("CREATE INDEX")]
        return [s for s in statements if s not in indexes], indexes

    async def _build_indexes(self) -> None:
        """Build the projection's indexes that are not there yet (IF NOT EXISTS), once."""
        if not self._indexes_due:
            return
        indexes = self._schema()[1]
        started = time.perf_counter()
        # Not ``migrate``: its lock would hold up every process starting meanwhile. Only the
        # lease holder builds indexes.
        if indexes:
            await self.db.write([(statement, [{}]) for statement in indexes])
        self._indexes_due = False
        if self._rebuilding:
            self._rebuilding = False
            log.info(
                "projection.indexes_built",
                projection=self.projection.name,
                position=self.position,
                indexes=len(indexes),
                seconds=round(time.perf_counter() - started, 3),
            )
        if self.state in ("rebuilding", "retrying"):
            await self._resume()

    async def run(self) -> None:
        name = self.projection.name

        def standing_by() -> None:
            self.state = "standby"

        try:
            await take_turns(
                self.lease,
                self._lead,
                role="projection",
                interval=self.settings.standby_interval,
                stopping=self._stopping,
                standing_by=standing_by,
                projection=name,
                holder=self.holder,
            )
        finally:
            self.state = "stopped"
            log.info("projection.stopped", projection=name, position=self.position)

    async def _lead(self) -> None:
        name = self.projection.name
        await self._take_over()
        follower = self._follower = self.feed.follow(self._writes)
        failures = 0
        try:
            while not self._stopping.is_set():
                if not await self._still_leading():
                    log.warning("projection.lease_lost", projection=name, position=self.position)
                    # Not saved on the way out: another process leads now, and may have
                    # started the projection again from 0.
                    self._unsaved = None
                    return
                if self.state == "parked":
                    await self._wait_while_parked()
                    continue
                try:
                    events = await follower.next_batch(
                        self.position, self.batch_size, timeout=self._idle_timeout()
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the log is unreachable; resume later
                    failures += 1
                    await self._retrying("projection.read_failed", exc, failures)
                    continue
                try:
                    await self._apply(events)
                except Parked:
                    continue
                except Exception as exc:  # noqa: BLE001 - infrastructure; resume from position
                    failures += 1
                    await self._retrying("projection.batch_failed", exc, failures)
                    continue
                if events and failures:
                    failures = 0
                    await self._resume()
        finally:
            follower.close()
            self._follower = None
            with contextlib.suppress(Exception):
                await self._save_quiet_position()
            await self._hooks_done()
            await self._enter("stopped")

    async def _take_over(self) -> None:
        """Become the active runner: tables in shape, position and state loaded."""
        name = self.projection.name
        log.info("projection.leading", projection=name, holder=self.holder)
        self.caught_up.clear()
        await self.prepare()
        if await self._rebuild_due():
            await self._rebuild()
        elif await schema_version(self.db, name) is None:
            await self._record_version()
        self.position = await projection_position(self.db, name)
        # A quiet position of an earlier lead that could not be saved is not this lead's.
        self._unsaved, self._saved_at = None, 0.0
        # Where it really is: after a rebuild, back at 0 (queries wait for the new tables).
        self.watch.restart(name, self.position)
        self._rebuilding = self.position == 0
        self._indexes_due = True
        if await open_parking(self.db, name):
            await self._enter("parked")
        else:
            await self._resume()
        await self._hooks_take_over()
        log.info("projection.started", projection=name, position=self.position)

    async def _apply(self, events: list[RecordedEvent]) -> None:
        if events:
            await self._commit_with_retries(events)
        else:
            await self._save_quiet_position()
        if len(events) < self.batch_size:  # caught up with the log
            await self._build_indexes()
            self.caught_up.set()

    # -- committing ---------------------------------------------------------------------

    async def _commit_with_retries(self, events: list[RecordedEvent]) -> None:
        """Commit the batch, retrying with backoff; if the database answers and the batch
        still fails, commit it event by event and park the first event that fails."""
        try:
            await self._attempts(events)
        except Exception as exc:
            if not await self._database_answers():
                raise
            log.warning(
                "projection.isolating",
                projection=self.projection.name,
                first=events[0].position,
                last=events[-1].position,
                error=repr(exc),
            )
        else:
            return
        for event in events:
            try:
                await self._attempts([event])
            except Exception as exc:
                if not await self._database_answers():
                    raise
                await self._park(event, exc)
                raise Parked from exc

    async def _attempts(self, events: list[RecordedEvent]) -> None:
        await retried(
            lambda: self._commit(events),
            on=Exception,
            attempts=self.settings.attempts,
            wait_initial=0.05,
            wait_max=2.0,
            timeout=None,
        )

    def _writes(self, events: list[RecordedEvent]) -> list[Write]:
        """The projection's writes for a batch, folded and merged. Pure: the follower runs
        it in its reading thread as it reads each batch, beside the commit of the one before."""
        handle_batch = getattr(self.projection, "handle_batch", None)
        if handle_batch is not None:
            return coalesce(handle_batch(events))
        return coalesce([w for event in events for w in self.projection.handle(event)])

    async def _commit(self, events: list[RecordedEvent]) -> None:
        prepared = None if self._follower is None else self._follower.prepared(events)
        writes = self._writes(events) if prepared is None else cast("list[Write]", prepared)
        last = events[-1].position
        if writes or time.monotonic() - self._saved_at >= QUIET_SAVE_INTERVAL:
            await self.db.write([*writes, self._save(last)])
            self._saved(last)
        else:
            # Nothing of the read model changed: queries here may rely on the position at
            # once, other processes once it is saved (within QUIET_SAVE_INTERVAL).
            self._unsaved = last
        self._committed(last)
        self._after_commit(events)
        log.debug(
            "projection.batch_committed",
            projection=self.projection.name,
            position=last,
            events=len(events),
        )

    def _save(self, position: int) -> Write:
        """The write that records ``position`` as this projection's."""
        row = {"name": self.projection.name, "position": position, "updated_at": now()}
        return (SAVE_POSITION, [row])

    def _saved(self, position: int) -> None:
        self._saved_at = time.monotonic()
        if self._unsaved is not None and self._unsaved <= position:
            self._unsaved = None

    def _idle_timeout(self) -> float:
        """How long to wait for events: until a quiet position falls due to be saved."""
        if self._unsaved is None:
            return self.settings.standby_interval
        return max(0.0, self._saved_at + QUIET_SAVE_INTERVAL - time.monotonic())

    async def _save_quiet_position(self) -> None:
        position = self._unsaved
        if position is not None:
            await self.db.write([self._save(position)])
            self._saved(position)

    def _committed(self, position: int) -> None:
        self.position = position
        self.watch.announce(self.projection.name, position)

    def _after_commit(self, events: list[RecordedEvent]) -> None:
        """Hand the committed batch to the hooks, which run in order in a task of their own:
        the next batch is not kept waiting for them (projection lag), and a backlog that
        builds up while they run is handed over as one run."""
        if not self.after_commit:
            return
        self._hooks_backlog.append(events)
        if self._hooks_task is None or self._hooks_task.done():
            self._hooks_task = asyncio.create_task(self._run_hooks())

    async def _run_hooks(self) -> None:
        while self._hooks_backlog:
            events = [event for batch in self._hooks_backlog for event in batch]
            self._hooks_backlog.clear()
            for hook in self.after_commit:
                try:
                    await hook(events)
                except Exception as exc:  # noqa: BLE001 - the batch is committed; a hook cannot undo it
                    log.warning(
                        "projection.after_commit_failed",
                        projection=self.projection.name,
                        position=events[-1].position,
                        error=repr(exc),
                    )

    async def _hooks_take_over(self) -> None:
        """Tell the hooks where this lead begins. The commits before it may include some an
        earlier lead made and never handed to its hooks (it died first): the cache refresher
        catches up with those from a mark of its own."""
        try:
            for hook in self.after_commit:
                take_over = getattr(hook, "take_over", None)
                if take_over is not None:
                    await take_over(self.position)
        except BaseException:
            await self._hooks_done()  # a hook that took over may have started work of its own
            raise

    async def _hooks_done(self) -> None:
        if self._hooks_task is not None:
            with contextlib.suppress(Exception):
                await self._hooks_task
        # A hook may keep work of its own going (the cache refresher's retries): it ends
        # with the lead.
        for hook in self.after_commit:
            close = getattr(hook, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    async def _database_answers(self) -> bool:
        try:
            await self.db.ping()
        except Exception:  # noqa: BLE001 - any failure means: not the event's fault
            return False
        return True

    # -- parking ------------------------------------------------------------------------

    async def _park(self, event: RecordedEvent, exc: BaseException) -> None:
        # Other processes may wait for the positions before the event: it may take a while.
        await self._save_quiet_position()
        error = f"{type(exc).__name__}: {exc}"[:2000]
        row = {
            "name": self.projection.name,
            "position": event.position,
            "event_type": event.type,
            "aggregate_id": str(event.aggregate_id),
            "error": error,
            "attempts": self.settings.attempts,
            "at": now(),
        }
        await self.db.write([(PARK, [row])])
        log.error(
            "projection.event_parked",
            projection=self.projection.name,
            position=event.position,
            event_type=event.type,
            aggregate_id=str(event.aggregate_id),
            error=error,
        )
        await self._enter("parked", detail=f"parked at {event.position}: {error}")

    async def _wait_while_parked(self) -> None:
        """Follow an operator's request for the parked event: retry it or skip it."""
        name = self.projection.name
        parked = await open_parking(self.db, name)
        if parked is None:  # resolved by hand in the database
            await self._resume()
            return
        request = parked["request"]
        position = int(parked["position"])
        if request == "skip":
            resolve = {"name": name, "position": position, "resolution": "skipped", "at": now()}
            await self.db.write([(RESOLVE, [resolve]), self._save(position)])
            self._saved(position)
            self._committed(max(self.position, position))
            log.warning("projection.event_skipped", projection=name, position=position)
            await self._resume()
        elif request == "retry":
            resolve = {"name": name, "position": position, "resolution": "retried", "at": now()}
            await self.db.write([(RESOLVE, [resolve])])
            log.info("projection.event_retried", projection=name, position=position)
            await self._resume()
        else:
            await self._heartbeat()
            await self._sleep(self.settings.standby_interval)

    # -- schema versions ----------------------------------------------------------------

    async def _rebuild_due(self) -> bool:
        stored = await schema_version(self.db, self.projection.name)
        if stored is not None:
            return stored != self.version
        # Tables from before versions were recorded: their shape is unknown unless empty.
        return await projection_position(self.db, self.projection.name) > 0

    async def _rebuild(self) -> None:
        name = self.projection.name
        stored = await schema_version(self.db, name)
        log.warning("projection.rebuilding", projection=name, old=stored, new=self.version)
        await self._enter("rebuilding", detail=f"schema {stored} -> {self.version}")
        tables = getattr(self.projection, "tables", ())
        # Queries here wait for the new tables from now on: before the old ones go, so that
        # this process never vouches for a position the tables do not hold.
        self.watch.restart(name, 0)
        await self.db.write(
            [
                *[(f"DROP TABLE IF EXISTS {table}", [{}]) for table in tables],
                (FORGET_POSITION, [{"name": name}]),
            ]
        )
        await self.db.migrate(self._schema()[0])
        await self._record_version()

    async def _record_version(self) -> None:
        row = {"name": self.projection.name, "version": self.version, "at": now()}
        await self.db.write([(SAVE_SCHEMA_VERSION, [row])])

    # -- lease and state ----------------------------------------------------------------

    async def _still_leading(self) -> bool:
        if time.monotonic() - self._last_beat < self.settings.standby_interval:
            return True
        if not await self.lease.held():
            return False
        await self._heartbeat()
        return True

    async def _heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        row = {
            "name": self.projection.name,
            "holder": self.holder,
            "state": self.state,
            "detail": self._detail,
            "at": now(),
        }
        try:
            await self.db.write([(STOP_LEASE if self.state == "stopped" else SAVE_LEASE, [row])])
        except Exception as exc:  # noqa: BLE001 - status only; the next beat tries again
            log.debug(
                "projection.heartbeat_failed", projection=self.projection.name, error=repr(exc)
            )

    async def _enter(self, state: State, detail: str | None = None) -> None:
        if state == self.state and detail == self._detail:
            return
        self.state, self._detail = state, detail
        await self._heartbeat()

    async def _resume(self) -> None:
        """Back to work: running, or rebuilding while catching up from position 0."""
        if self._rebuilding:
            await self._enter("rebuilding", detail="catching up from position 0")
        else:
            await self._enter("running")

    async def _retrying(self, event: str, exc: BaseException, failures: int) -> None:
        log.warning(
            event,
            projection=self.projection.name,
            position=self.position,
            failures=failures,
            error=repr(exc),
        )
        await self._enter("retrying", detail=repr(exc)[:500])
        await self._sleep(min(0.05 * 2 ** min(failures, 10), 5.0))
