"""The reading worker: a policy that turns ``reading.requested`` into a chart and a text.

It follows the feed from its tracked position. Handling is idempotent (a settled reading is
skipped, a half-done one continues from its chart) and appends are guarded by the
aggregate's version, so a restart after a crash at any point completes every reading once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import stamina
import structlog

from almanac.domain.chart import BirthData, Chart, ChartOptions, calculate_chart
from almanac.domain.interpretation import GenerationFailed, ReadingGenerator, ReadingText
from almanac.domain.reading import Reading
from almanac.errors import AlmanacError, Unavailable
from almanac.eventstore import ConcurrencyConflict, EventStore, RecordedEvent
from almanac.feed import EventFeed
from almanac.settings import WorkerSettings

log = structlog.get_logger("almanac.worker")

ChartCalculator = Callable[[BirthData, ChartOptions], Chart]


def _retryable(exc: BaseException) -> bool:
    """Transient generator failures, and unexpected ones (which may be transient too);
    never cancellation, which must stop the worker at once."""
    if isinstance(exc, GenerationFailed):
        return exc.retryable
    return isinstance(exc, Exception) and not isinstance(exc, AlmanacError)


class ReadingWorker:
    name = "reading-worker"

    def __init__(
        self,
        store: EventStore,
        feed: EventFeed,
        generator: ReadingGenerator,
        settings: WorkerSettings,
        *,
        calculate: ChartCalculator = calculate_chart,
        batch_size: int = 500,
    ) -> None:
        self.store = store
        self.feed = feed
        self.generator = generator
        self.settings = settings
        self.calculate = calculate
        self.batch_size = batch_size
        self.position = 0
        self._limit = asyncio.Semaphore(settings.concurrency)
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        follower = self.feed.follow()
        pause = 0.05
        started = False
        try:
            while not self._stopping.is_set():
                try:
                    if not started:
                        self.position = await self.store.consumer_position(self.name)
                        log.info("worker.started", worker=self.name, position=self.position)
                        started = True
                    events = await follower.next_batch(self.position, self.batch_size, 1.0)
                    requested = [e for e in events if e.type == Reading.Requested.TOPIC]
                    await asyncio.gather(*(self._handle(e) for e in requested))
                    if events:
                        await self.store.save_consumer_position(self.name, events[-1].position)
                        self.position = events[-1].position
                    pause = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retry the batch; handling is idempotent
                    log.warning("worker.batch_failed", position=self.position, error=str(exc))
                    await self._sleep(pause)
                    pause = min(pause * 2, 5.0)
        finally:
            follower.close()
            log.info("worker.stopped", worker=self.name, position=self.position)

    async def _handle(self, event: RecordedEvent) -> None:
        async with self._limit:
            log_ = log.bind(
                aggregate_id=str(event.aggregate_id),
                position=event.position,
                correlation_id=event.meta.correlation_id,
            )
            try:
                await self._process_until_settled(event)
            except Unavailable:
                raise
            except AlmanacError as exc:
                log_.warning("worker.reading_skipped", error=exc.detail)

    async def _process_until_settled(self, event: RecordedEvent) -> None:
        """Another worker may move the same reading on meanwhile (a conflict on append): reload
        and carry on from wherever it got, so the reading is never left half-done."""
        for _ in range(5):
            try:
                await self.process(event)
            except ConcurrencyConflict:
                log.info("worker.reading_moved_on_elsewhere", aggregate_id=str(event.aggregate_id))
                continue
            return
        raise ConcurrencyConflict(f"reading {event.aggregate_id} kept changing under the worker")

    async def process(self, event: RecordedEvent) -> None:
        reading = await self.store.load(Reading, event.aggregate_id)
        if reading is None or reading.settled:
            return
        meta = event.meta.caused_by(event.position)
        if reading.chart is None:
            try:
                chart = await asyncio.to_thread(self.calculate, reading.birth, reading.options)
            except AlmanacError as exc:
                reading.fail(f"the chart could not be calculated: {exc.detail}", meta)
                await self.store.append(reading)
                return
            except Exception as exc:  # one bad reading must not stall the log
                log.exception("worker.chart_crashed", aggregate_id=str(reading.id))
                reading.fail(f"the chart could not be calculated ({type(exc).__name__})", meta)
                await self.store.append(reading)
                return
            reading.record_chart(chart, meta)
            position = await self.store.append(reading)
            log.info("worker.chart_calculated", aggregate_id=str(reading.id), position=position)
        assert reading.chart is not None
        try:
            text = await self._generate(reading, reading.chart)
        except GenerationFailed as exc:
            reading.fail(f"the text could not be generated: {exc.detail}", meta)
            await self.store.append(reading)
            log.warning("worker.reading_failed", aggregate_id=str(reading.id), error=exc.detail)
            return
        except Unavailable:
            raise
        except Exception as exc:  # one bad reading must not stall the log
            log.exception("worker.generator_crashed", aggregate_id=str(reading.id))
            reading.fail(f"the text could not be generated ({type(exc).__name__})", meta)
            await self.store.append(reading)
            return
        reading.record_text(text, meta)
        position = await self.store.append(reading)
        log.info("worker.reading_generated", aggregate_id=str(reading.id), position=position)

    async def _generate(self, reading: Reading, chart: Chart) -> ReadingText:
        async for attempt in stamina.retry_context(
            on=_retryable, attempts=self.settings.attempts, wait_initial=0.2, wait_max=5.0
        ):
            with attempt:
                return await self.generator.generate(chart, reading.kind, reading.label)
        raise AssertionError("unreachable: stamina re-raises the last failure")

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return

    def stop(self) -> None:
        self._stopping.set()
