"""Configuration: one Struct per concern, read once from ``ALMANAC_*`` variables.

``Settings.from_env()`` validates every variable and raises ``SettingsError`` listing all
of the bad ones together, so a misconfigured deployment is fixed in one round trip.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

T = TypeVar("T")


class Profile(str, Enum):
    """Which engines back the ports (DESIGN.md, "Profiles")."""

    EMBEDDED = "embedded"
    SERVICES = "services"


class SettingsError(Exception):
    """Every bad variable, each with the reason."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {var}: {why}" for var, why in problems)
        super().__init__(f"Invalid configuration:\n{lines}")


class StoreSettings(msgspec.Struct, frozen=True):
    """Where the event store and the read models live."""

    postgres_url: str | None = None
    read_postgres_url: str | None = None
    # Hot standbys of the read database; queries use one that is fresh enough.
    read_replica_urls: tuple[str, ...] = ()
    # A replica further behind the primary's projection positions than this is skipped.
    replica_max_lag: int = 1000
    data_dir: Path = Path("var")
    writer_max_batch: int = 256
    pool_size: int = 8
    # The largest event (its stored JSON) the store accepts. The relay publishes each event
    # as one NATS message, and NATS refuses one over the server's max_payload (1 MiB by
    # default), so a bigger event would stop the relay at it: it is refused before it is
    # stored instead. The default leaves room under 1 MiB for the envelope and headers.
    max_event_bytes: int = 900 * 1024

    @property
    def sqlite_events_path(self) -> Path:
        return self.data_dir / "events.sqlite3"

    @property
    def sqlite_read_path(self) -> Path:
        return self.data_dir / "read.sqlite3"


class CacheSettings(msgspec.Struct, frozen=True):
    redis_url: str | None = None
    # The in-process L1: bounded, and short-lived so a missed invalidation heals quickly.
    l1_size: int = 10_000
    l1_ttl: float = 5.0
    # Redis L2 entries expire too, so Redis never holds more than the hot set.
    l2_ttl: float = 3600.0
    warm_keys: int = 500


class ProjectionSettings(msgspec.Struct, frozen=True):
    # A failing event is retried this many times with backoff, then parked.
    attempts: int = 5
    # How often a standby tries to take over an inactive projection.
    standby_interval: float = 1.0


class FeedSettings(msgspec.Struct, frozen=True):
    nats_url: str | None = None
    # How often a follower of the log looks for new events when nothing woke it.
    poll_interval: float = 0.5
    batch_size: int = 500


class RelaySettings(msgspec.Struct, frozen=True):
    """The JetStream stream the relay publishes every stored event to (services profile)."""

    # Configurable so that tests (and several installations on one NATS) keep to themselves.
    stream: str = "ALMANAC_EVENTS"
    subject_prefix: str = "almanac.events"
    # Limits retention: the event store keeps the history, the stream a recent window of it.
    # 0 means no limit (NATS's own convention for max_age; -1 for max_bytes).
    max_age: float = 30 * 86400.0
    max_bytes: int = -1
    # Republishing within this window is dropped by NATS (Nats-Msg-Id = position); beyond it
    # the relay's own resume point (the stream's last position) keeps publishing exactly once.
    duplicate_window: float = 120.0
    replicas: int = 1
    # Publishes in flight before the relay waits for acknowledgements.
    window: int = 500
    # A publish not acknowledged within this long counts as failed: the relay resynchronises.
    ack_timeout: float = 5.0
    # How often a standby tries the lease, and the active relay checks it still holds it.
    standby_interval: float = 1.0


