"""The composition root: builds the whole object graph from Settings.

Everything is constructed here and nowhere else; nothing connects at import time.
Tests pass ``**overrides`` to swap a collaborator (a generator, a chart calculator).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from almanac.adapters.leadership import FileLease, Lease, PostgresLease
from almanac.adapters.nats import NatsConnection
from almanac.adapters.postgres import PostgresReadDatabase
from almanac.adapters.redis import RedisConnection
from almanac.adapters.replicas import ReadRouter, ReplicaReadDatabase
from almanac.adapters.secretbox import SecretBox
from almanac.adapters.sqlite import SqliteReadDatabase
from almanac.adapters.webhook_targets import TargetGuard
from almanac.auth import KeyRing
from almanac.cache import ReadCache, TwoLevelCache
from almanac.container import ROLES, BackgroundRole, Container
from almanac.domain.interpretation import BuiltinGenerator, ReadingGenerator
from almanac.domain.reading import Reading
from almanac.eventstore import EventStore
from almanac.feed import WorkFeed
from almanac.readmodels import PositionWatch, ReadDatabase, projection_position
from almanac.settings import Profile, Settings, WorkerSettings
from commands.batch_process import BatchProcessManager
from commands.worker import ReadingWorker
from projections.batches import BatchesProjection
from projections.cache_refresher import CacheRefresher, read_entries
from projections.dead_letters import DeadLettersProjection
from projections.readings import ReadingsProjection
from projections.runner import AfterCommit, Projection, ProjectionRunner
from projections.webhooks import WebhookEndpointsProjection
from streams.jetstream import JetStreamWorkFeed
from streams.logfeed import LogFeed
from streams.logwork import LogWorkFeed
from streams.relay import Relay
from streams.webhook_log import DeliveryLog
from streams.webhooks import WebhookDeliverer, rate_storage
from streams.websocket import Hub, LiveSource, LogSource, NatsSource


def bootstrap(settings: Settings, roles: tuple[str, ...] = ROLES, **overrides: Any) -> Container:
    store = overrides.get("store") or EventStore(settings)
    read_db: ReadDatabase
    read_router: ReadRouter | None = None
    if settings.profile is Profile.SERVICES:
        assert settings.read_postgres_url is not None
        read_db = PostgresReadDatabase(
            settings.read_postgres_url, max_size=settings.store.pool_size
        )
        redis = RedisConnection(settings.cache.redis_url) if settings.cache.redis_url else None
        nats = NatsConnection(settings.feed.nats_url) if settings.feed.nats_url else None
        listen_dsn = settings.store.postgres_url
        # The lock lives beside the rows it guards: in the read database.
        lease: Lease = PostgresLease(settings.read_postgres_url, "projection:readings")
        batches_lease: Lease = PostgresLease(settings.read_postgres_url, "projection:batches")
        manager_lease: Lease = PostgresLease(settings.read_postgres_url, settings.batch.consumer)
        endpoints_lease: Lease = PostgresLease(
            settings.read_postgres_url, "projection:webhook_endpoints"
        )
        dead_letters_lease: Lease = PostgresLease(
            settings.read_postgres_url, "projection:dead_letters"
        )
        if settings.store.read_replica_urls:
            read_router = ReadRouter(
                read_db,
                [
                    ReplicaReadDatabase(url, max_size=settings.store.pool_size)
                    for url in settings.store.read_replica_urls
                ],
                max_lag=settings.store.replica_max_lag,
            )
    else:
        read_db = SqliteReadDatabase(settings.store.sqlite_read_path)
        redis = nats = None
        listen_dsn = None
        locks = settings.store.data_dir / "locks"
        lease = FileLease(locks / "projection-readings.lock")
        batches_lease = FileLease(locks / "projection-batches.lock")
        manager_lease = FileLease(locks / f"{settings.batch.consumer}.lock")
        endpoints_lease = FileLease(locks / "projection-webhook-endpoints.lock")
        dead_letters_lease = FileLease(locks / "projection-dead-letters.lock")
    feed = LogFeed(
        store,
        poll_interval=settings.feed.poll_interval,
        listen_dsn=listen_dsn,
        read_size=settings.feed.batch_size,
    )
    # Tests isolate their Redis keys (and invalidation channel) with a prefix.
    cache: ReadCache = TwoLevelCache(
        settings.cache,
        redis,
        prefix=overrides.get("cache_prefix", ""),
        # Warming reads what Redis lacks from the primary, as the refresher does.
        load=functools.partial(read_entries, read_db),
        roles=roles,
    )
    watch = PositionWatch(lambda name: projection_position(read_db, name))
    generator: ReadingGenerator = overrides.get("generator") or BuiltinGenerator()
    worker_kwargs = {"calculate": overrides["calculate"]} if "calculate" in overrides else {}
    # Workers share the readings out through JetStream when there is one; else each follows
    # the log itself.
    work: WorkFeed = overrides.get("work_feed") or (
        JetStreamWorkFeed(nats, settings.relay, settings.worker, event_type=Reading.Requested.TOPIC)
        if nats is not None
        else LogWorkFeed(
            store,
            feed,
            settings.worker,
            event_type=Reading.Requested.TOPIC,
            batch_size=settings.feed.batch_size,
        )
    )
    worker = ReadingWorker(store, work, generator, settings.worker, **worker_kwargs)

    def runner(
        projection: Projection, lease: Lease, after_commit: Sequence[AfterCommit] = ()
    ) -> ProjectionRunner:
        return ProjectionRunner(
            projection,
            feed,
            read_db,
            watch,
            batch_size=settings.feed.batch_size,
            after_commit=after_commit,
            lease=lease,
            settings=settings.projection,
        )

    projector = runner(
        overrides.get("readings_projection") or ReadingsProjection(),
        lease,
        [CacheRefresher(cache, read_db, store.read)],
    )
    batches_projector = runner(BatchesProjection(), batches_lease)
    manager = BatchProcessManager(
        store, feed, manager_lease, settings.batch, batch_size=settings.feed.batch_size
    )
    endpoints_projector = runner(WebhookEndpointsProjection(), endpoints_lease)
    dead_letters_projector = runner(DeadLettersProjection(), dead_letters_lease)
    deliverer = _deliverer(settings, store, feed, nats, read_db, watch, overrides)
    keyring = KeyRing(store, settings.access.key_cache_ttl)
    # Every API process sees every event: through NATS on services, from the log in-process.
    live: LiveSource = (
        NatsSource(nats, settings.relay.subject_prefix)
        if nats is not None
        else LogSource(feed, settings.feed.batch_size)
    )
    background: dict[str, list[BackgroundRole]] = {
        "api": [Hub(store, live, settings.websocket, on_key_revoked=keyring.forget)],
        "worker": [worker, manager],
        "projector": [projector, batches_projector, endpoints_projector, dead_letters_projector],
        "deliver": [deliverer],
    }
    if nats is not None and settings.store.postgres_url is not None:
        # One relay per stream publishes at a time; the others are hot standbys.
        relay_lease = PostgresLease(settings.store.postgres_url, f"relay:{settings.relay.stream}")
        background["relay"] = [
            Relay(
                store,
                feed,
                nats,
                relay_lease,
                settings.relay,
                batch_size=settings.feed.batch_size,
                max_event_bytes=settings.store.max_event_bytes,
            )
        ]
    return Container(
        settings=settings,
        store=store,
        read_db=read_db,
        watch=watch,
        feed=feed,
        keyring=keyring,
        generator=generator,
        cache=cache,
        redis=redis,
        nats=nats,
        read_router=read_router,
        background=background,
        roles=roles,
        webhook_guard=deliverer.guard,
        secret_box=deliverer.box,
    )


def _deliverer(  # noqa: PLR0917 - the collaborators bootstrap has made
    settings: Settings,
    store: EventStore,
    feed: LogFeed,
    nats: NatsConnection | None,
    read_db: ReadDatabase,
    watch: PositionWatch,
    overrides: dict[str, Any],
) -> WebhookDeliverer:
    hooks = settings.webhooks
    box = (
        SecretBox(hooks.secret_key)
        if hooks.secret_key
        else SecretBox.from_key_file(
            settings.store.data_dir / "webhook-secret.key",
            shared=settings.profile is Profile.SERVICES,
        )
    )
    guard = TargetGuard(
        hooks, **({"resolver": overrides["resolver"]} if "resolver" in overrides else {})
    )
    # Every event, shared among deliverers through their own durable consumer (services),
    # or followed from the log with a tracked position (embedded).
    intake = WorkerSettings(consumer=hooks.consumer, ack_wait=60.0, max_deliver=-1)
    work: WorkFeed = (
        JetStreamWorkFeed(nats, settings.relay, intake, event_type=None)
        if nats is not None
        else LogWorkFeed(store, feed, intake, event_type=None, batch_size=settings.feed.batch_size)
    )
    return WebhookDeliverer(
        store,
        work,
        DeliveryLog(read_db),
        watch,
        box,
        guard,
        hooks,
        rate_storage=rate_storage(settings.cache.redis_url, overrides.get("cache_prefix", "")),
        batch_size=settings.feed.batch_size,
    )
