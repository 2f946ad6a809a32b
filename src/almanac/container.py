"""The object graph ``bootstrap`` builds: what every role and handler is given."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from almanac.adapters.nats import NatsConnection
from almanac.adapters.redis import RedisConnection
from almanac.adapters.replicas import ReadRouter
from almanac.adapters.secretbox import SecretBox
from almanac.adapters.webhook_targets import TargetGuard
from almanac.auth import KeyRing
from almanac.cache import ReadCache
from almanac.domain.interpretation import ReadingGenerator
from almanac.errors import AlmanacError
from almanac.eventstore import EventStore
from almanac.feed import EventFeed
from almanac.readmodels import PositionWatch, ReadDatabase
from almanac.settings import Settings
from almanac.timeouts import wait_event, within

if TYPE_CHECKING:
    from litestar import Request

log = structlog.get_logger("almanac.container")

ROLES = ("api", "worker", "projector", "relay", "deliver")
# The key of the container in the app's state (``create_app`` puts it there).
CONTAINER = "container"
# Roles that only exist on the services profile (the relay publishes to NATS).
SERVICES_ROLES = frozenset({"relay"})


class BackgroundRole(Protocol):
    """A long-running consumer (worker, projector, relay) started by ``Container.start``."""

    name: str

    async def run(self) -> None: ...

    def stop(self) -> None: ...


class Stoppable:
    """A background role's stop signal, and pauses that end as soon as it is given."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._stopping, seconds)


class Preparable(Protocol):
    async def prepare(self) -> None: ...


@dataclass
class Container:
    settings: Settings
    store: EventStore
    read_db: ReadDatabase
    watch: PositionWatch
    feed: EventFeed
    keyring: KeyRing
    generator: ReadingGenerator
    cache: ReadCache
    redis: RedisConnection | None = None
    nats: NatsConnection | None = None
    # Routes queries to fresh-enough hot standbys of the read database (services only).
    read_router: ReadRouter | None = None
    # Each background role is listed under the role name that runs it.
    background: dict[str, list[BackgroundRole]] = field(default_factory=dict)
    roles: tuple[str, ...] = ROLES
    # Webhook URLs are checked against SSRF and secrets sealed with these (bootstrap makes
    # both; a hand-made container without webhooks leaves them out).
    webhook_guard: TargetGuard | None = None
    secret_box: SecretBox | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _started: bool = False

    async def start(self) -> None:
        """Open connections, create read-model tables, start the background roles."""
        if self._started:
            return
        self._started = True
        await self.read_db.open()
        await self.cache.start()
        if self.read_router is not None:
            await self.read_router.open()
        for roles in self.background.values():
            for role in roles:
                if hasattr(role, "prepare"):
                    await role.prepare()
        if "api" in self.roles:
            # Only processes that answer queries gain from it, and the tables exist by now.
            await self.cache.warm()
        await self.feed.start()
        for role_name, roles in self.background.items():
            if role_name in self.roles:
                for role in roles:
                    self._tasks.append(asyncio.create_task(role.run(), name=role.name))
        for role_name in self.roles:
            if role_name in SERVICES_ROLES and role_name not in self.background:
                # Asked for, but this profile has nothing for it to do (no NATS).
                log.info(
                    "almanac.role_inactive",
                    role=role_name,
                    profile=self.settings.profile.value,
                    reason="needs the services profile (ALMANAC_NATS_URL)",
                )
        log.info(
            "almanac.started",
            profile=self.settings.profile.value,
            roles=list(self.roles),
            **self.settings.locations(),
        )

    async def stop(self) -> None:
        """Stop background roles (each finishes its batch), then close every connection."""
        if not self._started:
            return
        for roles in self.background.values():
            for role in roles:
                role.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=10)
            for task in pending:
                frames = task.get_stack(limit=1)
                where = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
                log.warning("almanac.role_cancelled", role=task.get_name(), waiting_at=where)
                task.cancel()
            if pending:
                # Bounded too: a role that ignores its cancellation must not hold up the exit.
                _, stuck = await asyncio.wait(pending, timeout=5)
                for task in stuck:
                    log.error("almanac.role_not_stopped", role=task.get_name())
        self._tasks.clear()
        await self.keyring.stop()
        await self.feed.stop()
        await self.cache.stop()
        if self.read_router is not None:
            await self.read_router.close()
        await self.read_db.close()
        if self.redis is not None:
            await self.redis.close()
        if self.nats is not None:
            await self.nats.close()
        try:
            await self.store.stop_appending()
        finally:
            await asyncio.to_thread(self.store.close)
        self._started = False
        log.info("almanac.stopped")

    @property
    def webhooks(self) -> tuple[TargetGuard, SecretBox]:
        assert self.webhook_guard is not None, "bootstrap() sets up webhooks"
        assert self.secret_box is not None, "bootstrap() sets up webhooks"
        return self.webhook_guard, self.secret_box

    async def readiness(self) -> dict[str, str]:
        """Each engine of the active profile, ``ok`` or why not."""
        checks = {"event_store": self.store.ping(), "read_models": self.read_db.ping()}
        if self.redis is not None:
            checks["redis"] = self.redis.ping()
        if self.nats is not None:
            checks["nats"] = self.nats.ping()
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await within(check, 3)
                results[name] = "ok"
            except (AlmanacError, TimeoutError, OSError) as exc:
                results[name] = getattr(exc, "detail", None) or type(exc).__name__
        for task in self._tasks:
            if task.done():
                results[task.get_name()] = "stopped"
        return results

    def role_problems(self) -> dict[str, str]:
        """Running roles that cannot go on, each with why (a role's ``problem``, such as the
        relay's at an event the NATS server refuses): the process still serves."""
        problems: dict[str, str] = {}
        for role_name, roles in self.background.items():
            if role_name not in self.roles:
                continue
            for role in roles:
                problem = getattr(role, "problem", None)
                if problem is not None:
                    problems[role.name] = str(problem)
        return problems


def serving(request: Request[Any, Any, Any]) -> Container:
    """The container of the app serving ``request``. For the hottest routes, which take it
    from the app's state instead of as a dependency: Litestar's injection costs a POST ~4 µs
    of CPU a dependency."""
    container: Container = request.app.state[CONTAINER]
    return container
