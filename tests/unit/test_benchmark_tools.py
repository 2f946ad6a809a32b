"""The benchmark suite's own tools: the command that runs it and the bare baseline app.

Benchmarks measure and are not run here; these check only that the suite can be listed and
that the baseline serves what Almanac serves, so that the ratios compare like with like.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
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


def _suite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **runs: tuple[Any, tuple[str, ...]]
) -> Any:
    """The suite's runner with ``runs`` (name: (run, profiles)) as its only benchmarks."""
    from benchmarks import __main__ as suite

    benchmarks = {
        name: suite.Benchmark(run, f"fake {name}", profiles, 0.1)
        for name, (run, profiles) in runs.items()
    }
    monkeypatch.setattr(suite, "BENCHMARKS", benchmarks)
    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    return suite


def test_a_failing_benchmark_does_not_stop_the_rest_and_the_run_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []

    def broken(profile: str) -> dict[str, Any]:
        ran.append(f"broken {profile}")
        raise RuntimeError("no receiver")

    def fine(profile: str) -> dict[str, Any]:
        ran.append(f"fine {profile}")
        return {"benchmark": "fine", "profile": profile}

    suite = _suite(
        monkeypatch,
        tmp_path,
        broken=(broken, ("services", "embedded")),
        fine=(fine, ("services", "embedded")),
    )
    with pytest.raises(SystemExit) as stopped:
        suite.run_benchmarks([], profile="all")
    assert stopped.value.code == 1
    assert ran == ["broken services", "broken embedded", "fine services", "fine embedded"]
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir()) == [
        "fine-embedded",
        "fine-services",
    ]
    out = capsys.readouterr().out
    assert "2 failed:" in out
    assert "broken (services): RuntimeError: no receiver" in out
    assert "broken (embedded): RuntimeError: no receiver" in out


def test_a_services_only_benchmark_is_skipped_on_the_embedded_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []

    def run(profile: str) -> dict[str, Any]:
        ran.append(profile)
        return {"profile": profile}

    suite = _suite(
        monkeypatch, tmp_path, only=(run, ("services",)), both=(run, ("services", "embedded"))
    )
    saved = suite.run_benchmarks([], profile="embedded")
    assert ran == ["embedded"]
    assert [p.name.rsplit("-", 1)[0] for p in saved] == ["both-embedded"]
    assert "only (embedded): skipped, services profile only" in capsys.readouterr().out


class _DeliveryLog:
    """The read database as the webhook benchmark sees it: messages that stop short."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    async def fetch_one(self, sql: str, params: Any) -> dict[str, Any]:
        return {"n": self.counts.get("succeeded", 0)}

    async def fetch_all(self, sql: str, params: Any) -> list[dict[str, Any]]:
        return [{"status": s, "n": n} for s, n in sorted(self.counts.items())]


async def test_the_webhook_benchmark_gives_up_naming_how_many_messages_succeeded() -> None:
    from benchmarks.webhooks import all_succeeded

    stuck = _DeliveryLog({"succeeded": 4_980, "pending": 15})
    with pytest.raises(RuntimeError) as failed:
        await all_succeeded(stuck, 5_000, within=0.05)  # type: ignore[arg-type]
    assert str(failed.value) == (
        "4,980 of 5,000 webhook messages succeeded within 0.05 s;"
        " the others: pending 15, not in the log yet 5"
    )
    await all_succeeded(_DeliveryLog({"succeeded": 5_000}), 5_000, within=0.05)  # type: ignore[arg-type]


async def test_the_load_generators_alarm_wakes_no_earlier_than_asked() -> None:
    from benchmarks.loadgen import Alarm, _now

    alarm = Alarm(asyncio.get_running_loop())
    try:
        for ahead in (0.0003, 0.002, 0.0):
            when = _now() + ahead
            await asyncio.wait_for(alarm.until(when), 10)
            assert _now() >= when
        await asyncio.wait_for(alarm.until(_now() - 1), 10)  # already past: at once
    finally:
        alarm.close()
