"""Where a query reads from (``queries.routing.Reads``), with a router handing out read
databases as it would between replicas: one source per answer, and the position that
source reflects."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, cast
from uuid import UUID, uuid4

import pytest

from almanac.adapters.replicas import ReadRouter
from almanac.auth import Principal
from almanac.errors import NotYetVisible, Unavailable, ValidationFailed
from almanac.readmodels import PositionWatch, ReadDatabase, Row
from queries import routing
from queries.batches import download_results, list_batches
from queries.jobs import JobKind, list_jobs
from queries.paging import decode_cursor, scope_of
from queries.routing import Reads

BATCH = uuid4()
ALICE = Principal(key_id=str(uuid4()), name="alice", role="client", owner="alice")


class OneBatch:
    """A read database holding one batch of ``items`` items (none: it has not got there)."""

    def __init__(self, items: int, position: int) -> None:
        self.items = items
        self.position = position

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> Row | None:
        if "FROM batches" not in sql or not self.items:
            return None
        at = "2026-11-29T06:00:00+00:00"
        return {
            "id": str(BATCH),
            "owner": "alice",
            "status": "running",
            "label": None,
            "total": self.items,
            "succeeded": 0,
            "failed": 0,
            "created_at": at,
            "updated_at": at,
            "finished_at": None,
            "started_position": 1,
            "position": 2,
        }

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        first = int(params["after"]) + 1  # items are numbered from 0
        last = min(self.items, first + int(params["limit"])) - 1
        return [
            {
                "idx": index,
                "status": "pending",
                "reading_id": None,
                "kind": "natal",
                "label": None,
                "attempt": 0,
                "reason": None,
                "updated_at": "2026-11-29T06:00:00+00:00",
            }
            for index in range(first, last + 1)
        ]


class InTurn:
    """A router that hands out its sources in turn, as round-robin does among replicas."""

    def __init__(self, *sources: OneBatch) -> None:
        self.sources = sources
        self.turn = 0

    async def source(
        self, min_position: int | None = None, projections: Sequence[str] = ("readings",)
    ) -> OneBatch:
        chosen = self.sources[self.turn % len(self.sources)]
        self.turn += 1
        return chosen

    def applied_position(self, source: object) -> int | None:
        return cast("OneBatch", source).position


class Positions:
    """A position watch that counts how often it is asked where a projection is."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reads = 0

    async def current(self, name: str) -> int:
        self.reads += 1
        return self.at

    async def wait_for(self, name: str, position: int, timeout: float) -> int:
        self.reads += 1
        return self.at


def as_router(router: InTurn) -> ReadRouter:
    return cast("ReadRouter", router)


def as_watch(watch: Positions) -> PositionWatch:
    return cast("PositionWatch", watch)


async def test_a_batch_download_streams_the_items_of_the_source_that_found_the_batch() -> None:
    """The second of two replicas has not got the batch yet: the download, found on the
    first, must not stream its items from the second (an empty file with a 200)."""
    ahead, behind = OneBatch(items=3, position=10), OneBatch(items=0, position=5)
    reads = Reads(
        cast("ReadDatabase", behind), as_watch(Positions(10)), 1.0, as_router(InTurn(ahead, behind))
    )
    view, chunks = await download_results(BATCH, reads=reads, principal=ALICE, min_position=None)
    assert view.id == BATCH
    assert [item.index for chunk in [c async for c in chunks] for item in chunk] == [0, 1, 2]


async def test_a_page_from_a_replica_reports_the_replicas_position() -> None:
    replica = OneBatch(items=1, position=7)
    watch = Positions(9)
    primary = cast("ReadDatabase", OneBatch(items=1, position=9))
    reads = Reads(primary, as_watch(watch), 1.0, as_router(InTurn(replica)))
    source, position = await reads.read(("batches",), None)
    assert (source, position, watch.reads) == (replica, 7, 0)


async def test_a_page_from_the_primary_reads_its_position_once() -> None:
    primary = cast("ReadDatabase", OneBatch(items=1, position=9))
    for min_position, reads in ((None, 1), (4, 1)):  # with a wait, the wait's answer
        watch = Positions(9)
        source, position = await Reads(primary, as_watch(watch), 1.0).read(
            ("batches",), min_position
        )
        assert (source, position, watch.reads) == (primary, 9, reads)


