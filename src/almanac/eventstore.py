"""The event store: an eventsourcing application plus the group-commit writer.

eventsourcing is synchronous and its Postgres recorder locks the events table for every
insert transaction, so one save per command caps throughput. Here concurrent commands queue
their aggregates; one writer saves everything queued as one transaction and hands each
caller its own outcome and position: a thread (``GroupCommitWriter``) for SQLite and for
callers on threads, and on Postgres a task on the event loop (``LoopWriter``) for the
loop's commands. A conflict inside a batch falls back to saving the batch's
members one by one, so one stale command never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import fcntl
import queue
import threading
import typing
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

import msgspec
import psycopg
import stamina
import structlog
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    InternalError,
    Mapper,
    OperationalError,
    ProgrammingError,
    RecordConflictError,
    StoredEvent,
    Tracking,
    Transcoder,
)
from eventsourcing.postgres import (
    ConnectionPool,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
)
from eventsourcing.utils import Environment, EnvType, get_topic, resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from almanac.adapters.postgres import BlockingIdleCheck, IdleCheck
from almanac.domain.events import EventMeta
from almanac.errors import Conflict, FieldError, Unavailable, ValidationFailed
from almanac.retries import RetryPolicy, retried, retried_sync
from almanac.settings import Settings

log = structlog.get_logger("almanac.eventstore")

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")
_ENVELOPE_FIELDS = ("originator_id", "originator_version")
# How both writers retry a batch that surely did not land (their ``retryable`` decides).
APPEND_RETRIES: RetryPolicy = {
    "attempts": 10,
    "wait_initial": 0.1,
    "wait_max": 1.0,
    "timeout": 30.0,
}


class ConcurrencyConflict(Conflict):
    """Another command changed the aggregate first; reload and decide again."""


class EventTooLarge(ValidationFailed):
    """An event whose stored JSON would exceed ``ALMANAC_MAX_EVENT_BYTES``, refused before
    anything of its command is stored: the relay could not publish it (NATS refuses a
    message over its max_payload) and would go no further than it.

    Named ``body`` here; a command that knows which of its fields makes the event large
    reports that field instead (a batch's ``items``)."""

    def __init__(self, event: Any, size: int, limit: int) -> None:
        self.event = event
        self.topic = get_topic(type(event))
        self.size = size
        self.limit = limit
        super().__init__(
            [
                FieldError(
                    "body",
                    f"would be stored as a {self.topic} event of {size:,} bytes; "
                    f"an event may hold at most {limit:,}",
                )
            ]
        )


class MsgspecMapper(Mapper[UUID]):
    """Stores event state as msgspec JSON and decodes it straight into typed fields.

    The default JSON transcoder walks every value in Python; msgspec encodes Structs,
    UUIDs and datetimes natively and decodes with a compiled per-class schema.

    With ``max_state_bytes`` it refuses (``EventTooLarge``) an event whose JSON is longer:
    every way into the store encodes here, so none gets past it.
    """

    def __init__(self, max_state_bytes: int | None = None) -> None:
        super().__init__(transcoder=_UnusedTranscoder())
        self._encoder = msgspec.json.Encoder()
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
        self.max_state_bytes = max_state_bytes

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        originator_id, originator_version, topic, state = self._stored_fields(domain_event)
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=topic,
            state=state,
        )

    def columns_of(self, events: Sequence[Any]) -> tuple[list[Any], ...]:
        """``append_columns`` of the events' stored forms, without building them: the loop
        writer sends these, and a ``StoredEvent`` (a frozen dataclass) built only to be
        taken apart again cost a command a quarter of its encoding (callgrind)."""
        columns: tuple[list[Any], ...] = ([], [], [], [])
        ids, versions, topics, states = columns
        for event in events:
            originator_id, originator_version, topic, state = self._stored_fields(event)
            ids.append(originator_id)
            versions.append(originator_version)
            topics.append(topic)
            states.append(state)
        return columns

    def _stored_fields(self, domain_event: Any) -> tuple[Any, int, str, bytes]:
        state = dict(vars(domain_event))
        originator_id = state.pop("originator_id")
        originator_version = state.pop("originator_version")
        encoded = self._encoder.encode(state)
        if self.max_state_bytes is not None and len(encoded) > self.max_state_bytes:
            raise EventTooLarge(domain_event, len(encoded), self.max_state_bytes)
        return originator_id, originator_version, get_topic(type(domain_event)), encoded

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        cls = resolve_topic(stored_event.topic)
        decoded = self._decoder(cls).decode(stored_event.state)
        state = {f: getattr(decoded, f) for f in decoded.__struct_fields__}
        originator_id = stored_event.originator_id
        state["originator_id"] = (
            originator_id if isinstance(originator_id, UUID) else UUID(str(originator_id))
        )
        state["originator_version"] = stored_event.originator_version
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return event

    def _decoder(self, cls: type[Any]) -> msgspec.json.Decoder[Any]:
        decoder = self._decoders.get(cls)
        if decoder is None:
            hints = typing.get_type_hints(cls)
            # A field with a default (added after events were stored) may be absent.
            fields = [
                (f.name, hints[f.name])
                if f.default is dataclasses.MISSING
                else (f.name, hints[f.name], f.default)
                for f in dataclasses.fields(cls)
                if f.name not in _ENVELOPE_FIELDS
            ]
            schema = msgspec.defstruct(f"{cls.__qualname__}State", fields)
            decoder = self._decoders[cls] = msgspec.json.Decoder(schema)
        return decoder


class _UnusedTranscoder(Transcoder):
    """Mapper wants a transcoder; MsgspecMapper encodes by itself."""

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


