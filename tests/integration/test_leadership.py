"""The Postgres lease against a real server: one holder at a time, a lost connection a lost
lease, and a standby that keeps trying on one connection rather than a new one a try."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from almanac.adapters.leadership import PostgresLease
from tests.integration.support_databases import end_sessions
from tests.integration.support_waiting import eventually


class Sessions:
    """What the server says of a lease's sessions (not what the lease says of itself)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.application = f"almanac-lease-{name}"[:63]

    def _pids(self, query: str) -> set[int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(query, (self.application,)).fetchall()
        return {int(row[0]) for row in rows}

    def all(self) -> set[int]:
        return self._pids("SELECT pid FROM pg_stat_activity WHERE application_name = %s")

    def holder(self) -> set[int]:
        return self._pids(
            "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l USING (pid)"
            " WHERE a.application_name = %s AND l.locktype = 'advisory' AND l.granted"
        )

    def standing_by(self) -> set[int]:
        return self.all() - self.holder()


@pytest.fixture
async def leases(postgres_url: str) -> AsyncIterator[tuple[PostgresLease, PostgresLease, Sessions]]:
    """Two processes' leases of one name, and the server's view of their sessions."""
    name = f"test:{uuid.uuid4().hex[:8]}"
    leader, standby = PostgresLease(postgres_url, name), PostgresLease(postgres_url, name)
    try:
        yield leader, standby, Sessions(postgres_url, name)
    finally:
        await leader.release()
        await standby.release()


async def test_a_standby_tries_again_and_again_on_one_connection(
    leases: tuple[PostgresLease, PostgresLease, Sessions],
) -> None:
    """Each try on a connection of its own was a new backend every standby interval, in
    every process, for as long as it stood by."""
    leader, standby, sessions = leases
    assert await leader.acquire()
    [held_by] = sessions.holder()
    standing: list[set[int]] = []
    for _ in range(5):
        assert not await standby.acquire()
        assert not await standby.held(), "a standby's open connection holds nothing"
        standing.append(sessions.standing_by())
    assert len(standing[0]) == 1, "the standby keeps its connection between tries"
    [first] = standing[0]
    assert standing == [{first}] * 5, "the same backend every try"
    assert sessions.holder() == {held_by}
    await leader.release()
    assert await standby.acquire()
    assert await standby.held()
    assert sessions.holder() == {first}, "won on the connection it had been trying on"
    await standby.release()

    async def closed() -> bool:
        return not sessions.all()

    await eventually(closed, what="the lease's sessions closed")


async def test_a_standby_whose_connection_was_cut_connects_again_on_its_next_try(
    leases: tuple[PostgresLease, PostgresLease, Sessions],
) -> None:
    leader, standby, sessions = leases
    assert await leader.acquire()
    assert not await standby.acquire()
    cut = sessions.standing_by()
    assert await end_sessions(sessions.url, list(cut)) == 1
    assert not await standby.acquire()

    async def on_a_new_connection() -> bool:
        standing = sessions.standing_by()
        return len(standing) == 1 and not standing & cut

    await eventually(on_a_new_connection, what="the standby on a new connection alone")
    await leader.release()
    assert await standby.acquire()


async def test_a_leader_whose_connection_is_lost_has_lost_the_lease(
    leases: tuple[PostgresLease, PostgresLease, Sessions],
) -> None:
    """Postgres lets the lock go with the session: another process may take it at once."""
    leader, standby, sessions = leases
    assert await leader.acquire()
    assert not await standby.acquire()
    assert await end_sessions(sessions.url, list(sessions.holder())) == 1
    assert not await leader.held()
    await eventually(standby.acquire, what="the standby winning the lock let go")
    assert await standby.held()
    assert not await leader.acquire(), "the old leader is now a standby"


async def test_the_server_probes_a_holder_s_session_so_a_vanished_host_frees_the_lock(
    leases: tuple[PostgresLease, PostgresLease, Sessions],
) -> None:
    """A holder whose host died sends no reset: only the server's own keepalives end its
    session, and with it the lock (by default after two hours)."""
    leader, _, _ = leases
    assert await leader.acquire()
    conn = leader._conn  # the setting is the session's own, seen only from it
    assert conn is not None
    shown = {}
    for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"):
        row = await (await conn.execute(f"SHOW {name}")).fetchone()
        assert row is not None
        shown[name] = int(row[0])
    # Gone within ~11 s of silence: 5 s idle, then 3 probes 2 s apart.
    assert shown == {
        "tcp_keepalives_idle": 5,
        "tcp_keepalives_interval": 2,
        "tcp_keepalives_count": 3,
    }
