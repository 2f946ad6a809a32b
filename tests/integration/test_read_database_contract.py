"""One contract for the read-model port, run against every adapter (SQLite and Postgres)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from almanac.adapters.postgres import COPY_MIN_ROWS, PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.readmodels import (
    POSITIONS_SCHEMA,
    SAVE_POSITION,
    BulkInsert,
    ReadDatabase,
    projection_position,
)
from almanac.settings import Settings

SCHEMA = {
    "sqlite": [
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, n INTEGER NOT NULL)",
        (
            "CREATE TABLE loads (id TEXT PRIMARY KEY, body TEXT, at TEXT NOT NULL,"
            " n INTEGER NOT NULL, flag INTEGER)"
        ),
    ],
    "postgres": [
        "CREATE TABLE notes (id TEXT PRIMARY KEY, body JSONB, n BIGINT NOT NULL)",
        (
            "CREATE TABLE loads (id UUID PRIMARY KEY, body TEXT, at TIMESTAMPTZ NOT NULL,"
            " n BIGINT NOT NULL, flag INTEGER)"
        ),
    ],
}
ADD = "INSERT INTO notes (id, body, n) VALUES (:id, :body, :n)"


@pytest.fixture
async def db(settings: Settings, tmp_path: Path) -> AsyncIterator[ReadDatabase]:
    database: ReadDatabase
    if settings.read_postgres_url is None:
        database = SqliteReadDatabase(tmp_path / "contract.sqlite3")
    else:
        database = PostgresReadDatabase(settings.read_postgres_url, max_size=2)
    await database.open()
    await database.migrate([*POSITIONS_SCHEMA[database.dialect], *SCHEMA[database.dialect]])
    try:
        yield database
    finally:
        await database.close()


async def test_writes_then_reads_rows_back(db: ReadDatabase) -> None:
    await db.write(
        [(ADD, [{"id": "a", "body": '{"x": 1}', "n": 1}, {"id": "b", "body": None, "n": 2}])]
    )
    rows = await db.fetch_all("SELECT id, n FROM notes ORDER BY id", {})
    assert [(r["id"], r["n"]) for r in rows] == [("a", 1), ("b", 2)]
    one = await db.fetch_one("SELECT body FROM notes WHERE id = :id", {"id": "a"})
    assert one is not None and one["body"].replace(" ", "") == '{"x":1}'
    assert await db.fetch_one("SELECT id FROM notes WHERE id = :id", {"id": "zz"}) is None


async def test_a_failing_statement_rolls_back_the_whole_write(db: ReadDatabase) -> None:
    await db.write([(ADD, [{"id": "a", "body": None, "n": 1}])])
    with pytest.raises(Exception):  # noqa: B017, PT011 - each engine raises its own error
        await db.write(
            [
                (ADD, [{"id": "b", "body": None, "n": 2}]),
                (
                    SAVE_POSITION,
                    [{"name": "p", "position": 9, "updated_at": "2026-01-01T00:00:00+00:00"}],
                ),
                (ADD, [{"id": "a", "body": None, "n": 3}]),  # duplicate key
            ]
        )
    rows = await db.fetch_all("SELECT id FROM notes ORDER BY id", {})
    assert [r["id"] for r in rows] == ["a"]
    assert await projection_position(db, "p") == 0


async def test_bulk_inserts_many_rows_and_honours_on_conflict(db: ReadDatabase) -> None:
    rows = [[f"k{i:04d}", None if i % 2 else f'{{"i": {i}}}', i] for i in range(1500)]
    await db.write([BulkInsert("notes", ("id", "body", "n"), rows)])
    again = [["k0000", None, -1], ["new", '{"a": "quote \\" and \\\\ back"}', 7]]
    await db.write([BulkInsert("notes", ("id", "body", "n"), again, "ON CONFLICT (id) DO NOTHING")])
    count = await db.fetch_one("SELECT COUNT(*) AS c, SUM(n) AS s FROM notes", {})
    assert count is not None and int(count["c"]) == 1501
    assert int(count["s"]) == sum(range(1500)) + 7
    new = await db.fetch_one("SELECT body FROM notes WHERE id = 'new'", {})
    assert new is not None and "quote" in new["body"]


async def test_projection_positions_only_move_forward(db: ReadDatabase) -> None:
    for position in (5, 3, 8, 7):
        await db.write(
            [
                (
                    SAVE_POSITION,
                    [
                        {
                            "name": "p",
                            "position": position,
                            "updated_at": "2026-01-01T00:00:00+00:00",
                        }
                    ],
                )
            ]
        )
    assert await projection_position(db, "p") == 8


async def test_ping_answers_when_the_database_is_up(db: ReadDatabase) -> None:
    await db.ping()


def position(at: int) -> tuple[str, list[dict[str, object]]]:
    return (
        SAVE_POSITION,
        [{"name": "p", "position": at, "updated_at": "2026-01-01T00:00:00+00:00"}],
    )


async def test_new_rows_and_the_position_are_written_together(db: ReadDatabase) -> None:
    """A projector's batch of new rows: on Postgres, one statement."""
    rows = [["a", None, 1], ["b", '{"x": 2}', 2]]
    await db.write([BulkInsert("notes", ("id", "body", "n"), rows), position(5)])
    found = await db.fetch_all("SELECT id, n FROM notes ORDER BY id", {})
    assert [(r["id"], r["n"]) for r in found] == [("a", 1), ("b", 2)]
    assert await projection_position(db, "p") == 5


