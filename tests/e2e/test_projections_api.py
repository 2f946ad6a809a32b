"""Projection administration over HTTP: status, lag, and parked events retried or skipped."""

from __future__ import annotations

from typing import Any

from almanac.settings import Settings
from tests.e2e.conftest import Api, serving
from tests.factories import birth_json
from tests.integration.support_projection import PoisonedProjection
from tests.integration.support_waiting import eventually

PROBLEM = "application/problem+json"


async def readings_status(api: Api) -> dict[str, Any]:
    response = await api.client.get("/api/v1/projections/readings", headers=api.auth(api.admin))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_lists_every_projection_with_its_state_position_and_lag(api: Api) -> None:
    accepted = await api.post_reading(api.alice, {"birth": birth_json()})
    await api.wait_for_status(api.alice, accepted, {"generated"})
    end = await api.event_count()

    async def caught_up() -> dict[str, Any] | None:
        response = await api.client.get("/api/v1/projections", headers=api.auth(api.admin))
        assert response.status_code == 200, response.text
        listed = {p["name"]: p for p in response.json()["projections"]}
        assert set(listed) == {"batches", "dead_letters", "readings", "webhook_endpoints"}
        readings = listed["readings"]
        # A runner that started from position 0 reads 'rebuilding' until the indexes it
        # deferred are built, which may be a moment after it reached the head.
        caught = readings["position"] == end and readings["state"] == "running"
        return readings if caught else None

    readings = await eventually(caught_up, what="the listing shows the projection caught up")
    assert readings["name"] == "readings"
    assert readings["state"] == "running"
    assert readings["head"] == end
    assert readings["lag"] == 0
    assert readings["parked"] == []
    assert readings["schema_version"] >= 1


async def test_projection_administration_is_for_admins_only(api: Api) -> None:
    for method, path in (
        ("GET", "/api/v1/projections"),
        ("GET", "/api/v1/projections/readings"),
        ("POST", "/api/v1/projections/readings/parked/1/skip"),
    ):
        anonymous = await api.client.request(method, path)
        client = await api.client.request(method, path, headers=api.auth(api.alice))
        assert (anonymous.status_code, client.status_code) == (401, 403), path
        assert client.headers["content-type"].startswith(PROBLEM)


async def test_unknown_projections_and_events_not_parked_are_404(api: Api) -> None:
    admin = api.auth(api.admin)
    unknown = await api.client.get("/api/v1/projections/horoscopes", headers=admin)
    assert unknown.status_code == 404
    assert "horoscopes" in unknown.json()["detail"]
    not_parked = await api.client.post("/api/v1/projections/readings/parked/5/retry", headers=admin)
    assert not_parked.status_code == 404
    assert not_parked.headers["content-type"].startswith(PROBLEM)
    assert "'readings' is not parked at position 5" in not_parked.json()["detail"]
    # The route declares ``{position:int}``: a position that is not a number matches no
    # route, so it is the router's plain 404 (no handler ran, nothing in it is named).
    path = "/api/v1/projections/readings/parked/zero/skip"
    bad = await api.client.post(path, headers=admin)
    assert bad.status_code == 404
    assert bad.headers["content-type"].startswith(PROBLEM)
    assert (bad.json()["detail"], bad.json()["instance"]) == ("Not Found", path)
    unknown_action = await api.client.post(
        "/api/v1/projections/readings/parked/5/explode", headers=admin
    )
    assert unknown_action.status_code == 422
    assert unknown_action.headers["content-type"].startswith(PROBLEM)
    assert [e["field"] for e in unknown_action.json()["errors"]] == ["action"]


async def test_a_parked_event_is_shown_then_retried_and_skipped_over_http(
    settings: Settings,
) -> None:
    # Poisons nothing until the test names the position (positions start at 1).
    first_poison = PoisonedProjection(poisoned_position=0)
    async with serving(settings, readings_projection=first_poison) as api:
        admin = api.auth(api.admin)
        # Key issuance appended events; the next reading's request is the next position.
        poisoned = await api.event_count() + 1
        first_poison.poisoned = poisoned
        accepted = await api.post_reading(api.alice, {"birth": birth_json(), "label": "one"})
        assert int(accepted.headers["almanac-position"]) == poisoned

        async def parked() -> dict[str, Any] | None:
            status = await readings_status(api)
            return status if status["state"] == "parked" else None

        status = await eventually(parked, what="the projection is parked")
        [event] = status["parked"]
        assert event["position"] == poisoned
        assert event["event_type"] == "reading.requested"
        assert "no_such_table" in event["error"]
        assert status["lag"] >= 1

        # Fixed (as after a deploy), then retried: the reading appears after all.
        first_poison.healed = True
        retried = await api.client.post(
            f"/api/v1/projections/readings/parked/{poisoned}/retry", headers=admin
        )
        assert retried.status_code == 202, retried.text
        assert retried.json()["request"] == "retry"
        done = await api.wait_for_status(api.alice, accepted, {"generated"})
        assert done["label"] == "one"

        # A second poison, skipped: the projection goes on without that event.
        first_poison.healed = False
        first_poison.poisoned = await api.event_count() + 1
        skipped_reading = await api.post_reading(api.alice, {"birth": birth_json()})
        await eventually(parked, what="the projection is parked again")
        skipped = await api.client.post(
            f"/api/v1/projections/readings/parked/{first_poison.poisoned}/skip", headers=admin
        )
        assert skipped.status_code == 202, skipped.text
        later = await api.post_reading(api.alice, {"birth": birth_json(), "label": "later"})
        assert (await api.wait_for_status(api.alice, later, {"generated"}))["label"] == "later"
        missing = await api.client.get(
            skipped_reading.headers["location"], headers=api.auth(api.alice)
        )
        assert missing.status_code == 404
        final = await readings_status(api)
    resolutions = {p["position"]: p["resolution"] for p in final["parked"]}
    assert resolutions == {poisoned: "retried", first_poison.poisoned: "skipped"}
    assert final["state"] == "running"
