"""Dead letters over HTTP, on both profiles: work given up on after its last delivery fails
its reading (and its batch item, which retry-failed runs again) and is listed for admins."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from almanac.domain.chart import Chart
from almanac.domain.interpretation import BuiltinGenerator, ReadingText
from almanac.domain.kinds import ReadingKind
from almanac.errors import Unavailable
from almanac.settings import Settings
from tests.e2e.conftest import Api, serving
from tests.e2e.test_batches_api import all_results, item, post_batch, wait_for_batch
from tests.factories import birth_json
from tests.integration.support_projection import giving_up_after
from tests.integration.support_waiting import eventually

PROBLEM = "application/problem+json"
UNREACHABLE = "the oracle is unreachable"


class FlakyGenerator:
    """The built-in generator, except that for labels starting ``flaky`` its service is
    unreachable (a transient failure) while ``down`` is set."""

    name = "flaky"
    version = "1"

    def __init__(self) -> None:
        self.inner = BuiltinGenerator()
        self.down = True

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        if self.down and label is not None and label.startswith("flaky"):
            raise Unavailable(UNREACHABLE)
        return await self.inner.generate(chart, kind, label)


async def dead_letters(api: Api, **params: Any) -> dict[str, Any]:
    got = await api.client.get("/api/v1/dead-letters", params=params, headers=api.auth(api.admin))
    assert got.status_code == 200, got.text
    page: dict[str, Any] = got.json()
    assert int(got.headers["almanac-position"]) == page["position"]
    return page


async def test_an_exhausted_batch_item_fails_is_listed_and_runs_again_on_retry_failed(
    settings: Settings,
) -> None:
    generator = FlakyGenerator()
    async with serving(giving_up_after(settings, 2), generator=generator) as api:
        body = {"items": [item(label="fine 0"), item(label="flaky 1")]}
        location = (await post_batch(api, api.alice, body)).headers["location"]
        batch = await wait_for_batch(api, api.alice, location, {"completed"})
        assert (batch["succeeded"], batch["failed"]) == (1, 1)
        results = await all_results(api, api.alice, location)
        assert results[1]["status"] == "failed"
        assert results[1]["reason"] == f"exhausted 2 deliveries: {UNREACHABLE}"
        reading_id = results[1]["reading_id"]

        # The batch's position is past the reading's failure: read it from there.
        page = await dead_letters(api, min_position=batch["position"])
        [dead] = page["data"]
        requested = await api.container.store.position_of(UUID(reading_id), 1)
        assert dead["position"] == requested
        assert dead["failed_position"] > requested
        assert {k: dead[k] for k in ("event_type", "aggregate_id", "owner", "consumer")} == {
            "event_type": "reading.requested",
            "aggregate_id": reading_id,
            "owner": "alice",
            "consumer": settings.worker.consumer,
        }
        assert (dead["deliveries"], dead["last_error"]) == (2, UNREACHABLE)
        assert dead["location"] == f"/api/v1/readings/{reading_id}"
        assert dead["failed_at"]
        assert (page["has_more"], page["next_cursor"]) == (False, None)
        reading = (await api.client.get(dead["location"], headers=api.auth(api.alice))).json()
        assert (reading["status"], reading["failure"]) == ("failed", results[1]["reason"])

        generator.down = False
        retried = await api.client.post(f"{location}/retry-failed", headers=api.auth(api.alice))
        assert retried.status_code == 202 and retried.json()["retried"] == 1

        async def done_again() -> dict[str, Any] | None:
            got = (await api.client.get(location, headers=api.auth(api.alice))).json()
            return got if got["status"] == "completed" and got["succeeded"] == 2 else None

        await eventually(done_again, what="the retried item succeeded")
        # The record stays: it tells what happened to the first reading of the item.
        assert [d["aggregate_id"] for d in (await dead_letters(api))["data"]] == [reading_id]


async def test_dead_letters_are_listed_newest_first_across_pages(settings: Settings) -> None:
    async with serving(giving_up_after(settings, 1), generator=FlakyGenerator()) as api:
        ids = []
        for label in ("flaky a", "flaky b", "flaky c"):
            accepted = await api.post_reading(api.bob, {"birth": birth_json(), "label": label})
            done = await api.wait_for_status(api.bob, accepted, {"generated", "failed"})
            assert done["failure"] == f"exhausted 1 delivery: {UNREACHABLE}"
            ids.append(accepted.json()["id"])
        last = int(accepted.headers["almanac-position"])

        async def all_three() -> dict[str, Any] | None:
            page = await dead_letters(api, min_position=last, limit=2)
            return page if page["has_more"] else None

        first = await eventually(all_three, what="three dead letters recorded")
        second = await dead_letters(api, limit=2, cursor=first["next_cursor"])
        assert (second["has_more"], second["next_cursor"]) == (False, None)
        listed = [d["aggregate_id"] for d in first["data"] + second["data"]]
        assert listed == ids[::-1]


async def test_dead_letters_are_for_admins_and_bad_parameters_are_422(impatient_api: Api) -> None:
    api = impatient_api
    anonymous = await api.client.get("/api/v1/dead-letters")
    client = await api.client.get("/api/v1/dead-letters", headers=api.auth(api.alice))
    assert (anonymous.status_code, client.status_code) == (401, 403)
    assert client.headers["content-type"].startswith(PROBLEM)
    assert (await dead_letters(api))["data"] == []
    for query, field in (
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=latest", "cursor"),
        ("cursor=%C2%B2", "cursor"),
        (f"cursor={'9' * 30}", "cursor"),
        ("min_position=-1", "min_position"),
        ("min_position=soon", "min_position"),
        (f"min_position={10**9}", "min_position"),  # past every stored event
    ):
        got = await api.client.get(f"/api/v1/dead-letters?{query}", headers=api.auth(api.admin))
        assert got.status_code == 422, (query, got.text)
        assert got.headers["content-type"].startswith(PROBLEM)
        assert [e["field"] for e in got.json()["errors"]] == [field], query
