"""Listing, paging, filtering, field selection, charts, ETags and compression, on both profiles."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from almanac.cache import decode_reading, encode_entry, reading_key
from almanac.settings import Settings
from tests.e2e.conftest import Api, serving
from tests.e2e.test_batches_api import GatedGenerator, item, post_batch
from tests.e2e.test_dead_letters_api import FlakyGenerator, giving_up_after
from tests.factories import birth_json

PROBLEM = "application/problem+json"


def body(**changes: Any) -> dict[str, Any]:
    return {"birth": birth_json(), **changes}


async def post_many(api: Api, key: str, count: int, **changes: Any) -> list[Any]:
    return [await api.post_reading(key, body(label=f"n{i}", **changes)) for i in range(count)]


async def settled(api: Api, key: str, responses: list[Any]) -> list[dict[str, Any]]:
    return [await api.wait_for_status(key, r, {"generated", "failed"}) for r in responses]


async def list_all(api: Api, key: str, query: str) -> tuple[list[dict[str, Any]], int]:
    """Follow next_cursor to the end; returns the items and the number of pages."""
    items: list[dict[str, Any]] = []
    url = f"/api/v1/readings?{query}"
    for pages in range(1, 101):
        got = await api.client.get(url, headers=api.auth(key))
        assert got.status_code == 200, got.text
        page = got.json()
        items.extend(page["data"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return items, pages
        url = f"/api/v1/readings?{query}&cursor={page['next_cursor']}"
    raise AssertionError("more than 100 pages")


async def test_lists_only_the_callers_readings_newest_first_across_pages(api: Api) -> None:
    mine = await post_many(api, api.alice, 7)
    theirs = await post_many(api, api.bob, 3)
    last = mine[-1].headers["almanac-position"]
    items, pages = await list_all(api, api.alice, f"limit=3&min_position={last}")
    assert pages == 3
    assert [i["id"] for i in items] == [r.json()["id"] for r in reversed(mine)]
    # Bob's readings came after Alice's: the admin reads as of the last of them.
    newest = theirs[-1].headers["almanac-position"]
    everything, _ = await list_all(api, api.admin, f"limit=200&min_position={newest}")
    assert len(everything) >= 10


async def test_paging_is_stable_while_new_readings_arrive(api: Api) -> None:
    first = await post_many(api, api.alice, 6)
    position = first[-1].headers["almanac-position"]
    got = await api.client.get(
        f"/api/v1/readings?limit=2&min_position={position}", headers=api.auth(api.alice)
    )
    page1 = got.json()
    seen = [i["id"] for i in page1["data"]]
    cursor = page1["next_cursor"]
    newer = await post_many(api, api.alice, 3)
    await api.on_app(
        api.container.watch.wait_for, "readings", int(newer[-1].headers["almanac-position"]), 5.0
    )
    while cursor:
        page = (
            await api.client.get(
                f"/api/v1/readings?limit=2&cursor={cursor}", headers=api.auth(api.alice)
            )
        ).json()
        seen += [i["id"] for i in page["data"]]
        cursor = page["next_cursor"]
    assert seen == [r.json()["id"] for r in reversed(first)], "no item skipped or repeated"


async def test_filters_by_status_and_kind(api: Api) -> None:
    responses = await post_many(api, api.alice, 2, kind="career")
    responses += await post_many(api, api.alice, 1, kind="love")
    await settled(api, api.alice, responses)
    careers, _ = await list_all(api, api.alice, "kind=career&status=generated")
    assert len(careers) == 2 and {i["kind"] for i in careers} == {"career"}
    none, _ = await list_all(api, api.alice, "status=failed")
    assert none == []


async def test_filters_by_creation_time(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    [reading] = await settled(api, api.alice, [response])
    created = reading["created_at"]
    at, _ = await list_all(api, api.alice, f"created_after={created}")
    assert [i["id"] for i in at] == [reading["id"]]
    before, _ = await list_all(api, api.alice, f"created_before={created}")
    assert before == []


async def test_sparse_fields_return_just_those_parts(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    [reading] = await settled(api, api.alice, [response])
    got = await api.client.get(
        "/api/v1/readings?fields=id,status,chart.sun", headers=api.auth(api.alice)
    )
    [item] = got.json()["data"]
    assert set(item) == {"id", "status", "chart"}
    assert set(item["chart"]) == {"sun"} and item["chart"]["sun"]["sign"] == "aries"
    one = await api.client.get(
        f"{response.headers['location']}?fields=text.title,label&min_position={reading['position']}",
        headers=api.auth(api.alice),
    )
    assert one.json() == {"text": {"title": "A natal reading for n0"}, "label": "n0"}


async def test_a_repeated_fields_parameter_merges_its_values(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    [reading] = await settled(api, api.alice, [response])
    alice = api.auth(api.alice)
    listed = await api.client.get(
        "/api/v1/readings?fields=id&fields=status,label&fields=id", headers=alice
    )
    assert listed.status_code == 200, listed.text
    [item] = listed.json()["data"]
    assert item == {"id": reading["id"], "status": reading["status"], "label": "n0"}
    url = response.headers["location"]
    repeated = await api.client.get(f"{url}?fields=id&fields=status", headers=alice)
    joined = await api.client.get(f"{url}?fields=id,status", headers=alice)
    assert repeated.json() == joined.json() == {"id": reading["id"], "status": "generated"}
    assert repeated.headers["etag"] == joined.headers["etag"]
    unknown = await api.client.get(f"{url}?fields=id&fields=horoscope", headers=alice)
    assert unknown.status_code == 422 and "horoscope" in unknown.text


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("fields=id,horoscope", "fields"),
        ("fields=chart.sun.colour", "fields"),
        ("limit=201", "limit"),
        ("limit=0", "limit"),
        ("status=lost", "status"),
        ("kind=tarot", "kind"),
        ("cursor=not-a-cursor", "cursor"),
        ("created_after=yesterday", "created_after"),
        ("created_before=0001-01-01T00:00:00%2B14:00", "created_before"),
        (
            "created_after=2026-01-02T00:00:00Z&created_before=2026-01-01T00:00:00Z",
            "created_before",
        ),
        # One bound without a time zone and one with: the two cannot be compared, so the
        # bound without one is named, whichever it is (comparing first was a 500).
        ("created_after=2026-01-01T00:00:00&created_before=2026-01-02T00:00:00Z", "created_after"),
        ("created_after=2026-01-01T00:00:00Z&created_before=2026-01-02T00:00:00", "created_before"),
        ("created_after=2026-01-03T00:00:00&created_before=2026-01-02T00:00:00", "created_after"),
        (
            "created_after=0001-01-01T00:00:00%2B14:00&created_before=2026-01-02T00:00:00",
            "created_before",
        ),
    ],
)
async def test_bad_listing_parameters_are_422_naming_the_parameter(
    api: Api, query: str, field: str
) -> None:
    got = await api.client.get(f"/api/v1/readings?{query}", headers=api.auth(api.alice))
    assert got.status_code == 422, got.text
    assert got.headers["content-type"].startswith(PROBLEM)
    assert field in [e["field"] for e in got.json()["errors"]], got.text


async def test_a_cursor_only_works_with_the_filters_it_was_made_with(api: Api) -> None:
    responses = await post_many(api, api.alice, 3)
    position = responses[-1].headers["almanac-position"]
    page = (
        await api.client.get(
            f"/api/v1/readings?limit=1&min_position={position}", headers=api.auth(api.alice)
        )
    ).json()
    got = await api.client.get(
        f"/api/v1/readings?limit=1&kind=love&cursor={page['next_cursor']}",
        headers=api.auth(api.alice),
    )
    assert got.status_code == 422 and "cursor" in got.text
    stolen = await api.client.get(
        f"/api/v1/readings?limit=1&cursor={page['next_cursor']}", headers=api.auth(api.bob)
    )
    assert stolen.status_code == 422


async def test_readings_of_the_same_birth_data_share_one_chart(api: Api) -> None:
    responses = await post_many(api, api.alice, 2)
    readings = await settled(api, api.alice, responses)
    [hash_a, hash_b] = [r["chart_hash"] for r in readings]
    assert hash_a == hash_b
    got = await api.client.get(f"/api/v1/charts/{hash_a}", headers=api.auth(api.alice))
    assert got.status_code == 200, got.text
    chart = got.json()
    assert chart["chart"] == readings[0]["chart"] == readings[1]["chart"]
    rows = await api.on_app(
        api.container.read_db.fetch_all,
        "SELECT chart_hash FROM charts WHERE chart_hash = :h",
        {"h": hash_a},
    )
    assert len(rows) == 1
    other = await api.client.get(f"/api/v1/charts/{hash_a}", headers=api.auth(api.bob))
    assert other.status_code == 404
    missing = await api.client.get("/api/v1/charts/" + "0" * 64, headers=api.auth(api.alice))
    assert missing.status_code == 404


async def test_etag_answers_304_until_the_reading_changes(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    reading = await api.wait_for_status(api.alice, response, {"generated"})
    url = response.headers["location"]
    got = await api.client.get(url, headers=api.auth(api.alice))
    etag = got.headers["etag"]
    assert str(reading["position"]) in etag
    again = await api.client.get(url, headers={**api.auth(api.alice), "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    stale = await api.client.get(
        url, headers={**api.auth(api.alice), "If-None-Match": '"r-stale-1"'}
    )
    assert stale.status_code == 200


async def test_etag_is_weak_and_matches_in_either_form(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    await api.wait_for_status(api.alice, response, {"generated"})
    url, alice = response.headers["location"], api.auth(api.alice)
    etag = (await api.client.get(url, headers=alice)).headers["etag"]
    # Compression changes the bytes of one representation, so the tag cannot be strong.
    assert etag.startswith('W/"')
    for form in (etag, etag.removeprefix("W/"), f'"other", {etag}'):
        again = await api.client.get(url, headers={**alice, "If-None-Match": form})
        assert again.status_code == 304, form
    for encoding in ("br", "gzip", "identity"):
        got = await api.client.get(url, headers={**alice, "Accept-Encoding": encoding})
        assert got.headers["etag"] == etag, encoding


async def test_each_field_selection_has_an_etag_of_its_own(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    reading = await api.wait_for_status(api.alice, response, {"generated"})
    alice = api.auth(api.alice)
    for url in (response.headers["location"], f"/api/v1/charts/{reading['chart_hash']}"):
        full = (await api.client.get(url, headers=alice)).headers["etag"]
        selection = (await api.client.get(f"{url}?fields=position", headers=alice)).headers["etag"]
        assert selection != full, url
        # The tag of the whole body does not revalidate a selection, nor the other way round.
        selected = await api.client.get(
            f"{url}?fields=position", headers={**alice, "If-None-Match": full}
        )
        assert selected.status_code == 200 and set(selected.json()) == {"position"}
        whole = await api.client.get(url, headers={**alice, "If-None-Match": selection})
        assert whole.status_code == 200 and len(whole.json()) > 1
        # The order of the paths only orders the keys: the same selection, the same tag.
        one = await api.client.get(f"{url}?fields=position,chart_hash", headers=alice)
        other = await api.client.get(f"{url}?fields=chart_hash, position", headers=alice)
        assert one.headers["etag"] == other.headers["etag"] != full


async def test_large_responses_are_compressed_for_clients_that_accept_it(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    generated = await api.wait_for_status(api.alice, response, {"generated"})
    for encoding in ("br", "gzip"):
        # Reads are fresh from a position on: without it, a cached, earlier state may answer.
        got = await api.client.get(
            f"{response.headers['location']}?min_position={generated['position']}",
            headers={**api.auth(api.alice), "Accept-Encoding": encoding},
        )
        assert got.status_code == 200
        assert got.headers["content-encoding"] == encoding
        assert got.json()["status"] == "generated"
    small = await api.client.get("/health/live", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers


async def test_every_query_endpoint_honours_min_position(api_without_projectors: Api) -> None:
    api = api_without_projectors
    [response] = await post_many(api, api.alice, 1)
    stored = int(response.headers["almanac-position"])  # stored, and no read model has it
    # The wait comes before anything is looked up, so an id nobody has is a 503, not a 404.
    unknown = "00000000-0000-4000-8000-000000000000"
    urls = [
        f"{response.headers['location']}?min_position={stored}",
        f"/api/v1/readings?min_position={stored}",
        f"/api/v1/charts/{'0' * 64}?min_position={stored}",
        f"/api/v1/jobs/{response.json()['id']}?min_position={stored}",
        f"/api/v1/jobs?min_position={stored}",
        f"/api/v1/batches?min_position={stored}",
        f"/api/v1/webhooks?min_position={stored}",
        f"/api/v1/webhooks/{unknown}/deliveries?min_position={stored}",
        f"/api/v1/webhooks/{unknown}/deliveries/d-1?min_position={stored}",
        f"/api/v1/batches/{unknown}?min_position={stored}",
        f"/api/v1/batches/{unknown}/results?min_position={stored}",
        f"/api/v1/batches/{unknown}/results?format=csv&min_position={stored}",
    ]
    for url in urls:
        got = await api.client.get(url, headers=api.auth(api.alice))
        assert got.status_code == 503, url
        assert got.json()["min_position"] == stored
    # Dead letters are the admin's to read.
    got = await api.client.get(
        f"/api/v1/dead-letters?min_position={stored}", headers=api.auth(api.admin)
    )
    assert got.status_code == 503 and got.json()["min_position"] == stored
    # And a position past the store's last is no wait's to reach, on every endpoint.
    for url in [*urls, f"/api/v1/dead-letters?min_position={stored}"]:
        key = api.admin if "dead-letters" in url else api.alice
        past = url.replace(f"min_position={stored}", f"min_position={stored + 1}")
        got = await api.client.get(past, headers=api.auth(key))
        assert got.status_code == 422, past
        assert [e["field"] for e in got.json()["errors"]] == ["min_position"], past


async def test_a_commands_position_reads_its_own_write_on_batches_jobs_and_webhooks(
    settings: Settings,
) -> None:
    """Right after a command, with no polling: a read with ``min_position`` set to the
    command's ``Almanac-Position`` already shows what the command did. Each endpoint is the
    first read after a command of its own, so each is the one that has to wait."""
    # Closed, so that every batch is still running when it is cancelled.
    generator = GatedGenerator(open_=False)
    async with serving(settings, generator=generator) as api:
        alice = api.auth(api.alice)

        async def read(url: str, position: str, **params: str) -> Any:
            got = await api.client.get(
                url, params={**params, "min_position": position}, headers=alice
            )
            assert got.status_code == 200, (url, got.text)
            assert int(got.headers["almanac-position"]) >= int(position), url
            return got.json()

        async def start(label: str) -> tuple[str, str, str]:
            body = {"items": [item(label=f"{label} item")], "label": label}
            started = await post_batch(api, api.alice, body)
            assert started.status_code == 202, started.text
            position = started.headers["almanac-position"]
            return started.json()["id"], started.headers["location"], position

        async def cancel(batch_url: str) -> str:
            cancelled = await api.client.post(f"{batch_url}/cancel", headers=alice)
            assert cancelled.status_code == 202, cancelled.text
            return str(cancelled.headers["almanac-position"])

        detail, detail_url, at = await start("detail")
        got = await read(detail_url, at)
        assert (got["id"], got["label"], got["status"]) == (detail, "detail", "running")
        listed, listed_url, at = await start("listed")
        # Newest first: the batch just started leads the list.
        assert (await read("/api/v1/batches", at))["data"][0]["id"] == listed
        _, results_url, at = await start("results")
        results = (await read(f"{results_url}/results", at))["data"]
        assert [(r["label"], r["status"]) for r in results] == [("results item", "pending")]
        job, job_url, at = await start("job")
        assert (await read(f"/api/v1/jobs/{job}", at))["state"] == "running"
        jobs, jobs_url, at = await start("jobs")
        newest = (await read("/api/v1/jobs", at, kind="batch"))["data"][0]
        assert (newest["id"], newest["state"]) == (jobs, "running")

        at = await cancel(detail_url)
        assert (await read(detail_url, at))["status"] == "cancelled"
        at = await cancel(listed_url)
        states = {b["id"]: b["status"] for b in (await read("/api/v1/batches", at))["data"]}
        assert states.get(listed) == "cancelled"
        at = await cancel(job_url)
        assert (await read(f"/api/v1/jobs/{job}", at))["state"] == "cancelled"
        at = await cancel(jobs_url)
        page = (await read("/api/v1/jobs", at, kind="batch"))["data"]
        assert {j["id"]: j["state"] for j in page}.get(jobs) == "cancelled"
        generator.gate.set()

        async def register(description: str) -> tuple[str, str, str]:
            # No event is of this type here, so nothing is ever sent to the address.
            hook = {
                "url": "http://127.0.0.1:9/hook",
                "event_types": ["webhook.test"],
                "description": description,
            }
            created = await api.client.post("/api/v1/webhooks", json=hook, headers=alice)
            assert created.status_code == 201, created.text
            position = created.headers["almanac-position"]
            return created.json()["id"], created.headers["location"], position

        async def rename(hook_url: str, description: str) -> str:
            changed = await api.client.patch(
                hook_url, json={"description": description}, headers=alice
            )
            assert changed.status_code == 200, changed.text
            return str(changed.headers["almanac-position"])

        shown, shown_url, at = await register("shown")
        got = await read(shown_url, at)
        assert (got["id"], got["description"]) == (shown, "shown")
        hook_listed, hook_listed_url, at = await register("listed")
        hooks = (await read("/api/v1/webhooks", at))["data"]
        assert {h["id"]: h["description"] for h in hooks}.get(hook_listed) == "listed"
        at = await rename(shown_url, "shown, renamed")
        assert (await read(shown_url, at))["description"] == "shown, renamed"
        at = await rename(hook_listed_url, "listed, renamed")
        hooks = (await read("/api/v1/webhooks", at))["data"]
        assert {h["id"]: h["description"] for h in hooks}.get(hook_listed) == "listed, renamed"


async def test_a_failures_position_reads_its_dead_letter(settings: Settings) -> None:
    """A dead letter comes from the worker's ``reading.failed``, not from a command: the
    position to read it at is the failed reading's (as a WebSocket frame or webhook tells)."""
    async with serving(giving_up_after(settings, 1), generator=FlakyGenerator()) as api:
        accepted = await api.post_reading(api.alice, body(label="flaky"))
        failed = await api.wait_for_status(api.alice, accepted, {"generated", "failed"})
        assert failed["status"] == "failed", failed
        got = await api.client.get(
            "/api/v1/dead-letters",
            params={"min_position": failed["position"]},
            headers=api.auth(api.admin),
        )
        assert got.status_code == 200, got.text
        assert int(got.headers["almanac-position"]) >= failed["position"]
        listed = [(d["aggregate_id"], d["failed_position"]) for d in got.json()["data"]]
        assert listed == [(accepted.json()["id"], failed["position"])]


async def test_concurrent_listing_and_posting_never_errors(api: Api) -> None:
    async def reader() -> None:
        for _ in range(10):
            got = await api.client.get("/api/v1/readings?limit=5", headers=api.auth(api.alice))
            assert got.status_code == 200

    await asyncio.gather(reader(), post_many(api, api.alice, 10))


async def test_a_fresh_read_replaces_an_earlier_cached_state(api: Api) -> None:
    [response] = await post_many(api, api.alice, 1)
    generated = await api.wait_for_status(api.alice, response, {"generated"})
    key = reading_key(generated["id"])
    current = decode_reading(await api.on_app(api.container.cache.get, key))
    assert current is not None
    # The cache holds an earlier state, as it may between a commit and its refresh (the
    # projector's own refresh of the generated reading may still land after this one).
    earlier = msgspec.structs.replace(
        current.view, status="chart_calculated", position=generated["position"] - 1
    )
    stale = encode_entry(msgspec.structs.replace(current, view=earlier))
    await api.on_app(api.container.cache.refresh, {key: stale})
    location, alice = response.headers["location"], api.auth(api.alice)
    fresh = await api.client.get(f"{location}?min_position={generated['position']}", headers=alice)
    assert fresh.json()["status"] == "generated"
    # From then on, reads without a position do not step back.
    assert (await api.client.get(location, headers=alice)).json()["status"] == "generated"
    cached = decode_reading(await api.on_app(api.container.cache.get, key))
    assert cached is not None and cached.view.position == generated["position"]
