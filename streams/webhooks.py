"""The webhook deliverer (role ``deliver``): events in from the work feed, signed HTTP
POSTs out to the endpoints that asked for them.

Two loops. *Intake* takes every event from the work feed (a durable JetStream consumer
shared by all deliverers on services; the log from a tracked position when embedded),
waits until the ``webhook_endpoints`` read model has reached the event, writes one message
per matching endpoint to the delivery log, and only then acknowledges the event.
*Dispatch* claims due messages from the log and attempts each one: signed with the Standard
Webhooks scheme, under a per-endpoint circuit breaker, rate limit and concurrency cap (so
one slow endpoint holds only its own slots), with every attempt recorded and failures
rescheduled on the retry schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid5

import msgspec
import structlog
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from standardwebhooks.webhooks import Webhook

from almanac.adapters.secretbox import SecretBox
from almanac.adapters.webhook_targets import TargetGuard, TargetRefused
from almanac.container import Stoppable
from almanac.domain.events import EventMeta
from almanac.domain.webhook import TEST_EVENT_TYPE, WebhookEndpoint, matches
from almanac.errors import AlmanacError
from almanac.eventstore import ConcurrencyConflict, EventStore, RecordedEvent
from almanac.feed import Delivery, FeedNotReady, WorkFeed
from almanac.ids import new_uuid
from almanac.readmodels import PositionWatch
from almanac.settings import WebhookSettings
from almanac.timeouts import Backoff, cancel_and_wait, wait_event

if TYPE_CHECKING:
    import aiohttp
from streams.envelope import envelope_of
from streams.webhook_log import AttemptRecord, Claimed, DeliveryLog, NewMessage

log = structlog.get_logger("almanac.webhooks")

ENDPOINTS_PROJECTION = "webhook_endpoints"
_MESSAGE_NAMESPACE = UUID("3d0c8f0e-6a43-4e0f-9d7b-6a2b1c9e4f57")
# What of a response body is kept with the attempt.
EXCERPT = 1000
USER_AGENT = "Almanac-Webhooks/0.1"
# How long an endpoint's row is reused between attempts (a change takes effect within it),
# and how often a healthy endpoint's success is written down again.
ENDPOINT_TTL = 1.0
HEALTH_INTERVAL = 60.0
# How long attempts under way may go on finishing once the deliverer is told to stop.
STOP_GRACE = 5.0
# How many rounds of an endpoint's concurrent attempts are held at most: claimed ahead, so
# that an endpoint is claimed for once every CLAIM_ROUNDS - 1 rounds of its attempts.
CLAIM_ROUNDS = 4
# An attempt starts only with this long to spare beyond its timeout before its lease ends.
LEASE_MARGIN = 2.0
_encoder = msgspec.json.Encoder()


def message_id_for(endpoint_id: str, position: int) -> str:
    """The ``webhook-id`` of an event sent to an endpoint: the same on every retry."""
    return "msg_" + uuid5(_MESSAGE_NAMESPACE, f"{endpoint_id}:{position}").hex


def payload_of(event_type: str, occurred_at: datetime, data: Any) -> str:
    """The body: ``{"type", "timestamp", "data"}``, as the Standard Webhooks spec suggests."""
    return _encoder.encode({"type": event_type, "timestamp": occurred_at, "data": data}).decode()


def retry_delay(settings: WebhookSettings, attempts: int) -> float | None:
    """Seconds before the next try after ``attempts`` failed ones; None when they are spent."""
    schedule = settings.retry_schedule
    if attempts > len(schedule):
        return None
    # ±20 % jitter, so that messages failed together do not all come back together.
    return schedule[attempts - 1] * settings.retry_scale * random.uniform(0.8, 1.2)  # noqa: S311


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date), if any; the
    headers as a case-insensitive mapping (aiohttp's)."""
    raw = headers.get("retry-after")
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(raw))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds())
    return None


def sign(secrets: Sequence[str], message_id: str, at: datetime, body: str) -> str:
    """``webhook-signature``: one ``v1,<base64>`` per secret in use, space-separated."""
    return " ".join(Webhook(s).sign(message_id, at, body) for s in secrets)