async def test_new_rows_that_fail_leave_neither_rows_nor_position(db: ReadDatabase) -> None:
    await db.write([BulkInsert("notes", ("id", "body", "n"), [["a", None, 1]]), position(5)])
    # A new row and one already there, with no ON CONFLICT.
    rows = [["c", None, 3], ["a", None, 4]]
    with pytest.raises(Exception):  # noqa: B017, PT011 - each engine raises its own error
        await db.write([BulkInsert("notes", ("id", "body", "n"), rows), position(9)])
    found = await db.fetch_all("SELECT id FROM notes ORDER BY id", {})
    assert [r["id"] for r in found] == ["a"]
    assert await projection_position(db, "p") == 5


# Enough rows for Postgres to load them with COPY, as a rebuild's batch of new readings.
LOADED = COPY_MIN_ROWS + 20
LOAD_COLUMNS = ("id", "body", "at", "n", "flag")


def load_rows(first: int, count: int, n: int = 0) -> list[list[object]]:
    """Rows as projections give them: ids and times as text, awkward bodies, NULLs."""
    bodies = ["plain", "tab\tnew\nline", 'back\\slash "quoted"', "☉ ☽ ♄", "", None]
    return [
        [
            str(uuid.UUID(int=i + 1)),
            bodies[i % len(bodies)],
            f"2026-03-0{1 + i % 9}T12:34:56.{i + 1:06d}+00:00",
            n + i,
            None if i % 3 else i % 2,
        ]
        for i in range(first, first + count)
    ]


async def loaded(db: ReadDatabase) -> list[list[object]]:
    rows = await db.fetch_all("SELECT id, body, at, n, flag FROM loads ORDER BY n", {})
    return [
        [
            str(r["id"]),
            r["body"],
            r["at"] if isinstance(r["at"], str) else r["at"].isoformat(),
            r["n"],
            r["flag"],
        ]
        for r in rows
    ]


async def test_a_large_insert_of_new_keys_writes_every_row_as_given(db: ReadDatabase) -> None:
    rows = load_rows(0, LOADED)
    await db.write([BulkInsert("loads", LOAD_COLUMNS, rows, new_keys=True), position(5)])
    assert await loaded(db) == rows
    assert await projection_position(db, "p") == 5


async def test_a_replayed_large_insert_of_new_keys_leaves_the_rows_there_to_on_conflict(
    db: ReadDatabase,
) -> None:
    """A batch applied again (a replay) with rows beyond it: the rows already there stay as
    they were, the others are added, and the position moves."""
    first = load_rows(0, LOADED)
    await db.write([BulkInsert("loads", LOAD_COLUMNS, first, new_keys=True), position(5)])
    again = load_rows(LOADED // 2, LOADED, n=1000)
    skip = "ON CONFLICT (id) DO NOTHING"
    await db.write([BulkInsert("loads", LOAD_COLUMNS, again, skip, new_keys=True), position(9)])
    assert await loaded(db) == first + again[LOADED - LOADED // 2 :]
    assert await projection_position(db, "p") == 9


async def test_a_large_insert_of_new_keys_meeting_a_row_without_on_conflict_writes_nothing(
    db: ReadDatabase,
) -> None:
    await db.write([BulkInsert("loads", LOAD_COLUMNS, load_rows(0, 1), new_keys=True)])
    rows = load_rows(0, LOADED, n=1000)
    with pytest.raises(Exception):  # noqa: B017, PT011 - each engine raises its own error
        await db.write([BulkInsert("loads", LOAD_COLUMNS, rows, new_keys=True), position(9)])
    assert len(await loaded(db)) == 1
    assert await projection_position(db, "p") == 0
