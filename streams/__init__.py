"""Streams: the event feeds that carry stored events to consumers."""