def append_columns(stored: Sequence[StoredEvent]) -> tuple[list[Any], ...]:
    """The parameters of ``almanac_events_append``: one array per column."""
    return (
        [e.originator_id for e in stored],
        [e.originator_version for e in stored],
        [e.topic for e in stored],
        [e.state for e in stored],
    )


class ArrayInsertRecorder(PostgresApplicationRecorder):
    """eventsourcing's Postgres recorder, inserting a batch as four binary arrays in one
    statement: one round trip to store a batch.

    The stock recorder sends a batch as one array of a composite type, which psycopg dumps
    field by field in Python, escaping each event's state as text: about 4 ms of CPU for 64
    events here, against 1 ms for ``unnest`` over four typed arrays in binary. It also runs
    the transaction in psycopg's pipeline mode, whose send-and-receive loop polls the
    socket for writing between statements: ~2 ms of CPU to store a single event.

    Here a batch is one call of ``almanac_events_append``, a function that takes the table
    lock, sends the NOTIFY and inserts, in the statement's own transaction (the store's
    connections are in autocommit mode). Three round trips (BEGIN with the lock and NOTIFY,
    the insert, COMMIT) cost the writer thread three waits for the GIL after each answer,
    and the loop serving requests holds it for up to the switch interval at a time.

    The table, its lock, the NOTIFY and the returned ids are the stock recorder's. This is
    not eventsourcing's own database function (``POSTGRES_ENABLE_DB_FUNCTIONS``), which
    Almanac must not use: that one inserts without the table lock, so readers following
    the log could skip events committed out of order (see DESIGN).
    """

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        names = {
            "schema": Identifier(datastore.schema),
            "table": Identifier(events_table_name),
            "id_type": Identifier(datastore.originator_id_type),
            "function": Identifier(f"{events_table_name}_append"),
            "channel": Identifier(self.channel_name),
        }
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}("
                " ids {id_type}[], versions bigint[], topics text[], states bytea[])"
                " RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ BEGIN"
                "  SET LOCAL lock_timeout = '{lock_timeout}s';"
                "  LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE;"
                "  NOTIFY {channel};"
                "  RETURN QUERY INSERT INTO {schema}.{table}"
                "   (originator_id, originator_version, topic, state)"
                "   SELECT * FROM unnest(ids, versions, topics, states)"
                "   RETURNING notification_id;"
                " END $BODY$"
            ).format(lock_timeout=datastore.lock_timeout, **names)
        )
        # As text, composed once: psycopg converts a composed query again on every execute.
        self.append_statement = (
            SQL(
                "SELECT notification_id FROM {schema}.{function}("
                "%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[]) AS notification_id"
            )
            .format(**names)
            .as_string(None)
        )

    def insert_events(self, stored_events: Sequence[StoredEvent], **_: Any) -> Sequence[int]:
        if not stored_events:
            return []
        columns = append_columns(stored_events)
        sent = False

        def retryable(exc: Exception) -> bool:
            """Whether the batch surely did not land: it was never sent (no connection to
            be had: the server restarting, say), or the server answered with an error (a
            lock timeout, a shutdown), so the statement's transaction did not commit. A
            connection lost without an answer may have committed it, and a second insert
            would report the batch's own events as a version conflict: that failure goes
            to the callers."""
            if not isinstance(exc, (OperationalError, InterfaceError)):
                return False
            cause = exc.__cause__
            return not sent or (isinstance(cause, psycopg.Error) and cause.sqlstate is not None)

        def insert() -> list[int]:
            nonlocal sent
            sent = False
            with self.datastore.get_connection() as conn, conn.cursor() as curs:
                sent = True
                curs.execute(self.append_statement, columns)
                return [row["notification_id"] for row in curs.fetchall()]

        return retried_sync(insert, on=retryable, **APPEND_RETRIES)


class AlmanacApplication(Application[UUID]):
    """The one eventsourcing application; its events table is ``almanac_events``."""

    name = "Almanac"
    env: ClassVar[dict[str, str]] = {}

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # Only what Almanac's settings say, never stray eventsourcing variables from os.environ.
        return Environment(name, dict(env or {}))

    def construct_mapper(self) -> Mapper[UUID]:
        limit = self.env.get("MAX_EVENT_BYTES")
        return MsgspecMapper(int(limit) if limit else None)

    def record(self, events: Sequence[Any]) -> list[int]:
        """Store domain events in one transaction; their notification ids, in order.

        What ``save`` does for Almanac, which has no snapshots, aggregate cache or
        followers, without its per-object protocol checks (``isinstance`` against runtime
        protocols), which cost as much CPU as the insert itself."""
        stored = [self.mapper.to_stored_event(event) for event in events]
        ids = self.recorder.insert_events(stored)
        if ids is None or len(ids) != len(stored):
            raise ProgrammingError(f"the recorder returned {ids!r} for {len(stored)} events")
        return list(ids)


