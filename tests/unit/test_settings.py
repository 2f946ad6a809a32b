"""Settings read from ``ALMANAC_*`` variables: profiles, validation and what is shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from almanac.settings import Profile, Settings, SettingsError

SERVICES_ENV = {
    "ALMANAC_POSTGRES_URL": "postgresql://almanac:pg-s3cret@db.internal:5433/almanac",
    "ALMANAC_REDIS_URL": "redis://:redis-s3cret@cache.internal:6379/0",
    "ALMANAC_NATS_URL": "nats://bus:nats-s3cret@bus.internal:4222",
}
SERVICE_VARS = tuple(SERVICES_ENV)


def problem_vars(error: SettingsError) -> list[str]:
    return [var for var, _why in error.problems]


def test_no_variables_give_the_embedded_profile_with_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.profile is Profile.EMBEDDED
    assert settings == Settings()
    assert settings.store.data_dir == Path("var")
    assert settings.read_postgres_url is None
    assert (settings.cache.redis_url, settings.feed.nats_url) == (None, None)


def test_blank_variables_count_as_unset() -> None:
    env = dict.fromkeys([*SERVICE_VARS, "ALMANAC_PORT", "ALMANAC_LOG_LEVEL"], "  ")
    assert Settings.from_env(env) == Settings()


def test_all_three_service_urls_give_the_services_profile() -> None:
    settings = Settings.from_env(SERVICES_ENV)
    assert settings.profile is Profile.SERVICES
    assert settings.store.postgres_url == SERVICES_ENV["ALMANAC_POSTGRES_URL"]
    assert settings.cache.redis_url == SERVICES_ENV["ALMANAC_REDIS_URL"]
    assert settings.feed.nats_url == SERVICES_ENV["ALMANAC_NATS_URL"]


@pytest.mark.parametrize("given_vars", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)])
def test_a_partial_services_set_names_each_missing_variable(given_vars: tuple[int, ...]) -> None:
    env = {SERVICE_VARS[i]: SERVICES_ENV[SERVICE_VARS[i]] for i in given_vars}
    missing = [var for var in SERVICE_VARS if var not in env]
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == missing
    for var in missing:
        assert var in str(caught.value)


def test_reports_every_bad_variable_at_once() -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_POSTGRES_URL": "mysql://db.internal/almanac",
        "ALMANAC_PORT": "eighty",
        "ALMANAC_LOG_LEVEL": "LOUD",
        "ALMANAC_BOOTSTRAP_ADMIN": "maybe",
        "ALMANAC_WORKER_CONCURRENCY": "0",
    }
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    bad = {
        "ALMANAC_POSTGRES_URL": "postgresql://",
        "ALMANAC_PORT": "'eighty'",
        "ALMANAC_LOG_LEVEL": "'LOUD'",
        "ALMANAC_BOOTSTRAP_ADMIN": "'maybe'",
        "ALMANAC_WORKER_CONCURRENCY": "from 1 to 1024",
    }
    assert sorted(problem_vars(caught.value)) == sorted(bad)
    reasons = dict(caught.value.problems)
    for var, hint in bad.items():
        assert hint in reasons[var], (var, reasons[var])
        assert var in str(caught.value)


def test_a_bad_service_url_is_not_also_reported_as_missing() -> None:
    env = {**SERVICES_ENV, "ALMANAC_REDIS_URL": "http://cache.internal:6379"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == ["ALMANAC_REDIS_URL"]


def test_a_url_without_a_host_is_refused() -> None:
    env = {**SERVICES_ENV, "ALMANAC_POSTGRES_URL": "postgresql:///almanac"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == ["ALMANAC_POSTGRES_URL"]
    assert "names no host" in caught.value.problems[0][1]


def test_a_unix_socket_redis_url_needs_no_host() -> None:
    env = {**SERVICES_ENV, "ALMANAC_REDIS_URL": "unix:///run/redis.sock"}
    assert Settings.from_env(env).cache.redis_url == "unix:///run/redis.sock"


def test_a_read_url_without_the_services_profile_is_refused() -> None:
    env = {"ALMANAC_READ_POSTGRES_URL": "postgresql://db.internal/reads"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == ["ALMANAC_READ_POSTGRES_URL"]


def test_the_read_database_defaults_to_the_event_database_name_with_read_suffix() -> None:
    settings = Settings.from_env(SERVICES_ENV)
    assert settings.read_postgres_url == (
        "postgresql://almanac:pg-s3cret@db.internal:5433/almanac_read"
    )


def test_the_derived_read_url_keeps_the_query_string() -> None:
    env = {**SERVICES_ENV, "ALMANAC_POSTGRES_URL": "postgresql://db.internal/ev?sslmode=require"}
    settings = Settings.from_env(env)
    assert settings.read_postgres_url == "postgresql://db.internal/ev_read?sslmode=require"


def test_an_event_url_without_a_database_reads_from_postgres_read() -> None:
    env = {**SERVICES_ENV, "ALMANAC_POSTGRES_URL": "postgresql://db.internal:5432"}
    assert Settings.from_env(env).read_postgres_url == "postgresql://db.internal:5432/postgres_read"


def test_an_explicit_read_url_wins_over_the_derived_one() -> None:
    env = {**SERVICES_ENV, "ALMANAC_READ_POSTGRES_URL": "postgresql://replica.internal/reads"}
    assert Settings.from_env(env).read_postgres_url == "postgresql://replica.internal/reads"


def test_locations_mask_every_password() -> None:
    env = {**SERVICES_ENV, "ALMANAC_READ_POSTGRES_URL": "postgresql://r:read-s3cret@replica/reads"}
    locations = Settings.from_env(env).locations()
    assert set(locations) == {"event_store", "read_models", "redis", "nats"}
    shown = " ".join(locations.values())
    assert "s3cret" not in shown
    assert locations["event_store"] == "postgresql://almanac:***@db.internal:5433/almanac"
    assert locations["read_models"] == "postgresql://r:***@replica/reads"
    assert locations["redis"] == "redis://:***@cache.internal:6379/0"
    assert locations["nats"] == "nats://bus:***@bus.internal:4222"


def test_the_derived_read_location_is_masked_too() -> None:
    locations = Settings.from_env(SERVICES_ENV).locations()
    assert locations["read_models"] == "postgresql://almanac:***@db.internal:5433/almanac_read"


@given(
    password=st.text(
        alphabet=st.characters(codec="ascii", categories=["L", "N"], include_characters="-._~!$"),
        min_size=12,
        max_size=40,
    )
)
def test_locations_never_show_a_password(password: str) -> None:
    env = {
        "ALMANAC_POSTGRES_URL": f"postgresql://user:{password}@db.internal/almanac",
        "ALMANAC_REDIS_URL": f"redis://:{password}@cache.internal/0",
        "ALMANAC_NATS_URL": f"nats://user:{password}@bus.internal:4222",
    }
    for where in Settings.from_env(env).locations().values():
        assert password not in where
        assert ":***@" in where


def test_embedded_locations_are_the_two_sqlite_files() -> None:
    locations = Settings.from_env({"ALMANAC_DATA_DIR": "/srv/almanac"}).locations()
    assert locations == {
        "event_store": "/srv/almanac/events.sqlite3",
        "read_models": "/srv/almanac/read.sqlite3",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[("1", True), ("TRUE", True), ("yes", True), ("On", True)],
        *[("0", False), ("false", False), ("NO", False), ("off", False)],
    ],
)
def test_bools_accept_the_usual_spellings(raw: str, expected: bool) -> None:
    settings = Settings.from_env({"ALMANAC_BOOTSTRAP_ADMIN": raw})
    assert settings.access.bootstrap_admin is expected


def test_choices_are_case_insensitive_and_stored_canonically() -> None:
    settings = Settings.from_env({"ALMANAC_LOG_LEVEL": "warning", "ALMANAC_LOG_FORMAT": "CONSOLE"})
    assert settings.log.level == "WARNING"
    assert settings.log.format == "console"


def test_numbers_are_parsed_with_surrounding_space_trimmed() -> None:
    settings = Settings.from_env(
        {"ALMANAC_FEED_POLL_INTERVAL": " 0.05 ", "ALMANAC_POOL_SIZE": "\t12\n"}
    )
    assert settings.feed.poll_interval == 0.05
    assert settings.store.pool_size == 12


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "61"])
def test_a_poll_interval_outside_its_range_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ALMANAC_FEED_POLL_INTERVAL": raw})
    assert problem_vars(caught.value) == ["ALMANAC_FEED_POLL_INTERVAL"]


@given(
    number=st.one_of(
        st.integers(min_value=-5, max_value=70_000),
        st.integers(),
    ),
    spelling=st.sampled_from(["{}", "+{}", " {} ", "00{}"]),
)
def test_the_port_parser_accepts_exactly_0_to_65535(number: int, spelling: str) -> None:
    raw = spelling.format(number) if number >= 0 else str(number)
    if 0 <= number <= 65535:
        assert Settings.from_env({"ALMANAC_PORT": raw}).http.port == number
    else:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"ALMANAC_PORT": raw})
        assert problem_vars(caught.value) == ["ALMANAC_PORT"]
        assert "from 0 to 65535" in caught.value.problems[0][1]


@given(raw=st.text(max_size=8))
def test_a_port_that_is_not_a_whole_number_is_refused(raw: str) -> None:
    try:
        int(raw)
    except ValueError:
        pass
    else:
        reject()  # a number: the test above covers it
    if not raw.strip(" \t\r\n\f\v"):  # blank (ASCII): unset, so the default
        assert Settings.from_env({"ALMANAC_PORT": raw}).http.port == 8000
        return
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ALMANAC_PORT": raw})
    assert problem_vars(caught.value) == ["ALMANAC_PORT"]
    assert "whole number" in caught.value.problems[0][1]


@pytest.mark.parametrize("port", ["five", "99999", "-1"])
def test_a_service_url_with_a_bad_port_is_refused_with_the_rest(port: str) -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_NATS_URL": f"nats://bus:nats-s3cret@bus.internal:{port}",
        "ALMANAC_LOG_LEVEL": "LOUD",
    }
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == ["ALMANAC_NATS_URL", "ALMANAC_LOG_LEVEL"]
    assert "invalid port" in caught.value.problems[0][1]
    assert "nats-s3cret" not in str(caught.value)


def test_errors_never_show_a_password() -> None:
    env = {**SERVICES_ENV, "ALMANAC_POSTGRES_URL": "postgresql+psycopg://u:pg-s3cret@db/almanac"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert problem_vars(caught.value) == ["ALMANAC_POSTGRES_URL"]
    assert "pg-s3cret" not in str(caught.value)


def test_the_relay_stream_defaults_to_almanac_events() -> None:
    relay = Settings.from_env(SERVICES_ENV).relay
    assert (relay.stream, relay.subject_prefix) == ("ALMANAC_EVENTS", "almanac.events")
    assert relay.duplicate_window <= relay.max_age


def test_the_relay_stream_and_its_limits_are_configurable() -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_NATS_STREAM": "TENANT_7_EVENTS",
        "ALMANAC_NATS_SUBJECT_PREFIX": "tenant-7.events",
        "ALMANAC_NATS_STREAM_MAX_AGE": "86400",
        "ALMANAC_NATS_STREAM_MAX_BYTES": "1073741824",
        "ALMANAC_NATS_DUPLICATE_WINDOW": "30",
        "ALMANAC_NATS_STREAM_REPLICAS": "3",
        "ALMANAC_RELAY_WINDOW": "1000",
        "ALMANAC_RELAY_ACK_TIMEOUT": "2.5",
        "ALMANAC_RELAY_STANDBY_INTERVAL": "0.5",
    }
    relay = Settings.from_env(env).relay
    assert relay.stream == "TENANT_7_EVENTS"
    assert relay.subject_prefix == "tenant-7.events"
    assert (relay.max_age, relay.max_bytes, relay.duplicate_window) == (86400, 2**30, 30)
    assert (relay.replicas, relay.window, relay.ack_timeout) == (3, 1000, 2.5)
    assert relay.standby_interval == 0.5


def test_reports_every_bad_relay_variable_at_once() -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_NATS_STREAM": "almanac.events",
        "ALMANAC_NATS_SUBJECT_PREFIX": "almanac.*",
        "ALMANAC_NATS_STREAM_MAX_AGE": "60",
        "ALMANAC_NATS_DUPLICATE_WINDOW": "120",
        "ALMANAC_NATS_STREAM_MAX_BYTES": "1000",
        "ALMANAC_RELAY_WINDOW": "0",
    }
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    reasons = dict(caught.value.problems)
    assert sorted(reasons) == [
        "ALMANAC_NATS_DUPLICATE_WINDOW",
        "ALMANAC_NATS_STREAM",
        "ALMANAC_NATS_STREAM_MAX_BYTES",
        "ALMANAC_NATS_SUBJECT_PREFIX",
        "ALMANAC_RELAY_WINDOW",
    ]
    assert "ALMANAC_NATS_STREAM_MAX_AGE (60 s)" in reasons["ALMANAC_NATS_DUPLICATE_WINDOW"]
    assert "no wildcards" in reasons["ALMANAC_NATS_SUBJECT_PREFIX"]


def test_the_worker_consumer_defaults_to_reading_worker() -> None:
    worker = Settings.from_env(SERVICES_ENV).worker
    assert worker.consumer == "reading-worker"
    assert (worker.ack_wait, worker.max_deliver) == (30.0, 100)


def test_the_worker_consumer_and_its_redelivery_are_configurable() -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_WORKER_CONSUMER": "readings_eu-1",
        "ALMANAC_WORKER_ACK_WAIT": "2.5",
        "ALMANAC_WORKER_MAX_DELIVER": "-1",
    }
    worker = Settings.from_env(env).worker
    assert (worker.consumer, worker.ack_wait, worker.max_deliver) == ("readings_eu-1", 2.5, -1)


def test_reports_every_bad_worker_variable_at_once() -> None:
    env = {
        **SERVICES_ENV,
        "ALMANAC_WORKER_CONSUMER": "reading.worker",
        "ALMANAC_WORKER_ACK_WAIT": "0",
        "ALMANAC_WORKER_MAX_DELIVER": "0",
        "ALMANAC_WORKER_CONCURRENCY": "lots",
    }
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    reasons = dict(caught.value.problems)
    assert sorted(reasons) == [
        "ALMANAC_WORKER_ACK_WAIT",
        "ALMANAC_WORKER_CONCURRENCY",
        "ALMANAC_WORKER_CONSUMER",
        "ALMANAC_WORKER_MAX_DELIVER",
    ]
    assert "consumer name" in reasons["ALMANAC_WORKER_CONSUMER"]
    assert "-1 (no limit)" in reasons["ALMANAC_WORKER_MAX_DELIVER"]


def test_webhooks_default_to_https_only_and_the_svix_schedule() -> None:
    webhooks = Settings.from_env({}).webhooks
    assert webhooks.allow_http is False
    assert webhooks.allowed_networks == ()
    assert webhooks.retry_schedule == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    assert (webhooks.timeout, webhooks.rotation_overlap) == (15.0, 86400.0)
    assert webhooks.consumer == "webhook-deliverer"


def test_webhook_networks_http_and_schedule_scale_are_configurable() -> None:
    webhooks = Settings.from_env(
        {
            "ALMANAC_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8, ::1/128",
            "ALMANAC_WEBHOOK_ALLOW_HTTP": "1",
            "ALMANAC_WEBHOOK_RETRY_SCALE": "0.001",
            "ALMANAC_WEBHOOK_SECRET_KEY": "A" * 43 + "=",
        }
    ).webhooks
    assert webhooks.allowed_networks == ("127.0.0.0/8", "::1/128")
    assert webhooks.allow_http is True
    assert webhooks.retry_scale == 0.001
    assert webhooks.secret_key == "A" * 43 + "="


def test_reports_every_bad_webhook_variable_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "ALMANAC_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,not-a-network",
                "ALMANAC_WEBHOOK_ALLOW_HTTP": "maybe",
                "ALMANAC_WEBHOOK_SECRET_KEY": "short",
                "ALMANAC_WEBHOOK_TIMEOUT": "0",
            }
        )
    assert problem_vars(caught.value) == [
        "ALMANAC_WEBHOOK_SECRET_KEY",
        "ALMANAC_WEBHOOK_ALLOWED_NETWORKS",
        "ALMANAC_WEBHOOK_ALLOW_HTTP",
        "ALMANAC_WEBHOOK_TIMEOUT",
    ]
    assert "short" not in str(caught.value)


def test_the_event_size_limit_defaults_to_900_kib_and_is_checked() -> None:
    assert Settings.from_env({}).store.max_event_bytes == 900 * 1024
    raised = Settings.from_env({"ALMANAC_MAX_EVENT_BYTES": "8388608"})
    assert raised.store.max_event_bytes == 8 * 2**20
    for bad in ("1000", "100000000", "1MB"):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"ALMANAC_MAX_EVENT_BYTES": bad})
        assert [var for var, _ in caught.value.problems] == ["ALMANAC_MAX_EVENT_BYTES"]
