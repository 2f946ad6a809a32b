"""The reading worker on both profiles: in-process, and as a real process killed mid-run."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog

from almanac.container import Container
from almanac.domain.chart import BirthData, Chart, ChartOptions, calculate_chart
from almanac.domain.interpretation import BuiltinGenerator, GenerationFailed, ReadingText
from almanac.domain.kinds import ReadingKind
from almanac.domain.reading import DeadLetter, Reading
from almanac.errors import AlmanacError, Unavailable
from almanac.eventstore import EventStore, RecordedEvent
from almanac.feed import Delivery, FeedNotReady
from almanac.settings import Settings
from commands.worker import UNANSWERED, ReadingWorker
from tests.conftest import embedded_settings
from tests.factories import birth, new_reading
from tests.integration.support_containers import running, settled
from tests.integration.support_eventlog import (
    CHART_CALCULATED,
    FAILED,
    GENERATED,
    REQUESTED,
    LogTally,
    by_reading,
    whole_log,
)
from tests.integration.support_nats import consumer_backlog
from tests.integration.support_processes import RoleProcesses
from tests.integration.support_projection import giving_up_after
from tests.integration.support_waiting import eventually, wait_until


def worker_of(container: Container) -> ReadingWorker:
    [worker] = [w for w in container.background["worker"] if isinstance(w, ReadingWorker)]
    return worker


class CountingGenerator:
    """The built-in generator, failing the first ``failures`` calls as told."""

    name = "counting"
    version = "1"

    def __init__(self, failures: int = 0, *, retryable: bool = True) -> None:
        self.failures = failures
        self.retryable = retryable
        self.calls = 0
        self._builtin = BuiltinGenerator()

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        self.calls += 1
        if self.calls <= self.failures:
            raise GenerationFailed(f"the oracle is busy (call {self.calls})", self.retryable)
        return await self._builtin.generate(chart, kind, label)


class LoadRecordingStore(EventStore):
    """The event store, noting which aggregates are loaded."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.loaded: list[UUID] = []

    def load_sync(self, cls: type[Any], aggregate_id: UUID) -> Any:
        self.loaded.append(aggregate_id)
        return super().load_sync(cls, aggregate_id)


async def test_every_requested_reading_is_generated_once_with_causal_meta(
    settings: Settings,
) -> None:
    async with running(settings) as container:
        readings = [new_reading(owner=f"owner-{i % 3}") for i in range(12)]
        for reading in readings:
            await container.store.append(reading)
        done = await settled(container, [r.id for r in readings])
        assert {r.status for r in done} == {"generated"}
        log = by_reading(await whole_log(container.store))

    for reading in readings:
        events = log[reading.id]
        assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, GENERATED]
        requested = events[0]
        for follow_on in events[1:]:
            assert follow_on.meta.causation_id == f"position:{requested.position}"
            assert follow_on.meta.correlation_id == requested.meta.correlation_id
            assert follow_on.meta.owner == requested.meta.owner
        assert events[1].event.chart == calculate_chart(birth())
        assert events[2].event.text.generator == "builtin"


async def test_retryable_generation_failures_are_retried_until_success(
    settings: Settings,
) -> None:
    generator = CountingGenerator(failures=2, retryable=True)
    async with running(settings, generator=generator) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert done.status == "generated"
    assert generator.calls == 3
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, GENERATED]


async def test_retryable_failures_fail_the_reading_once_attempts_run_out(
    settings: Settings,
) -> None:
    generator = CountingGenerator(failures=100, retryable=True)
    async with running(settings, generator=generator) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
    assert done.status == "failed"
    assert generator.calls == 3, "stamina's testing mode allows three attempts"
    assert done.failure == "the text could not be generated: the oracle is busy (call 3)"


async def test_a_permanent_generation_failure_fails_the_reading_with_the_reason(
    settings: Settings,
) -> None:
    generator = CountingGenerator(failures=100, retryable=False)
    async with running(settings, generator=generator) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert done.status == "failed"
    assert done.failure == "the text could not be generated: the oracle is busy (call 1)"
    assert generator.calls == 1, "a failure that is not retryable is not retried"
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, FAILED]
    assert events[2].event.stage == "text"
    assert events[2].meta.causation_id == f"position:{events[0].position}"


class CrashingGenerator:
    """The built-in generator, except that it crashes on readings labelled "boom"."""

    name = "crashing"
    version = "1"

    def __init__(self) -> None:
        self.crashes = 0
        self._builtin = BuiltinGenerator()

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        if label == "boom":
            self.crashes += 1
            raise RuntimeError("generator bug")
        return await self._builtin.generate(chart, kind, label)


