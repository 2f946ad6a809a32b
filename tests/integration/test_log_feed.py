"""The log feed on Postgres: LISTEN only while something follows, woken across processes, and
LISTENing again after its connection is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

from almanac.eventstore import EventStore, RecordedEvent
from streams.logfeed import LISTENER_NAME, LogFeed, LogFollower
from tests.conftest import services_settings
from tests.integration.support_databases import end_sessions
from tests.integration.support_projection import request
from tests.integration.support_waiting import eventually


def listeners(url: str, since: object) -> int:
    """This database's LISTEN connections opened since ``since`` (the server's clock)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND backend_start >= %s",
            (LISTENER_NAME, since),
        ).fetchone()
        return 0 if row is None else int(row[0])


def listening_backends(url: str) -> set[int]:
    """The server pids of this database's feed connections that have run their LISTEN."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND state = 'idle' AND query LIKE 'LISTEN %%'",
            (LISTENER_NAME,),
        ).fetchall()
        return {int(row[0]) for row in rows}


def server_now(url: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]


async def appended_elsewhere(
    store: EventStore, elsewhere: EventStore, follower: LogFollower, label: str
) -> tuple[int, list[RecordedEvent]]:
    """A reading appended through ``elsewhere``, and the events the follower of ``store``'s
    feed is handed next, within 10 s: far less than the feed's polling takes."""
    after = await store.max_position()

    async def next_events() -> list[RecordedEvent]:
        # The listener wakes its followers once when it (re)connects: such a wake-up may
        # find nothing yet, and the follower simply waits again.
        while not (events := await follower.next_batch(after, 10, timeout=60)):
            pass
        return events

    waiting = asyncio.create_task(next_events())
    position = await elsewhere.append(request(label=label))
    return position, await asyncio.wait_for(waiting, timeout=10)


@asynccontextmanager
async def feed_and_another_writer(
    postgres_url: str, poll_interval: float
) -> AsyncIterator[tuple[str, EventStore, EventStore, LogFeed]]:
    """A started LISTENing feed of one store, and a second store: a writer of its own (its
    commit hooks are not the feed's), whose commits reach the feed only by NOTIFY, or by
    polling every ``poll_interval`` s."""
    settings = services_settings(postgres_url)
    url = settings.store.postgres_url
    assert url is not None
    store, elsewhere = EventStore(settings), EventStore(settings)
    feed = LogFeed(store, poll_interval=poll_interval, listen_dsn=url)
    try:
        await feed.start()
        yield url, store, elsewhere, feed
    finally:
        await feed.stop()
        store.close()
        elsewhere.close()


async def test_a_feed_listens_once_followed_and_is_woken_by_another_writer(
    postgres_url: str,
) -> None:
    since = server_now(postgres_url)
    # Polling alone would take 30 s: only the notification can wake the follower in time.
    async with feed_and_another_writer(postgres_url, 30) as (url, store, elsewhere, feed):
        unfollowed = feed.listening
        follower = feed.follow()
        followed = feed.listening

        async def listening() -> bool:
            return listeners(url, since) >= 1

        await eventually(listening, what="the feed LISTENs once followed")
        # Another process's writer: its commits reach this process only by NOTIFY.
        position, events = await appended_elsewhere(store, elsewhere, follower, "elsewhere")
        follower.close()
    assert not unfollowed, "nothing followed the feed yet"
    assert followed
    assert [e.position for e in events] == [position]


async def test_a_feed_listens_again_after_its_connection_is_dropped(postgres_url: str) -> None:
    """Once the LISTEN connection's backend is terminated (a database restart, an idle-session
    timeout, an administrator), another writer's commits still wake the follower at once."""
    # Polling would take 60 s.
    async with feed_and_another_writer(postgres_url, 60) as (url, store, elsewhere, feed):
        follower = feed.follow()

        async def first_listener() -> set[int]:
            return listening_backends(url)

        [dropped] = await eventually(first_listener, what="the feed LISTENs once followed")
        assert await end_sessions(url, [dropped]) == 1

        async def listening_again() -> set[int]:
            return listening_backends(url) - {dropped}

        await eventually(listening_again, what="the feed LISTENs again on a new connection")
        position, events = await appended_elsewhere(store, elsewhere, follower, "after the drop")
        follower.close()
    assert [e.position for e in events] == [position]
