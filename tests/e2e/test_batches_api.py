"""Batches over HTTP, on both profiles: start, validate, follow, cancel, retry, export."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from almanac.domain.chart import Chart
from almanac.domain.interpretation import BuiltinGenerator, GenerationFailed, ReadingText
from almanac.domain.kinds import ReadingKind
from almanac.settings import BatchSettings, Settings
from tests.e2e.conftest import Api, serving
from tests.factories import birth_json
from tests.integration.support_waiting import eventually

PROBLEM = "application/problem+json"


def item(**changes: Any) -> dict[str, Any]:
    return {"birth": birth_json(), **changes}


def items(count: int) -> list[dict[str, Any]]:
    # A few distinct births, repeated: identical birth data shares one chart.
    return [item(birth=birth_json(latitude=10.0 + i % 3), label=f"item {i}") for i in range(count)]


class GatedGenerator:
    """The built-in generator behind a gate the test opens; labels starting ``bad`` fail
    (permanently) while ``failing`` is set."""

    name = "gated"
    version = "1"

    def __init__(self, *, open_: bool = True) -> None:
        self.inner = BuiltinGenerator()
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.failing = True
        self.started = 0

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        self.started += 1
        await self.gate.wait()
        if self.failing and label is not None and label.startswith("bad"):
            raise GenerationFailed("the generator refuses this one")
        return await self.inner.generate(chart, kind, label)


def with_window(settings: Settings, window: int) -> Settings:
    return msgspec.structs.replace(settings, batch=BatchSettings(window=window))


@pytest.fixture
async def gated(settings: Settings) -> AsyncIterator[tuple[Api, GatedGenerator]]:
    generator = GatedGenerator(open_=False)
    async with serving(with_window(settings, 4), generator=generator) as api:
        yield api, generator


async def post_batch(api: Api, key: str, body: Any, **headers: str) -> Any:
    return await api.client.post("/api/v1/batches", json=body, headers={**api.auth(key), **headers})


async def wait_for_batch(
    api: Api, key: str, location: str, statuses: set[str], within: float = 60
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        got = await api.client.get(location, headers=api.auth(key))
        if got.status_code == 404:
            return None
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        return body if body["status"] in statuses else None

    return await eventually(check, within=within, what=f"batch {location} in {statuses}")


async def all_results(api: Api, key: str, location: str, limit: int = 7) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        got = await api.client.get(f"{location}/results", params=params, headers=api.auth(key))
        assert got.status_code == 200, got.text
        page = got.json()
        results.extend(page["data"])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return results
    raise AssertionError("the results never ended")


async def test_a_batch_runs_every_item_and_reports_each_outcome(api: Api) -> None:
    response = await post_batch(api, api.alice, {"items": items(12), "label": "family"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    location = response.headers["location"]
    assert location == f"/api/v1/batches/{accepted['id']}"
    assert int(response.headers["almanac-position"]) == accepted["position"]
    assert accepted["items"] == 12

    batch = await wait_for_batch(api, api.alice, location, {"completed"})
    assert batch["succeeded"] == 12 and batch["failed"] == 0 and batch["pending"] == 0
    assert batch["progress"] == 100.0 and batch["label"] == "family"

    results = await all_results(api, api.alice, location)
    assert [r["index"] for r in results] == list(range(12))
    assert {r["status"] for r in results} == {"succeeded"}
    reading = await api.client.get(
        f"/api/v1/readings/{results[4]['reading_id']}", headers=api.auth(api.alice)
    )
    assert reading.json()["label"] == "item 4" and reading.json()["status"] == "generated"
    # Identical birth data, in this batch and beyond, shares one chart.
    hashes = set()
    for r in results:
        got = await api.client.get(
            f"/api/v1/readings/{r['reading_id']}", headers=api.auth(api.alice)
        )
        hashes.add(got.json()["chart_hash"])
    assert len(hashes) == 3

    listed = await api.client.get("/api/v1/batches", headers=api.auth(api.alice))
    assert [b["id"] for b in listed.json()["data"]] == [accepted["id"]]
    theirs = await api.client.get("/api/v1/batches", headers=api.auth(api.bob))
    assert theirs.json()["data"] == []
    assert (await api.client.get(location, headers=api.auth(api.bob))).status_code == 404
    assert (await api.client.get(location, headers=api.auth(api.admin))).status_code == 200


async def test_results_export_as_ndjson_and_csv_equals_the_outcomes(api: Api) -> None:
    response = await post_batch(api, api.alice, {"items": items(9)})
    location = response.headers["location"]
    await wait_for_batch(api, api.alice, location, {"completed"})
    outcomes = await all_results(api, api.alice, location, limit=4)

    ndjson = await api.client.get(f"{location}/results?format=ndjson", headers=api.auth(api.alice))
    assert ndjson.status_code == 200
    assert ndjson.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in ndjson.text.splitlines()] == outcomes

    exported = await api.client.get(
        f"{location}/results", headers={**api.auth(api.alice), "Accept": "text/csv"}
    )
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(int(r["index"]), r["status"], r["reading_id"]) for r in rows] == [
        (o["index"], o["status"], o["reading_id"]) for o in outcomes
    ]


async def test_rejects_bad_items_by_index_and_starts_nothing(api: Api) -> None:
    before = await api.event_count()
    body = {
        "items": [
            item(),
            item(),
            item(),
            item(birth=birth_json(latitude=123)),
            item(birth=birth_json(timezone="Mars/Olympus")),
            item(kind="fortune"),
        ]
    }
    response = await post_batch(api, api.alice, body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    fields = [e["field"] for e in response.json()["errors"]]
    assert fields == ["items[3].birth.latitude", "items[4].birth.timezone", "items[5].kind"]
    assert await api.event_count() == before


async def test_rejects_a_batch_larger_than_the_limit(api: Api) -> None:
    response = await post_batch(api, api.alice, {"items": [item()] * 10_001})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "items"
    empty = await post_batch(api, api.alice, {"items": []})
    assert empty.status_code == 422


async def test_rejects_a_batch_too_large_to_store_naming_items_and_starts_nothing(
    api: Api,
) -> None:
    """Fewer than 10,000 items, but more than one event may hold (ALMANAC_MAX_EVENT_BYTES,
    900 KiB by default): refused, where storing it would stop the relay at it."""
    before = await api.event_count()
    body = {"items": [item(label="x" * 200)] * 3000}  # ~1.1 MB as stored
    response = await post_batch(api, api.alice, body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    [error] = response.json()["errors"]
    assert error["field"] == "items"
    assert "at most 921,600" in error["message"] and "split it" in error["message"]
    assert await api.event_count() == before


async def test_accepts_a_streamed_ndjson_body(api: Api) -> None:
    lines = b"".join(msgspec.json.encode(i) + b"\n" for i in items(5))

    response = await api.client.post(
        "/api/v1/batches?label=streamed",
        content=lines,
        headers={**api.auth(api.alice), "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 202, response.text
    batch = await wait_for_batch(api, api.alice, response.headers["location"], {"completed"})
    assert batch["succeeded"] == 5 and batch["label"] == "streamed"

    bad = b'{"birth": {"date": "1990-01-01"}}\nnot json\n'
    rejected = await api.client.post(
        "/api/v1/batches",
        content=lines + bad,
        headers={**api.auth(api.alice), "Content-Type": "application/x-ndjson"},
    )
    assert rejected.status_code == 422
    fields = [e["field"] for e in rejected.json()["errors"]]
    assert fields[0].startswith("items[5].birth") and fields[-1] == "items[6]"


async def test_a_repeated_idempotency_key_returns_the_same_batch(api: Api) -> None:
    body = {"items": items(2)}
    first = await post_batch(api, api.alice, body, **{"Idempotency-Key": "batch-1"})
    again = await post_batch(api, api.alice, body, **{"Idempotency-Key": "batch-1"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    other = await post_batch(api, api.alice, {"items": items(3)}, **{"Idempotency-Key": "batch-1"})
    assert other.status_code == 422


async def test_cancel_stops_new_items_and_keeps_partial_results(
    gated: tuple[Api, GatedGenerator],
) -> None:
    api, generator = gated
    response = await post_batch(api, api.alice, {"items": items(40)})
    location = response.headers["location"]
    await eventually(lambda: _true(generator.started >= 2), what="items started")

    cancelled = await api.client.post(f"{location}/cancel", headers=api.auth(api.alice))
    assert cancelled.status_code == 202, cancelled.text
    generator.gate.set()
    batch = await wait_for_batch(api, api.alice, location, {"cancelled"})

    async def settled() -> dict[str, Any] | None:
        got = (await api.client.get(location, headers=api.auth(api.alice))).json()
        in_flight = generator.started - got["succeeded"] - got["failed"]
        return got if in_flight <= 0 else None

    batch = await eventually(settled, what="running items finished")
    assert 0 < batch["succeeded"] <= 4 * 2 and batch["pending"] >= 40 - 8
    results = await all_results(api, api.alice, location, limit=100)
    assert sum(r["status"] == "succeeded" for r in results) == batch["succeeded"]
    theirs = await api.client.post(f"{location}/cancel", headers=api.auth(api.bob))
    assert theirs.status_code == 404


async def test_retry_failed_runs_only_the_failed_items_again(settings: Settings) -> None:
    generator = GatedGenerator()
    async with serving(settings, generator=generator) as served:
        body = {"items": [item(label="good 0"), item(label="bad 1"), item(label="good 2")]}
        response = await post_batch(served, served.alice, body)
        location = response.headers["location"]
        batch = await wait_for_batch(served, served.alice, location, {"completed"})
        assert (batch["succeeded"], batch["failed"]) == (2, 1)
        failed = [r for r in await all_results(served, served.alice, location) if r["index"] == 1]
        assert failed[0]["status"] == "failed" and "refuses" in failed[0]["reason"]

        generator.failing = False
        retried = await served.client.post(
            f"{location}/retry-failed", headers=served.auth(served.alice)
        )
        assert retried.status_code == 202 and retried.json()["retried"] == 1

        async def done_again() -> dict[str, Any] | None:
            got = (await served.client.get(location, headers=served.auth(served.alice))).json()
            return got if got["succeeded"] == 3 and got["status"] == "completed" else None

        await eventually(done_again, what="the retried item succeeded")
        results = await all_results(served, served.alice, location)
        assert [r["attempt"] for r in results] == [0, 1, 0]
        assert results[1]["reading_id"] != failed[0]["reading_id"]


async def _true(value: bool) -> bool:
    return value


class HoldsBatchItems(BuiltinGenerator):
    """Holds every batch item (labels ``item …``) until the test lets them go; any other
    reading goes through at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = 0

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        if label is not None and label.startswith("item "):
            self.held += 1
            await self.gate.wait()
        return await super().generate(chart, kind, label)