async def test_an_unexpected_generator_crash_fails_that_reading_and_the_rest_carry_on(
    settings: Settings,
) -> None:
    generator = CrashingGenerator()
    async with running(settings, generator=generator) as container:
        boom = new_reading(label="boom")
        others = [new_reading() for _ in range(3)]
        for reading in [boom, *others]:
            await container.store.append(reading)
        done = await settled(container, [r.id for r in [boom, *others]])
    assert done[0].status == "failed"
    assert done[0].failure == "the text could not be generated (RuntimeError)"
    assert generator.crashes == 3, "an unexpected error is retried like a transient one"
    assert {r.status for r in done[1:]} == {"generated"}


async def test_a_chart_that_cannot_be_calculated_fails_the_reading_at_the_chart_stage(
    settings: Settings,
) -> None:
    def refuse(_birth: BirthData, _options: ChartOptions) -> Chart:
        raise AlmanacError("the ephemeris has no data for that date")

    generator = CountingGenerator()
    async with running(settings, generator=generator, calculate=refuse) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert done.status == "failed"
    assert (
        done.failure == "the chart could not be calculated: the ephemeris has no data for that date"
    )
    assert [e.type for e in events] == [REQUESTED, FAILED]
    assert events[1].event.stage == "chart"
    assert generator.calls == 0


async def test_a_reading_left_with_only_its_chart_is_finished_from_that_chart(
    settings: Settings,
) -> None:
    """As after a crash between the chart and the text: the chart is not calculated again."""
    calculations: list[BirthData] = []

    def counting(b: BirthData, options: ChartOptions) -> Chart:
        calculations.append(b)
        return calculate_chart(b, options)

    reading = new_reading()
    reading.record_chart(calculate_chart(birth()), reading.pending_events[0].meta.caused_by(1))
    store = EventStore(settings)
    try:
        await store.append(reading)
    finally:
        store.close()
    async with running(settings, calculate=counting) as container:
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert done.status == "generated"
    assert calculations == []
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, GENERATED]


async def test_a_settled_reading_is_skipped_when_its_request_is_seen_again(
    settings: Settings,
) -> None:
    generator = CountingGenerator()
    async with running(settings, generator=generator) as container:
        reading = new_reading()
        await container.store.append(reading)
        await settled(container, [reading.id])
        before = await container.store.max_position()
        requested: RecordedEvent = (by_reading(await whole_log(container.store)))[reading.id][0]
        await worker_of(container).process(requested)
        assert await container.store.max_position() == before
    assert generator.calls == 1


async def test_a_restarted_worker_resumes_after_its_saved_position(settings: Settings) -> None:
    """Its tracked position in the log (embedded), its durable consumer (services)."""
    first_batch = [new_reading() for _ in range(8)]
    async with running(settings) as container:
        for reading in first_batch:
            await container.store.append(reading)
        await settled(container, [r.id for r in first_batch])
        store = container.store

        async def caught_up() -> bool:
            if settings.feed.nats_url is not None:
                backlog = await consumer_backlog(
                    settings.feed.nats_url, settings.relay.stream, settings.worker.consumer
                )
                return backlog == 0
            saved = await store.consumer_position(settings.worker.consumer)
            return saved == await store.max_position()

        await eventually(caught_up, what="the worker has acknowledged everything it was fed")

    generator = CountingGenerator()
    store = LoadRecordingStore(settings)
    async with running(settings, generator=generator, store=store) as container:
        late = new_reading()
        await container.store.append(late)
        [done] = await settled(container, [late.id])
        assert done.status == "generated"
        log = by_reading(await whole_log(container.store))
    assert generator.calls == 1
    worker_loads = [i for i in store.loaded if i != late.id]
    assert worker_loads == [], "the readings before the saved position are not fed again"
    assert len(log) == len(first_batch) + 1
    for events in log.values():
        assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, GENERATED]


