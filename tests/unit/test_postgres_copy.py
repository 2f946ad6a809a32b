from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from almanac.adapters.postgres import _uuid

SPELLINGS = [str, lambda u: str(u).upper(), lambda u: u.hex, lambda u: f"{{{u}}}", lambda u: u.urn]


@given(value=st.uuids(), spell=st.sampled_from(SPELLINGS))
def test_a_key_is_copied_as_the_bytes_of_the_uuid_it_spells(
    value: uuid.UUID, spell: object
) -> None:
    text = spell(value)  # type: ignore[operator]
    assert _uuid(text) == value.bytes
    assert _uuid(value) == value.bytes


@given(text=st.text(max_size=40))
def test_text_that_is_no_uuid_fails_to_copy_as_uuid_refuses_it(text: str) -> None:
    try:
        expected = uuid.UUID(text).bytes
    except ValueError:
        with pytest.raises(ValueError):  # noqa: PT011 - the error uuid.UUID gives
            _uuid(text)
    else:
        assert _uuid(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "0123 4567-89ab-cdef-0123-456789abcdef",  # 36 characters, a digit short
        "01 23456789abcdef0123456789abcdef01",  # 32 digits with a space: not a UUID
        "0123456789abcdef0123456789abcdef0",
        "01234567 89ab cdef 0123 456789abcdef",  # whitespace for hyphens
        "  0123456789abcdef0123456789abcdef  ",
        "0123456789abcdef0123456789abcdef\t\n\r\x0b",
    ],
)
def test_near_misses_are_refused_as_uuid_refuses_them(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the error uuid.UUID gives
        uuid.UUID(text)
    with pytest.raises(ValueError):  # noqa: PT011
        _uuid(text)
