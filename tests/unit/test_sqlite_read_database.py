"""The embedded read database's connections."""

from __future__ import annotations

from pathlib import Path

from almanac.adapters.sqlite import WRITER_CACHE_KIB, SqliteReadDatabase


async def test_the_writer_gets_a_large_page_cache_and_readers_keep_the_default(
    tmp_path: Path,
) -> None:
    db = SqliteReadDatabase(tmp_path / "read.sqlite3")
    await db.open()
    try:
        await db.write([("CREATE TABLE t (id INTEGER PRIMARY KEY)", [{}])])
        writer = await db._on(
            db._writer, lambda: db._connection().execute("PRAGMA cache_size").fetchone()[0]
        )
        reader = await db.fetch_one("PRAGMA cache_size", {})
    finally:
        await db.close()
    assert writer == -WRITER_CACHE_KIB
    assert reader is not None
    assert reader["cache_size"] != -WRITER_CACHE_KIB, "readers keep SQLite's default"
