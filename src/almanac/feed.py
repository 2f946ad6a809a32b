"""The event-feed ports: how consumers follow the global order of stored events
(``EventFeed``), and how competing workers share events out as work (``WorkFeed``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol
from uuid import UUID

from almanac.domain.events import EventMeta
from almanac.errors import Unavailable
from almanac.eventstore import RecordedEvent


class Follower(Protocol):
    """One consumer's view of the feed, with its own wake-ups."""

    async def next_batch(self, after: int, limit: int, timeout: float) -> list[RecordedEvent]:
        """Events with positions greater than ``after``, in order; waits up to ``timeout``
        seconds for the first one and returns an empty list if none came."""
        ...

    def prepared(self, events: list[RecordedEvent]) -> object | None:
        """What the follower's ``prepare`` made of ``events``, the batch it returned last,
        handed out once (a consumer trying the batch again works it out anew); None if
        there is nothing for these events. A follower may prepare only some batches (the
        log feed prepares those it reads for one follower, not the few newest events it
        shares among all of them): the consumer works out the others itself."""
        ...

    def close(self) -> None: ...


# Work on a batch that a follower may do as it reads it, off the event loop: pure, and safe
# to run in a worker thread.
Prepare = Callable[[list[RecordedEvent]], object]


class EventFeed(Protocol):
    async def start(self) -> None: ...

    def follow(self, prepare: Prepare | None = None) -> Follower: ...

    async def stop(self) -> None: ...


class EventRef(Protocol):
    """What a consumer of work needs of a stored event: a ``RecordedEvent`` has it, and so
    do the headers of a message on the relay's stream."""

    @property
    def position(self) -> int: ...

    @property
    def type(self) -> str: ...

    @property
    def aggregate_id(self) -> UUID: ...

    @property
    def meta(self) -> EventMeta: ...


class Delivery(Protocol):
    """One event handed to one consumer, until that consumer acknowledges it."""

    @property
    def event(self) -> EventRef: ...

    @property
    def attempt(self) -> int:
        """1 on the first delivery, more when the event comes again (the log's feed counts
        within one run only: after a restart it starts again at 1)."""
        ...

    @property
    def exhausted(self) -> bool:
        """True on the one delivery that follows the last of ``max_deliver`` unacknowledged
        ones: not for trying the work again, but for recording that it was given up (a
        dead letter). If this one is not acknowledged either, the event is dropped."""
        ...

    async def ack(self) -> None:
        """Done: the event is never delivered again."""
        ...

    async def nak(self, delay: float = 0.0) -> None:
        """Not done: deliver the event again (to any consumer) after ``delay`` seconds."""
        ...

    async def in_progress(self) -> None:
        """Still working on it: the ack wait starts again."""
        ...


class FeedNotReady(Unavailable):
    """What a feed is read from does not exist yet (the stream a relay creates): usual while
    a deployment starts, so the feed says so once, and its consumers wait without warning."""


class WorkFeed(Protocol):
    """Events of one type shared out as work among competing consumers, at least once.

    Each event goes to one consumer at a time; one that is neither acknowledged nor handed
    back within the ack wait (its consumer died, say) is delivered again, as is one handed
    back with ``nak``, up to ``max_deliver`` times; then once more, marked ``exhausted``, so
    that the consumer records it as given up, whether its last delivery failed or its
    consumer died. A single consumer gets first deliveries in position order.
    """

    async def open(self) -> None:
        """Connect and resume; raises ``FeedNotReady`` (or another error) if the feed is not
        available yet: try again later."""
        ...

    async def fetch(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` deliveries; waits up to ``timeout`` seconds for the first one and
        returns an empty list if none came."""
        ...

    async def close(self) -> None:
        """Stop taking work; whatever is unacknowledged is delivered again, elsewhere or
        after a restart."""
        ...
