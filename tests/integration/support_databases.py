"""Fresh, empty read databases of the active profile, removed after use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.readmodels import ReadDatabase
from almanac.settings import Settings


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
