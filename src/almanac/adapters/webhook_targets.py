"""Which URLs webhooks may be sent to: a guard against server-side request forgery.

A URL is refused unless it is ``https`` (or ``http`` when allowed) and every address its
host resolves to is public, or inside a network the operator allowed. It is checked when
an endpoint is registered or changed, and again by every new connection a delivery makes,
since what a name resolves to can change: the connection goes to an address of the lookup
that was checked (``almanac.adapters.webhook_client.guarded_session``), never to a second
lookup's, so a name that
answered with a public address at registration and a private one later (DNS rebinding)
cannot carry a delivery inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from almanac.errors import AlmanacError
from almanac.settings import WebhookSettings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port → the addresses it resolves to (tests swap in their own names).
Resolver = Callable[[str, int], Awaitable[list[str]]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
MAX_URL = 2000


class TargetRefused(AlmanacError):
    """The URL may not be a webhook target; ``detail`` says why."""


async def resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetRefused(f"the host {host!r} does not resolve ({exc.strerror})") from None
    # In the resolver's order (its preference, e.g. IPv4 or IPv6 first), each once.
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT)
        or not address.is_global
    )


class TargetGuard:
    def __init__(self, settings: WebhookSettings, resolver: Resolver = resolve) -> None:
        self.allow_http = settings.allow_http
        self.allowed: list[Network] = [
            ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks
        ]
        self._resolve = resolver

    def check_form(self, url: str) -> tuple[str, int]:
        """The URL's host and port, if its form is acceptable (no lookups)."""
        if len(url) > MAX_URL:
            raise TargetRefused(f"the URL is longer than {MAX_URL} characters")
        parts = urlsplit(url)
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise TargetRefused(
                f"the URL must start with {' or '.join(s + '://' for s in schemes)}"
            )
        if not parts.hostname:
            raise TargetRefused("the URL names no host")
        if parts.username or parts.password:
            raise TargetRefused("the URL must not hold credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise TargetRefused("the URL has an invalid port") from None
        return parts.hostname, port

    async def check(self, url: str) -> list[str]:
        """The addresses the URL's host resolves to, all of them acceptable."""
        return await self.addresses(*self.check_form(url))

    async def check_send(self, url: str) -> None:
        """Before a request of a ``guarded_session``: the URL's form and, when its host is
        an address literal (which no resolver is asked about), that address. A name's
        addresses are checked when a connection is made (``GuardedResolver``): a kept-alive
        connection goes to addresses checked when it was made, so a lookup before every
        delivery would be one more for nothing."""
        host, port = self.check_form(url)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        await self.addresses(host, port)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to (or is), refused unless all are acceptable."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = [
                ipaddress.ip_address(a.split("%")[0]) for a in await self._resolve(host, port)
            ]
        if not addresses:
            raise TargetRefused(f"the host {host!r} does not resolve")
        for address in addresses:
            if not is_public(address) and not any(address in n for n in self.allowed):
                raise TargetRefused(
                    f"the host {host!r} resolves to {address}, a private or reserved address"
                )
        return [str(a) for a in addresses]
