"""Postgres loads large inserts of new keys with binary COPY: what it writes must be what
the INSERT it replaces would have written, or fail as that INSERT would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from almanac.adapters.postgres import COPY_MIN_ROWS, PostgresReadDatabase
from almanac.readmodels import BulkInsert

COLUMNS = ("id", "small", "n")


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[PostgresReadDatabase]:
    database = PostgresReadDatabase(f"{postgres_url}_read", max_size=2)
    await database.open()
    await database.migrate(
        ["CREATE TABLE loads (id UUID PRIMARY KEY, small SMALLINT, n INTEGER NOT NULL)"]
    )
    try:
        yield database
    finally:
        await database.close()


def rows(*, small: int = 1, n: int = 1) -> list[list[object]]:
    """Enough rows for COPY; the last one carries the given values."""
    ordinary = [[str(uuid.uuid4()), 1, 1] for _ in range(COPY_MIN_ROWS)]
    return [*ordinary, [str(uuid.uuid4()), small, n]]


async def count(db: PostgresReadDatabase) -> int:
    row = await db.fetch_one("SELECT COUNT(*) AS c FROM loads", {})
    assert row is not None
    return int(row["c"])


@pytest.mark.parametrize(
    ("small", "n"), [(2**15, 1), (-(2**15) - 1, 1), (1, 2**31), (1, -(2**31) - 1)]
)
async def test_an_integer_too_wide_for_its_column_fails_the_load_instead_of_wrapping(
    db: PostgresReadDatabase, small: int, n: int
) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        await db.write([BulkInsert("loads", COLUMNS, rows(small=small, n=n), new_keys=True)])
    assert await count(db) == 0


async def test_the_widest_integers_a_column_holds_are_loaded_as_they_are(
    db: PostgresReadDatabase,
) -> None:
    loaded = rows(small=-(2**15), n=2**31 - 1)
    await db.write([BulkInsert("loads", COLUMNS, loaded, new_keys=True)])
    row = await db.fetch_one("SELECT small, n FROM loads WHERE id = :id", {"id": loaded[-1][0]})
    assert row == {"small": -(2**15), "n": 2**31 - 1}
    assert await count(db) == len(loaded)