class StoreFactory(PostgresFactory):
    """eventsourcing's Postgres persistence, whose pool checks a connection before lending
    it only when it is due a check (``BlockingIdleCheck``: rested over a second, or the
    server has said something on it), not with a round trip before every use as
    eventsourcing's pre-ping does: that was a round trip in every group commit."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        stock = self.datastore.pool  # made, not opened: nothing has connected yet
        self.datastore.pool = ConnectionPool(
            stock.conninfo,
            connection_class=stock.connection_class,
            kwargs=stock.kwargs,
            min_size=stock.min_size,
            max_size=stock.max_size,
            open=False,
            configure=self.datastore.after_connect_func(),
            check=(idle := BlockingIdleCheck()).check,
            timeout=stock.timeout,
            max_waiting=stock.max_waiting,
            max_lifetime=stock.max_lifetime,
            get_password_func=stock.get_password_func,
        )
        idle.sweeps(self.datastore.pool)


def application_env(settings: Settings) -> dict[str, str]:
    """eventsourcing's configuration for the active profile."""
    url = settings.store.postgres_url
    # Almanac's own, read by ``AlmanacApplication.construct_mapper``: the same on both profiles.
    limit = {"MAX_EVENT_BYTES": str(settings.store.max_event_bytes)}
    if url is None:
        settings.store.data_dir.mkdir(parents=True, exist_ok=True)
        return {
            **limit,
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(settings.store.sqlite_events_path),
            "SQLITE_LOCK_TIMEOUT": "10",
        }
    parts = urlsplit(url)
    return {
        **limit,
        "PERSISTENCE_MODULE": get_topic(StoreFactory),
        "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_POOL_SIZE": str(settings.store.pool_size),
        "POSTGRES_MAX_OVERFLOW": str(settings.store.pool_size),
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_LOCK_TIMEOUT": "5",
        "APPLICATION_RECORDER_TOPIC": get_topic(ArrayInsertRecorder),
    }


def _schema_race(exc: Exception) -> bool:
    """eventsourcing runs CREATE OR REPLACE FUNCTION (and CREATE TABLE IF NOT EXISTS)
    whenever it opens a Postgres store, so of processes starting together all but one may
    fail: with "tuple concurrently updated" where a function exists, with a duplicate key
    in the catalog where the first of them creates it (a new database, or Almanac's own
    function on a database from before it). The object is in place by then, and a second
    try succeeds."""
    message = str(exc)
    return (isinstance(exc, InternalError) and "concurrently updated" in message) or (
        isinstance(exc, IntegrityError) and "duplicate key value" in message
    )


# The event store database's advisory lock held while a process creates or checks its schema.
_SCHEMA_LOCK = 7245002


@contextlib.contextmanager
def schema_lock(settings: Settings) -> Iterator[None]:
    """Held while a store opens: eventsourcing creates its tables, types and functions
    whenever it opens a store, and of processes opening one at once on a new database all
    but one failed ("already exists", a duplicate key in the catalog, or on SQLite the
    migration's tracking record). An advisory lock on Postgres, a file lock on SQLite."""
    url = settings.store.postgres_url
    if url is None:
        locks = settings.store.data_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / "event-store-schema.lock").open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            yield
        return
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        # Opening the store reports the database's absence in its own words.
        yield
        return
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        yield


def open_application(env: dict[str, str]) -> AlmanacApplication:
    # A retry context, not a decorated function: stamina logs a function's arguments, and
    # these hold the database password.
    for attempt in stamina.retry_context(
        on=_schema_race, attempts=10, wait_initial=0.05, wait_max=1.0
    ):
        with attempt:
            return AlmanacApplication(env=env)
    raise AssertionError("unreachable: stamina re-raises the last failure")


S = TypeVar("S")
# Longest a command waits for the group-commit writer before answering 503.
APPEND_TIMEOUT = 60.0
# One compiled decoder per view type: views are few and live as long as the process.
_view_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class RecordedEvent(msgspec.Struct, gc=False, eq=False):
    """A stored event with its place in the global order.

    The stored state is decoded only when asked for, and only as far as asked: ``event``
    (with ``occurred_at`` and ``meta``) builds the whole domain event, while ``view`` decodes
    just the fields of a consumer's own Struct, skipping the rest (a projection catching up on
    a million events never builds a chart it only copies).

    A Struct outside the cyclic garbage collector's sight (it holds no cycle), built per row
    from a positional SELECT: a rebuild makes a million of them, and a tracked class cost
    0.24 us each to build where this takes 0.13, and a young collection every ~700.
    Compared by identity.
    """

    position: int
    type: str
    # ``str(aggregate_id)``, as stored: most consumers key rows by it, and building a UUID
    # per event only to print it again costs more than the rest of a small event.
    aggregate_key: str
    aggregate_version: int
    state: bytes
    _mapper: Mapper[UUID]
    _event: Any = None

    @classmethod
    def of(cls, domain_event: Any, position: int) -> RecordedEvent:
        """A domain event as the log would hand it over at ``position`` (tests, tools)."""
        mapper = MsgspecMapper()
        stored = mapper.to_stored_event(domain_event)
        return cls(
            position,
            stored.topic,
            str(stored.originator_id),
            stored.originator_version,
            stored.state,
            mapper,
        )

    def __repr__(self) -> str:
        return f"RecordedEvent({self.position}, {self.type!r}, {self.aggregate_key})"

    @property
    def aggregate_id(self) -> UUID:
        return UUID(self.aggregate_key)

    @property
    def event(self) -> Any:
        """The domain event, decoded on first use."""
        if self._event is None:
            self._event = self._mapper.to_domain_event(
                StoredEvent(
                    originator_id=self.aggregate_id,
                    originator_version=self.aggregate_version,
                    topic=self.type,
                    state=self.state,
                )
            )
        return self._event

    @property
    def occurred_at(self) -> datetime:
        occurred: datetime = self.event.timestamp
        return occurred

    @property
    def meta(self) -> EventMeta:
        meta: EventMeta = self.event.meta
        return meta

    def view(self, cls: builtins.type[S]) -> S:  # ``type`` is a field here
        """The event's fields named by ``cls`` (a msgspec Struct; ``msgspec.Raw`` fields keep
        their JSON undecoded, unknown fields are skipped)."""
        decoder = _view_decoders.get(cls)
        if decoder is None:
            decoder = _view_decoders[cls] = msgspec.json.Decoder(cls)
        view: S = decoder.decode(self.state)
        return view


