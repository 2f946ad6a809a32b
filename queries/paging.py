"""The cursors of paged listings: where the next page starts, and how fresh a source must be
to serve it.

Each page is routed on its own, to the primary or to any standby within ``max_lag`` of it.
A page read from a source further behind than the one that served the page before it
lacks the rows that source had got to: those between its own position and the cursor's
key would be missing without a trace. So a cursor holds, beside the key, the position its
page was read at, and the next page is read as though it had asked for that
``min_position``: only from a source that has got at least as far (waiting for the
primary's projections as such a read does, and refused with the same 503 when they never
get there, as after a rebuild in place).

A cursor is opaque (base64url of JSON) and bound to the listing, its filters and its
owner: anything a client sends in its place is a cursor made here, for this listing, or a
422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

from almanac.errors import FieldError, ValidationFailed

# Within a 64-bit integer, as positions are: a larger number, which only a forged cursor
# carries, would overflow SQLite's INTEGER parameter.
_Int64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Cursor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Where the next page starts in the listing's own order (a position, an item's index).
    key: _Int64
    # A position the source of the page had reached: the floor for the next page's source.
    at: _Int64
    # The listing, filters and owner the cursor was made for (``scope_of``).
    scope: str


def scope_of(listing: str, *parts: Any) -> str:
    """What a cursor of ``listing`` with these filters and owner is bound to."""
    return hashlib.sha256(msgspec.json.encode([listing, *parts])).hexdigest()[:16]


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(raw: str | None, scope: str) -> Cursor | None:
    """The cursor ``raw`` holds (None for the first page), or a 422 naming ``cursor``."""
    if raw is None:
        return None
    try:
        padded = raw + "=" * (-len(raw) % 4)
        cursor = msgspec.json.decode(base64.urlsafe_b64decode(padded), type=Cursor)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        raise _bad("is not a cursor from this API; use next_cursor as given") from None
    if cursor.scope != scope:
        raise _bad("belongs to a listing with other filters; repeat the filters it was made with")
    return cursor


def floor(min_position: int | None, cursor: Cursor | None) -> int | None:
    """The ``min_position`` to read a page with: the client's, raised to the position the
    page before was read at."""
    if cursor is None:
        return min_position
    return max(min_position or 0, cursor.at)


def read_at(position: int, seen: Iterable[int] = ()) -> int:
    """The position a page was read at: what its read reported, raised to any position its
    rows show the source had got to.

    The reported position is where the source was known to be when the read was routed;
    the rows, read after, may come from further on (a row's position is one its projection
    had committed). Were the next page held only to the reported position, it could come
    from a source short of the rows just shown. ``seen`` must be positions of every
    projection the listing reads.
    """
    return max([position, *seen])


def _bad(message: str) -> ValidationFailed:
    return ValidationFailed([FieldError("cursor", message)])
