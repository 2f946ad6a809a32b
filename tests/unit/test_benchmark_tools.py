"""The benchmark suite's own tools: the command that runs it and the bare baseline app.

Benchmarks measure and are not run here; these check only that the suite can be listed and
that the baseline serves what Almanac serves, so that the ratios compare like with like.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from click.testing import CliRunner
from litestar.testing import TestClient

from almanac.cli import main
from almanac.domain.chart import ChartOptions
from almanac.views import ReadingView
from benchmarks.bare_app import create_bare_app
from benchmarks.cpu import CONCURRENCY, Posts, start_lifespan
from tests.factories import birth, birth_json


def _reading() -> bytes:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    view = ReadingView(
        id=uuid.uuid4(),
        status="generated",
        kind="natal",
        label="Ada",
        birth=birth(),
        options=ChartOptions(),
        chart_hash="c" * 64,
        chart=None,
        text=None,
        failure=None,
        created_at=moment,
        updated_at=moment,
        position=42,
    )
    return msgspec.json.encode(view)


def test_bench_lists_every_benchmark_with_its_profiles() -> None:
    result = CliRunner().invoke(main, ["bench", "--list"])
    assert result.exit_code == 0, result.output
    for name in ("appends", "rebuild", "lag", "api", "websocket", "webhooks"):
        assert name in result.output
    assert "make bench" in result.output


def test_bench_refuses_an_unknown_benchmark() -> None:
    result = CliRunner().invoke(main, ["bench", "no-such-benchmark"])
    assert result.exit_code == 2
    assert "unknown benchmark" in result.output


def test_bare_app_serves_the_reading_it_was_given_byte_for_byte() -> None:
    body = _reading()
    with TestClient(create_bare_app(body)) as client:
        got = client.get(f"/api/v1/readings/{uuid.uuid4()}")
    assert got.status_code == 200
    assert got.content == body
    assert got.headers["almanac-position"] == "42"


def test_bare_app_answers_a_reading_command_as_almanac_does() -> None:
    with TestClient(create_bare_app()) as client:
        accepted = client.post("/api/v1/readings", json={"birth": birth_json(), "label": "x"})
        refused = client.post("/api/v1/readings", json={"birth": {}})
    assert accepted.status_code == 202
    assert set(accepted.json()) == {"id", "status", "position"}
    assert accepted.json()["status"] == "requested"
    assert accepted.headers["location"] == f"/api/v1/readings/{accepted.json()['id']}"
    assert refused.status_code == 400


def test_the_leak_check_judges_growth_after_the_first_round_per_request_served() -> None:
    from benchmarks.api import LEAK_TOLERANCE_MB, leak_check

    runs = {"post": [{"requests": 1_000}] * 3, "get": [{"requests": 3_000}] * 3}
    steady = leak_check([90.0, 90.5, 91.0], runs)
    assert steady["verdict"] == "levels off"
    assert steady["requests"] == 8_000  # rounds 2 and 3: the first fills pools and caches
    growing = leak_check([90.0, 93.0, 96.0], runs)
    assert growing["verdict"] == "grows"
    assert growing["bytes_per_request"] == round(6 * 2**20 / 8_000, 1)
    assert leak_check([90.0, 90.0 + LEAK_TOLERANCE_MB], runs)["verdict"] == "levels off"
    assert "growth_mb" not in leak_check([90.0], runs)


def test_the_disk_probe_reports_the_slow_flushes_of_a_window_and_says_when_it_saw_none() -> None:
    from benchmarks.disk import FsyncProbe, describe

    probe = FsyncProbe()  # not started: fed what its process would report
    probe.slow = [(10.5, 0.139), (12.2, 0.030), (30.0, 0.5)]
    probe.counts = [(11.0, 98), (12.0, 97), (13.0, 99), (31.0, 60)]
    window = probe.window(10.0, 12.9)
    assert (window["slow_fsyncs"], window["slowest_ms"], window["stalled_ms"]) == (2, 139, 169)
    assert window["flushes"] == 98 + 97 + 99
    assert describe(window) == "; disk: 2 fsync(s) over 20 ms of 294 (slowest 139 ms)"
    quiet = probe.window(20.0, 25.0)
    assert "no flushes measured" in describe(quiet), (
        "a probe that measured nothing is not a calm disk"
    )
    probe.failure = "the probe ended early: disk full"
    assert "disk full" in describe(probe.window(10.0, 12.9))
    assert describe(None) == ""


async def test_the_in_process_posts_send_whole_commands_with_labels_of_their_own() -> None:
    """The cpu benchmark's ASGI driver: every request a valid command, each label new."""
    labels: list[str] = []
    bare = create_bare_app()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        labels.append(msgspec.json.decode(message["body"])["label"])
        replay_sent = False

        async def replay() -> Any:
            nonlocal replay_sent
            if replay_sent:
                return await receive()
            replay_sent = True
            return message

        await bare(scope, replay, send)

    posts = Posts(app, key="alm_test")
    inbox, lifespan = await start_lifespan(bare)
    try:
        measured = await posts.run(CONCURRENCY * 2)
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
    assert measured["requests"] == CONCURRENCY * 2
    assert posts.statuses == {202: CONCURRENCY * 2}
    assert len(set(labels)) == len(labels) == CONCURRENCY * 2