class HttpSettings(msgspec.Struct, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    # How long a query with ?min_position= waits for the read model before giving up.
    min_position_timeout: float = 2.0


class WorkerSettings(msgspec.Struct, frozen=True):
    """The reading worker, and the work feed it takes ``reading.requested`` from."""

    concurrency: int = 8
    attempts: int = 3
    # The durable JetStream consumer every worker process shares (services), and the name
    # of the worker's tracked position in the log (embedded).
    consumer: str = "reading-worker"
    # A reading handed to a worker and neither acknowledged nor handed back within this long
    # goes to another worker: how soon the work of a killed worker is taken up.
    ack_wait: float = 30.0
    # Deliveries of one reading before it is given up on (-1: never): it then fails as
    # exhausted, with a dead letter. Each worker failure hands a reading back with a growing
    # delay, so the default outlasts a long outage, yet a reading that kills every worker
    # that takes it does not do so forever.
    max_deliver: int = 100


class BatchSettings(msgspec.Struct, frozen=True):
    """Batches: how the process manager releases their items to the workers."""

    # Readings of one owner's batches waiting for or held by workers at once. Items are
    # released as earlier ones finish, so another owner's reading queues behind at most
    # this many of them, however large the batch.
    window: int = 32
    # The process manager's tracked position in the log, and the name of its lease.
    consumer: str = "batch-manager"
    # How often a standby process manager tries the lease.
    standby_interval: float = 1.0


class LogSettings(msgspec.Struct, frozen=True):
    level: str = "INFO"
    format: str = "json"


class AccessSettings(msgspec.Struct, frozen=True):
    # On first start the API creates an admin key and prints it once.
    bootstrap_admin: bool = True
    key_cache_ttl: float = 30.0


class WebSocketSettings(msgspec.Struct, frozen=True):
    # Frames a connection may have waiting; a client that falls further behind is closed.
    queue_size: int = 1000
    # Seconds between heartbeat frames on a quiet connection.
    heartbeat: float = 15.0
    # How far back (in positions) a reconnecting client may resume; older is "too old".
    max_replay: int = 10_000
    # Seconds a client has to authenticate by its first message.
    auth_timeout: float = 5.0
    # Topics one connection may hold at once: every event is matched against each of them
    # on the hub's loop, so they are bounded as the queue is.
    max_topics: int = 100


# Seconds after a failed attempt before the next one (Svix's schedule); then it has failed.
RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class WebhookSettings(msgspec.Struct, frozen=True):
    """Webhook endpoints and the deliverer."""

    # A Fernet key (urlsafe base64 of 32 bytes) that encrypts endpoint secrets at rest. When
    # unset, a key file under the data directory is made and used (fine for one machine).
    secret_key: str | None = None
    # Networks a webhook URL may resolve into although they are private or reserved.
    allowed_networks: tuple[str, ...] = ()
    allow_http: bool = False
    # An attempt that has no 2xx within this long has failed.
    timeout: float = 15.0
    retry_schedule: tuple[float, ...] = RETRY_SCHEDULE
    # Multiplies every delay of the schedule: tests compress hours into moments with it.
    retry_scale: float = 1.0
    # How long the secret replaced by a rotation still signs deliveries too.
    rotation_overlap: float = 86400.0
    # An endpoint failing without any success for this long is disabled.
    disable_after: float = 5 * 86400.0
    # Consecutive failures that open an endpoint's circuit breaker, and how long it stays open.
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    # Attempts in flight at once: in all, and to any one endpoint.
    concurrency: int = 64
    per_endpoint_concurrency: int = 4
    # The durable JetStream consumer every deliverer shares (services), and the name of the
    # deliverer's tracked position in the log (embedded).
    consumer: str = "webhook-deliverer"
    # How often the deliverer looks for attempts that fell due when nothing woke it.
    poll_interval: float = 0.5


class Settings(msgspec.Struct, frozen=True):
    store: StoreSettings = StoreSettings()
    cache: CacheSettings = CacheSettings()
    feed: FeedSettings = FeedSettings()
    http: HttpSettings = HttpSettings()
    worker: WorkerSettings = WorkerSettings()
    log: LogSettings = LogSettings()
    access: AccessSettings = AccessSettings()
    projection: ProjectionSettings = ProjectionSettings()
    websocket: WebSocketSettings = WebSocketSettings()
    relay: RelaySettings = RelaySettings()
    batch: BatchSettings = BatchSettings()
    webhooks: WebhookSettings = WebhookSettings()

    @property
    def profile(self) -> Profile:
        return Profile.SERVICES if self.store.postgres_url else Profile.EMBEDDED

    @property
    def read_postgres_url(self) -> str | None:
        """The read database: configured, or ``<event db>_read`` on the event store's server."""
        if self.store.read_postgres_url or not self.store.postgres_url:
            return self.store.read_postgres_url
        return derive_read_url(self.store.postgres_url)

    def locations(self) -> dict[str, str]:
        """Where data lives, for the startup log (passwords masked)."""
        if self.profile is Profile.EMBEDDED:
            return {
                "event_store": str(self.store.sqlite_events_path),
                "read_models": str(self.store.sqlite_read_path),
            }
        return {
            "event_store": mask_password(self.store.postgres_url or ""),
            "read_models": mask_password(self.read_postgres_url or ""),
            "redis": mask_password(self.cache.redis_url or ""),
            "nats": mask_password(self.feed.nats_url or ""),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _Reader(os.environ if env is None else env).settings()


def derive_read_url(event_url: str) -> str:
    parts = urlsplit(event_url)
    dbname = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path=f"/{dbname}_read"))


def mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_BLANKS = " \t\r\n\f\v"
_SERVICE_VARS = ("ALMANAC_POSTGRES_URL", "ALMANAC_REDIS_URL", "ALMANAC_NATS_URL")
_SCHEMES = {
    "ALMANAC_POSTGRES_URL": ("postgresql", "postgres"),
    "ALMANAC_READ_POSTGRES_URL": ("postgresql", "postgres"),
    "ALMANAC_REDIS_URL": ("redis", "rediss", "unix"),
    "ALMANAC_NATS_URL": ("nats", "tls", "ws", "wss"),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class _Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[tuple[str, str]] = []

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.env.get(name)
        # Only ASCII blanks are trimmed: str.strip() would also eat control characters
        # (``"0\x1f"`` would pass for a port), which int() and float() refuse.
        value = None if raw is None else raw.strip(_BLANKS)
        if not value:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problems.append((name, str(exc)))
            return default

    def url(self, name: str) -> str | None:
        raw = self.env.get(name, "").strip()
        if not raw:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in _SCHEMES[name]:
            allowed = ", ".join(f"{s}://" for s in _SCHEMES[name])
            self.problems.append(
                (name, f"expected a URL starting with {allowed}, got {mask_password(raw)!r}")
            )
            return None
        if parts.scheme != "unix" and not parts.hostname:
            self.problems.append((name, f"the URL {mask_password(raw)!r} names no host"))
            return None
        try:
            _ = parts.port
        except ValueError:
            self.problems.append((name, f"the URL {mask_password(raw)!r} has an invalid port"))
            return None
        return raw

    def url_list(self, name: str) -> tuple[str, ...]:
        raw = self.env.get(name, "").strip()
        if not raw:
            return ()
        urls = []
        for item in (part.strip() for part in raw.split(",")):
            parts = urlsplit(item)
            if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
                self.problems.append(
                    (
                        name,
                        f"expected comma-separated postgresql:// URLs, got {mask_password(item)!r}",
                    )
                )
                continue
            urls.append(item)
        return tuple(urls)

    def settings(self) -> Settings:
        postgres_url = self.url("ALMANAC_POSTGRES_URL")
        read_url = self.url("ALMANAC_READ_POSTGRES_URL")
        replica_urls = self.url_list("ALMANAC_READ_REPLICA_URLS")
        redis_url = self.url("ALMANAC_REDIS_URL")
        nats_url = self.url("ALMANAC_NATS_URL")
        present = [v for v in _SERVICE_VARS if self.env.get(v, "").strip()]
        if present and len(present) < len(_SERVICE_VARS):
            missing = ", ".join(v for v in _SERVICE_VARS if v not in present)
            for var in _SERVICE_VARS:
                if var not in present:
                    self.problems.append(
                        (
                            var,
                            (
                                f"missing: the services profile needs all of "
                                f"{', '.join(_SERVICE_VARS)} ({', '.join(present)} set, "
                                f"{missing} not); set none of them for the embedded profile"
                            ),
                        )
                    )
        if replica_urls and not present:
            self.problems.append(
                ("ALMANAC_READ_REPLICA_URLS", "only used with ALMANAC_POSTGRES_URL (services)")
            )
        if read_url and not present:
            self.problems.append(
                ("ALMANAC_READ_POSTGRES_URL", "only used with ALMANAC_POSTGRES_URL (services)")
            )

        store = StoreSettings(
            postgres_url=postgres_url,
            read_postgres_url=read_url,
            data_dir=self.get("ALMANAC_DATA_DIR", Path, Path("var")),
            writer_max_batch=self.get("ALMANAC_WRITER_MAX_BATCH", _int_between(1, 10_000), 256),
            pool_size=self.get("ALMANAC_POOL_SIZE", _int_between(1, 200), 8),
            # 64 MiB is the most NATS allows for max_payload.
            max_event_bytes=self.get(
                "ALMANAC_MAX_EVENT_BYTES",
                _int_between(64 * 1024, 64 * 1024 * 1024),
                StoreSettings().max_event_bytes,
            ),
            read_replica_urls=replica_urls,
            replica_max_lag=self.get("ALMANAC_REPLICA_MAX_LAG", _int_between(0, 10**9), 1000),
        )
        cache = CacheSettings(
            redis_url=redis_url,
            l1_size=self.get("ALMANAC_CACHE_L1_SIZE", _int_between(0, 10**7), 10_000),
            l1_ttl=self.get("ALMANAC_CACHE_L1_TTL", _float_between(0, 3600), 5.0),
            l2_ttl=self.get("ALMANAC_CACHE_L2_TTL", _float_between(1, 86400 * 30), 3600.0),
            warm_keys=self.get("ALMANAC_CACHE_WARM_KEYS", _int_between(0, 100_000), 500),
        )
        projection = ProjectionSettings(
            attempts=self.get("ALMANAC_PROJECTION_ATTEMPTS", _int_between(1, 100), 5),
            standby_interval=self.get(
                "ALMANAC_PROJECTION_STANDBY_INTERVAL", _float_between(0.05, 60), 1.0
            ),
        )
        feed = FeedSettings(
            nats_url=nats_url,
            poll_interval=self.get("ALMANAC_FEED_POLL_INTERVAL", _float_between(0.01, 60), 0.5),
            batch_size=self.get("ALMANAC_FEED_BATCH_SIZE", _int_between(1, 100_000), 500),
        )
        relay = self.relay()
        http = HttpSettings(
            host=self.get("ALMANAC_HOST", str, "127.0.0.1"),
            port=self.get("ALMANAC_PORT", _int_between(0, 65535), 8000),
            public_url=self.get("ALMANAC_PUBLIC_URL", str, None),
            min_position_timeout=self.get(
                "ALMANAC_MIN_POSITION_TIMEOUT", _float_between(0, 60), 2.0
            ),
        )
        worker = self.worker()
        log = LogSettings(
            level=self.get(
                "ALMANAC_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"
            ),
            format=self.get("ALMANAC_LOG_FORMAT", _choice("json", "console"), "json"),
        )
        access = AccessSettings(
            bootstrap_admin=self.get("ALMANAC_BOOTSTRAP_ADMIN", _bool, True),
            key_cache_ttl=self.get("ALMANAC_KEY_CACHE_TTL", _float_between(0, 3600), 30.0),
        )
        websocket = WebSocketSettings(
            queue_size=self.get("ALMANAC_WS_QUEUE_SIZE", _int_between(1, 1_000_000), 1000),
            heartbeat=self.get("ALMANAC_WS_HEARTBEAT", _float_between(0.05, 3600), 15.0),
            max_replay=self.get("ALMANAC_WS_MAX_REPLAY", _int_between(0, 10**9), 10_000),
            auth_timeout=self.get("ALMANAC_WS_AUTH_TIMEOUT", _float_between(0.1, 600), 5.0),
            max_topics=self.get("ALMANAC_WS_MAX_TOPICS", _int_between(1, 100_000), 100),
        )
        batch = BatchSettings(
            window=self.get("ALMANAC_BATCH_WINDOW", _int_between(1, 10_000), 32),
            standby_interval=self.get(
                "ALMANAC_BATCH_STANDBY_INTERVAL", _float_between(0.05, 60), 1.0
            ),
        )
        webhooks = self.webhooks()
        if self.problems:
            raise SettingsError(self.problems)
        return Settings(
            store=store,
            cache=cache,
            projection=projection,
            feed=feed,
            http=http,
            worker=worker,
            log=log,
            access=access,
            websocket=websocket,
            relay=relay,
            batch=batch,
            webhooks=webhooks,
        )

    def webhooks(self) -> WebhookSettings:
        default = WebhookSettings()
        return WebhookSettings(
            secret_key=self.get("ALMANAC_WEBHOOK_SECRET_KEY", _fernet_key, None),
            allowed_networks=self.get("ALMANAC_WEBHOOK_ALLOWED_NETWORKS", _networks, ()),
            allow_http=self.get("ALMANAC_WEBHOOK_ALLOW_HTTP", _bool, False),
            timeout=self.get("ALMANAC_WEBHOOK_TIMEOUT", _float_between(0.1, 300), default.timeout),
            retry_scale=self.get(
                "ALMANAC_WEBHOOK_RETRY_SCALE", _float_between(0.0001, 100), default.retry_scale
            ),
            rotation_overlap=self.get(
                "ALMANAC_WEBHOOK_ROTATION_OVERLAP",
                _float_between(0, 30 * 86400),
                default.rotation_overlap,
            ),
            disable_after=self.get(
                "ALMANAC_WEBHOOK_DISABLE_AFTER",
                _float_between(1, 365 * 86400),
                default.disable_after,
            ),
            breaker_threshold=self.get(
                "ALMANAC_WEBHOOK_BREAKER_THRESHOLD",
                _int_between(1, 10_000),
                default.breaker_threshold,
            ),
            breaker_cooldown=self.get(
                "ALMANAC_WEBHOOK_BREAKER_COOLDOWN",
                _float_between(0.01, 86400),
                default.breaker_cooldown,
            ),
            concurrency=self.get(
                "ALMANAC_WEBHOOK_CONCURRENCY", _int_between(1, 10_000), default.concurrency
            ),
            per_endpoint_concurrency=self.get(
                "ALMANAC_WEBHOOK_ENDPOINT_CONCURRENCY",
                _int_between(1, 1000),
                default.per_endpoint_concurrency,
            ),
            consumer=self.get("ALMANAC_WEBHOOK_CONSUMER", _consumer_name, default.consumer),
            poll_interval=self.get(
                "ALMANAC_WEBHOOK_POLL_INTERVAL", _float_between(0.01, 60), default.poll_interval
            ),
        )

    def worker(self) -> WorkerSettings:
        default = WorkerSettings()
        return WorkerSettings(
            concurrency=self.get(
                "ALMANAC_WORKER_CONCURRENCY", _int_between(1, 1024), default.concurrency
            ),
            attempts=self.get("ALMANAC_WORKER_ATTEMPTS", _int_between(1, 100), default.attempts),
            consumer=self.get("ALMANAC_WORKER_CONSUMER", _consumer_name, default.consumer),
            ack_wait=self.get(
                "ALMANAC_WORKER_ACK_WAIT", _float_between(0.5, 86400), default.ack_wait
            ),
            max_deliver=self.get("ALMANAC_WORKER_MAX_DELIVER", _max_deliver, default.max_deliver),
        )

    def relay(self) -> RelaySettings:
        default = RelaySettings()
        max_age = self.get(
            "ALMANAC_NATS_STREAM_MAX_AGE", _float_between(0, 10 * 365 * 86400), default.max_age
        )
        duplicate_window = self.get(
            "ALMANAC_NATS_DUPLICATE_WINDOW", _float_between(0.1, 86400), default.duplicate_window
        )
        if max_age and duplicate_window > max_age:
            self.problems.append(
                (
                    "ALMANAC_NATS_DUPLICATE_WINDOW",
                    (
                        f"must not exceed ALMANAC_NATS_STREAM_MAX_AGE ({max_age:g} s), "
                        f"got {duplicate_window:g}"
                    ),
                )
            )
        return RelaySettings(
            stream=self.get("ALMANAC_NATS_STREAM", _stream_name, default.stream),
            subject_prefix=self.get(
                "ALMANAC_NATS_SUBJECT_PREFIX", _subject_prefix, default.subject_prefix
            ),
            max_age=max_age,
            max_bytes=self.get("ALMANAC_NATS_STREAM_MAX_BYTES", _max_bytes, default.max_bytes),
            duplicate_window=duplicate_window,
            replicas=self.get("ALMANAC_NATS_STREAM_REPLICAS", _int_between(1, 5), default.replicas),
            window=self.get("ALMANAC_RELAY_WINDOW", _int_between(1, 10_000), default.window),
            ack_timeout=self.get(
                "ALMANAC_RELAY_ACK_TIMEOUT", _float_between(0.1, 300), default.ack_timeout
            ),
            standby_interval=self.get(
                "ALMANAC_RELAY_STANDBY_INTERVAL", _float_between(0.05, 60), default.standby_interval
            ),
        )


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value}")
        return value

    return parse


