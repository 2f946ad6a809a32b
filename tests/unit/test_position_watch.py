"""How far a projection has got, as queries asking for ``min_position`` see it."""

from __future__ import annotations

import asyncio

from almanac.readmodels import PositionWatch


class Tracking:
    """The tracking row (read by the watch) and a clock the test moves by hand."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.reads = 0
        self.now = 1000.0

    async def read(self, name: str) -> int:
        self.reads += 1
        return self.position

    def clock(self) -> float:
        return self.now


def watch_of(tracking: Tracking) -> PositionWatch:
    return PositionWatch(tracking.read, fresh=1.0, clock=tracking.clock)


async def test_what_was_read_is_trusted_for_a_moment_without_reading_again() -> None:
    tracking = Tracking(100)
    watch = watch_of(tracking)
    assert await watch.wait_for("readings", 100, timeout=0) == 100
    assert await watch.wait_for("readings", 90, timeout=0) == 100
    assert tracking.reads == 1


async def test_a_projection_rebuilt_elsewhere_is_waited_for_again() -> None:
    tracking = Tracking(100)
    watch = watch_of(tracking)
    assert await watch.wait_for("readings", 100, timeout=0) == 100
    tracking.position = 0  # another process rebuilds it from position 0
    tracking.now += 1.5
    assert await watch.wait_for("readings", 50, timeout=0) == 0  # not yet there again
    assert await watch.current("readings") == 0


async def test_a_commit_announced_here_is_not_undone_by_a_read_that_raced_it() -> None:
    tracking = Tracking(100)
    watch = watch_of(tracking)
    watch.announce("readings", 120)
    assert await watch.current("readings") == 120
    assert await watch.wait_for("readings", 120, timeout=0) == 120
    tracking.now += 1.5  # long after: the tracking row is believed again
    assert await watch.current("readings") == 100


async def test_a_projection_taken_over_here_is_where_its_projector_says() -> None:
    tracking = Tracking(100)
    watch = watch_of(tracking)
    watch.announce("readings", 100)
    tracking.position = 0
    watch.restart("readings", 0)  # rebuilt from 0 by this process's projector
    assert await watch.wait_for("readings", 50, timeout=0) == 0
    watch.announce("readings", 60)
    assert await watch.wait_for("readings", 50, timeout=0) == 60


async def test_a_read_under_way_when_the_projection_starts_again_is_not_believed() -> None:
    tracking = Tracking(100)
    gate = asyncio.Event()

    async def slow_read(name: str) -> int:
        position = tracking.position  # the old tables' row, read before the rebuild
        await gate.wait()
        return position

    watch = PositionWatch(slow_read, fresh=1.0, clock=tracking.clock)
    reading = asyncio.ensure_future(watch.current("readings"))
    await asyncio.sleep(0)
    watch.restart("readings", 0)  # this process's projector rebuilds it meanwhile
    gate.set()
    assert await reading == 0
    assert await watch.wait_for("readings", 100, timeout=0) == 0
