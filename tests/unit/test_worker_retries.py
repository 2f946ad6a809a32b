"""Which failures the reading worker retries."""

from __future__ import annotations

import asyncio

import pytest

from almanac.domain.interpretation import GenerationFailed
from almanac.errors import ValidationFailed
from commands.worker import _retryable


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (GenerationFailed("busy", retryable=True), True),
        (GenerationFailed("refused", retryable=False), False),
        (RuntimeError("a bug, perhaps transient"), True),
        (ValidationFailed([]), False),
        (asyncio.CancelledError(), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_retries_transient_and_unexpected_failures_but_never_cancellation(
    exc: BaseException, expected: bool
) -> None:
    assert _retryable(exc) is expected
