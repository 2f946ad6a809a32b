"""Webhook connections go only to addresses the SSRF guard accepted in the same lookup."""

from __future__ import annotations

import asyncio
from typing import Any

import httpcore
import httpx
import pytest

from almanac.adapters.webhook_targets import (
    GuardedNetwork,
    TargetGuard,
    TargetRefused,
    guarded_transport,
)
from almanac.settings import WebhookSettings
from tests.integration.support_receiver import receiving

LOOPBACK_ALLOWED = WebhookSettings(allowed_networks=("127.0.0.0/8",), allow_http=True)


class Names:
    """A resolver answering each name with its next scripted answer (the last one repeats)."""

    def __init__(self, **answers: list[list[str]]) -> None:
        self.answers = {name.replace("_", "."): list(a) for name, a in answers.items()}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.answers[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


async def test_a_delivery_connects_to_the_checked_address_and_names_the_host() -> None:
    names = Names(hooks_example=[["127.0.0.1"]])
    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=names)
    async with (
        receiving() as receiver,
        httpx.AsyncClient(transport=guarded_transport(guard)) as client,
    ):
        url = f"http://hooks.example:{receiver.port}/hook"
        response = await client.post(url, content=b"{}")
    assert response.status_code == 200
    assert [r.headers["host"] for r in receiver.at("/hook")] == [f"hooks.example:{receiver.port}"]
    assert names.asked == ["hooks.example"]  # the connection's own lookup


async def test_a_name_rebound_to_a_private_address_after_its_check_is_not_connected_to() -> None:
    # Public when checked, then (a short TTL later) a private address: DNS rebinding.
    names = Names(rebind_example=[["93.184.216.34"], ["10.0.0.7"]])
    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=names)
    assert await guard.check("http://rebind.example/hook") == ["93.184.216.34"]
    async with httpx.AsyncClient(transport=guarded_transport(guard)) as client:
        with pytest.raises(TargetRefused, match=r"resolves to 10\.0\.0\.7"):
            await client.post("http://rebind.example/hook", content=b"{}")
    assert names.asked == ["rebind.example", "rebind.example"]


async def test_an_address_literal_is_checked_at_connect_too() -> None:
    guard = TargetGuard(WebhookSettings(allow_http=True))  # loopback not allowed
    async with (
        receiving() as receiver,
        httpx.AsyncClient(transport=guarded_transport(guard)) as client,
    ):
        with pytest.raises(TargetRefused, match="private or reserved"):
            await client.post(receiver.url("/hook"), content=b"{}")
    assert receiver.received == []


class Unanswered(httpcore.AsyncNetworkBackend):
    """A network where no address answers: each try takes the time it is given."""

    def __init__(self) -> None:
        self.tried: list[tuple[str, float | None]] = []

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, *_: Any, **__: Any
    ) -> httpcore.AsyncNetworkStream:
        self.tried.append((host, timeout))
        await asyncio.sleep(timeout or 0)
        raise httpcore.ConnectTimeout(f"{host} did not answer")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def test_the_lookup_and_every_address_tried_share_the_connection_s_one_timeout() -> None:
    names = Names(slow_example=[["93.184.216.34", "93.184.216.35", "93.184.216.36"]])
    network = Unanswered()
    guarded = GuardedNetwork(TargetGuard(WebhookSettings(), resolver=names), network)
    with pytest.raises(httpcore.ConnectTimeout):
        await guarded.connect_tcp("slow.example", 443, timeout=0.2)
    # The first address (in the resolver's order) had the whole budget; no other had more
    # than what was left of it.
    assert network.tried[0][0] == "93.184.216.34"
    assert sum(t or 0 for _, t in network.tried) <= 0.2 + 0.01 * len(network.tried)


def test_a_transport_through_a_proxy_is_refused() -> None:
    guard = TargetGuard(LOOPBACK_ALLOWED)
    with pytest.raises(RuntimeError, match="pinned"):
        guarded_transport(guard, proxy="http://127.0.0.1:3128")
