"""Fresh, empty read databases of the active profile, removed after use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.readmodels import ReadDatabase
from almanac.settings import Settings
from tests.integration.support_waiting import eventually


@asynccontextmanager
async def fresh_read_database(settings: Settings, workdir: Path) -> AsyncIterator[ReadDatabase]:
    """An open read database with no tables, beside (never in) the settings' own."""
    if settings.store.postgres_url is None:
        sqlite = SqliteReadDatabase(workdir / f"rebuild-{uuid.uuid4().hex[:8]}.sqlite3")
        await sqlite.open()
        try:
            yield sqlite
        finally:
            await sqlite.close()
        return
    parts = urlsplit(settings.store.postgres_url)
    name = f"almanac_rebuild_{uuid.uuid4().hex[:12]}"
    postgres = PostgresReadDatabase(urlunsplit(parts._replace(path=f"/{name}")), max_size=2)
    try:
        await postgres.open()  # creates the database
        yield postgres
    finally:
        await postgres.close()
        await _drop(urlunsplit(parts._replace(path="/postgres")), name)


async def _drop(admin_url: str, name: str) -> None:
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        await conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


async def end_sessions(url: str, pids: Sequence[int] | None = None) -> int:
    """End the sessions ``pids`` (by default every other one) on ``url``'s database, as a
    server restart would, and wait until they are gone; how many were ended."""
    others = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND (%(pids)s::int[] IS NULL OR pid = ANY(%(pids)s::int[]))"
    )
    params = {"pids": None if pids is None else list(pids)}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        cur = await admin.execute(
            f"SELECT count(pg_terminate_backend(pid)) FROM ({others}) AS o", params
        )
        row = await cur.fetchone()

        async def gone() -> bool:
            cur = await admin.execute(others, params)
            return not await cur.fetchall()

        await eventually(gone, within=10, what="the sessions to end")
    return 0 if row is None else int(row[0])