def _float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        for choice in choices:
            if raw.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")

    return parse


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _stream_name(raw: str) -> str:
    if not _STREAM_NAME.fullmatch(raw):
        raise ValueError(
            f"expected a JetStream stream name (letters, digits, _ and -), got {raw!r}"
        )
    return raw


def _subject_prefix(raw: str) -> str:
    tokens = raw.split(".")
    if not all(_SUBJECT_TOKEN.fullmatch(token) for token in tokens):
        raise ValueError(
            "expected dot-separated subject tokens of letters, digits, _ and - "
            f"(no wildcards), got {raw!r}"
        )
    return raw


def _consumer_name(raw: str) -> str:
    # JetStream durable names allow no dots, wildcards or spaces; the same rule keeps the
    # tracking name on the embedded profile portable.
    if not _STREAM_NAME.fullmatch(raw):
        raise ValueError(
            f"expected a consumer name (letters, digits, _ and -, at most 200), got {raw!r}"
        )
    return raw


def _max_deliver(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number of deliveries, got {raw!r}") from None
    if value != -1 and not 1 <= value <= 1_000_000:
        raise ValueError(f"expected -1 (no limit) or a number from 1 to 1000000, got {value}")
    return value


def _max_bytes(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number of bytes, got {raw!r}") from None
    if value != -1 and not 1024 * 1024 <= value <= 2**62:
        raise ValueError(f"expected -1 (no limit) or at least 1048576 bytes, got {value}")
    return value


def _fernet_key(raw: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(raw.encode())
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise ValueError(
            "expected a Fernet key: urlsafe base64 of 32 random bytes (make one with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
            ".decode())'`)"
        )
    return raw


def _networks(raw: str) -> tuple[str, ...]:
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(
                f"expected comma-separated networks such as 10.0.0.0/8, got {item!r}"
            ) from None
    return tuple(networks)


def _bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {raw!r}")