Outcome = int | BaseException


@dataclasses.dataclass(slots=True)
class _Job:
    events: list[Any]
    # A thread waits on a concurrent Future (loop None); a coroutine on an asyncio Future of
    # its loop, which only that loop may settle.
    future: Future[int] | asyncio.Future[int]
    loop: asyncio.AbstractEventLoop | None = None

    def claim(self) -> bool:
        """Whether the caller still waits; one that gave up before its turn is dropped."""
        if self.loop is None:
            return typing.cast("Future[int]", self.future).set_running_or_notify_cancel()
        # Read from the writer thread: a plain attribute read. A caller that gave up
        # (cancelled, or its deadline passed) is done; one that gives up after this point
        # hears a timeout while its write may still land, as the docs say.
        return not self.future.done()


def _deliver(outcomes: list[tuple[_Job, Outcome]]) -> None:
    """Settle each caller's future; one wake-up per event loop for the whole batch.

    Waking a loop costs a system call and a turn of the loop; per caller that was a large
    share of a command's CPU under load."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], Outcome]]] = {}
    for job, outcome in outcomes:
        if job.loop is None:
            _settle_one(job.future, outcome)
        else:
            by_loop.setdefault(job.loop, []).append((typing.cast("Any", job.future), outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting there
            loop.call_soon_threadsafe(_settle, settled)


def _collect(aggregates: Iterable[Aggregate]) -> list[Any]:
    # Collected on the caller's side: if a batch fails, the events must still exist for the
    # one-by-one fallback.
    return [e for agg in aggregates for e in agg.collect_events()]


def _settle(settled: list[tuple[asyncio.Future[int], Outcome]]) -> None:
    for future, outcome in settled:
        if not future.done():
            _settle_one(future, outcome)


def _expire(future: asyncio.Future[int]) -> None:
    if not future.done():
        future.set_exception(
            Unavailable(f"the event store did not confirm the write within {APPEND_TIMEOUT:g} s")
        )


def _settle_one(future: Future[int] | asyncio.Future[int], outcome: Outcome) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# Saving a batch, as both writers do it: yields the events to record next and is sent
# their positions, or the error recording them gave; returns every caller's outcome.
SavePlan = Generator[list[Any], list[int] | BaseException, list[tuple[_Job, Outcome]]]


class _BatchOutcomes:
    """How a batch's callers learn how their saves ended, for a writer that records (a
    thread's calls or a loop's awaits) and drives ``_plan`` with what each record gave."""

    _on_commit: Callable[[int], None]

    def __init__(self, on_commit: Callable[[int], None]) -> None:
        self._on_commit = on_commit
        self.batches = 0
        self.fallbacks = 0

    def _plan(self, batch: list[_Job]) -> SavePlan:
        refused: list[tuple[_Job, Outcome]] = []
        positions = yield _events_of(batch)
        while isinstance(positions, EventTooLarge) and len(batch) > 1:
            # Refused while encoding, before anything was sent: one command's oversized
            # event must not fail its neighbours either, who are saved without it.
            batch, too_large = _apart(batch, positions)
            if not too_large or not batch:
                batch += too_large
                break
            refused += [(job, positions) for job in too_large]
            positions = yield _events_of(batch)
        if isinstance(positions, ConcurrencyConflict) and len(batch) > 1:
            # One stale command must not fail its neighbours: save each on its own.
            log.debug("writer.batch_conflict", size=len(batch))
            self.fallbacks += 1
            for job in batch:
                refused.append((job, self._alone((yield job.events))))
            return refused
        if isinstance(positions, BaseException):
            return refused + [(job, positions) for job in batch]
        self.batches += 1
        self._on_commit(positions[-1])
        return refused + _split(batch, positions)

    def _alone(self, positions: list[int] | BaseException) -> Outcome:
        if isinstance(positions, BaseException):
            return positions
        self._on_commit(positions[-1])
        return max(positions)


class GroupCommitWriter(_BatchOutcomes):
    """One thread that saves queued events from many callers in one transaction each."""

    def __init__(
        self,
        app: AlmanacApplication,
        max_batch: int,
        on_commit: Callable[[int], None],
    ) -> None:
        super().__init__(on_commit)
        self._app = app
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="almanac-writer", daemon=True)
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        with self._lock:
            self._stopped = False
            if not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="almanac-writer", daemon=True
                )
                self._thread.start()

    def submit(self, aggregates: Iterable[Aggregate]) -> Future[int]:
        """Queue a save; for a thread, which waits on the returned future."""
        future: Future[int] = Future()
        self._queue_job(aggregates, future, None)
        return future

    def submit_async(self, aggregates: Iterable[Aggregate]) -> asyncio.Future[int]:
        """Queue a save; for a coroutine on the running loop, which awaits the result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue_job(aggregates, future, loop)
        return future

    def _queue_job(
        self,
        aggregates: Iterable[Aggregate],
        future: Future[int] | asyncio.Future[int],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        events = _collect(aggregates)
        if not events:
            future.set_exception(ValueError("nothing to save: no pending events"))
        elif self._stopped:
            # A job queued behind a stopped writer would wait for ever.
            future.set_exception(Unavailable("the event store is closed"))
        else:
            self._queue.put(_Job(events, future, loop))

    def stop(self) -> None:
        """Save everything queued so far, then end the thread."""
        with self._lock:
            self._stopped = True
            if self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=30)

    def _record(self, events: list[Any]) -> list[int] | BaseException:
        """The events' positions, or the error each of their callers is to hear."""
        try:
            return self._app.record(events)
        except RecordConflictError:
            return ConcurrencyConflict("the aggregate was changed by another command")
        except (OperationalError, InterfaceError) as exc:
            return Unavailable(f"the event store is not answering: {exc}")
        except Exception as exc:  # noqa: BLE001 - every caller must hear how its save ended
            return exc

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            try:
                self._save(batch)
            except Exception:
                log.exception("writer.batch_crashed", size=len(batch))
            if stopping:
                return

    def _save(self, batch: list[_Job]) -> None:
        # A caller that gave up before its turn is dropped, unsaved; every remaining caller
        # hears how its save ended.
        batch = [job for job in batch if job.claim()]
        if batch:
            _deliver(self._outcomes(batch))

    def _outcomes(self, batch: list[_Job]) -> list[tuple[_Job, Outcome]]:
        plan = self._plan(batch)
        events = next(plan)
        while True:
            try:
                events = plan.send(self._record(events))
            except StopIteration as done:
                return typing.cast("list[tuple[_Job, Outcome]]", done.value)


