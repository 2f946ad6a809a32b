"""The cursor of every paged listing: whatever a client sends in its place is a cursor this
API made for the same listing, or a 422 naming ``cursor``; and the next page it leads to is
held to the position its own page was read at."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.errors import ValidationFailed
from queries.paging import Cursor, decode_cursor, encode_cursor, floor, read_at, scope_of
from queries.readings import ReadingFilters

SCOPE = scope_of("readings", ReadingFilters(status="generated"), "alice")


def forged(key: Any = 5, *, at: Any = 9, scope: str = SCOPE, **more: Any) -> str:
    body = {"key": key, "at": at, "scope": scope, **more}
    return base64.urlsafe_b64encode(msgspec.json.encode(body)).decode().rstrip("=")


def cursor_error(raw: str) -> str:
    with pytest.raises(ValidationFailed) as caught:
        decode_cursor(raw, SCOPE)
    [error] = caught.value.errors
    assert error.field == "cursor"
    return error.message


def test_a_cursor_made_by_a_listing_decodes_to_the_same_place_and_position() -> None:
    made = encode_cursor(Cursor(key=12_345, at=12_400, scope=SCOPE))
    assert decode_cursor(made, SCOPE) == Cursor(12_345, 12_400, SCOPE)


def test_no_cursor_is_the_first_page() -> None:
    assert decode_cursor(None, SCOPE) is None


@pytest.mark.parametrize("number", [2**63, 10**30, -1, 1.5, "7", None])
def test_a_forged_key_or_position_outside_a_64_bit_position_is_refused(number: Any) -> None:
    """A number past 2**63 - 1 reached SQLite as a parameter it cannot hold: a 500."""
    assert "not a cursor from this API" in cursor_error(forged(key=number))
    assert "not a cursor from this API" in cursor_error(forged(at=number))


def test_the_largest_64_bit_position_is_a_cursor() -> None:
    assert decode_cursor(forged(key=2**63 - 1, at=2**63 - 1), SCOPE) is not None


def test_a_cursor_without_its_position_or_with_fields_of_its_own_is_refused() -> None:
    """Without ``at`` the next page could come from any standby, however far behind."""
    bare = {"key": 5, "scope": SCOPE}
    raw = base64.urlsafe_b64encode(msgspec.json.encode(bare)).decode()
    assert "not a cursor from this API" in cursor_error(raw)
    assert "not a cursor from this API" in cursor_error(forged(before=3))


def test_a_cursor_of_other_filters_another_owner_or_another_listing_is_refused() -> None:
    for scope in (
        scope_of("readings", ReadingFilters(), "alice"),
        scope_of("readings", ReadingFilters(status="generated"), "mallory"),
        scope_of("jobs", ReadingFilters(status="generated"), "alice"),
    ):
        assert "other filters" in cursor_error(forged(scope=scope))


def test_the_next_page_is_read_at_least_where_the_page_before_was() -> None:
    cursor = Cursor(key=40, at=57, scope=SCOPE)
    assert floor(None, None) is None
    assert floor(30, None) == 30
    assert floor(None, cursor) == 57
    assert floor(30, cursor) == 57
    assert floor(90, cursor) == 90


def test_a_page_is_read_at_the_latest_position_its_rows_show() -> None:
    """The rows are read after the source was chosen, and may be newer than it was then."""
    assert read_at(50) == 50
    assert read_at(50, [41, 63, 48]) == 63
    assert read_at(50, [41, 48]) == 50


@given(st.text(max_size=80) | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()))
def test_any_text_is_a_cursor_or_a_422_naming_the_cursor(raw: str) -> None:
    fields: list[str] = []
    try:
        cursor = decode_cursor(raw, SCOPE)
    except ValidationFailed as exc:
        fields = [e.field for e in exc.errors]
    else:
        assert cursor is not None
        assert 0 <= cursor.key < 2**63 and 0 <= cursor.at < 2**63
    assert fields in ([], ["cursor"])
