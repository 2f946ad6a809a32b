from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from almanac.domain.chart import BirthData, calculate_chart
from projections.readings import _hash_of

BIRTH = BirthData("1990-07-15", "14:30", "Europe/London", 51.5074, -0.1278)


def test_the_hash_of_a_stored_chart_is_the_one_it_was_calculated_with() -> None:
    chart = calculate_chart(BIRTH)
    assert _hash_of(msgspec.Raw(msgspec.json.encode(chart))) == chart.chart_hash


@given(
    value=st.text(max_size=200),
    before=st.dictionaries(st.sampled_from(["utc", "bodies", "x"]), st.text(max_size=20)),
    after=st.dictionaries(st.sampled_from(["utc", "bodies", "y"]), st.integers()),
)
def test_the_hash_read_off_a_chart_is_what_decoding_it_gives(
    value: str, before: dict[str, str], after: dict[str, int]
) -> None:
    """Whatever the hash holds (quotes, escapes, any length) and wherever it sits in the
    document, reading it off the front agrees with decoding the whole chart."""
    for document in ({"chart_hash": value, **after}, {**before, "chart_hash": value, **after}):
        raw = msgspec.Raw(msgspec.json.encode(document))
        assert _hash_of(raw) == value
