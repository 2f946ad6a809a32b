"""Streams: the event feeds that carry stored events to consumers."""

# Before any module here imports nats-py: the adapter imports it without aiohttp.
import almanac.adapters.nats  # noqa: F401
