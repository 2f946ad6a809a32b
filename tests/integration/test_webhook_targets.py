"""Webhook connections go only to addresses the SSRF guard accepted in the same lookup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from almanac.adapters.webhook_client import guarded_session
from almanac.adapters.webhook_targets import TargetGuard, TargetRefused
from almanac.settings import WebhookSettings
from tests.integration.support_receiver import receiving

LOOPBACK_ALLOWED = WebhookSettings(allowed_networks=("127.0.0.0/8",), allow_http=True)


@asynccontextmanager
async def session(guard: TargetGuard, timeout: float = 5.0) -> AsyncIterator[aiohttp.ClientSession]:
    async with guarded_session(guard, connections=4, timeout=timeout, headers={}) as client:
        yield client


async def post(
    client: aiohttp.ClientSession, guard: TargetGuard, url: str, *, close: bool = False
) -> int:
    """As the deliverer sends: the guard's check before the request, then the request."""
    await guard.check_send(url)
    headers = {"connection": "close"} if close else {}
    async with client.post(url, data=b"{}", headers=headers, allow_redirects=False) as response:
        return response.status


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
    async with receiving() as receiver, session(guard) as client:
        url = f"http://hooks.example:{receiver.port}/hook"
        assert await post(client, guard, url) == 200
    assert [r.headers["host"] for r in receiver.at("/hook")] == [f"hooks.example:{receiver.port}"]
    assert names.asked == ["hooks.example"]  # the connection's own lookup


async def test_a_name_rebound_to_a_private_address_after_its_check_is_not_connected_to() -> None:
    # Public when checked, then (a short TTL later) a private address: DNS rebinding.
    names = Names(rebind_example=[["93.184.216.34"], ["10.0.0.7"]])
    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=names)
    assert await guard.check("http://rebind.example/hook") == ["93.184.216.34"]
    async with session(guard) as client:
        with pytest.raises(TargetRefused, match=r"resolves to 10\.0\.0\.7"):
            await post(client, guard, "http://rebind.example/hook")
    assert names.asked == ["rebind.example", "rebind.example"]


async def test_every_new_connection_is_looked_up_and_checked_again() -> None:
    # No cache of lookups between connections: the second connection's lookup is its own.
    names = Names(hooks_example=[["127.0.0.1"], ["10.0.0.7"]])
    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=names)
    async with receiving() as receiver, session(guard) as client:
        url = f"http://hooks.example:{receiver.port}/hook"
        assert await post(client, guard, url, close=True) == 200
        with pytest.raises(TargetRefused, match=r"resolves to 10\.0\.0\.7"):
            await post(client, guard, url)
    assert names.asked == ["hooks.example", "hooks.example"]
    assert len(receiver.at("/hook")) == 1


async def test_an_address_literal_is_checked_before_the_request() -> None:
    guard = TargetGuard(WebhookSettings(allow_http=True))  # loopback not allowed
    async with receiving() as receiver, session(guard) as client:
        with pytest.raises(TargetRefused, match="private or reserved"):
            await post(client, guard, receiver.url("/hook"))
    assert receiver.received == []


async def test_the_lookup_counts_against_the_attempt_s_one_timeout() -> None:
    async def never(host: str, port: int) -> list[str]:
        # A lookup that never answers: only the attempt's own timeout ends it.
        answer: list[str] = await asyncio.get_running_loop().create_future()
        return answer

    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=never)
    async with session(guard, timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            await post(client, guard, "http://slow.example/hook")


async def test_proxy_variables_of_the_environment_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy would be what is checked and connected to, and what resolves the target.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    names = Names(hooks_example=[["127.0.0.1"]])
    guard = TargetGuard(LOOPBACK_ALLOWED, resolver=names)
    async with receiving() as receiver, session(guard) as client:
        assert await post(client, guard, f"http://hooks.example:{receiver.port}/hook") == 200
    assert names.asked == ["hooks.example"]