class UnavailableOnceStore(EventStore):
    """The event store, unavailable for the worker's first append (a reading with a chart)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.refused = 0

    async def append(self, *aggregates: Any) -> int:
        if not self.refused and any(getattr(a, "chart", None) is not None for a in aggregates):
            self.refused += 1
            raise Unavailable("the event store is restarting")
        return await super().append(*aggregates)


async def test_a_reading_the_store_refuses_for_a_moment_is_handed_back_and_completed(
    settings: Settings,
) -> None:
    store = UnavailableOnceStore(settings)
    generator = CountingGenerator()
    async with running(settings, generator=generator, store=store) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert store.refused == 1
    assert done.status == "generated"
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, GENERATED]


READINGS_TO_KILL = 300


def test_a_worker_killed_mid_run_completes_every_reading_exactly_once_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    store = EventStore(settings)
    try:
        readings = [new_reading() for _ in range(READINGS_TO_KILL)]
        store.append_sync(*readings)
        tally = LogTally(store)
        with RoleProcesses(
            settings,
            tmp_path,
            # Small batches and little concurrency: the run lasts long enough to be cut short,
            # and the saved position moves during it.
            ALMANAC_WORKER_CONCURRENCY="2",
            ALMANAC_FEED_BATCH_SIZE="40",
            # What the killed worker had taken goes to the next one this soon (services).
            ALMANAC_WORKER_ACK_WAIT="2",
        ) as processes:
            # On services the worker's feed is the relay's stream: a relay runs beside it.
            first = processes.start("worker,relay")

            def some_generated() -> bool:
                first.ensure_running()
                return tally.count(GENERATED) >= 60

            wait_until(some_generated, within=30, what="the first worker generates 60 readings")
            first.kill()
            at_kill = tally.count(GENERATED)
            assert at_kill < READINGS_TO_KILL, "the worker was not killed mid-run"

            second = processes.start("worker,relay")

            def all_generated() -> bool:
                second.ensure_running()
                return tally.count(GENERATED) >= READINGS_TO_KILL

            wait_until(all_generated, within=60, what=f"all {READINGS_TO_KILL} readings generated")
            tally.refresh()
            for reading in readings:
                assert tally.per_reading[reading.id] == [REQUESTED, CHART_CALCULATED, GENERATED]
            assert tally.types[FAILED] == 0
            assert len(tally.per_reading) == READINGS_TO_KILL

            code = second.terminate(timeout=20)
            events = second.log_events()
            assert "worker.stopped" in events
            assert "almanac.stopped" in events
            assert code == 0, second.output()[-4000:]
            assert sum(tally.refresh().types.values()) == 3 * READINGS_TO_KILL
    finally:
        store.close()


def test_a_worker_process_exits_zero_after_sigterm(settings: Settings, tmp_path: Path) -> None:
    with RoleProcesses(settings, tmp_path) as processes:
        worker = processes.start("worker,relay")

        def started() -> bool:
            worker.ensure_running()
            return "worker.started" in worker.log_events()

        wait_until(started, within=30, what="the worker process starts")
        assert worker.terminate(timeout=20) == 0


async def test_identical_birth_data_reuses_the_calculated_chart(settings: Settings) -> None:
    calculations: list[BirthData] = []

    def counting(b: BirthData, options: ChartOptions) -> Chart:
        calculations.append(b)
        return calculate_chart(b, options)

    async with running(settings, calculate=counting) as container:
        first = new_reading()
        await container.store.append(first)
        await settled(container, [first.id])
        again = [new_reading() for _ in range(3)]
        await container.store.append(*again)
        done = await settled(container, [r.id for r in again])
    assert {r.status for r in done} == {"generated"}
    assert len(calculations) == 1
    assert len({r.chart.chart_hash for r in done if r.chart is not None}) == 1


class UnreachableGenerator:
    """A generator whose service is down: every call is a transient failure."""

    name = "unreachable"
    version = "1"

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        self.calls += 1
        raise Unavailable("the oracle is unreachable")


async def test_a_reading_whose_every_delivery_fails_is_failed_as_exhausted_with_a_dead_letter(
    settings: Settings,
) -> None:
    generator = UnreachableGenerator()
    async with running(giving_up_after(settings, 3), generator=generator) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert done.status == "failed"
    assert done.failure == "exhausted 3 deliveries: the oracle is unreachable"
    assert generator.calls == 3, "one try per delivery, the last one included"
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, FAILED]
    requested, failed = events[0], events[2]
    assert failed.event.dead_letter == DeadLetter(
        consumer=settings.worker.consumer,
        position=requested.position,
        deliveries=3,
        last_error="the oracle is unreachable",
    )
    assert failed.meta.causation_id == f"position:{requested.position}"


class RefusingFirstDeadLetterStore(EventStore):
    """The event store, unavailable for the first dead letter the worker records."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.refused = 0

    async def append(self, *aggregates: Any) -> int:
        dead_letters = [
            e
            for a in aggregates
            for e in a.pending_events
            if isinstance(e, Reading.Failed) and e.dead_letter is not None
        ]
        if dead_letters and not self.refused:
            self.refused += 1
            raise Unavailable("the event store is restarting")
        return await super().append(*aggregates)


