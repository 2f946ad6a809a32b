"""The reading worker: a policy that turns ``reading.requested`` into a chart and a text.

It takes ``reading.requested`` events from a work feed (``almanac.feed.WorkFeed``): on the
services profile a JetStream consumer that every worker process shares, so the readings
split among them; on the embedded profile the event store's log from a tracked position.
A reading is acknowledged only once its events are appended, or it is found settled
already; on a transient failure it is handed back, and a worker that dies leaves it to be
delivered again. When its last try (``ALMANAC_WORKER_MAX_DELIVER``) fails, or the feed
marks a delivery exhausted because the last try went unanswered, the reading fails as
exhausted, carrying a dead letter: nothing is dropped with only a log line. Handling is
idempotent (a settled reading is skipped, a half-done one continues from its chart) and
appends are guarded by the aggregate's version, so however often a reading is delivered,
it is completed once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from almanac.container import Stoppable
from almanac.domain.chart import BirthData, Chart, ChartOptions, calculate_chart, chart_hash
from almanac.domain.interpretation import GenerationFailed, ReadingGenerator, ReadingText
from almanac.domain.reading import DeadLetter, Reading
from almanac.errors import AlmanacError, Unavailable
from almanac.eventstore import ConcurrencyConflict, EventStore
from almanac.feed import Delivery, EventRef, FeedNotReady, WorkFeed
from almanac.retries import retried
from almanac.settings import WorkerSettings
from almanac.timeouts import Backoff, unless

log = structlog.get_logger("almanac.worker")

ChartCalculator = Callable[[BirthData, ChartOptions], Chart]
# Charts kept in memory by hash: a batch of the same birth data many times (or a client
# asking again) costs one calculation. Commands never read read models, so this is the
# worker's own cache, not the ``charts`` table.
CHART_CACHE_SIZE = 4096
# The last error of readings whose dead letter could not be recorded on their last try, for
# the exhausted delivery that follows (if it comes to this process).
LAST_ERRORS_SIZE = 1024
# The last error of a reading whose last try ended without an answer.
UNANSWERED = "the last delivery ended without an answer (its worker stopped or died)"


def _retryable(exc: BaseException) -> bool:
    """Transient generator failures, and unexpected ones (which may be transient too);
    never cancellation, which must stop the worker at once."""
    if isinstance(exc, GenerationFailed):
        return exc.retryable
    return isinstance(exc, Exception) and not isinstance(exc, AlmanacError)


def redelivery_delay(attempt: int) -> float:
    """Seconds before a reading handed back after ``attempt`` deliveries comes again: growing,
    so that an outage is waited out rather than hammered."""
    return min(0.1 * 2.0 ** min(attempt - 1, 10), 30.0)


class ReadingWorker(Stoppable):
    name = "reading-worker"

    def __init__(
        self,
        store: EventStore,
        feed: WorkFeed,
        generator: ReadingGenerator,
        settings: WorkerSettings,
        *,
        calculate: ChartCalculator = calculate_chart,
    ) -> None:
        self.store = store
        self.feed = feed
        self.generator = generator
        self.settings = settings
        self.calculate = calculate
        self.handled = 0
        self.charts_reused = 0
        self._charts: OrderedDict[str, Chart] = OrderedDict()
        self._last_errors: OrderedDict[int, str] = OrderedDict()
        self._in_flight: set[asyncio.Task[None]] = set()
        super().__init__()

    async def run(self) -> None:
        backoff = Backoff(0.05, 5.0)
        opened = False
        try:
            while not self._stopping.is_set():
                try:
                    if not opened:
                        await self.feed.open()
                        opened = True
                        log.info(
                            "worker.started", worker=self.name, consumer=self.settings.consumer
                        )
                    # Only as much work as there are free hands: what one worker does not
                    # take stays with the feed for the others.
                    free = self.settings.concurrency - len(self._in_flight)
                    if free <= 0:
                        await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    # Stop does not wait for the fetch to run out: it ends it.
                    fetched = await unless(self._stopping, self.feed.fetch(free, timeout=1.0))
                    for delivery in fetched or []:
                        task = asyncio.create_task(self._work_on(delivery))
                        self._in_flight.add(task)
                        task.add_done_callback(self._in_flight.discard)
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except FeedNotReady:
                    await self._sleep(backoff.next())  # the feed has said so, once
                except Exception as exc:  # noqa: BLE001 - the worker outlives feed outages
                    log.warning(
                        "worker.feed_unavailable",
                        worker=self.name,
                        error=str(exc) or type(exc).__name__,
                    )
                    await self._sleep(backoff.next())
        finally:
            try:
                # Finish what was taken; if shutdown runs out of patience and cancels, each
                # unfinished reading is handed back on the way out.
                if self._in_flight:
                    await asyncio.gather(*self._in_flight, return_exceptions=True)
            finally:
                if opened:
                    await self._close_feed()
                log.info("worker.stopped", worker=self.name, handled=self.handled)

    async def _close_feed(self) -> None:
        try:
            await self.feed.close()
        except Exception as exc:  # noqa: BLE001 - unacknowledged work comes back anyway
            log.warning("worker.feed_close_failed", error=str(exc) or type(exc).__name__)

    async def _work_on(self, delivery: Delivery) -> None:
        event = delivery.event
        log_ = log.bind(
            aggregate_id=str(event.aggregate_id),
            position=event.position,
            correlation_id=event.meta.correlation_id,
            attempt=delivery.attempt,
        )
        if delivery.attempt > 1:
            log_.info("worker.redelivered")
        keepalive = asyncio.create_task(self._keep_alive(delivery))
        try:
            if delivery.exhausted:
                # The last try went unanswered (its worker died, say, or could not record it).
                await self._give_up(delivery, None, log_)
                return
            if event.type == Reading.Requested.TOPIC:
                await self._handle(event)
        except asyncio.CancelledError:
            # Hand it back now rather than after the ack wait.
            await self._answer(delivery.nak(), log_, "worker.nak_failed")
            raise
        except Exception as exc:  # noqa: BLE001 - transient: it comes back later, or is given up
            error = str(exc) or type(exc).__name__
            max_deliver = self.settings.max_deliver
            if max_deliver != -1 and delivery.attempt >= max_deliver:
                await self._give_up(delivery, error, log_)
                return
            log_.warning("worker.reading_deferred", error=error)
            await self._answer(
                delivery.nak(delay=redelivery_delay(delivery.attempt)), log_, "worker.nak_failed"
            )
            return
        finally:
            keepalive.cancel()
        self.handled += 1
        # A lost ack costs only a redelivery, found settled and skipped.
        await self._answer(delivery.ack(), log_, "worker.ack_failed")

    async def _give_up(self, delivery: Delivery, error: str | None, log_: Any) -> None:
        """Record the dead letter: the reading fails as exhausted (so a batch gets its item's
        outcome), then the delivery is acknowledged. Should the record fail too (the event
        store still down, say), the delivery is handed back: after the last try, the exhausted
        delivery tries again; after that one, the feed drops the event and logs it."""
        event = delivery.event
        tries = delivery.attempt - 1 if delivery.exhausted else delivery.attempt
        remembered = self._last_errors.pop(event.position, None)
        last_error = error or remembered or UNANSWERED
        dead = DeadLetter(self.settings.consumer, event.position, tries, last_error)
        try:
            position = await self._abandon(event, dead)
        except Exception as exc:
            log_.exception(
                "worker.dead_letter_failed",
                deliveries=tries,
                last_error=last_error,
                error=str(exc) or type(exc).__name__,
            )
            if not delivery.exhausted:
                self._remember(event.position, last_error)
            await self._answer(
                delivery.nak(delay=redelivery_delay(delivery.attempt)), log_, "worker.nak_failed"
            )
            return
        if position is not None:
            log_.error(
                "worker.reading_abandoned",
                deliveries=tries,
                last_error=last_error,
                failed_position=position,
            )
        await self._answer(delivery.ack(), log_, "worker.ack_failed")

    async def _abandon(self, event: EventRef, dead: DeadLetter) -> int | None:
        """Fail the reading with the dead letter; ``None`` if it is settled (or gone) already."""
        for _ in range(5):
            reading = await self.store.load(Reading, event.aggregate_id)
            if reading is None or reading.settled:
                return None
            reading.abandon(dead, event.meta.caused_by(event.position))
            try:
                return await self.store.append(reading)
            except ConcurrencyConflict:
                continue
        raise ConcurrencyConflict(f"reading {event.aggregate_id} kept changing under the worker")

    def _remember(self, position: int, error: str) -> None:
        self._last_errors[position] = error
        if len(self._last_errors) > LAST_ERRORS_SIZE:
            self._last_errors.popitem(last=False)

    @staticmethod
    async def _answer(answer: Awaitable[None], log_: Any, failed: str) -> None:
        try:
            await answer
        except Exception as exc:  # noqa: BLE001 - the feed delivers the reading again anyway
            log_.warning(failed, error=str(exc) or type(exc).__name__)

    async def _keep_alive(self, delivery: Delivery) -> None:
        """Restart the ack wait while a slow reading (a generator retrying) is worked on, so
        it does not go to a second worker meanwhile."""
        while True:
            await asyncio.sleep(self.settings.ack_wait / 3)
            try:
                await delivery.in_progress()
            except Exception as exc:  # noqa: BLE001 - at worst the reading is delivered again
                log.warning("worker.keepalive_failed", error=str(exc) or type(exc).__name__)

    async def _handle(self, event: EventRef) -> None:
        """Settle the reading; raises only on a transient failure (try again later)."""
        try:
            await self._process_until_settled(event)
        except Unavailable:
            raise
        except AlmanacError as exc:
            log.warning(
                "worker.reading_skipped", aggregate_id=str(event.aggregate_id), error=exc.detail
            )

    async def _process_until_settled(self, event: EventRef) -> None:
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

    async def process(self, event: EventRef) -> None:
        reading = await self.store.load(Reading, event.aggregate_id)
        if reading is None or reading.settled:
            return
        meta = event.meta.caused_by(event.position)
        if reading.chart is None:
            try:
                chart = await self._chart(reading.birth, reading.options)
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

    async def _chart(self, birth: BirthData, options: ChartOptions) -> Chart:
        key = chart_hash(birth, options)
        chart = self._charts.get(key)
        if chart is not None:
            self._charts.move_to_end(key)
            self.charts_reused += 1
            return chart
        chart = await asyncio.to_thread(self.calculate, birth, options)
        self._charts[key] = chart
        if len(self._charts) > CHART_CACHE_SIZE:
            self._charts.popitem(last=False)
        return chart

    async def _generate(self, reading: Reading, chart: Chart) -> ReadingText:
        return await retried(
            lambda: self.generator.generate(chart, reading.kind, reading.label),
            on=_retryable,
            attempts=self.settings.attempts,
            wait_initial=0.2,
            wait_max=5.0,
        )
