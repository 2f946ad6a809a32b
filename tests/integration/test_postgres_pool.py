"""The Postgres pools check a connection they lend only after it rested, or when the server
has said something on it since (ended its session)."""

from __future__ import annotations

import asyncio
import os
import resource

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from almanac.adapters.postgres import BlockingIdleCheck, IdleCheck, PostgresReadDatabase
from tests.integration.support_databases import end_sessions


async def _cut(conn: psycopg.AsyncConnection[object], url: str) -> None:
    """End ``conn``'s server session from another connection, as a server restart would."""
    await end_sessions(url, [conn.info.backend_pid])


@pytest.mark.parametrize(
    ("lent", "after", "due"),
    [(True, 60, False), (True, 0, True), (False, 60, True)],
    ids=["lent-a-moment-ago-lent-without-a-round-trip", "rested-checked", "never-lent"],
)
async def test_a_lent_connection_is_checked_only_after_a_rest(
    postgres_url: str, lent: bool, after: float, due: bool
) -> None:
    idle = IdleCheck(after=after)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        if lent:
            await idle.check(conn)  # alive: passes
        assert idle.due(conn) is due


async def test_a_connection_the_server_ended_is_checked_even_straight_after_use(
    postgres_url: str,
) -> None:
    """A restart or a terminated session leaves its notice on the socket: the connection
    is checked (and the check fails) without waiting for it to rest."""
    idle = IdleCheck(after=60)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await idle.check(conn)
        await _cut(conn, postgres_url)
        with pytest.raises(psycopg.OperationalError):
            await idle.check(conn)


def test_the_blocking_check_also_skips_the_round_trip_only_for_a_quiet_connection(
    postgres_url: str,
) -> None:
    idle = BlockingIdleCheck(after=60)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        idle.check(conn)
        assert not idle.due(conn)
        asyncio.run(end_sessions(postgres_url, [conn.info.backend_pid]))
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
        await end_sessions(postgres_url, [first["pid"]])
        again = await db.fetch_one("SELECT pg_backend_pid() AS pid", {})
        assert again is not None and again["pid"] != first["pid"]
    finally:
        await db.close()


async def test_a_connection_on_a_descriptor_above_1023_is_lent_without_a_round_trip(
    postgres_url: str,
) -> None:
    """As in an API process holding thousands of WebSockets (``select`` refuses such
    descriptors, and every lend would have paid the round trip again)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        idle = IdleCheck(after=60)
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            assert conn.fileno() > 1023
            await idle.check(conn)
            assert not idle.due(conn)
            await _cut(conn, postgres_url)
            assert idle.due(conn)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failed_check_lets_every_dead_idle_connection_go_at_once(postgres_url: str) -> None:
    """After a restart every session is gone: the first lend that meets a dead connection
    has the pool check the rest too, instead of meeting them one lend (and one backoff)
    at a time."""
    idle = _CountingCheck(after=60)
    pool = ConnectionPool(
        postgres_url, min_size=4, max_size=4, kwargs={"autocommit": True}, check=idle.check
    )
    idle.sweeps(pool)
    with pool:
        pool.wait(timeout=10)
        assert asyncio.run(end_sessions(postgres_url)) == 4
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert idle.failed == 1, "only the first dead connection was met lending it"
        assert pool.get_stats().get("connections_lost", 0) == 4


class _CountingCheck(BlockingIdleCheck):
    """Counts the lends whose check failed."""

    def __init__(self, after: float) -> None:
        super().__init__(after)
        self.failed = 0

    def check(self, conn: psycopg.Connection[object]) -> None:
        try:
            super().check(conn)
        except psycopg.Error:
            self.failed += 1
            raise