async def test_a_dead_letter_the_store_refuses_is_recorded_on_the_exhausted_delivery(
    settings: Settings,
) -> None:
    """The last try's error is kept for the extra delivery the feed makes after it."""
    generator = UnreachableGenerator()
    tight = giving_up_after(settings, 2)
    store = RefusingFirstDeadLetterStore(tight)
    async with running(tight, generator=generator, store=store) as container:
        reading = new_reading()
        await container.store.append(reading)
        [done] = await settled(container, [reading.id])
        events = (by_reading(await whole_log(container.store)))[reading.id]
    assert store.refused == 1
    assert generator.calls == 2, "the exhausted delivery records the failure, it does not retry"
    assert done.failure == "exhausted 2 deliveries: the oracle is unreachable"
    assert [e.type for e in events] == [REQUESTED, CHART_CALCULATED, FAILED]
    assert events[2].event.dead_letter.deliveries == 2


class ScriptedDelivery:
    """One delivery as a feed would make it, noting how it was answered."""

    def __init__(self, event: RecordedEvent, attempt: int, *, exhausted: bool) -> None:
        self.event = event
        self.attempt = attempt
        self.exhausted = exhausted
        self.answers: list[str] = []

    async def ack(self) -> None:
        self.answers.append("ack")

    async def nak(self, delay: float = 0.0) -> None:
        self.answers.append("nak")

    async def in_progress(self) -> None:
        return None


class ScriptedFeed:
    """A work feed that hands out the deliveries it is given, then nothing more."""

    def __init__(self, deliveries: list[Delivery]) -> None:
        self.waiting = deliveries
        self._never = asyncio.Event()

    async def open(self) -> None:
        return None

    async def fetch(self, limit: int, timeout: float) -> list[Delivery]:
        if self.waiting:
            handed, self.waiting = self.waiting[:limit], self.waiting[limit:]
            return handed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._never.wait(), timeout)
        return []

    async def close(self) -> None:
        return None


async def test_an_exhausted_delivery_after_an_unanswered_last_try_fails_the_reading(
    tmp_path: Path,
) -> None:
    """As when the worker on the last try died: no error is known, and the reason says so."""
    settings = giving_up_after(embedded_settings(tmp_path / "var"), 3)
    store = EventStore(settings)
    reading = new_reading()
    await store.append(reading)
    [requested] = await store.read(0, 1)
    delivery = ScriptedDelivery(requested, 4, exhausted=True)
    generator = CountingGenerator()
    feed = ScriptedFeed([delivery])
    async with running(settings, store=store, generator=generator, work_feed=feed) as container:
        [done] = await settled(container, [reading.id])
        await eventually(lambda: _true(delivery.answers == ["ack"]), what="the delivery acked")
        [failed] = [e for e in (await whole_log(store)) if e.type == FAILED]
    assert done.failure == f"exhausted 3 deliveries: {UNANSWERED}"
    assert generator.calls == 0
    assert failed.event.dead_letter == DeadLetter(
        settings.worker.consumer, requested.position, 3, UNANSWERED
    )


async def _true(value: bool) -> bool:
    return value


class NotReadyAtFirst(ScriptedFeed):
    """A feed whose stream no relay has created for its first ``refusals`` opens."""

    def __init__(self, deliveries: list[Delivery], refusals: int) -> None:
        super().__init__(deliveries)
        self.refusals = refusals
        self.opens = 0

    async def open(self) -> None:
        self.opens += 1
        if self.opens <= self.refusals:
            raise FeedNotReady("stream ALMANAC_EVENTS does not exist yet (a relay creates it)")


async def test_a_worker_started_before_the_stream_waits_for_it_without_warning(
    tmp_path: Path,
) -> None:
    """Usual while a deployment starts: the feed says so once; the worker is not failing."""
    settings = embedded_settings(tmp_path / "var")
    store = EventStore(settings)
    reading = new_reading()
    await store.append(reading)
    [requested] = await store.read(0, 1)
    delivery = ScriptedDelivery(requested, 1, exhausted=False)
    feed = NotReadyAtFirst([delivery], refusals=2)
    with structlog.testing.capture_logs() as logs:
        async with running(settings, store=store, work_feed=feed) as container:
            [done] = await settled(container, [reading.id])
    assert done.status == "generated"
    assert feed.opens == 3
    assert "worker.started" in [e["event"] for e in logs]  # the capture saw the worker
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == []
