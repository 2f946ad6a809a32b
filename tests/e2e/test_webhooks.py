"""Webhooks end to end: endpoints over HTTP, deliveries to a real receiver on 127.0.0.1 that
checks every signature with the ``standardwebhooks`` library."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from standardwebhooks.webhooks import Webhook

from almanac.settings import Settings
from tests.e2e.conftest import Api, serving
from tests.integration.support_receiver import Receiver, Reply, receiving
from tests.integration.support_waiting import eventually

BIRTH = {
    "birth": {
        "date": "1990-04-12",
        "time": "14:30",
        "timezone": "Europe/London",
        "latitude": 51.5074,
        "longitude": -0.1278,
    }
}


@dataclass
class Hooks:
    api: Api
    receiver: Receiver

    async def register(self, key: str, path: str, **body: Any) -> dict[str, Any]:
        response = await self.api.client.post(
            "/api/v1/webhooks",
            json={"url": self.receiver.url(path), **body},
            headers=self.api.auth(key),
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    async def test(self, key: str, endpoint: dict[str, Any]) -> str:
        response = await self.api.client.post(
            f"/api/v1/webhooks/{endpoint['id']}/test", headers=self.api.auth(key)
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    async def delivery(self, key: str, endpoint: dict[str, Any], delivery_id: str) -> Any:
        response = await self.api.client.get(
            f"/api/v1/webhooks/{endpoint['id']}/deliveries/{delivery_id}",
            headers=self.api.auth(key),
        )
        return response.json() if response.status_code == 200 else None

    async def settled(
        self, key: str, endpoint: dict[str, Any], delivery_id: str, status: str = "succeeded"
    ) -> dict[str, Any]:
        async def check() -> Any:
            found = await self.delivery(key, endpoint, delivery_id)
            return found if found and found["status"] == status else None

        settled: dict[str, Any] = await eventually(check, what=f"delivery {status}")
        return settled


def with_webhooks(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(
        settings, webhooks=msgspec.structs.replace(settings.webhooks, **changes)
    )


@pytest.fixture
async def hooks(settings: Settings) -> AsyncIterator[Hooks]:
    async with receiving() as receiver, serving(settings) as api:
        yield Hooks(api, receiver)


def verified(secret: str, received: Any) -> Any:
    """The payload, if its signature is good (raises otherwise)."""
    return Webhook(secret).verify(received.body.decode(), received.headers)


async def test_registers_an_endpoint_and_shows_the_secret_only_once(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.register(
        api.alice, "/a", event_types=["reading.*"], description="mine", rate_limit=5
    )
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    response = await api.client.get(
        f"/api/v1/webhooks/{created['id']}?min_position={created['position']}",
        headers=api.auth(api.alice),
    )
    assert response.status_code == 200, response.text
    shown = response.json()
    assert "secret" not in json.dumps(shown)
    assert shown["event_types"] == ["reading.*"]
    assert (shown["status"], shown["rate_limit"], shown["description"]) == ("enabled", 5, "mine")
    listed = (await api.client.get("/api/v1/webhooks", headers=api.auth(api.alice))).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert (
        await api.client.get(f"/api/v1/webhooks/{created['id']}", headers=api.auth(api.bob))
    ).status_code == 404
    # Stored encrypted: the secret appears nowhere in the event store.
    events = await api.on_app(api.container.store.read, 0, 1000)
    assert not any(secret.encode() in e.state for e in events)
    assert not any(secret.removeprefix("whsec_").encode() in e.state for e in events)


async def test_changes_and_deletes_an_endpoint(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.register(api.alice, "/a")
    url = f"/api/v1/webhooks/{created['id']}"
    assert (
        await api.client.patch(url, json={"description": "x"}, headers=api.auth(api.bob))
    ).status_code == 404
    changed = await api.client.patch(
        url,
        json={"event_types": ["reading.generated"], "rate_limit": None, "enabled": False},
        headers=api.auth(api.alice),
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["status"] == "disabled"
    assert changed.json()["event_types"] == ["reading.generated"]
    bad = await api.client.patch(
        url, json={"event_types": ["Not A Type"]}, headers=api.auth(api.alice)
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "event_types.0"
    deleted = await api.client.delete(url, headers=api.auth(api.alice))
    assert deleted.status_code == 204
    position = deleted.headers["almanac-position"]
    gone = await api.client.get(f"{url}?min_position={position}", headers=api.auth(api.alice))
    assert gone.status_code == 404


async def test_an_endpoint_has_an_etag_that_changes_with_it(hooks: Hooks) -> None:
    api = hooks.api
    created = await hooks.register(api.alice, "/a")
    url = f"/api/v1/webhooks/{created['id']}"
    alice = api.auth(api.alice)
    position = created["position"]
    first = await api.client.get(f"{url}?min_position={position}", headers=alice)
    etag = first.headers["etag"]
    assert etag.startswith('W/"w-')
    unchanged = await api.client.get(url, headers={**alice, "If-None-Match": etag})
    assert unchanged.status_code == 304
    changed = await api.client.patch(url, json={"description": "renamed"}, headers=alice)
    assert changed.status_code == 200, changed.text
    after = changed.headers["almanac-position"]
    again = await api.client.get(
        f"{url}?min_position={after}", headers={**alice, "If-None-Match": etag}
    )
    assert again.status_code == 200
    assert again.json()["description"] == "renamed"
    assert again.headers["etag"] != etag


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://127.0.0.1/hook", "must start with"),
        ("http://", "names no host"),
        ("http://10.1.2.3/hook", "private or reserved"),
        ("http://169.254.169.254/latest/meta-data", "private or reserved"),
        ("http://100.64.0.1/hook", "private or reserved"),
        ("http://[::1]/hook", "private or reserved"),
        ("http://internal.example/hook", "resolves to 10.0.0.7"),
    ],
)
async def test_refuses_urls_that_reach_private_networks(
    settings: Settings, url: str, why: str
) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.0.0.7"] if host == "internal.example" else ["127.0.0.1"]

    async with serving(settings, resolver=resolver) as api:
        response = await api.client.post(
            "/api/v1/webhooks", json={"url": url}, headers=api.auth(api.alice)
        )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "url"
    assert why in response.json()["errors"][0]["message"]


async def test_refuses_loopback_and_plain_http_unless_allowed(settings: Settings) -> None:
    strict = with_webhooks(settings, allowed_networks=(), allow_http=False)
    async with serving(strict) as api:
        for url in ("http://127.0.0.1:9/hook", "https://127.0.0.1:9/hook", "https://localhost/"):
            response = await api.client.post(
                "/api/v1/webhooks", json={"url": url}, headers=api.auth(api.alice)
            )
            assert response.status_code == 422, (url, response.text)


async def test_delivers_matching_events_signed_to_each_endpoint(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    every = await hooks.register(api.alice, "/every", event_types=["reading.*"])
    generated = await hooks.register(api.alice, "/generated", event_types=["reading.generated"])
    accepted = await api.post_reading(api.alice, BIRTH)
    await api.post_reading(api.bob, BIRTH)
    reading_id = accepted.json()["id"]
    await api.wait_for_status(api.alice, accepted, {"generated"})

    await eventually(lambda: _async(len(receiver.at("/generated")) >= 1), what="generated sent")
    await eventually(
        lambda: _async(
            any(json.loads(r.body)["type"] == "reading.generated" for r in receiver.at("/every"))
        ),
        what="every event sent",
    )
    for received in receiver.at("/every"):
        payload = verified(every["secret"], received)
        assert payload["type"].startswith("reading.")
        assert payload["data"]["aggregate_id"] == reading_id  # bob's events never come here
        assert received.headers["content-type"] == "application/json"
        assert int(received.headers["webhook-timestamp"]) > 0
    [only] = receiver.at("/generated")
    payload = verified(generated["secret"], only)
    assert payload["type"] == "reading.generated"
    assert payload["data"]["metadata"]["owner"] == "alice"
    assert payload["data"]["position"] > 0
    with pytest.raises(Exception, match="signature"):
        verified(every["secret"], only)
    detail = await hooks.settled(api.alice, generated, only.id)
    assert detail["event_type"] == "reading.generated"
    [attempt] = detail["attempt_log"]
    assert attempt["status_code"] == 200 and attempt["outcome"] == "succeeded"
    assert attempt["response"] == "ok" and attempt["latency_ms"] >= 0
    listed = await api.client.get(
        f"/api/v1/webhooks/{generated['id']}/deliveries", headers=api.auth(api.alice)
    )
    assert [d["id"] for d in listed.json()["data"]] == [only.id]


async def test_retries_on_the_schedule_with_a_stable_webhook_id(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    receiver.scripts["/flaky"] = [Reply(500), Reply(502, body=b"bad gateway")]
    endpoint = await hooks.register(api.alice, "/flaky")
    message_id = await hooks.test(api.alice, endpoint)
    detail = await hooks.settled(api.alice, endpoint, message_id)
    assert [a["status_code"] for a in detail["attempt_log"]] == [500, 502, 200]
    assert detail["attempt_log"][1]["response"] == "bad gateway"
    assert detail["attempts"] == 3
    tries = receiver.at("/flaky")
    assert {r.id for r in tries} == {message_id}
    # 5 s and 5 min, compressed a thousandfold, with ±20 % jitter.
    assert tries[2].at - tries[1].at >= 0.3 * 0.8 - 0.05
    assert verified(endpoint["secret"], tries[2])["type"] == "webhook.test"


async def test_an_answer_holding_nul_is_recorded_and_settles_the_message(hooks: Hooks) -> None:
    """A Postgres text column refuses NUL: the answer is kept with NUL replaced, and the
    message settles instead of staying claimed (and going out again at every lease)."""
    api, receiver = hooks.api, hooks.receiver
    receiver.default["/binary"] = Reply(200, body=b"ok\x00\x01binary")
    endpoint = await hooks.register(api.alice, "/binary")
    message_id = await hooks.test(api.alice, endpoint)
    detail = await hooks.settled(api.alice, endpoint, message_id)
    assert detail["attempts"] == 1
    assert [a["response"] for a in detail["attempt_log"]] == ["ok\ufffd\x01binary"]


async def test_a_spent_schedule_fails_the_message_and_recover_sends_it_again(
    settings: Settings,
) -> None:
    quick = with_webhooks(settings, retry_schedule=(0.01, 0.01), breaker_threshold=100)
    async with receiving() as receiver, serving(quick) as api:
        hooks = Hooks(api, receiver)
        receiver.default["/down"] = Reply(500)
        endpoint = await hooks.register(api.alice, "/down")
        started = datetime.now(UTC) - timedelta(seconds=1)
        message_id = await hooks.test(api.alice, endpoint)
        failed = await hooks.settled(api.alice, endpoint, message_id, "failed")
        assert len(failed["attempt_log"]) == 3
        receiver.default["/down"] = Reply(200)
        response = await api.client.post(
            f"/api/v1/webhooks/{endpoint['id']}/recover",
            params={"since": started.isoformat()},
            headers=api.auth(api.alice),
        )
        assert response.status_code == 202, response.text
        recovered = await hooks.settled(api.alice, endpoint, message_id)
        assert recovered["attempt_log"][-1]["status_code"] == 200
        # An explicit resend sends a delivered message once more, with the same id.
        resent = await api.client.post(
            f"/api/v1/webhooks/{endpoint['id']}/deliveries/{message_id}/resend",
            headers=api.auth(api.alice),
        )
        assert resent.status_code == 202, resent.text
        await eventually(lambda: _async(len(receiver.at("/down")) == 5), what="the resend received")
        assert {r.id for r in receiver.at("/down")} == {message_id}
        missing = await api.client.post(
            f"/api/v1/webhooks/{endpoint['id']}/deliveries/msg_nope/resend",
            headers=api.auth(api.alice),
        )
        assert missing.status_code == 404


async def test_a_delivery_cursor_or_id_that_names_nothing_is_a_4xx_not_a_500(
    hooks: Hooks,
) -> None:
    """A NUL cannot be a parameter of a Postgres query: sent on, it failed the query."""
    api = hooks.api
    created = await api.client.post(
        "/api/v1/webhooks", json={"url": hooks.receiver.url("/any")}, headers=api.auth(api.alice)
    )
    assert created.status_code == 201, created.text
    deliveries = f"/api/v1/webhooks/{created.json()['id']}/deliveries"
    known = {"min_position": created.headers["almanac-position"]}
    for cursor in ("1.5~msg_\x00", "nan~msg_a", "inf~msg_a", "1.5~", "soon~msg_a"):
        got = await api.client.get(
            deliveries, params={**known, "cursor": cursor}, headers=api.auth(api.alice)
        )
        assert got.status_code == 422, (cursor, got.text)
        assert got.headers["content-type"].startswith("application/problem+json")
        assert [e["field"] for e in got.json()["errors"]] == ["cursor"], cursor
    for delivery_id in ("%00", "msg_%00"):
        got = await api.client.get(f"{deliveries}/{delivery_id}", headers=api.auth(api.alice))
        assert got.status_code == 404, (delivery_id, got.text)
        resent = await api.client.post(
            f"{deliveries}/{delivery_id}/resend", headers=api.auth(api.alice)
        )
        assert resent.status_code == 404, (delivery_id, resent.text)


async def test_a_410_disables_the_endpoint_at_once(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    receiver.default["/gone"] = Reply(410)
    endpoint = await hooks.register(api.alice, "/gone")
    message_id = await hooks.test(api.alice, endpoint)
    await hooks.settled(api.alice, endpoint, message_id, "failed")

    async def disabled() -> Any:
        shown = await api.client.get(
            f"/api/v1/webhooks/{endpoint['id']}", headers=api.auth(api.alice)
        )
        return shown.json() if shown.json()["status"] == "disabled" else None

    shown = await eventually(disabled, what="endpoint disabled")
    assert "410" in shown["disabled_reason"]
    assert len(receiver.at("/gone")) == 1


async def test_retry_after_on_429_is_honoured(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    receiver.scripts["/busy"] = [Reply(429, headers=(("retry-after", "1"),))]
    endpoint = await hooks.register(api.alice, "/busy")
    message_id = await hooks.test(api.alice, endpoint)
    await hooks.settled(api.alice, endpoint, message_id)
    first, second = receiver.at("/busy")
    assert second.at - first.at >= 0.95


async def test_a_rotation_signs_with_both_secrets_during_the_overlap(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    endpoint = await hooks.register(api.alice, "/rotating")
    rotated = await api.client.post(
        f"/api/v1/webhooks/{endpoint['id']}/rotate-secret", headers=api.auth(api.alice)
    )
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret != endpoint["secret"] and new_secret.startswith("whsec_")
    message_id = await hooks.test(api.alice, endpoint)
    await hooks.settled(api.alice, endpoint, message_id)
    [received] = receiver.at("/rotating")
    assert len(received.headers["webhook-signature"].split(" ")) == 2
    assert verified(endpoint["secret"], received)["type"] == "webhook.test"
    assert verified(new_secret, received)["type"] == "webhook.test"


async def test_a_slow_endpoint_does_not_delay_a_fast_one(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    answering = asyncio.Event()
    receiver.default["/slow"] = Reply(gate=answering)
    slow = await hooks.register(api.alice, "/slow")
    fast = await hooks.register(api.alice, "/fast")
    try:
        slow_ids = [await hooks.test(api.alice, slow) for _ in range(10)]
        await eventually(lambda: _async(len(receiver.at("/slow")) >= 1), what="slow ones sent")
        fast_id = await hooks.test(api.alice, fast)
        await hooks.settled(api.alice, fast, fast_id)
        # Delivered while the slow endpoint's whole backlog was still waiting for an answer.
        slow_ones = [await hooks.delivery(api.alice, slow, i) for i in slow_ids]
    finally:
        answering.set()
    assert [d and d["status"] for d in slow_ones] == ["pending"] * len(slow_ids), slow_ones


async def test_a_deliverer_with_every_slot_waiting_on_an_endpoint_stops_without_its_answer(
    settings: Settings,
) -> None:
    """Stopping does not wait for the endpoint's timeout (a minute here): attempts under way
    get a short grace, then are given up; their messages fall due again with their lease."""
    settings = with_webhooks(settings, concurrency=2, per_endpoint_concurrency=2, timeout=60.0)
    answering = asyncio.Event()
    async with receiving() as receiver, serving(settings) as api:
        hooks = Hooks(api, receiver)
        receiver.default["/hangs"] = Reply(gate=answering)
        endpoint = await hooks.register(api.alice, "/hangs")
        try:
            for _ in range(3):
                await hooks.test(api.alice, endpoint)
            await eventually(
                lambda: _async(len(receiver.at("/hangs")) >= 2), what="both slots sending"
            )
            (deliverer,) = api.container.background["deliver"]
            (running,) = [t for t in api.container._tasks if t.get_name() == deliverer.name]
            # The app runs on a loop of its own (the test client's).
            running.get_loop().call_soon_threadsafe(deliverer.stop)
            await eventually(lambda: _async(running.done()), within=30, what="the stop")
            assert running.exception() is None  # stopped, not crashed
        finally:
            answering.set()


async def test_a_rate_limit_spreads_deliveries_out(hooks: Hooks) -> None:
    api, receiver = hooks.api, hooks.receiver
    endpoint = await hooks.register(api.alice, "/limited", rate_limit=2)
    ids = [await hooks.test(api.alice, endpoint) for _ in range(5)]
    for message_id in ids:
        await hooks.settled(api.alice, endpoint, message_id)
    times = sorted(r.at for r in receiver.at("/limited"))
    assert len(times) == 5
    assert times[-1] - times[0] >= 1.0


async def test_the_circuit_breaker_holds_attempts_back_from_a_failing_endpoint(
    settings: Settings,
) -> None:
    # One attempt at a time, so that the order of failures and holds is plain.
    tripping = with_webhooks(
        settings, breaker_threshold=2, breaker_cooldown=1.0, per_endpoint_concurrency=1
    )
    async with receiving() as receiver, serving(tripping) as api:
        hooks = Hooks(api, receiver)
        receiver.default["/dead"] = Reply(500)
        endpoint = await hooks.register(api.alice, "/dead")
        ids = [await hooks.test(api.alice, endpoint) for _ in range(4)]

        async def each_tried() -> bool:
            return {r.id for r in receiver.at("/dead")} >= set(ids)

        # While open, the breaker lets one probe through per cooldown, so this takes a while.
        await eventually(each_tried, within=60, what="every message tried once")
        firsts: dict[str, float] = {}
        for received in receiver.at("/dead"):
            firsts.setdefault(received.id, received.at)
        # Two failures opened the breaker: the rest were held back for its cooldown.
        assert max(firsts.values()) - min(firsts.values()) >= 0.9


async def test_an_endpoint_failing_for_too_long_is_disabled(settings: Settings) -> None:
    impatient = with_webhooks(settings, disable_after=1.0, breaker_threshold=100)
    async with receiving() as receiver, serving(impatient) as api:
        hooks = Hooks(api, receiver)
        receiver.default["/broken"] = Reply(500)
        endpoint = await hooks.register(api.alice, "/broken")
        await hooks.test(api.alice, endpoint)

        async def disabled() -> Any:
            shown = await api.client.get(
                f"/api/v1/webhooks/{endpoint['id']}", headers=api.auth(api.alice)
            )
            return shown.json() if shown.json()["status"] == "disabled" else None

        shown = await eventually(disabled, what="endpoint disabled")
        assert "no successful delivery" in shown["disabled_reason"]


async def _async(value: Any) -> Any:
    return value


async def test_a_name_rebound_after_its_check_is_refused_at_the_connection(
    settings: Settings,
) -> None:
    # The check at registration hears an allowed address, the delivery's connection a
    # private one (DNS rebinding): nothing may be sent there.
    answers = itertools.repeat(["127.0.0.1"])

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers) if host == "rebind.example" else ["127.0.0.1"]

    async with receiving() as receiver, serving(settings, resolver=resolver) as api:
        hooks = Hooks(api, receiver)
        response = await api.client.post(
            "/api/v1/webhooks",
            json={"url": f"http://rebind.example:{receiver.port}/hook"},
            headers=api.auth(api.alice),
        )
        assert response.status_code == 201, response.text
        endpoint = response.json()
        answers = itertools.repeat(["10.0.0.7"])
        message_id = await hooks.test(api.alice, endpoint)

        async def attempted() -> Any:
            found = await hooks.delivery(api.alice, endpoint, message_id)
            return found["attempt_log"] if found and found["attempt_log"] else None

        first = (await eventually(attempted, what="an attempt"))[0]
    assert first["error"].startswith("refused:"), first
    assert "resolves to 10.0.0.7" in first["error"]
    assert receiver.at("/hook") == []
