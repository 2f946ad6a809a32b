"""The HTTP client webhooks are delivered with: aiohttp, connecting only to addresses the
``TargetGuard`` accepted in each new connection's own lookup.

A module of its own so that only a process that delivers loads aiohttp (~9 MB of RSS):
an API process checks URLs with the guard alone.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from almanac.adapters.webhook_targets import TargetGuard


class GuardedResolver(AbstractResolver):
    """aiohttp's name lookup for new connections: the host is resolved and checked here, and
    the connection is made to those addresses, in the resolver's order. (TLS still verifies,
    and names, the host itself.)"""

    def __init__(self, guard: TargetGuard) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in await self._guard.addresses(host, port)
        ]

    async def close(self) -> None:
        return None


def guarded_session(
    guard: TargetGuard, *, connections: int, timeout: float, headers: Mapping[str, str]
) -> aiohttp.ClientSession:
    """An aiohttp session whose new connections go to addresses ``guard`` accepted in the
    connection's own lookup (``GuardedResolver``).

    aiohttp asks no resolver for an address literal: ``TargetGuard.check_send`` checks it
    before each request. Nothing goes through a proxy (it would be the proxy that is
    checked and connected to), none is taken from the environment, and no cookie an
    endpoint sets is kept or sent to another.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            resolver=GuardedResolver(guard),
            # A fresh, checked lookup for every new connection, as the guard's own.
            use_dns_cache=False,
            limit=connections,
        ),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers=dict(headers),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
