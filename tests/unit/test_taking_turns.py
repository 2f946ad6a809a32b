"""``take_turns``: how a singleton role (projector, relay, batch manager) leads under its
lease, stands by, and outlives a lease it cannot ask for and a lead that fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import structlog

from almanac.adapters.leadership import take_turns
from tests.integration.support_waiting import eventually


class ScriptedLease:
    """Answers each ``acquire`` with the next of ``answers`` (an exception is raised)."""

    def __init__(self, answers: list[bool | Exception]) -> None:
        self.answers = answers
        self.releases = 0

    async def acquire(self) -> bool:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        self.releases += 1


async def test_a_standby_outlives_an_unreachable_lease_and_a_failed_lead() -> None:
    lease = ScriptedLease([OSError("no lock file"), OSError("no lock file"), False, True, True])
    stopping = asyncio.Event()
    leads: list[str] = []
    standbys: list[None] = []

    async def lead() -> None:
        leads.append("lead")
        if len(leads) == 1:
            raise RuntimeError("the log went away")
        stopping.set()  # the second lead runs until the role is stopped

    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(
            take_turns(
                lease,
                lead,
                role="relay",
                interval=0.01,
                stopping=stopping,
                standing_by=lambda: standbys.append(None),
                stream="S",
            ),
            timeout=10,
        )
    assert leads == ["lead", "lead"]
    assert len(standbys) == 3  # the two unreachable tries and the refused one
    said = [(e["event"], e.get("stream")) for e in logs]
    assert said == [
        ("relay.lease_unavailable", "S"),  # once for the run of failed tries
        ("relay.standby", "S"),  # once for the whole wait
        ("relay.lead_failed", "S"),
    ]
    # After each lead, and once more on the way out (a standby's connection).
    assert lease.releases == 3
    assert lease.answers == []


@pytest.mark.parametrize("cancel_in", ["standby", "lead"])
async def test_a_cancelled_role_gives_its_lease_up(cancel_in: str) -> None:
    lease = ScriptedLease([cancel_in == "lead"] * 1000)
    stopping = asyncio.Event()
    leading = asyncio.Event()

    async def lead() -> None:
        leading.set()
        await asyncio.Event().wait()

    standing: Callable[[], None] = leading.set
    task = asyncio.ensure_future(
        take_turns(
            lease, lead, role="batches", interval=0.01, stopping=stopping, standing_by=standing
        )
    )
    await asyncio.wait_for(leading.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lease.releases == (2 if cancel_in == "lead" else 1)


async def test_a_failed_lead_gives_the_lease_up_before_its_pause() -> None:
    """So that a standby may take over in the pause, rather than find it held throughout."""
    lease = ScriptedLease([True] * 10)
    stopping = asyncio.Event()

    async def lead() -> None:
        raise RuntimeError("the log went away")

    turns = asyncio.ensure_future(
        take_turns(lease, lead, role="projection", interval=60.0, stopping=stopping)
    )
    try:

        async def released() -> bool:
            return lease.releases >= 1

        await eventually(released, within=5, what="the lease given up in the pause")
    finally:
        stopping.set()
        await asyncio.wait_for(turns, timeout=5)