def _events_of(batch: list[_Job]) -> list[Any]:
    return [e for job in batch for e in job.events]


def _apart(batch: list[_Job], error: EventTooLarge) -> tuple[list[_Job], list[_Job]]:
    """The jobs of ``batch`` without the event ``error`` refused, and the job with it."""
    rest: list[_Job] = []
    holding: list[_Job] = []
    for job in batch:
        (holding if any(e is error.event for e in job.events) else rest).append(job)
    return rest, holding


def _split(batch: list[_Job], positions: list[int]) -> list[tuple[_Job, Outcome]]:
    """Each job of a saved batch with the position of its last event."""
    outcomes: list[tuple[_Job, Outcome]] = []
    offset = 0
    for job in batch:
        mine = positions[offset : offset + len(job.events)]
        offset += len(job.events)
        outcomes.append((job, max(mine)))
    return outcomes


def _write_error(exc: psycopg.Error) -> BaseException:
    """What the callers of a batch that failed with ``exc`` are to hear."""
    if isinstance(exc, psycopg.IntegrityError):
        return ConcurrencyConflict("the aggregate was changed by another command")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Unavailable(f"the event store is not answering: {exc}")
    return exc


def running_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on ``loop`` (its thread, inside it)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class LoopConnection:
    """One async connection to the event store's database, for one event loop: the loop's
    own way to the log (``LoopWriter``, ``EventStore.read_tail``) without a thread's hop.

    It belongs to the loop that first asks for it; after that loop closed, the next one
    takes it over (its connection closed without the old loop), and while it lives any
    other loop is told no, and uses the threads.
    """

    def __init__(self, app: AlmanacApplication) -> None:
        pool: Any = typing.cast("Any", app.recorder).datastore.pool
        self.connect_kwargs: dict[str, Any] = {
            k: v for k, v in pool.kwargs.items() if k != "row_factory" and v is not None
        }
        self._connect_timeout = max(1, int(pool.timeout))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._cursor: psycopg.AsyncCursor[tuple[Any, ...]] | None = None
        # Loops on other threads ask too (a tool's, a test's): binding is one step.
        self._binding = threading.Lock()
        self.closed = False  # the store is closed: for good
        self.stopped = False  # this loop's use has ended (``stop_appending``)
        self._idle = IdleCheck()
        # For users that take turns on the connection (one statement at a time).
        self.lock = asyncio.Lock()

    def serves(
        self, loop: asyncio.AbstractEventLoop, on_bind: Callable[[], None] | None = None
    ) -> bool:
        """Whether ``loop`` may use this connection, binding it if it is free (then calling
        ``on_bind``, still as one step)."""
        with self._binding:
            if self._loop is not loop:
                if self._loop is not None and not self._loop.is_closed():
                    return False
                self.drop()
                self._loop, self.stopped = loop, False
                self.lock = asyncio.Lock()
                if on_bind is not None:
                    on_bind()
            return not (self.closed or self.stopped)

    async def cursor(self) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        """The connection's one cursor, for one statement at a time. The connection is
        checked as the store's pool checks its own (a round trip only after a rest of over
        a second, or when the server has ended the session), or replaced. One cursor for
        every statement: psycopg's own CPU was ~70 µs a statement here, ~12 of it making a
        cursor each time."""
        if self.closed:
            raise Unavailable("the event store is closed")
        if self._conn is not None and not self._conn.closed:
            try:
                await self._idle.check(self._conn)
            except psycopg.Error:
                self.drop()
        if self._conn is None or self._conn.closed or self._cursor is None:
            self.drop()
            conn = await psycopg.AsyncConnection.connect(
                **self.connect_kwargs,
                connect_timeout=self._connect_timeout,
                autocommit=True,
                row_factory=tuple_row,
            )
            if self._closed_meanwhile():
                await conn.close()
                raise Unavailable("the event store is closed")
            self._conn, self._cursor = conn, conn.cursor()
        return self._cursor

    def _closed_meanwhile(self) -> bool:
        # The store may have been closed (from another thread) while a connection was made.
        return self.closed

    def failed(self) -> None:
        """After an error on the connection: let it go if it is broken."""
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            self.drop()

    async def aclose(self) -> None:
        """End this loop's use (the next loop to come may use it anew)."""
        self.stopped = True
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None and self._loop is asyncio.get_running_loop():
            await conn.close()
        elif conn is not None:
            self._finish(conn)

    def drop(self) -> None:
        """Close the connection, from any thread."""
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            self._finish(conn)

    def _finish(self, conn: psycopg.AsyncConnection[Any]) -> None:
        loop = self._loop
        if conn.closed:
            return
        if loop is not None and loop.is_running() and not running_on(loop):
            # Its loop may be in the middle of a statement on it: closed there, in turn.
            with contextlib.suppress(RuntimeError):  # unless it closed meanwhile
                loop.call_soon_threadsafe(conn.pgconn.finish)
                return
        conn.pgconn.finish()


