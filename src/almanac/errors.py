"""The one error tree. Every error Almanac raises on purpose is an ``AlmanacError``;
``almanac.app`` maps each class to an HTTP problem response in one table."""

from __future__ import annotations

import msgspec


class FieldError(msgspec.Struct, frozen=True):
    """One bad input field: a dotted path (``birth.latitude``) and why it is bad."""

    field: str
    message: str


class AlmanacError(Exception):
    """Base of every deliberate error."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ValidationFailed(AlmanacError):
    """Input that is well-formed but not acceptable; names every bad field."""

    def __init__(self, errors: list[FieldError]) -> None:
        fields = ", ".join(e.field for e in errors)
        super().__init__(f"Invalid field(s): {fields}")
        self.errors = errors

    def prefixed(self, prefix: str) -> ValidationFailed:
        """The same errors with their field paths under ``prefix``."""
        return ValidationFailed([FieldError(f"{prefix}.{e.field}", e.message) for e in self.errors])


class NotFound(AlmanacError):
    """The resource does not exist, or belongs to another owner."""


class Conflict(AlmanacError):
    """The request clashes with the current state."""


class Unauthorized(AlmanacError):
    """Missing or wrong credentials."""


class Forbidden(AlmanacError):
    """Valid credentials without the role the request needs."""


class Unavailable(AlmanacError):
    """An engine the request needs is not answering; try again later."""

    def __init__(self, detail: str, retry_after: int = 2) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotYetVisible(AlmanacError):
    """A read asked for ``min_position`` the read model has not reached in time."""

    def __init__(self, detail: str, wanted: int, current: int) -> None:
        super().__init__(detail)
        self.wanted = wanted
        self.current = current
