"""Generating and reading readings over HTTP, on both profiles."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import Api
from tests.factories import birth_json

PROBLEM = "application/problem+json"


def body(**changes: Any) -> dict[str, Any]:
    return {"birth": birth_json(), "label": "Ada", **changes}


async def test_generates_a_reading_end_to_end(api: Api) -> None:
    response = await api.post_reading(api.alice, body(kind="love"))
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "requested"
    assert response.headers["location"] == f"/api/v1/readings/{accepted['id']}"
    assert int(response.headers["almanac-position"]) == accepted["position"]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["x-request-id"]
    assert "idempotent-replayed" not in response.headers

    reading = await api.wait_for_status(api.alice, response, {"generated"})
    assert reading["id"] == accepted["id"]
    assert reading["kind"] == "love" and reading["label"] == "Ada"
    assert reading["chart"]["sun"]["sign"] == "aries"
    assert reading["chart"]["chart_hash"] == reading["chart_hash"]
    keys = [s["key"] for s in reading["text"]["sections"]]
    assert keys[:3] == ["sun", "moon", "ascendant"] and "venus" in keys
    assert "Ada" in reading["text"]["title"]
    assert reading["position"] > accepted["position"]


async def test_min_position_reads_your_own_write(api: Api) -> None:
    response = await api.post_reading(api.alice, body())
    position = response.headers["almanac-position"]
    got = await api.client.get(
        f"{response.headers['location']}?min_position={position}", headers=api.auth(api.alice)
    )
    assert got.status_code == 200, got.text
    assert got.json()["position"] >= int(position)


async def test_min_position_not_reached_in_time_is_a_problem_with_the_current_position(
    api_without_projectors: Api,
) -> None:
    api = api_without_projectors
    response = await api.post_reading(api.alice, body())
    position = int(response.headers["almanac-position"])
    got = await api.client.get(
        f"{response.headers['location']}?min_position={position}", headers=api.auth(api.alice)
    )
    assert got.status_code == 503
    assert got.headers["content-type"].startswith(PROBLEM)
    assert got.headers["retry-after"] == "1"
    problem = got.json()
    assert problem["min_position"] == position
    assert 0 <= problem["current_position"] < position


async def test_min_position_past_every_stored_event_is_a_422_naming_it(
    impatient_api: Api,
) -> None:
    """No wait would reach a position no command has been answered with: the client is told
    so, where a 503 would have it retry for ever."""
    api = impatient_api
    response = await api.post_reading(api.alice, body())
    past = int(response.headers["almanac-position"]) + 1_000
    got = await api.client.get(
        f"{response.headers['location']}?min_position={past}", headers=api.auth(api.alice)
    )
    assert got.status_code == 422, got.text
    assert got.headers["content-type"].startswith(PROBLEM)
    [error] = got.json()["errors"]
    assert error["field"] == "min_position"
    assert "past the last stored position" in error["message"]


async def test_repeated_idempotency_key_returns_the_original_response_and_appends_nothing(
    api: Api,
) -> None:
    first = await api.post_reading(api.alice, body(), **{"Idempotency-Key": "order-1"})
    assert first.status_code == 202
    before = await api.event_count()
    again = await api.post_reading(api.alice, body(), **{"Idempotency-Key": "order-1"})
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["almanac-position"] == first.headers["almanac-position"]
    assert again.headers["idempotent-replayed"] == "true"
    requested = [
        e
        for e in await api.on_app(api.container.store.read, 0, 10_000)
        if e.type == "reading.requested"
    ]
    assert [str(e.aggregate_id) for e in requested].count(first.json()["id"]) == 1
    assert len(requested) == 1
    after = await api.on_app(api.container.store.read, before, 10_000)
    assert all(e.type != "reading.requested" for e in after), "the repeat appended a request"


async def test_idempotency_key_reused_with_another_body_is_rejected(api: Api) -> None:
    await api.post_reading(api.alice, body(), **{"Idempotency-Key": "order-2"})
    other = await api.post_reading(api.alice, body(label="Bea"), **{"Idempotency-Key": "order-2"})
    assert other.status_code == 422
    assert other.headers["content-type"].startswith(PROBLEM)
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"


async def test_idempotency_keys_belong_to_their_owner(api: Api) -> None:
    a = await api.post_reading(api.alice, body(), **{"Idempotency-Key": "same"})
    b = await api.post_reading(api.bob, body(label="Bea"), **{"Idempotency-Key": "same"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


@pytest.mark.parametrize("header", [None, "Bearer alm_not-a-real-key", "Basic abc", "Bearer "])
async def test_missing_or_wrong_key_is_401(api: Api, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = await api.client.post("/api/v1/readings", json=body(), headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.headers["www-authenticate"].startswith("Bearer")
    got = await api.client.get(
        "/api/v1/readings/00000000-0000-0000-0000-000000000000", headers=headers
    )
    assert got.status_code == 401


async def test_another_owner_gets_404_and_admin_sees_everything(api: Api) -> None:
    response = await api.post_reading(api.alice, body())
    location, position = response.headers["location"], response.headers["almanac-position"]
    url = f"{location}?min_position={position}"
    bob = await api.client.get(url, headers=api.auth(api.bob))
    assert bob.status_code == 404
    assert bob.headers["content-type"].startswith(PROBLEM)
    admin = await api.client.get(url, headers=api.auth(api.admin))
    assert admin.status_code == 200


async def test_unknown_reading_is_404(api: Api) -> None:
    got = await api.client.get(
        "/api/v1/readings/7b0c1f0e-2f55-4b8e-9d3a-111111111111", headers=api.auth(api.alice)
    )
    assert got.status_code == 404


BAD_BODIES = [
    (body(birth=birth_json(latitude=91)), "birth.latitude"),
    (body(birth=birth_json(latitude=78.2)), "birth.latitude"),
    (body(birth=birth_json(longitude=-181)), "birth.longitude"),
    (body(birth=birth_json(latitude="north")), "birth.latitude"),
    (body(birth=birth_json(date="2023-02-30")), "birth.date"),
    (body(birth=birth_json(date="1500-01-01")), "birth.date"),
    (body(birth=birth_json(time="25:10")), "birth.time"),
    (body(birth=birth_json(timezone="Mars/Olympus_Mons")), "birth.timezone"),
    (body(birth=birth_json(date="2021-03-28", time="01:30")), "birth.time"),
    (body(kind="tarot"), "kind"),
    (body(label=""), "label"),
    (body(label="a\x00b"), "label"),
    (body(birth={**birth_json(), "x": 1}), "birth.x"),
    (body(birth={k: v for k, v in birth_json().items() if k != "longitude"}), "birth.longitude"),
    (body(options={"zz": 1}), "options.zz"),
    (body(options={"house_system": "placidus"}), "options.house_system"),
    (body(colour="blue"), "colour"),
    ({"label": "no birth"}, "birth"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_BODIES)
async def test_bad_input_is_422_naming_the_field_and_appends_nothing(
    api: Api, payload: dict[str, Any], field: str
) -> None:
    before = await api.event_count()
    response = await api.post_reading(api.alice, payload)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert field in [e["field"] for e in problem["errors"]], problem
    assert problem["status"] == 422 and problem["title"]
    assert await api.event_count() == before


async def test_several_bad_birth_fields_are_reported_together(api: Api) -> None:
    response = await api.post_reading(
        api.alice, body(birth=birth_json(latitude=95, longitude=200, timezone="Nowhere/Land"))
    )
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"birth.latitude", "birth.longitude", "birth.timezone"} <= fields


@pytest.mark.parametrize(
    "content",
    [
        b'{"birth": "\xff\xfe"}',
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b'{"birth": {"latitude": 1e400}}',
        b"",
    ],
    ids=["not-utf8", "deep-array", "deep-object", "huge-number", "empty"],
)
async def test_unreadable_bodies_are_400_problems(api: Api, content: bytes) -> None:
    response = await api.client.post(
        "/api/v1/readings",
        content=content,
        headers={**api.auth(api.alice), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith(PROBLEM)


async def test_a_missing_key_is_401_before_the_body_is_even_read(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/readings", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


async def test_malformed_json_is_400(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/readings",
        content=b'{"birth": ',
        headers={**api.auth(api.alice), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith(PROBLEM)


async def test_bad_min_position_is_a_problem_naming_it(api: Api) -> None:
    got = await api.client.get(
        "/api/v1/readings/7b0c1f0e-2f55-4b8e-9d3a-111111111111?min_position=soon",
        headers=api.auth(api.alice),
    )
    assert got.status_code in (400, 422)
    assert got.headers["content-type"].startswith(PROBLEM)
    assert "min_position" in got.text


async def test_unknown_route_is_a_problem(api: Api) -> None:
    got = await api.client.get("/api/v1/nothing-here", headers=api.auth(api.alice))
    assert got.status_code == 404
    assert got.headers["content-type"].startswith(PROBLEM)


async def test_health_reports_every_engine_of_the_profile(api: Api) -> None:
    live = await api.client.get("/health/live")
    assert live.status_code == 200
    ready = await api.client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    expected = {"event_store", "read_models"}
    if api.container.settings.profile.value == "services":
        expected |= {"redis", "nats"}
    assert expected <= set(checks)
    assert all(v == "ok" for k, v in checks.items() if k in expected)


async def test_every_response_carries_a_request_id(api: Api) -> None:
    got = await api.client.get("/health/live", headers={"X-Request-Id": "trace-me-1"})
    assert got.headers["x-request-id"] == "trace-me-1"
    fresh = await api.client.get("/health/live")
    assert len(fresh.headers["x-request-id"]) >= 16


@pytest.mark.parametrize(("method", "path"), [("GET", "/nowhere"), ("DELETE", "/health/live")])
async def test_a_path_or_method_no_route_has_is_answered_with_a_request_id(
    api: Api, method: str, path: str
) -> None:
    """No middleware runs for these: the problem answer gives the id itself."""
    echoed = await api.client.request(method, path, headers={"X-Request-Id": "trace-me-3"})
    assert echoed.status_code in {404, 405}
    assert echoed.headers.get_list("x-request-id") == ["trace-me-3"]
    assert echoed.json()["request_id"] == "trace-me-3"
    made = await api.client.request(method, path)
    assert made.headers["x-request-id"] == made.json()["request_id"]
    assert len(made.headers["x-request-id"]) == 32


@pytest.mark.parametrize("authorization", [None, "Bearer alm_not-a-key"])
async def test_a_refused_key_is_answered_with_the_request_id_too(
    api: Api, authorization: str | None
) -> None:
    headers = {"X-Request-Id": "trace-me-2"}
    if authorization:
        headers["Authorization"] = authorization
    got = await api.client.get("/api/v1/readings", headers=headers)
    assert got.status_code == 401
    assert got.headers["x-request-id"] == "trace-me-2"
    assert got.json()["request_id"] == "trace-me-2"
    assert got.headers["www-authenticate"].startswith("Bearer")


async def test_openapi_document_describes_the_readings_api(api: Api) -> None:
    got = await api.client.get("/docs/openapi.json")
    assert got.status_code == 200
    paths = got.json()["paths"]
    assert "/api/v1/readings" in paths and "/api/v1/readings/{reading_id}" in paths