class LoopWriter(_BatchOutcomes):
    """Group commit on the event loop, for Postgres: the commands of one loop queue their
    events here, and one task sends everything queued in one statement on an async
    connection of its own, while the next batch gathers behind it.

    It does what ``GroupCommitWriter`` does for threads, with the same SQL (the recorder's
    ``almanac_events_append``: the table lock, the NOTIFY and the insert in one
    transaction) and the same outcomes. It exists for the API process's CPU: handing every
    command to the writer thread and back cost ~50 µs of CPU a command under load (the
    thread's wake-ups, and the two threads taking turns with the GIL), where encoding the
    events and awaiting the statement on the loop cost about half of that.

    The writer serves the loop it first saw; commands on another loop, or after that loop
    closed and another took over, are handed to the thread writer or served anew.
    """

    def __init__(
        self, app: AlmanacApplication, max_batch: int, on_commit: Callable[[int], None]
    ) -> None:
        super().__init__(on_commit)
        recorder: Any = app.recorder
        self.connection = LoopConnection(app)
        self._mapper = typing.cast("MsgspecMapper", app.mapper)
        self._sql: str = recorder.append_statement
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._task: asyncio.Task[None] | None = None

    def submit(
        self, aggregates: Iterable[Aggregate], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[int] | None:
        """Queue a save of the running ``loop``'s command and return the future to await;
        None if this writer does not serve that loop (the thread writer does then)."""
        if not self.connection.serves(loop, on_bind=self._forget):
            return None
        future: asyncio.Future[int] = loop.create_future()
        events = _collect(aggregates)
        if not events:
            future.set_exception(ValueError("nothing to save: no pending events"))
            return future
        self._pending.append(_Job(events, future, loop))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="almanac-loop-writer")
        return future

    def _forget(self) -> None:
        # A new loop: nothing queued on the closed one can be awaited any more.
        self._pending, self._task = [], None

    async def stop(self, timeout: float = 10) -> None:
        """Save everything the running loop queued (waiting up to ``timeout`` s), then close
        the connection; later commands on this loop go to the thread writer. A writer that
        another live loop owns is left alone: only its own loop may settle its callers."""
        if not self.connection.serves(asyncio.get_running_loop(), on_bind=self._forget):
            return
        self.connection.stopped = True  # nothing new is queued meanwhile
        task = self._task
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=timeout)
            if pending:
                log.error("writer.stop_timed_out", queued=len(self._pending))
                task.cancel()
                # psycopg gives up on a cancelled statement within seconds; bounded anyway.
                await asyncio.wait({task}, timeout=5)
        self._fail_pending()
        await self.connection.aclose()

    def _fail_pending(self, batch: Sequence[_Job] = ()) -> None:
        # Nobody may wait for ever. A batch in flight may still have landed, which a 503
        # leaves open, as a timeout does.
        for job in [*batch, *self._pending]:
            if not job.future.done():
                job.future.set_exception(Unavailable("the event store is closing"))
        self._pending = []

    async def _drain(self) -> None:
        batch: list[_Job] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                # A caller that gave up before its turn is dropped, unsaved.
                batch = [job for job in batch if job.claim()]
                if not batch:
                    continue
                try:
                    outcomes = await self._outcomes(batch)
                except Exception as exc:
                    log.exception("writer.batch_crashed", size=len(batch))
                    outcomes = [(job, exc) for job in batch]
                for job, outcome in outcomes:
                    if not job.future.done():
                        _settle_one(job.future, outcome)
        except asyncio.CancelledError:
            self._fail_pending(batch)
            raise
        finally:
            self._task = None

    async def _outcomes(self, batch: list[_Job]) -> list[tuple[_Job, Outcome]]:
        plan = self._plan(batch)
        events = next(plan)
        while True:
            try:
                events = plan.send(await self._record(events))
            except StopIteration as done:
                return typing.cast("list[tuple[_Job, Outcome]]", done.value)

    async def _record(self, events: list[Any]) -> list[int] | BaseException:
        try:
            columns = self._mapper.columns_of(events)
        except EventTooLarge as exc:
            return exc
        sent = False

        def retryable(exc: Exception) -> bool:
            # As the thread writer's recorder decides (ArrayInsertRecorder.insert_events).
            if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                return False
            return not sent or exc.sqlstate is not None

        async def insert() -> list[tuple[Any, ...]]:
            nonlocal sent
            sent = False
            cursor = await self.connection.cursor()
            sent = True
            try:
                await cursor.execute(self._sql, columns)
                return await cursor.fetchall()
            except psycopg.Error:
                self.connection.failed()
                raise

        try:
            rows = await retried(insert, on=retryable, **APPEND_RETRIES)
        except psycopg.Error as exc:
            return _write_error(exc)
        except Exception as exc:  # noqa: BLE001 - every caller must hear how its save ended
            return exc
        ids = [int(row[0]) for row in rows]
        if len(ids) != len(events):
            return ProgrammingError(f"the append returned {ids!r} for {len(events)} events")
        return ids