async def test_one_owners_big_batch_does_not_starve_anothers_reading(settings: Settings) -> None:
    """Only a window of the batch is with the workers at a time, so another owner's reading is
    taken and generated while every item the batch has out is still held."""
    window = 4
    assert settings.worker.concurrency > window, "the workers have hands beyond the window"
    generator = HoldsBatchItems()
    async with serving(with_window(settings, window), generator=generator) as api:
        try:
            response = await post_batch(api, api.alice, {"items": items(400)})
            location = response.headers["location"]
            await eventually(
                lambda: _true(generator.held >= window), what="a window of the batch held"
            )
            single = await api.post_reading(api.bob, {"birth": birth_json()})
            await api.wait_for_status(api.bob, single, {"generated"})
            batch = (await api.client.get(location, headers=api.auth(api.alice))).json()
            held = generator.held
        finally:
            # On the app's loop, where the held items wait for it.
            await asyncio.to_thread(api.client.blocking_portal.call, generator.gate.set)
    assert held == window, "no more of the batch was released meanwhile"
    assert (batch["status"], batch["succeeded"], batch["pending"]) == ("running", 0, 400), batch


async def test_jobs_view_covers_readings_and_batches(api: Api) -> None:
    reading = await api.post_reading(api.alice, {"birth": birth_json()})
    batch = await post_batch(api, api.alice, {"items": items(3)})
    await api.post_reading(api.bob, {"birth": birth_json()})
    await wait_for_batch(api, api.alice, batch.headers["location"], {"completed"})
    await api.wait_for_status(api.alice, reading, {"generated"})

    mine = (await api.client.get("/api/v1/jobs", headers=api.auth(api.alice))).json()["data"]
    batch_id, reading_id = batch.json()["id"], reading.json()["id"]
    assert [(j["id"], j["kind"]) for j in mine if j["id"] in {batch_id, reading_id}] == [
        (batch_id, "batch"),
        (reading_id, "reading"),
    ]
    # The batch's items are readings too, and jobs of their own.
    assert len(mine) == 5
    shown = await api.client.get(f"/api/v1/jobs/{batch_id}", headers=api.auth(api.alice))
    job = shown.json()
    assert (job["kind"], job["state"], job["progress"]) == ("batch", "succeeded", 100.0)
    etag = shown.headers["etag"]
    assert etag == f'W/"j-{batch_id}-{job["position"]}"'
    unchanged = await api.client.get(
        f"/api/v1/jobs/{batch_id}", headers={**api.auth(api.alice), "If-None-Match": etag}
    )
    assert unchanged.status_code == 304
    batch_etag = (
        await api.client.get(f"/api/v1/batches/{batch_id}", headers=api.auth(api.alice))
    ).headers["etag"]
    assert batch_etag.startswith(f'W/"b-{batch_id}-')
    revalidated = await api.client.get(
        f"/api/v1/batches/{batch_id}", headers={**api.auth(api.alice), "If-None-Match": batch_etag}
    )
    assert revalidated.status_code == 304
    assert job["location"] == f"/api/v1/batches/{batch_id}"
    hidden = await api.client.get(f"/api/v1/jobs/{batch_id}", headers=api.auth(api.bob))
    assert hidden.status_code == 404

    everyone = await api.client.get(
        "/api/v1/jobs", params={"kind": "reading", "limit": 2}, headers=api.auth(api.admin)
    )
    page = everyone.json()
    assert len(page["data"]) == 2 and page["has_more"]
    assert {j["kind"] for j in page["data"]} == {"reading"}
    rest = await api.client.get(
        "/api/v1/jobs",
        params={"kind": "reading", "cursor": page["next_cursor"]},
        headers=api.auth(api.admin),
    )
    assert len(page["data"]) + len(rest.json()["data"]) == 5
    succeeded = await api.client.get(
        "/api/v1/jobs", params={"kind": "batch", "state": "succeeded"}, headers=api.auth(api.alice)
    )
    assert [j["id"] for j in succeeded.json()["data"]] == [batch_id]