@dataclass
class Breaker:
    """Per-endpoint circuit breaker: after ``threshold`` failures in a row, no attempts until
    ``open_until``; then one probe decides."""

    failures: int = 0
    open_until: float = 0.0

    def blocked(self, now: float, cooldown: float, threshold: int) -> float | None:
        if self.failures < threshold or now >= self.open_until:
            if self.failures >= threshold:
                # Half open: this attempt probes; the rest wait another cooldown.
                self.open_until = now + cooldown
            return None
        return self.open_until

    def record(self, *, ok: bool, now: float, cooldown: float, threshold: int) -> None:
        if ok:
            self.failures = 0
            self.open_until = 0.0
            return
        self.failures += 1
        if self.failures >= threshold:
            self.open_until = now + cooldown


class Outcome(msgspec.Struct, frozen=True):
    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookDeliverer(Stoppable):
    name = "webhook-deliverer"

    def __init__(  # noqa: PLR0917 - built once, by bootstrap
        self,
        store: EventStore,
        feed: WorkFeed,
        deliveries: DeliveryLog,
        watch: PositionWatch,
        box: SecretBox,
        guard: TargetGuard,
        settings: WebhookSettings,
        *,
        rate_storage: Storage | None = None,
        batch_size: int = 500,
    ) -> None:
        self.store = store
        self.feed = feed
        self.log = deliveries
        self.watch = watch
        self.box = box
        self.guard = guard
        self.settings = settings
        self.batch_size = batch_size
        self.limiter = MovingWindowRateLimiter(rate_storage or MemoryStorage())
        self.fallback_limiter = MovingWindowRateLimiter(MemoryStorage())
        self.breakers: dict[str, Breaker] = {}
        self.delivered = 0
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._busy: dict[str, int] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        # The attempts of ``_in_flight`` past their endpoint's slot, so under way.
        self._under_way: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._full = False  # every attempt slot taken: the dispatcher waits for one to end
        self._claimed_per_endpoint = CLAIM_ROUNDS * settings.per_endpoint_concurrency
        # Holding this many of an endpoint's messages or fewer (one round of its slots), it
        # is claimed for again, for the rounds it has room for.
        self._claimable = settings.per_endpoint_concurrency
        super().__init__()
        self._session: aiohttp.ClientSession | None = None
        self._endpoints: dict[str, tuple[float, Any]] = {}
        self._success_noted: dict[str, float] = {}

    async def prepare(self) -> None:
        await self.log.prepare()

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    async def run(self) -> None:
        # Here, not at import: only a process that delivers loads the HTTP client.
        from almanac.adapters.webhook_client import guarded_session

        self._session = guarded_session(
            self.guard,
            connections=self.settings.concurrency,
            timeout=self.settings.timeout,
            headers={"user-agent": USER_AGENT},
        )
        log.info("webhook.deliverer_started", consumer=self.settings.consumer)
        intake = asyncio.create_task(self._intake(), name="webhook-intake")
        try:
            await self._dispatch()
        finally:
            await cancel_and_wait(intake)
            # Attempts still waiting for a slot are dropped at once and those under way have a
            # moment to finish; what is not settled falls due again when its lease runs out
            # (an unconfirmed attempt is sent again with the same webhook-id).
            for task in self._in_flight - self._under_way:
                task.cancel()
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=min(self.settings.timeout, STOP_GRACE))
                for task in self._in_flight:
                    task.cancel()
            # Outcomes of attempts that finished are written before the session closes.
            await self.log.drain(STOP_GRACE)
            await self._session.close()
            log.info("webhook.deliverer_stopped", delivered=self.delivered)

    # -- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        backoff = Backoff(0.05, 5.0)
        opened = False
        try:
            while not self._stopping.is_set():
                try:
                    if not opened:
                        await self.feed.open()
                        opened = True
                    deliveries = await self.feed.fetch(self.batch_size, timeout=1.0)
                    if deliveries:
                        await self._take(deliveries)
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except FeedNotReady:
                    await self._sleep(backoff.next())  # the feed has said so, once
                except Exception as exc:  # noqa: BLE001 - the deliverer outlives outages
                    log.warning("webhook.intake_failed", error=str(exc) or type(exc).__name__)
                    await self._sleep(backoff.next())
        finally:
            if opened:
                with contextlib.suppress(Exception):
                    await self.feed.close()

    async def _take(self, deliveries: list[Delivery]) -> None:
        """Write the messages a batch of events owes, then acknowledge the batch."""
        head = max(d.event.position for d in deliveries)
        reached = await self.watch.wait_for(ENDPOINTS_PROJECTION, head, timeout=5.0)
        if reached < head:
            # The endpoints read model is behind (its projector is down?): try again later.
            for delivery in deliveries:
                await delivery.nak(delay=1.0)
            return
        customer = [d for d in deliveries if not d.event.type.startswith("webhook_endpoint.")]
        owners = sorted({d.event.meta.owner for d in customer})
        endpoints = await self.log.endpoints_of(owners)
        wanted: dict[int, list[str]] = {}
        for delivery in customer:
            event = delivery.event
            for row in endpoints:
                if row["owner"] == event.meta.owner and matches(
                    msgspec.json.decode(row["event_types"], type=list[str]), event.type
                ):
                    wanted.setdefault(event.position, []).append(str(row["id"]))
        messages: list[NewMessage] = []
        if wanted:
            for event in await self._events(sorted(wanted)):
                body = payload_of(event.type, event.occurred_at, envelope_of(event))
                messages.extend(
                    NewMessage(
                        id=message_id_for(endpoint_id, event.position),
                        endpoint_id=endpoint_id,
                        owner=event.meta.owner,
                        event_type=event.type,
                        position=event.position,
                        payload=body,
                    )
                    for endpoint_id in wanted[event.position]
                )
        requests = [d for d in deliveries if d.event.type.startswith("webhook_endpoint.")]
        if requests:
            messages.extend(await self._requests(requests))
        await self.log.add(messages)
        for delivery in deliveries:
            await delivery.ack()
        if messages:
            self._wake.set()

    async def _events(self, positions: list[int]) -> list[RecordedEvent]:
        first, last = positions[0], positions[-1]
        if last - first < 5 * len(positions) + 100:
            found = await self.store.read(first - 1, last - first + 1)
        else:
            found = [e for p in positions for e in await self.store.read(p - 1, 1)]
        keep = set(positions)
        return [e for e in found if e.position in keep]

    async def _requests(self, deliveries: list[Delivery]) -> list[NewMessage]:
        """Test messages, resends and recoveries asked for through the endpoint's events."""
        kinds = (
            WebhookEndpoint.TestRequested.TOPIC,
            WebhookEndpoint.ResendRequested.TOPIC,
            WebhookEndpoint.RecoveryRequested.TOPIC,
        )
        asked = [d.event.position for d in deliveries if d.event.type in kinds]
        if not asked:
            return []
        messages = []
        for recorded in await self._events(sorted(asked)):
            event = recorded.event
            endpoint_id = recorded.aggregate_key
            if isinstance(event, WebhookEndpoint.TestRequested):
                data = {"endpoint_id": endpoint_id, "message_id": event.message_id}
                messages.append(
                    NewMessage(
                        id=event.message_id,
                        endpoint_id=endpoint_id,
                        owner=event.meta.owner,
                        event_type=TEST_EVENT_TYPE,
                        position=None,
                        payload=payload_of(TEST_EVENT_TYPE, recorded.occurred_at, data),
                    )
                )
            elif isinstance(event, WebhookEndpoint.ResendRequested):
                await self.log.resend(endpoint_id, event.delivery_id, recorded.position)
                self._wake.set()
            elif isinstance(event, WebhookEndpoint.RecoveryRequested):
                await self.log.recover(endpoint_id, event.since.timestamp(), recorded.position)
                self._wake.set()
        return messages

    # -- dispatch --------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        settings = self.settings
        # Up to ``CLAIM_ROUNDS`` rounds of an endpoint's slots are held at once (fewer
        # claims, each covering more), so an attempt may wait ``CLAIM_ROUNDS - 1`` rounds for
        # its slot before its own: the lease outlasts that, and a message claimed by a
        # deliverer that died is due again when it runs out. An endpoint is claimed for only
        # up to that, less what it holds, and only once it holds just a round (``_claimable``).
        lease = CLAIM_ROUNDS * settings.timeout + 5.0
        per_endpoint = self._claimed_per_endpoint
        backoff = Backoff(0.05, 5.0)
        while not self._stopping.is_set():
            self._wake.clear()
            free = settings.concurrency - len(self._in_flight)
            if free <= 0:
                # Until an attempt ends (``_ended`` wakes this) or the deliverer stops: a
                # stop must not wait for an endpoint's answer, up to ``timeout`` away.
                self._full = True
                await self._wake.wait()
                continue
            try:
                claimed = await self.log.claim(
                    free, per_endpoint, lease, self._held(), new_uuid().hex
                )
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - the log's database may come back
                log.warning("webhook.claim_failed", error=str(exc) or type(exc).__name__)
                await self._sleep(backoff.next())
                continue
            for message in claimed:
                self._busy[message.endpoint_id] = self._busy.get(message.endpoint_id, 0) + 1
                task = asyncio.create_task(self._attempt(message))
                self._in_flight.add(task)
                task.add_done_callback(self._ended)
            if len(claimed) >= free:
                continue
            # Nothing more may be claimed now: sleep until new messages come in, an endpoint
            # has room again or a message is rescheduled (each sets ``_wake``), or until the
            # next message of an endpoint with room falls due.
            busy = [e for e, n in self._held().items() if n >= per_endpoint]
            wait = settings.poll_interval
            with contextlib.suppress(Exception):
                due = await self.log.next_due(busy)
                if due is not None:
                    wait = min(wait, max(due - time.time(), 0.005))
            await wait_event(self._wake, wait)

    def _held(self) -> dict[str, int]:
        """What this deliverer holds of each endpoint, as the claim counts it: an endpoint
        not yet claimable again counts as full."""
        full = self._claimed_per_endpoint
        return {e: n if n <= self._claimable else full for e, n in self._busy.items()}

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._full:
            self._full = False
            self._wake.set()

    async def _attempt(self, message: Claimed) -> None:
        endpoint_id = message.endpoint_id
        slot = self._slots.setdefault(
            endpoint_id, asyncio.Semaphore(self.settings.per_endpoint_concurrency)
        )
        holding, needing = False, True

        def done_with_endpoint() -> None:
            # Once the endpoint has answered, the attempt needs it no more while its outcome
            # is written (outcomes written together share a transaction): the slot goes to
            # the endpoint's next attempt, and the endpoint may be claimed for again.
            nonlocal holding, needing
            if holding:
                holding = False
                slot.release()
            if needing:
                needing = False
                self._leave(endpoint_id)

        try:
            await slot.acquire()
            holding = True
            task = asyncio.current_task()
            assert task is not None
            self._under_way.add(task)
            try:
                await self._attempt_now(message, done_with_endpoint)
            finally:
                self._under_way.discard(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left claimed: the message falls due again when its lease runs out.
            log.exception("webhook.attempt_crashed", message_id=message.id)
        finally:
            done_with_endpoint()

    def _leave(self, endpoint_id: str) -> None:
        left = self._busy[endpoint_id] = self._busy[endpoint_id] - 1
        if not left:
            del self._busy[endpoint_id]
            self._slots.pop(endpoint_id, None)
        if left == self._claimable:
            # The endpoint is claimable again, for the rounds it has room for. Waking the
            # dispatcher after every attempt instead cost a claim and a look for the next due
            # message per delivery, each finding room for one message at most.
            self._wake.set()

    async def _attempt_now(self, message: Claimed, answered: Callable[[], None]) -> None:
        settings = self.settings
        log_ = log.bind(message_id=message.id, endpoint_id=message.endpoint_id)
        if time.time() + settings.timeout + LEASE_MARGIN > message.leased_until:
            # Its turn came too late to finish within the lease (a slow endpoint, a deep
            # backlog): sent now, it could also be sent by whoever claims it when the lease
            # runs out. It is handed back, due at once, to be claimed afresh.
            log_.debug("webhook.lease_too_short", leased_until=message.leased_until)
            await self._postpone(message, time.time())
            return
        endpoint = await self._endpoint(message.endpoint_id)
        now = time.time()
        if endpoint is None or endpoint["status"] != "enabled":
            why = "deleted" if endpoint is None else str(endpoint["status"])
            await self.log.settle(
                message,
                status="failed",
                attempts=message.attempts,
                next_attempt_at=None,
                attempt=self._record(message, now, Outcome(None, 0.0, f"endpoint {why}", None)),
            )
            return
        breaker = self.breakers.setdefault(message.endpoint_id, Breaker())
        open_until = breaker.blocked(now, settings.breaker_cooldown, settings.breaker_threshold)
        if open_until is not None:
            # Not an attempt: the dead endpoint is left alone, the message waits its turn.
            await self._postpone(message, open_until + random.uniform(0, 1))  # noqa: S311
            return
        rate = endpoint["rate_limit"]
        if rate and not await self._admit(message.endpoint_id, int(rate)):
            await self._postpone(message, now + 1.0 / int(rate) + random.uniform(0, 0.05))  # noqa: S311
            return
        outcome = await self._send(message, endpoint)
        now = time.time()
        breaker.record(
            ok=outcome.ok,
            now=now,
            cooldown=settings.breaker_cooldown,
            threshold=settings.breaker_threshold,
        )
        answered()
        record = self._record(message, now, outcome)
        if outcome.ok:
            self.delivered += 1
            await self.log.settle(
                message,
                status="succeeded",
                attempts=message.attempts + 1,
                next_attempt_at=None,
                attempt=record,
            )
            if now - self._success_noted.get(message.endpoint_id, 0.0) >= HEALTH_INTERVAL:
                # Clears a failing spell; while all goes well, once a minute is enough.
                await self.log.health(message.endpoint_id, succeeded=True)
                self._success_noted[message.endpoint_id] = now
            return
        attempts = message.attempts + 1
        if outcome.status_code == 410:
            await self.log.settle(
                message, status="failed", attempts=attempts, next_attempt_at=None, attempt=record
            )
            await self._disable(message, endpoint, "the endpoint answered 410 Gone")
            return
        delay = retry_delay(settings, attempts)
        if delay is not None and outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, 86400.0))
        log_.info(
            "webhook.delivery_failed",
            attempt=attempts,
            status_code=outcome.status_code,
            error=outcome.error,
            retry_in=delay,
        )
        await self.log.settle(
            message,
            status="failed" if delay is None else "pending",
            attempts=attempts,
            next_attempt_at=None if delay is None else now + delay,
            attempt=record,
        )
        if delay is not None:
            self._rescheduled(now + delay)
        self._success_noted.pop(message.endpoint_id, None)
        failing_since = await self.log.health(message.endpoint_id, succeeded=False)
        if failing_since is not None and now - failing_since >= settings.disable_after:
            days = settings.disable_after / 86400
            await self._disable(message, endpoint, f"no successful delivery for {days:g} days")

    async def _endpoint(self, endpoint_id: str) -> Any:
        now = time.monotonic()
        cached = self._endpoints.get(endpoint_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self.log.endpoint(endpoint_id)
        if len(self._endpoints) > 10_000:
            self._endpoints.clear()
        self._endpoints[endpoint_id] = (now + ENDPOINT_TTL, row)
        return row

    async def _postpone(self, message: Claimed, at: float) -> None:
        await self.log.settle(
            message, status="pending", attempts=message.attempts, next_attempt_at=at, attempt=None
        )
        self._rescheduled(at)

    def _rescheduled(self, at: float) -> None:
        # The dispatcher may be asleep until a later due time than this message's new one;
        # it looks again within a poll interval anyway (a retry's delay is seconds at least).
        if at < time.time() + self.settings.poll_interval:
            self._wake.set()

    async def _admit(self, endpoint_id: str, rate: int) -> bool:
        item = RateLimitItemPerSecond(rate)
        try:
            return await self.limiter.hit(item, "webhook", endpoint_id)
        except Exception as exc:  # noqa: BLE001 - Redis down: limit in-process instead
            log.warning("webhook.rate_limit_degraded", error=str(exc) or type(exc).__name__)
            return await self.fallback_limiter.hit(item, "webhook", endpoint_id)

    def _secrets(self, endpoint: Any) -> list[str]:
        secrets = [self.box.open(str(endpoint["secret_sealed"]))]
        previous, until = endpoint["previous_secret_sealed"], endpoint["previous_until"]
        if previous and until and float(until) > time.time():
            secrets.append(self.box.open(str(previous)))
        return secrets

    async def _send(self, message: Claimed, endpoint: Any) -> Outcome:
        assert self._session is not None
        from aiohttp import ClientError  # loaded by ``run`` already: a lookup in sys.modules

        url = str(endpoint["url"])
        started = time.monotonic()

        def elapsed() -> float:
            return round((time.monotonic() - started) * 1000, 3)

        try:
            # The form and an address literal here; a name's addresses when a connection is
            # made, from the one lookup it connects by (``guarded_session``).
            await self.guard.check_send(url)
            at = datetime.now(UTC)
            headers = {
                "content-type": "application/json",
                "webhook-id": message.id,
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": sign(self._secrets(endpoint), message.id, at, message.payload),
            }
            async with self._session.post(
                url, data=message.payload.encode(), headers=headers, allow_redirects=False
            ) as response:
                excerpt = await _excerpt(response.content)
                code = response.status
                wait = retry_after(response.headers) if code in (429, 503) else None
        except TargetRefused as exc:
            return Outcome(None, elapsed(), f"refused: {exc.detail}", None)
        except AlmanacError as exc:
            return Outcome(None, elapsed(), exc.detail, None)
        except TimeoutError:
            return Outcome(None, elapsed(), f"no answer within {self.settings.timeout:g} s", None)
        except ClientError as exc:
            return Outcome(None, elapsed(), f"{type(exc).__name__}: {exc}"[:500], None)
        error = None
        if 300 <= code < 400:
            error = "redirects are not followed"
        elif not 200 <= code < 300:
            error = f"HTTP {code}"
        return Outcome(code, elapsed(), error, excerpt, wait)

    def _record(self, message: Claimed, at: float, outcome: Outcome) -> AttemptRecord:
        # An endpoint's answer may hold NUL, which a Postgres text column refuses.
        return AttemptRecord(
            id=f"atmpt_{new_uuid().hex}",
            message_id=message.id,
            endpoint_id=message.endpoint_id,
            attempted_at=at,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            # An endpoint's answer may hold NUL, which a Postgres text column refuses.
            error=_without_nul(outcome.error),
            response=_without_nul(outcome.response),
            outcome="succeeded" if outcome.ok else "failed",
            trigger="scheduled" if message.attempts == 0 else "retry",
        )

    async def _disable(self, message: Claimed, endpoint: Any, reason: str) -> None:
        meta = EventMeta(str(endpoint["owner"]), message.id, f"webhook:{message.id}")
        for _ in range(3):
            aggregate = await self.store.load(WebhookEndpoint, UUID(message.endpoint_id))
            if aggregate is None or aggregate.status != "enabled":
                return
            aggregate.disable(meta, reason)
            try:
                position = await self.store.append(aggregate)
            except ConcurrencyConflict:
                continue
            log.warning(
                "webhook.endpoint_disabled",
                endpoint_id=message.endpoint_id,
                reason=reason,
                position=position,
            )
            return


def _without_nul(text: str | None) -> str | None:
    return None if text is None else text.replace("\x00", "\ufffd")


async def _excerpt(body: aiohttp.StreamReader) -> str:
    """The start of the body; the rest is not read."""
    taken = b""
    while len(taken) < EXCERPT and (chunk := await body.read(EXCERPT - len(taken))):
        taken += chunk
    return taken.decode(errors="replace")


def rate_storage(redis_url: str | None, prefix: str = "") -> Storage:
    """Limits shared through Redis on services, in-process when embedded."""
    if redis_url is None:
        return MemoryStorage()
    return RedisStorage(
        "async+" + redis_url, implementation="redispy", key_prefix=f"{prefix}almanac-webhooks"
    )