class EventStore:
    """The write side's only door to persistence, and the log that consumers follow."""

    def __init__(self, settings: Settings) -> None:
        with schema_lock(settings):
            self.app = open_application(application_env(settings))
            # Consumers that write back to this store (the worker) keep their positions here.
            self._tracking: Any = self.app.factory.tracking_recorder()
        self._executor = ThreadPoolExecutor(
            max_workers=settings.store.pool_size, thread_name_prefix="almanac-store"
        )
        self._listeners: list[Callable[[int], None]] = []
        self.writer = GroupCommitWriter(self.app, settings.store.writer_max_batch, self._committed)
        self._is_postgres = settings.store.postgres_url is not None
        # Postgres has an async driver, so commands on the event loop are saved there; the
        # thread writer serves threads (and every caller on SQLite).
        self._loop_writer = (
            LoopWriter(self.app, settings.store.writer_max_batch, self._committed)
            if self._is_postgres
            else None
        )
        self._loop_reader = LoopConnection(self.app) if self._is_postgres else None
        # The Postgres log's read (made once: it runs on every wake-up of every follower).
        table = typing.cast("Any", self.app.recorder).events_table_name
        self._select_after_sql = (
            f"SELECT notification_id, topic, originator_id::text, originator_version,"
            f" state FROM {table} WHERE notification_id > %s"
            " ORDER BY notification_id LIMIT %s"
        )
        self.writer.start()

    # -- writing ---------------------------------------------------------------------------

    async def append(self, *aggregates: Aggregate) -> int:
        """Save the aggregates' pending events durably; return the last event's position.

        A write not confirmed within ``APPEND_TIMEOUT`` answers ``Unavailable``: if it had
        not started it is dropped, otherwise it may still land (a retry with the same
        Idempotency-Key is then answered from the stored result)."""
        loop = asyncio.get_running_loop()
        future = None if self._loop_writer is None else self._loop_writer.submit(aggregates, loop)
        if future is None:
            future = self.writer.submit_async(aggregates)
        # A timer on the future rather than ``asyncio.timeout`` (and its Python context
        # manager, ~10 µs of the loop per command under load). Expiry settles the future
        # with the error, so the writer drops the job if it has not started it.
        timer = future.get_loop().call_later(APPEND_TIMEOUT, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    @property
    def batches(self) -> int:
        """Group commits so far, by both writers."""
        return self.writer.batches + (self._loop_writer.batches if self._loop_writer else 0)

    async def stop_appending(self) -> None:
        """Save what this loop's commands have queued and close the loop's connections;
        later appends and reads on the loop go to the threads."""
        if self._loop_writer is not None:
            await self._loop_writer.stop()
        reader = self._loop_reader
        if reader is not None and reader.serves(asyncio.get_running_loop()):
            async with reader.lock:
                await reader.aclose()

    def append_sync(self, *aggregates: Aggregate, timeout: float = 30) -> int:
        return self.writer.submit(aggregates).result(timeout=timeout)

    def on_commit(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(position)`` after every commit: from the writer thread, or on
        Postgres from the event loop whose command it was."""
        self._listeners.append(listener)

    def _committed(self, position: int) -> None:
        for listener in self._listeners:
            try:
                listener(position)
            except Exception:
                log.exception("eventstore.listener_failed")

    # -- reading ---------------------------------------------------------------------------

    async def load(self, cls: type[A], aggregate_id: UUID) -> A | None:
        return await self._run(self.load_sync, cls, aggregate_id)

    def load_sync(self, cls: type[A], aggregate_id: UUID) -> A | None:
        try:
            aggregate: Any = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc
        return aggregate if isinstance(aggregate, cls) else None

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        """Up to ``limit`` events with positions greater than ``after``, in order."""
        return await self._run(self.read_sync, after, limit)

    async def read_prepared(
        self, after: int, limit: int, prepare: Callable[[list[RecordedEvent]], T]
    ) -> tuple[list[RecordedEvent], T | None]:
        """``read``, with ``prepare`` applied to the events in the same worker thread: CPU
        work on a batch (a projection folding it into writes) runs beside the event loop,
        while the loop is busy with the batch before. None when ``prepare`` raised: the
        events were read all the same, and the consumer works them out itself, where its
        own handling of a failing event applies (a projection parks it)."""

        def read_and_prepare() -> tuple[list[RecordedEvent], T | None]:
            events = self.read_sync(after, limit)
            if not events:  # an idle poll: nothing to prepare
                return events, None
            try:
                return events, prepare(events)
            except Exception:  # noqa: BLE001 - not the read's failure; see above
                return events, None

        return await self._run(read_and_prepare)

    async def read_tail(self, after: int, limit: int) -> list[RecordedEvent]:
        """``read``, for a reader of the log's newest events, woken after every commit: on
        Postgres on the loop's own connection, without a thread's hop each time (the
        relay's CPU at 1,000 commands/s was mostly the system calls of its wake-ups)."""
        reader = self._loop_reader
        if reader is None or not reader.serves(asyncio.get_running_loop()):
            return await self._run(self.read_sync, after, limit)
        async with reader.lock:
            try:
                cursor = await reader.cursor()
                await cursor.execute(
                    self._select_after_sql, (after, limit), prepare=True, binary=True
                )
                rows = typing.cast(
                    "list[tuple[int, str, str, int, bytes]]", await cursor.fetchall()
                )
            except psycopg.Error as exc:
                reader.failed()
                raise Unavailable(f"the event store is not answering: {exc}") from exc
        mapper = self.app.mapper
        return [RecordedEvent(*row, mapper) for row in rows]

    def read_sync(self, after: int, limit: int) -> list[RecordedEvent]:
        try:
            rows = self._select_after(after, limit)
        except (OperationalError, InterfaceError, psycopg.OperationalError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc
        mapper = self.app.mapper
        return [RecordedEvent(*row, mapper) for row in rows]

    def _select_after(self, after: int, limit: int) -> list[tuple[int, str, str, int, bytes]]:
        """The recorder's own notification query (``> after``, in position order, the
        recorder's connections and so its visibility), minus what it costs in Python: the
        Postgres recorder reads text format, hex-encoding every state on the wire, and builds
        a ``Notification`` and a UUID per row."""
        recorder: Any = self.app.recorder
        table = recorder.events_table_name
        if self._is_postgres:
            with (
                recorder.datastore.get_connection() as conn,
                conn.cursor(row_factory=tuple_row, binary=True) as cur,
            ):
                cur.execute(self._select_after_sql, (after, limit), prepare=True)
                rows: list[tuple[int, str, str, int, bytes]] = cur.fetchall()
                return rows
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT rowid, topic, originator_id, originator_version, state FROM {table}"
                " WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            )
            # SQLite keeps ids as bare hex; consumers get the canonical form either way.
            return [
                (n, topic, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", version, state)
                for n, topic, h, version, state in cursor.fetchall()
            ]

    async def max_position(self) -> int:
        return await self._run(self.max_position_sync)

    def max_position_sync(self) -> int:
        try:
            return int(self.app.recorder.max_notification_id() or 0)
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc

    async def position_of(self, aggregate_id: UUID, version: int) -> int | None:
        """The position of one aggregate's event, for replaying an original response."""
        return await self._run(self._position_of, aggregate_id, version)

    def _position_of(self, aggregate_id: UUID, version: int) -> int | None:
        recorder: Any = self.app.recorder
        table = recorder.events_table_name
        if self._is_postgres:
            with recorder.datastore.get_connection() as conn:
                row = conn.execute(
                    f"SELECT notification_id FROM {table} "
                    "WHERE originator_id = %s AND originator_version = %s",
                    (aggregate_id, version),
                ).fetchone()
            return None if row is None else int(row["notification_id"])
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT rowid FROM {table} WHERE originator_id = ? AND originator_version = ?",
                (aggregate_id.hex, version),
            )
            found = cursor.fetchone()
        return None if found is None else int(found[0])

    async def first_events(self, aggregate_ids: Sequence[UUID]) -> dict[UUID, RecordedEvent]:
        """The events that began these aggregates (each names its owner), by aggregate id;
        those with no such aggregate are left out. One query for the lot: an access check
        built on it takes as long for another owner's aggregate as for one that does not
        exist."""
        if not aggregate_ids:
            return {}
        return await self._run(self._first_events, list(dict.fromkeys(aggregate_ids)))

    def _first_events(self, aggregate_ids: list[UUID]) -> dict[UUID, RecordedEvent]:
        recorder: Any = self.app.recorder
        table = recorder.events_table_name
        rows: list[tuple[int, str, str, int, bytes]] = []
        try:
            if self._is_postgres:
                with (
                    recorder.datastore.get_connection() as conn,
                    conn.cursor(row_factory=tuple_row, binary=True) as cur,
                ):
                    cur.execute(
                        "SELECT notification_id, topic, originator_id::text, originator_version,"
                        f" state FROM {table}"
                        " WHERE originator_id = ANY(%s) AND originator_version = 1",
                        (aggregate_ids,),
                    )
                    rows = cur.fetchall()
            else:
                with recorder.datastore.transaction(commit=False) as cursor:
                    # SQLite binds at most 32,766 parameters (999 before 3.32) a statement.
                    for start in range(0, len(aggregate_ids), 500):
                        chunk = [a.hex for a in aggregate_ids[start : start + 500]]
                        cursor.execute(
                            f"SELECT rowid, topic, originator_id, originator_version, state"
                            f" FROM {table} WHERE originator_version = 1"
                            f" AND originator_id IN ({', '.join('?' * len(chunk))})",
                            chunk,
                        )
                        # SQLite keeps ids as bare hex; consumers get the canonical form.
                        found = cursor.fetchall()
                        rows += [(p, t, str(UUID(k)), v, st) for p, t, k, v, st in found]
        except (OperationalError, InterfaceError, psycopg.OperationalError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc
        return {
            UUID(key): RecordedEvent(position, topic, key, version, state, self.app.mapper)
            for position, topic, key, version, state in rows
        }

    @property
    def notify_channel(self) -> str:
        """The Postgres channel the recorder NOTIFYs after each insert."""
        recorder: Any = self.app.recorder
        return str(recorder.events_table_name).replace(".", "_")

    async def consumer_position(self, name: str) -> int:
        return await self._run(self._consumer_position, name)

    def _consumer_position(self, name: str) -> int:
        try:
            return int(self._tracking.max_tracking_id(name) or 0)
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc

    async def save_consumer_position(self, name: str, position: int) -> None:
        await self._run(self._save_consumer_position, name, position)

    def _save_consumer_position(self, name: str, position: int) -> None:
        if position <= self._consumer_position(name):
            return
        try:
            self._tracking.insert_tracking(Tracking(name, position))
        except RecordConflictError:
            # Another process moved it further meanwhile; positions only go forward.
            return
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"the event store is not answering: {exc}") from exc

    async def ping(self) -> None:
        await self.max_position()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        connections = [self._loop_reader]
        if self._loop_writer is not None:
            connections.append(self._loop_writer.connection)
        for connection in connections:
            if connection is not None:
                connection.closed = True
                connection.drop()
        self.writer.stop()
        self._executor.shutdown(wait=True)
        self.app.close()
