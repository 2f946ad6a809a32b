"""The read-model port: the database projectors write and queries read.

SQL is written once with ``:name`` parameters and portable upserts
(``INSERT … ON CONFLICT … DO UPDATE``); each adapter runs it on its own engine.
Schema statements differ per dialect and are supplied by each projection.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from almanac.timeouts import Pulse

Dialect = Literal["sqlite", "postgres"]
Row = Mapping[str, Any]
# One statement with the parameter sets to run it with, in order.
Statement = tuple[str, Sequence[Mapping[str, Any]]]


class BulkInsert(NamedTuple):
    """Many rows into one table; each engine inserts them its fastest way.

    ``new_keys``: every row's key is new unless its event was applied before (a replay), as
    a reading's row is new with its request; then an engine may load the rows without
    checking each for a conflict, and apply ``on_conflict`` only when one turns up. Leave it
    false where rows legitimately meet existing ones (charts shared by many readings).
    """

    table: str
    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    on_conflict: str = ""
    new_keys: bool = False


Write = Statement | BulkInsert

POSITIONS_SCHEMA = {
    "sqlite": [
        (
            "CREATE TABLE IF NOT EXISTS projection_positions ("
            " name TEXT PRIMARY KEY, position INTEGER NOT NULL, updated_at TEXT NOT NULL)"
        )
    ],
    "postgres": [
        (
            "CREATE TABLE IF NOT EXISTS projection_positions ("
            " name TEXT PRIMARY KEY, position BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"
        )
    ],
}
SAVE_POSITION = (
    "INSERT INTO projection_positions (name, position, updated_at)"
    " VALUES (:name, :position, :updated_at)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position,"
    " updated_at = excluded.updated_at WHERE projection_positions.position < excluded.position"
)
# Positions only move forward; a rebuild forgets the row and starts again from 0.
FORGET_POSITION = "DELETE FROM projection_positions WHERE name = :name"


class ReadDatabase(Protocol):
    @property
    def dialect(self) -> Dialect: ...

    async def open(self) -> None: ...

    async def migrate(self, statements: Sequence[str]) -> None: ...

    async def write(self, writes: Sequence[Write]) -> None:
        """Run every write in one transaction: all of it commits, or none."""
        ...

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None: ...

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


async def projection_position(db: ReadDatabase, name: str) -> int:
    row = await db.fetch_one(
        "SELECT position FROM projection_positions WHERE name = :name", {"name": name}
    )
    return 0 if row is None else int(row["position"])


class PositionWatch:
    """How far each projection has got, announced in-process and read from the database.

    Projectors in this process announce their commits so waiting queries wake at once;
    projectors in other processes are seen by re-reading the tracking row with backoff.

    The tracking row is the authority: a projection rebuilt in place starts again from 0,
    in this process or another, and a query asking for ``min_position`` must then wait for
    the rebuilt read model, not pass on what the old one had reached. So a position known
    without reading the row is trusted for ``fresh`` seconds at most; a projector of this
    process that starts a projection again (``restart``) sets it to where it really is, and
    a read that was under way meanwhile is not believed.
    """

    def __init__(
        self,
        read_position: Callable[[str], Awaitable[int]],
        *,
        fresh: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_position = read_position
        self._fresh = fresh
        self._clock = clock
        # name -> (position, when it was learned, whether this process's projector said so)
        self._known: dict[str, tuple[int, float, bool]] = {}
        self._restarts: dict[str, int] = {}
        self._changed = Pulse()

    def announce(self, name: str, position: int) -> None:
        """A commit of this process's projector: it moves forward from what it said before,
        and is believed over a read (a leading projector knows best)."""
        known = self._known.get(name)
        if known is None or not known[2] or position >= known[0]:
            self._learn(name, position, announced=True)

    def restart(self, name: str, position: int) -> None:
        """This process's projector starts ``name`` at ``position`` (0 for a rebuild)."""
        self._restarts[name] = self._restarts.get(name, 0) + 1
        self._learn(name, position, announced=True)

    def _learn(self, name: str, position: int, *, announced: bool) -> None:
        before = self._known.get(name)
        self._known[name] = (position, self._clock(), announced)
        if before is None or position > before[0]:
            self._changed.fire()

    def _trusted(self, name: str) -> tuple[int, bool] | None:
        """What is known of ``name`` and whether it was announced, while still fresh."""
        known = self._known.get(name)
        if known is None or self._clock() - known[1] >= self._fresh:
            return None
        return known[0], known[2]

    async def current(self, name: str) -> int:
        restarts = self._restarts.get(name, 0)
        position = await self._read_position(name)
        trusted = self._trusted(name)
        if self._restarts.get(name, 0) != restarts:
            # Started again while the row was read: the read may be of the old tables.
            return trusted[0] if trusted is not None else 0
        if trusted is not None and trusted[0] > position:
            return trusted[0]  # learned since the read began; positions do not go back
        self._learn(name, position, announced=False)
        return position

    async def wait_for(self, name: str, position: int, timeout: float) -> int:
        """Wait until projection ``name`` reaches ``position``; return where it is."""
        trusted = self._trusted(name)
        if trusted is not None and trusted[0] >= position:
            return trusted[0]
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            trusted = self._trusted(name)
            if trusted is not None and trusted[1]:
                current = trusted[0]  # this process's projector tells each commit
            else:
                current = await self.current(name)
            remaining = deadline - time.monotonic()
            if current >= position or remaining <= 0:
                return current
            await self._changed.wait(min(pause, remaining))
            pause = min(pause * 2, 0.1)
