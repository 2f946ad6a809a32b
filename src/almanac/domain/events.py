"""What every event carries besides its own facts."""

from __future__ import annotations

import msgspec

from almanac.ids import new_request_id


class EventMeta(msgspec.Struct, frozen=True):
    """Owner (tenant), and the ids that tie an event to the request and event behind it.

    ``correlation_id`` is shared by everything one request sets off; ``causation_id`` names
    the request (``request:<id>``) or the stored event (``position:<n>``) that caused this one.
    """

    owner: str
    correlation_id: str
    causation_id: str

    def caused_by(self, position: int) -> EventMeta:
        """Meta for an event that the event at ``position`` set off."""
        return EventMeta(self.owner, self.correlation_id, f"position:{position}")

    @staticmethod
    def for_request(owner: str, request_id: str | None = None) -> EventMeta:
        rid = request_id or new_request_id()
        return EventMeta(owner, rid, f"request:{rid}")
