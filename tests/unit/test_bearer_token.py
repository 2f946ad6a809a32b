"""Reading the API key from raw ASGI headers, as the API's middleware and WebSockets do."""

from __future__ import annotations

import pytest

from almanac.auth import bearer_token


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ([(b"authorization", b"Bearer alm_x")], "alm_x"),
        ([(b"authorization", b"bearer  alm_x ")], "alm_x"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"authorization", b"Bearer alm_a"), (b"authorization", b"Bearer alm_b")], "alm_a"),
        ([(b"x-request-id", b"r1")], None),
        ([], None),
    ],
)
def test_the_key_is_the_first_authorization_header_bearer_token(
    headers: list[tuple[bytes, bytes]], key: str | None
) -> None:
    assert bearer_token(headers) == key
