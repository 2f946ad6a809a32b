"""The Postgres recorder of events: what it keeps of eventsourcing's own, on a real server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from almanac.eventstore import AlmanacApplication, application_env, open_application
from tests.conftest import services_settings
from tests.factories import new_reading


@pytest.fixture
def app(postgres_url: str) -> Iterator[AlmanacApplication]:
    # A lock timeout of one second, so that waiting it out is quick.
    env = {**application_env(services_settings(postgres_url)), "POSTGRES_LOCK_TIMEOUT": "1"}
    application = open_application(env)
    try:
        yield application
    finally:
        application.close()


def test_a_batch_that_waited_out_the_table_lock_is_tried_again_and_stored_once(
    app: AlmanacApplication, postgres_url: str
) -> None:
    readings = [new_reading(), new_reading()]
    events = [e for reading in readings for e in reading.collect_events()]
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        # Another writer holds the events table for longer than the lock timeout.
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE almanac_events IN EXCLUSIVE MODE")
        release = threading.Timer(1.5, lambda: holder.execute("COMMIT"))
        release.start()
        try:
            positions = app.record(events)
        finally:
            release.join()
        stored = holder.execute(
            "SELECT originator_id, notification_id FROM almanac_events"
            " WHERE originator_id = ANY(%s) ORDER BY notification_id",
            ([r.id for r in readings],),
        ).fetchall()
    assert [row[1] for row in stored] == positions
    assert [row[0] for row in stored] == [r.id for r in readings]


def test_a_version_already_stored_is_a_conflict_not_tried_again(
    app: AlmanacApplication,
) -> None:
    reading = new_reading()
    [event] = reading.collect_events()
    app.record([event])
    with pytest.raises(IntegrityError, match="duplicate key"):
        app.record([event])
