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


async def test_a_connection_back_a_moment_ago_is_lent_without_a_round_trip(
    postgres_url: str,
) -> None:
    idle = IdleCheck(after=60)
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        await idle.returned(conn)
        await _cut(conn, postgres_url)
        # Not checked, so the cut goes unnoticed here (the query that follows fails, and
        # is repeated on a fresh connection: see the last test).
        await idle.check(conn)


async def test_a_connection_that_rested_is_checked_and_a_dead_one_refused(
    postgres_url: str,
) -> None:
    idle = IdleCheck(after=0)
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        await idle.returned(conn)
        await idle.check(conn)  # alive: passes
        await _cut(conn, postgres_url)
        with pytest.raises(psycopg.OperationalError):
            await idle.check(conn)


async def test_a_connection_never_returned_is_checked(postgres_url: str) -> None:
    idle = IdleCheck(after=60)
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        await _cut(conn, postgres_url)
        with pytest.raises(psycopg.OperationalError):
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
