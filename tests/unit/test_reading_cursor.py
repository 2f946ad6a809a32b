"""The readings listing's cursor: whatever a client sends in its place is a cursor this API
made, or a 422 naming ``cursor``."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.errors import ValidationFailed
from queries.readings import ReadingFilters, _Cursor, decode_cursor, encode_cursor

FILTERS = ReadingFilters(status="completed")
OWNER = "alice"


def forged(before: Any, *, filters: str | None = None, owner: str = OWNER) -> str:
    body = {"before": before, "filters": filters or FILTERS.fingerprint(), "owner": owner}
    return base64.urlsafe_b64encode(msgspec.json.encode(body)).decode().rstrip("=")


def cursor_error(raw: str) -> str:
    with pytest.raises(ValidationFailed) as caught:
        decode_cursor(raw, FILTERS, OWNER)
    [error] = caught.value.errors
    assert error.field == "cursor"
    return error.message


def test_a_cursor_made_by_the_listing_decodes_to_the_same_place() -> None:
    made = encode_cursor(_Cursor(before=12_345, filters=FILTERS.fingerprint(), owner=OWNER))
    assert decode_cursor(made, FILTERS, OWNER).before == 12_345


@pytest.mark.parametrize("before", [2**63, 10**30, -1, 1.5, "7", None])
def test_a_forged_position_outside_a_64_bit_position_is_refused(before: Any) -> None:
    """A number past 2**63 - 1 reached SQLite as a parameter it cannot hold: a 500."""
    assert "not a cursor from this API" in cursor_error(forged(before))


def test_the_largest_64_bit_position_is_a_cursor() -> None:
    assert decode_cursor(forged(2**63 - 1), FILTERS, OWNER).before == 2**63 - 1


def test_a_cursor_of_other_filters_or_another_owner_is_refused() -> None:
    assert "other filters" in cursor_error(forged(5, filters=ReadingFilters().fingerprint()))
    assert "other filters" in cursor_error(forged(5, owner="mallory"))


@given(st.text(max_size=80) | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()))
def test_any_text_is_a_cursor_or_a_422_naming_the_cursor(raw: str) -> None:
    fields: list[str] = []
    try:
        cursor = decode_cursor(raw, FILTERS, OWNER)
    except ValidationFailed as exc:
        fields = [e.field for e in exc.errors]
    else:
        assert 0 <= cursor.before < 2**63
    assert fields in ([], ["cursor"])
