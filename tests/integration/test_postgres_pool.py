"""The read database's pool checks a connection it lends only after the connection rested."""

from __future__ import annotations

import psycopg
import pytest

from almanac.adapters.postgres import IdleCheck, PostgresReadDatabase
from tests.integration.support_waiting import eventually


async def _cut(conn: psycopg.AsyncConnection[object], url: str) -> None:
    """End ``conn``'s server session from another connection, as a server restart would."""
    await _end_session(conn.info.backend_pid, url)


async def _end_session(pid: int, url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        async def gone() -> bool:
            cur = await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
            return await cur.fetchone() is None

        await eventually(gone, within=10, what="the server session to end")


@pytest.mark.parametrize(
    ("returned", "after", "checked"),
    [(True, 60, False), (True, 0, True), (False, 60, True)],
    ids=["back-a-moment-ago-lent-without-a-round-trip", "rested-checked", "never-returned"],
)
async def test_a_lent_connection_is_checked_only_after_a_rest(
    postgres_url: str, returned: bool, after: float, checked: bool
) -> None:
    idle = IdleCheck(after=after)
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        if returned:
            await idle.returned(conn)
        await idle.check(conn)  # alive: passes either way
        await _cut(conn, postgres_url)
        if checked:
            with pytest.raises(psycopg.OperationalError):
                await idle.check(conn)
        else:
            # Not checked, so the cut goes unnoticed here (the query that follows fails, and
            # is repeated on a fresh connection: see the next test).
            await idle.check(conn)


async def test_a_read_on_a_connection_cut_since_its_last_use_is_repeated_on_a_fresh_one(
    postgres_url: str,
) -> None:
    """A server restart within the rest that goes unchecked costs the reader nothing."""
    db = PostgresReadDatabase(postgres_url, max_size=1)
    await db.open()
    try:
        first = await db.fetch_one("SELECT pg_backend_pid() AS pid", {})
        assert first is not None
        await _end_session(first["pid"], postgres_url)
        again = await db.fetch_one("SELECT pg_backend_pid() AS pid", {})
        assert again is not None and again["pid"] != first["pid"]
    finally:
        await db.close()
