"""Read models on SQLite (embedded profile): one writer thread, a few reader threads."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from almanac.errors import Unavailable
from almanac.readmodels import BulkInsert, Row, Write

T = TypeVar("T")

# The writer connection's page cache, in KiB (SQLite's default is 2 MB a connection). A
# projector's writes look rows up by id all over the primary-key index; with 2 MB, a
# rebuild of 1M events (333k readings) kept re-reading index pages from the file, at
# 40-45k events/s; with 32 MB or more, 48-51k. Only the writer has it: the cache fills
# only as pages are used, and the readers' point queries do well on the default.
WRITER_CACHE_KIB = 65_536
_UNAVAILABLE = re.compile(r"locked|busy|unable to open|disk|readonly|I/O", re.IGNORECASE)


class SqliteReadDatabase:
    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, path: Path, readers: int = 4) -> None:
        self.path = path
        # sqlite3 connections belong to the thread that made them; one thread writes.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="almanac-sqlite-w")
        self._readers = ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="almanac-sqlite-r"
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self, cache_kib: int | None = None) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Each connection is used only by the thread that made it; close() runs after
            # those threads have ended, from another thread, hence check_same_thread=False.
            conn = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            # Readings are a few kB each: on the default 4 kB pages nearly every row spills
            # into overflow pages, which made bulk inserts ~1.6x slower. Takes effect only
            # on a new database (before WAL mode is set); on others it changes nothing.
            conn.execute("PRAGMA page_size=16384")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            if cache_kib is not None:
                conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, fn, *args)
        except sqlite3.OperationalError as exc:
            # A locked or unreadable file is the engine's trouble; a bad statement is ours.
            if not _UNAVAILABLE.search(str(exc)):
                raise
            raise Unavailable(f"the read database is not answering: {exc}") from exc

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    async def migrate(self, statements: Sequence[str]) -> None:
        await self.write([(s, [{}]) for s in statements])

    async def write(self, writes: Sequence[Write]) -> None:
        await self._on(self._writer, self._write, writes)

    def _write(self, writes: Sequence[Write]) -> None:
        conn = self._connection(cache_kib=WRITER_CACHE_KIB)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                if isinstance(write, BulkInsert):
                    marks = ", ".join("?" * len(write.columns))
                    conn.executemany(
                        f"INSERT INTO {write.table} ({', '.join(write.columns)})"
                        f" VALUES ({marks}) {write.on_conflict}",
                        write.rows,
                    )
                    continue
                sql, params = write
                if len(params) == 1:
                    conn.execute(sql, params[0])
                else:
                    conn.executemany(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        return await self._on(self._readers, self._fetch_one, sql, params)

    def _fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        row = self._connection().execute(sql, params).fetchone()
        return None if row is None else dict(row)

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        return await self._on(self._readers, self._fetch_all, sql, params)

    def _fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        return [dict(r) for r in self._connection().execute(sql, params).fetchall()]

    async def ping(self) -> None:
        await self.fetch_one("SELECT 1 AS ok", {})

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