class BatchLog:
    """A read database holding one batch started at each position up to its own, as the
    primary or a standby that has replayed that far would."""

    dialect = "postgres"

    def __init__(self, name: str, position: int) -> None:
        self.url = f"postgresql://{name}/read"
        self.position = position

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        if "projection_positions" in sql:
            return [{"name": "batches", "position": self.position}]
        started = range(min(self.position, int(params.get("before", 2**62)) - 1), 0, -1)
        at = "2026-11-29T06:00:00+00:00"
        return [
            {
                "id": str(UUID(int=start)),
                "owner": "alice",
                "status": "running",
                "label": None,
                "total": 1,
                "succeeded": 0,
                "failed": 0,
                "created_at": at,
                "updated_at": at,
                "finished_at": None,
                "started_position": start,
                "position": start,
            }
            for start in started[: int(params["limit"])]
        ]


async def test_paging_on_never_reads_from_a_standby_behind_the_page_before() -> None:
    """Page one read from the primary at 20; the standby, at 12, is within ``max_lag`` and
    may serve reads that name no position. Had it served page two, the batches started at
    13 to 17, below the cursor but past the standby, would have been skipped."""
    primary, standby = BatchLog("primary", 20), BatchLog("standby", 12)
    router = ReadRouter(
        cast("ReadDatabase", primary),
        [cast("ReadDatabase", standby)],
        max_lag=100,
        clock=lambda: 1000.0,
    )
    reads = Reads(cast("ReadDatabase", primary), as_watch(Positions(20)), 1.0, router)
    assert router.applied_position(await router.source(None, ("batches",))) == 12
    started: list[int] = []
    positions: list[int] = []
    cursor, min_position = None, 20
    while True:
        page = await list_batches(
            reads=reads,
            principal=ALICE,
            status=None,
            limit=3,
            cursor=cursor,
            min_position=min_position,
        )
        started += [view.position for view in page.data]
        positions.append(page.position)
        if page.next_cursor is None:
            break
        cursor, min_position = page.next_cursor, None
    assert started == list(range(20, 0, -1))
    assert positions == sorted(positions), "no page reads from further back than the one before"


class ReadingsOnly:
    """A read database holding readings requested at positions 1 to ``count``, each last
    updated at ``updated``, and no batches."""

    def __init__(self, count: int, updated: int) -> None:
        self.count = count
        self.updated = updated

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list[Row]:
        if "FROM readings" not in sql:
            return []
        at = "2026-11-29T06:00:00+00:00"
        return [
            {
                "id": str(UUID(int=requested)),
                "owner": "alice",
                "status": "generated",
                "created_at": at,
                "updated_at": at,
                "pos": requested,
                "position": self.updated,
            }
            for requested in range(self.count, 0, -1)[: int(params["limit"])]
        ]


@pytest.mark.parametrize("kind", ["reading", None])
async def test_the_next_jobs_page_is_held_to_the_readings_shown_when_no_batch_is(
    kind: JobKind | None,
) -> None:
    """The read reported 5, its rows show the readings at 30: the next page is read from
    a source at 30 at least, whether batches were filtered out or had no rows to show."""
    source = cast("ReadDatabase", ReadingsOnly(count=3, updated=30))
    reads = Reads(source, as_watch(Positions(5)), 1.0)
    page = await list_jobs(
        reads=reads,
        principal=ALICE,
        kind=kind,
        state=None,
        limit=2,
        cursor=None,
        min_position=None,
    )
    assert page.position == 5 and page.next_cursor is not None
    cursor = decode_cursor(page.next_cursor, scope_of("jobs", kind, None, "alice"))
    assert cursor.at == 30


@pytest.mark.parametrize(
    ("head", "raised"),
    [
        (20, NotYetVisible),
        (19, ValidationFailed),
        (Unavailable("the event store is not answering"), NotYetVisible),
        (RuntimeError("the pool is closed"), NotYetVisible),
        (None, NotYetVisible),
    ],
    ids=["stored, not yet read", "never given out", "store away", "store failing", "stalled"],
)
async def test_a_position_not_reached_in_time_is_told_apart_from_one_never_given_out(
    head: int | Exception | None, raised: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read models are at 5 and the wait runs out: a 503 for a position the store has
    (or when the store cannot say, soon), a 422 naming ``min_position`` for one past its
    last."""
    monkeypatch.setattr(routing, "HEAD_TIMEOUT", 0.05)

    async def last_stored() -> int:
        if isinstance(head, Exception):
            raise head
        if head is None:
            await asyncio.Event().wait()  # a store that does not answer
        assert head is not None
        return head

    source = cast("ReadDatabase", ReadingsOnly(count=1, updated=5))
    reads = Reads(source, as_watch(Positions(5)), 0.01, head=last_stored)
    with pytest.raises(raised) as caught:
        await reads.route(("readings",), 20)
    if isinstance(caught.value, ValidationFailed):
        assert [e.field for e in caught.value.errors] == ["min_position"]
    else:
        assert (caught.value.wanted, caught.value.current) == (20, 5)  # type: ignore[attr-defined]
