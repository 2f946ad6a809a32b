"""``retried``: a first try outside stamina, the rest as stamina's retry context has them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import stamina
from stamina.instrumentation import RetryDetails, get_on_retry_hooks, set_on_retry_hooks

from almanac import retries
from almanac.retries import retried, retried_sync
from tests.factories import Clock


class Flaky:
    """Fails with ``error`` for its first ``failures`` calls, then answers its call count."""

    def __init__(self, failures: int, error: type[Exception] = OSError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return self.calls

    async def async_call(self) -> int:
        return self()


@pytest.fixture
def no_context(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(**_: Any) -> None:
        raise AssertionError("a retry context was built")

    monkeypatch.setattr(stamina, "retry_context", refused)


@pytest.fixture
def real_stamina() -> Iterator[None]:
    """Stamina as it runs in production: real pauses and timeouts, not the suite's testing
    mode (three attempts, no pauses)."""
    stamina.set_testing(False)
    try:
        yield
    finally:
        stamina.set_testing(True, attempts=3)


@pytest.fixture
def scheduled(real_stamina: None) -> Iterator[list[RetryDetails]]:
    """Every retry stamina schedules, with its real (tiny) pauses."""
    del real_stamina
    seen: list[RetryDetails] = []

    def hook(details: RetryDetails) -> None:
        seen.append(details)

    hooks = get_on_retry_hooks()
    set_on_retry_hooks([hook])
    try:
        yield seen
    finally:
        set_on_retry_hooks(hooks)


async def _in_stamina_context(flaky: Flaky, **policy: Any) -> int:
    """What ``retried`` stands for: the call inside stamina's own retry context."""
    async for attempt in stamina.retry_context(on=OSError, **policy):
        with attempt:
            return await flaky.async_call()
    raise AssertionError("unreachable")


POLICY: dict[str, Any] = {"attempts": 4, "wait_initial": 0.001, "wait_max": 0.002, "timeout": 5}


@pytest.mark.usefixtures("no_context")
async def test_a_first_try_that_succeeds_builds_no_retry_context() -> None:
    flaky = Flaky(0)
    assert await retried(flaky.async_call, on=OSError) == 1
    assert retried_sync(flaky, on=OSError) == 2


@pytest.mark.usefixtures("no_context")
@pytest.mark.parametrize("on", [ValueError, (ValueError, KeyError), lambda exc: False])
async def test_a_failure_the_policy_does_not_retry_is_raised_at_once(on: Any) -> None:
    flaky = Flaky(5)
    with pytest.raises(OSError, match="failure 1"):
        await retried(flaky.async_call, on=on)
    with pytest.raises(OSError, match="failure 2"):
        retried_sync(flaky, on=on)
    assert flaky.calls == 2


async def test_a_retried_failure_is_tried_again_and_its_answer_returned() -> None:
    flaky = Flaky(1)
    assert await retried(flaky.async_call, on=OSError) == 2
    flaky = Flaky(2)
    assert retried_sync(flaky, on=lambda exc: isinstance(exc, OSError)) == 3


@pytest.mark.parametrize("pause", [0.0, timedelta(0)])
async def test_a_hook_that_answers_with_a_pause_retries_even_a_pause_of_nothing(
    pause: float | timedelta,
) -> None:
    flaky = Flaky(1)
    assert await retried(flaky.async_call, on=lambda exc: pause) == 2


async def test_attempts_run_out_as_in_a_stamina_context() -> None:
    """Under the suite's testing mode (three attempts), as stamina itself counts them."""
    own = Flaky(10)
    with pytest.raises(OSError, match="failure 3"):
        await retried(own.async_call, on=OSError, attempts=10)
    theirs = Flaky(10)
    with pytest.raises(OSError, match="failure 3"):
        await _in_stamina_context(theirs, attempts=10)
    assert own.calls == theirs.calls == 3
    with pytest.raises(OSError, match="failure 3"):
        retried_sync(Flaky(10), on=OSError, attempts=10)


def _schedule(seen: list[RetryDetails]) -> list[tuple[int, str, bool]]:
    """Each scheduled retry: its number, its cause, and whether its pause is the policy's."""
    paused = [0 < one.wait_for <= POLICY["wait_max"] for one in seen]
    return [(one.retry_num, str(one.caused_by), ok) for one, ok in zip(seen, paused, strict=True)]


async def test_retries_are_scheduled_and_reported_as_stamina_schedules_them(
    scheduled: list[RetryDetails],
) -> None:
    with pytest.raises(OSError, match="failure 4"):
        await retried(Flaky(10).async_call, on=OSError, **POLICY)
    own = _schedule(scheduled)
    scheduled.clear()
    with pytest.raises(OSError, match="failure 4"):
        await _in_stamina_context(Flaky(10), **POLICY)
    assert own == _schedule(scheduled) == [(n, f"failure {n}", True) for n in (1, 2, 3)]


def test_the_blocking_form_is_scheduled_as_stamina_schedules_it(
    scheduled: list[RetryDetails],
) -> None:
    flaky: Callable[[], int] = Flaky(2)
    assert retried_sync(flaky, on=OSError, **POLICY) == 3
    assert _schedule(scheduled) == [(1, "failure 1", True), (2, "failure 2", True)]


@pytest.mark.usefixtures("real_stamina")
async def test_the_first_try_counts_against_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a plain context, whose clock starts before its first attempt: stamina is given
    what the first try left of the timeout, and none if it used it all."""
    clock = Clock()
    monkeypatch.setattr(retries, "time", clock)
    given: list[object] = []
    plain = stamina.retry_context

    def context(**policy: Any) -> Any:
        given.append(policy["timeout"])
        return plain(**policy)

    monkeypatch.setattr(stamina, "retry_context", context)

    def slow(seconds: float) -> Callable[[], int]:
        def call() -> int:
            clock.now += seconds
            return flaky()

        return call

    async def slow_async() -> int:
        return slow(0.25)()

    flaky = Flaky(1)
    assert await retried(slow_async, on=OSError, timeout=1.0, wait_max=0.001) == 2
    flaky = Flaky(1)
    assert retried_sync(slow(0.5), on=OSError, timeout=1.0, wait_max=0.001) == 2
    assert given == [0.75, 0.5], "the timeout less the first try"
    flaky = Flaky(5)
    with pytest.raises(OSError, match="failure 1"):
        await retried(slow_async, on=OSError, timeout=timedelta(seconds=0.25))
    with pytest.raises(OSError, match="failure 2"):
        retried_sync(slow(45), on=OSError)  # stamina's default timeout: 45 s
    assert given == [0.75, 0.5], "no retry context once the first try spent the timeout"
    assert flaky.calls == 2


async def test_with_stamina_switched_off_a_failure_is_not_tried_again() -> None:
    stamina.set_active(False)
    try:
        flaky = Flaky(5)
        with pytest.raises(OSError, match="failure 1"):
            await retried(flaky.async_call, on=OSError)
        with pytest.raises(OSError, match="failure 2"):
            retried_sync(flaky, on=OSError)
    finally:
        stamina.set_active(True)
    assert flaky.calls == 2
