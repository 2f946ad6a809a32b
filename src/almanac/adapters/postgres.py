"""Postgres connection handling: the read-model database and database creation."""

from __future__ import annotations

import contextlib
import re
import select
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypeGuard
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import psycopg
import structlog
from psycopg import sql as pgsql
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from almanac.errors import Unavailable
from almanac.readmodels import SAVE_POSITION, BulkInsert, Row, Write

log = structlog.get_logger("almanac.postgres")
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``:name`` parameters (the portable spelling) to psycopg's ``%(name)s``."""
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


@lru_cache(maxsize=512)
def to_positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` parameters to psycopg's ``%s``, and the names in their order."""
    return _PARAM.sub("%s", sql.replace("%", "%%")), tuple(_PARAM.findall(sql))


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist; True if it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    try:
        async with await psycopg.AsyncConnection.connect(
            admin_url, autocommit=True, connect_timeout=5
        ) as conn:
            found = await (
                await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            ).fetchone()
            if found:
                return False
            try:
                await conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                return False  # another process created it first
            log.info("postgres.database_created", database=name)
            return True
    except psycopg.OperationalError as exc:
        raise Unavailable(f"cannot reach Postgres to create {name!r}: {exc}") from exc


def _has_news(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has said something on an idle connection (no query under way): a
    session it ends, by a restart or a terminated backend, sends its notice and closes, so
    the socket reads at once. A zero-timeout ``poll`` (not ``select``, which refuses the
    descriptors above 1023 of a process holding thousands of WebSockets), no round trip."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):  # closed already
        return True


class _Rest:
    """Which of the connections a pool lends are due a round trip to check them.

    A connection lent again within ``after`` seconds of its last lending, on which the
    server has said nothing since, was working a moment ago: checking it as well cost a
    round trip before every query, projector commit and append (under load, one in every
    group commit of the event store's writer: 64 concurrent appenders, 12.6-13.8k
    appends/s with it, 14.4-17.5k without). One that rested longer (a network may have
    dropped it without a word) is checked, and replaced if it is dead; so is one the server
    has ended (its notice is there to read). Should a connection be cut without a word
    within that second, its first use fails, as when a server dies between a check and the
    statement: the read database repeats a read once on a fresh connection and projectors
    retry their writes; the event store's reads and appends fail to their callers
    (``Unavailable``, a 503), and are retried there.

    The time is noted as the connection is lent, not as it comes back: a pool's ``reset``
    callback would move every return onto one of the pool's workers.
    """

    def __init__(self, after: float = 1.0) -> None:
        self._after = after
        self._lent: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._pool: weakref.ref[Any] | None = None

    def sweeps(self, pool: Any) -> None:
        """When a check fails, have ``pool`` check all its idle connections at once: a
        restart ends every session, and the pool otherwise meets the dead ones a lend at a
        time, backing off after each (1 s, then 2 s, ...: the first append after a restart
        waited 5 s, the pool's timeout)."""
        self._pool = weakref.ref(pool)

    def _swept(self) -> Any:
        return None if self._pool is None else self._pool()

    def due(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
        """Whether ``conn``, being lent now, needs the round trip (and note that it is)."""
        now = time.monotonic()
        lent = self._lent.get(conn)
        self._lent[conn] = now
        return lent is None or now - lent > self._after or _has_news(conn)


class IdleCheck(_Rest):
    """An async pool's check of a connection it lends (see ``_Rest``): the pool's
    ``check``."""

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self.due(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            if (pool := self._swept()) is not None:
                with contextlib.suppress(Exception):  # a closing pool: the lend fails anyway
                    await pool.check()
            raise


class BlockingIdleCheck(_Rest):
    """``IdleCheck`` for a blocking pool: the event store's."""

    def check(self, conn: psycopg.Connection[Any]) -> None:
        if not self.due(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            if (pool := self._swept()) is not None:
                with contextlib.suppress(Exception):  # a closing pool: the lend fails anyway
                    pool.check()
            raise


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # JSON columns come back as text: msgspec decodes them faster than psycopg would.
    conn.adapters.register_loader("jsonb", TextLoader)
    conn.adapters.register_loader("json", TextLoader)


def _inserts_then_position(writes: Sequence[Write]) -> bool:
    """Bulk inserts, each into a table of its own, then a projection's position: the shape
    of a projector's batch of new rows. (Two clauses of one statement must not write the
    same row, so no other statement qualifies.)"""
    if len(writes) < 2:
        return False
    *inserts, last = writes
    tables = {w.table for w in inserts if isinstance(w, BulkInsert)}
    return (
        len(tables) == len(inserts)
        and not isinstance(last, BulkInsert)
        and last[0] == SAVE_POSITION
        and len(last[1]) == 1
    )


# A bulk insert of at least this many rows with new keys is loaded with COPY, which fills a
# page per WAL record where INSERT … SELECT FROM unnest writes one per row: a rebuild's batch
# of ~650 readings of ~3 kB took ~15 % less time and CPU (measures in benchmarks/README.md).
# Below it, a live batch keeps its single round trip (``_write_as_one``).
COPY_MIN_ROWS = 100


def _uuid(value: Any) -> Any:
    """A UUID's 16 bytes, from its text as keys are read off the log (``UUID(text)`` took
    ~1 us of the ~5 a rebuild's row cost to dump; this ~0.2)."""
    if isinstance(value, UUID):
        return value.bytes
    digits = value.replace("-", "")
    # 32 characters that are 16 bytes are 32 hex digits: ``fromhex`` skips whitespace, which
    # ``uuid.UUID`` refuses, so any whitespace leaves too few bytes and goes to the check below.
    if len(digits) == _UUID_DIGITS:
        with contextlib.suppress(ValueError):
            packed = bytes.fromhex(digits)
            if len(packed) == _UUID_BYTES:
                return packed
    return UUID(value).bytes  # the other spellings a ``::uuid`` cast accepts, or its error


_UUID_DIGITS, _UUID_BYTES = 32, 16


def _timestamptz(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _fits(bits: int) -> Callable[[Any], Any]:
    """A check that an integer fits the column: binary COPY would wrap it around silently,
    where INSERT fails with ``NumericValueOutOfRange``."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"{value} does not fit a {bits}-bit integer column")
        return value

    return check


class _Copied(NamedTuple):
    """What binary COPY needs done to a value of a column type first, and the type COPY is
    told, where it is not the column's own."""

    prepare: Callable[[Any], Any] | None = None
    sent_as: str | None = None


# The column types a table may have for COPY: text (a UUID, an RFC 3339 time) parsed as the
# INSERT's casts would, a narrow integer checked. psycopg encodes the rest as they are or
# refuses them (a str for a number, an int over 64 bits). Any other type (JSONB, which
# psycopg would encode anew) keeps the table on INSERT. A UUID goes as its 16 bytes, which
# is what a binary ``uuid`` field holds, and the ``bytea`` dumper writes them as they are
# (psycopg's ``uuid`` dumper would want a ``UUID`` object built first).
_COPY_AS: dict[str, _Copied] = {
    "text": _Copied(),
    "bigint": _Copied(),
    "double precision": _Copied(),
    "integer": _Copied(_fits(32)),
    "smallint": _Copied(_fits(16)),
    "uuid": _Copied(_uuid, sent_as="bytea"),
    "timestamp with time zone": _Copied(_timestamptz),
}


def _to_load(write: Write) -> TypeGuard[BulkInsert]:
    """Whether ``write`` is an insert to load with COPY, if its table's types allow."""
    return isinstance(write, BulkInsert) and write.new_keys and len(write.rows) >= COPY_MIN_ROWS


def _loaded_tables(writes: Sequence[Write]) -> list[str]:
    return [w.table for w in writes if _to_load(w)]


def _one_statement(writes: Sequence[Write]) -> bool:
    if len(writes) != 1 or isinstance(writes[0], BulkInsert):
        return False
    return len(writes[0][1]) == 1


class PostgresReadDatabase:
    dialect: Literal["postgres"] = "postgres"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8) -> None:
        self.url = url
        self._column_types: dict[str, dict[str, str]] = {}
        # The text of each bulk insert, by table and shape, composed once: composing it with
        # ``psycopg.sql`` on every batch was most of a small batch's CPU (a live projector
        # commits a few events at a time), and psycopg caches the conversion of a query
        # given as text, not as a composed one.
        self._statements: dict[tuple[Any, ...], str] = {}
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            configure=_configure,
            kwargs={
                "row_factory": dict_row,
                "connect_timeout": 5,
                # A read is one statement: in a transaction of its own it cost BEGIN and
                # COMMIT, two more round trips. Writes open their transaction themselves.
                "autocommit": True,
                # Read models are derived: rows and their tracking position commit together, so
                # a crash loses both consistently and the projector replays from the log.
                # Not waiting for the WAL flush takes milliseconds off projection lag.
                "options": "-c synchronous_commit=off",
            },
            timeout=5,
            check=(idle := IdleCheck()).check,
        )
        idle.sweeps(self.pool)

    async def open(self) -> None:
        await ensure_database(self.url)
        await self.pool.open(wait=False)

    async def migrate(self, statements: Sequence[str]) -> None:
        # A migration may drop and recreate a table: its column types are looked up again.
        self._column_types.clear()
        self._statements.clear()
        async with self._connection() as conn, conn.transaction():
            # Several processes may start at once; serialise their CREATE … IF NOT EXISTS.
            await conn.execute("SELECT pg_advisory_xact_lock(7245001)")
            for statement in statements:
                await conn.execute(statement)

    async def write(self, writes: Sequence[Write]) -> None:
        try:
            # Not in psycopg's pipeline mode: its loop polls the socket between statements,
            # which cost more CPU (1.47 -> 1.69 ms a projector batch) than the round trips
            # it saved on a local server.
            async with self._connection() as conn, conn.cursor() as cur:
                if _one_statement(writes):
                    # Atomic on its own: a projector's batch that only moves its position
                    # (most batches, for most projections) is one round trip, not three.
                    sql, params = writes[0]  # type: ignore[misc]
                    await cur.execute(to_pyformat(sql), params[0])
                    return
                if any(map(_to_load, writes)) and await self._loaded(conn, cur, writes):
                    return
                if _inserts_then_position(writes):
                    await self._write_as_one(cur, writes)
                    return
                async with conn.transaction():
                    await self._write_all(cur, writes)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"the read database is not answering: {exc}") from exc

    async def _loaded(
        self,
        conn: psycopg.AsyncConnection[Any],
        cur: psycopg.AsyncCursor[Any],
        writes: Sequence[Write],
    ) -> bool:
        """The writes in one transaction, large inserts of new keys by COPY; false, with
        nothing written, if a row was there already (a replay): then the conflict clauses
        are to decide, row by row."""
        try:
            async with conn.transaction():
                await self._write_all(cur, writes, load=True)
        except psycopg.errors.UniqueViolation:
            log.info("postgres.bulk_load_replayed", tables=_loaded_tables(writes))
            return False
        return True

    async def _write_as_one(self, cur: psycopg.AsyncCursor[Any], writes: Sequence[Write]) -> None:
        """Bulk inserts, then the position, as one statement: the inserts in data-modifying
        ``WITH`` clauses. One round trip, where a transaction of them took BEGIN, each
        statement and COMMIT (a projector's live batch of new readings and its position:
        four; projection lag p50 7.3-9.3 -> 3.3-5.5 ms at 1,000 commands/s). Each clause
        writes another table, and all of it commits or none."""
        clauses: list[str] = []
        values: list[Any] = []
        for number, write in enumerate(writes[:-1]):
            assert isinstance(write, BulkInsert)
            query, columns = await self._bulk_insert(cur, write)
            clauses.append(f"w{number} AS ({query})")
            values.extend(columns)
        sql, params = writes[-1]  # type: ignore[misc]
        last, names = to_positional(sql)
        values.extend(params[0][name] for name in names)
        await cur.execute(f"WITH {', '.join(clauses)} {last}", values)

    async def _write_all(
        self, cur: psycopg.AsyncCursor[Any], writes: Sequence[Write], *, load: bool = False
    ) -> None:
        for write in writes:
            if isinstance(write, BulkInsert):
                if load and _to_load(write) and await self._copied(cur, write):
                    continue
                bulk, columns = await self._bulk_insert(cur, write)
                await cur.execute(bulk, columns)
                continue
            sql, params = write
            query = to_pyformat(sql)
            if len(params) == 1:
                await cur.execute(query, params[0])
            else:
                await cur.executemany(query, params)

    async def _copied(self, cur: psycopg.AsyncCursor[Any], write: BulkInsert) -> bool:
        """``COPY … FROM STDIN (FORMAT BINARY)``: the rows as they are, no conflict checked
        but the keys' own uniqueness (a duplicate fails the whole transaction); false, with
        nothing done for a column type COPY is not given here."""
        types = await self._types_of(cur, write.table)
        column_types = [types[c] for c in write.columns]
        if not _COPY_AS.keys() >= set(column_types):
            return False
        copied = [_COPY_AS[t] for t in column_types]
        convert = [(i, c.prepare) for i, c in enumerate(copied) if c.prepare is not None]
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            pgsql.Identifier(write.table),
            pgsql.SQL(", ").join(map(pgsql.Identifier, write.columns)),
        )
        async with cur.copy(statement) as copy:
            copy.set_types([c.sent_as or t for c, t in zip(copied, column_types, strict=True)])
            for row in write.rows:
                values = list(row)
                for index, prepare in convert:
                    if (value := values[index]) is not None:
                        values[index] = prepare(value)
                await copy.write_row(values)
        return True

    async def _types_of(self, cur: psycopg.AsyncCursor[Any], table: str) -> dict[str, str]:
        """Each column's type, as ``format_type`` names it."""
        types = self._column_types.get(table)
        if types is None:
            await cur.execute(
                "SELECT attname AS column_name, format_type(atttypid, atttypmod) AS type"
                " FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " AND NOT attisdropped",
                (table,),
            )
            types = {row["column_name"]: row["type"] for row in await cur.fetchall()}
            self._column_types[table] = types
        return types

    async def _bulk_insert(
        self, cur: psycopg.AsyncCursor[Any], write: BulkInsert
    ) -> tuple[str, list[list[Any]]]:
        """``INSERT … SELECT * FROM unnest(%b::type[], …)``: one parameter per column, so a
        thousand rows cost one round trip and no per-row query parsing; binary arrays spare
        escaping every JSON document as text."""
        columns = [list(values) for values in zip(*write.rows, strict=True)]
        key = (write.table, write.columns, write.on_conflict)
        query = self._statements.get(key)
        if query is not None:
            return query, columns
        types = await self._types_of(cur, write.table)
        casts = pgsql.SQL(", ").join(
            pgsql.SQL("%b::{}[]").format(pgsql.SQL(types[c])) for c in write.columns
        )
        query = self._statements[key] = (
            pgsql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({}) {}")
            .format(
                pgsql.Identifier(write.table),
                pgsql.SQL(", ").join(map(pgsql.Identifier, write.columns)),
                casts,
                pgsql.SQL(write.on_conflict),
            )
            .as_string(cur)
        )
        return query, columns

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        rows = await self._read(sql, params, one=True)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        return await self._read(sql, params, one=False)

    async def _read(self, sql: str, params: Mapping[str, Any], *, one: bool) -> list[Row]:
        # A connection lent without a check (IdleCheck) may have been cut by a server
        # restart since it was last used: a read is safe to repeat on a fresh one, once.
        for attempt in (1, 2):
            lent: psycopg.AsyncConnection[Any] | None = None
            try:
                async with self._connection() as conn:
                    lent = conn
                    cur = await conn.execute(to_pyformat(sql), params)
                    if one:
                        row = await cur.fetchone()
                        return [] if row is None else [row]
                    return list(await cur.fetchall())
            except psycopg.OperationalError as exc:
                if attempt == 1 and lent is not None and lent.broken:
                    continue
                raise Unavailable(f"the read database is not answering: {exc}") from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _connection(self) -> Any:
        return _Connection(self.pool)

    async def ping(self) -> None:
        await self.fetch_one("SELECT 1 AS ok", {})

    async def close(self) -> None:
        await self.pool.close()


class _Connection:
    """A pooled connection whose pool time-out surfaces as ``Unavailable``."""

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> None:
        self._pool = pool
        self._cm: Any = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._cm = self._pool.connection()
        try:
            conn: psycopg.AsyncConnection[Any] = await self._cm.__aenter__()
        except PoolTimeout as exc:
            raise Unavailable("the read database is not answering (no connection)") from exc
        return conn

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)