async def test_jobs_read_your_own_write_with_min_position(api: Api) -> None:
    """Right after the command, with no polling: the job waits for both read models."""
    accepted = await api.post_reading(api.alice, {"birth": birth_json()})
    position = int(accepted.headers["almanac-position"])
    reading_id = accepted.json()["id"]
    one = await api.client.get(
        f"/api/v1/jobs/{reading_id}", params={"min_position": position}, headers=api.auth(api.alice)
    )
    assert one.status_code == 200, one.text
    assert (one.json()["id"], one.json()["kind"]) == (reading_id, "reading")
    assert int(one.headers["almanac-position"]) >= position
    listed = await api.client.get(
        "/api/v1/jobs", params={"min_position": position}, headers=api.auth(api.alice)
    )
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert reading_id in [j["id"] for j in page["data"]]
    assert page["position"] >= position
    assert int(listed.headers["almanac-position"]) == page["position"]


@pytest.mark.parametrize(
    "path", ["/api/v1/jobs", "/api/v1/jobs/77777777-0000-4000-8000-000000000000"]
)
async def test_a_bad_min_position_on_jobs_is_422_naming_it(api: Api, path: str) -> None:
    for bad in ("soon", "-1"):
        got = await api.client.get(path, params={"min_position": bad}, headers=api.auth(api.alice))
        assert got.status_code == 422, got.text
        assert got.headers["content-type"].startswith(PROBLEM)
        assert [e["field"] for e in got.json()["errors"]] == ["min_position"]


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/batches"])
async def test_a_cursor_not_made_by_the_listing_is_422_naming_it(api: Api, path: str) -> None:
    """Not digits, a digit that is not ASCII, a number too large for a position."""
    for bad in ("latest", "\u00b2", "9" * 30):
        got = await api.client.get(path, params={"cursor": bad}, headers=api.auth(api.alice))
        assert got.status_code == 422, (bad, got.text)
        assert got.headers["content-type"].startswith(PROBLEM)
        assert [e["field"] for e in got.json()["errors"]] == ["cursor"]
