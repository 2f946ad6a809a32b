"""The Postgres pools check a connection they lend only after it rested, or when the server
has said something on it since (ended its session)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from almanac.adapters.postgres import BlockingIdleCheck, IdleCheck, PostgresReadDatabase
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
    ("returned", "after", "due"),
    [(True, 60, False), (True, 0, True), (False, 60, True)],
    ids=["back-a-moment-ago-lent-without-a-round-trip", "rested-checked", "never-returned"],
)
async def test_a_lent_connection_is_checked_only_after_a_rest(
    postgres_url: str, returned: bool, after: float, due: bool
) -> None:
    idle = IdleCheck(after=after)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("SELECT 1")
        if returned:
            await idle.returned(conn)
        assert idle.due(conn) is due
        await idle.check(conn)  # alive: passes either way


async def test_a_connection_the_server_ended_is_checked_even_straight_after_use(
    postgres_url: str,
) -> None:
    """A restart or a terminated session leaves its notice on the socket: the connection
    is checked (and the check fails) without waiting for it to rest."""
    idle = IdleCheck(after=60)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await idle.returned(conn)
        await _cut(conn, postgres_url)
        assert idle.due(conn)
        with pytest.raises(psycopg.OperationalError):
            await idle.check(conn)


def test_the_blocking_check_also_skips_the_round_trip_only_for_a_quiet_connection(
    postgres_url: str,
) -> None:
    idle = BlockingIdleCheck(after=60)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        idle.returned(conn)
        assert not idle.due(conn)
        idle.check(conn)
        asyncio.run(_end_session(conn.info.backend_pid, postgres_url))
        assert idle.due(conn)
        with pytest.raises(psycopg.OperationalError):
            idle.check(conn)


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
