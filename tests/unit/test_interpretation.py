"""The built-in reading generator: what it writes, and that it can always write it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from almanac.domain import texts
from almanac.domain.interpretation import (
    SECTION_KEYS,
    BuiltinGenerator,
    GenerationFailed,
    ReadingGenerator,
    ReadingText,
)
from almanac.errors import AlmanacError

# A stand-in for almanac.domain.chart.Chart with the same shape, so these tests do not depend
# on the chart calculation.


class FakeBody(msgspec.Struct, frozen=True):
    longitude: float
    sign: str
    degree: float
    retrograde: bool
    house: int


class FakeAngle(msgspec.Struct, frozen=True):
    longitude: float
    sign: str
    degree: float


class FakeAspect(msgspec.Struct, frozen=True):
    first: str
    second: str
    kind: str
    angle: float
    separation: float
    orb: float


class FakeChart(msgspec.Struct, frozen=True):
    chart_hash: str
    calculation_version: str
    utc: str
    house_system: str
    sun: FakeBody
    moon: FakeBody
    mercury: FakeBody
    venus: FakeBody
    mars: FakeBody
    jupiter: FakeBody
    saturn: FakeBody
    uranus: FakeBody
    neptune: FakeBody
    pluto: FakeBody
    ascendant: FakeAngle
    midheaven: FakeAngle
    houses: tuple[float, ...]
    aspects: list[FakeAspect]


ANGLES = {"conjunction": 0.0, "sextile": 60.0, "square": 90.0, "trine": 120.0, "opposition": 180.0}


def body(sign: str = "aries", house: int = 1, *, retrograde: bool = False) -> FakeBody:
    start = texts.SIGNS.index(sign) * 30.0
    return FakeBody(start + 12.5, sign, 12.5, retrograde, house)


def angle(sign: str) -> FakeAngle:
    return FakeAngle(texts.SIGNS.index(sign) * 30.0 + 3.0, sign, 3.0)


def aspect(first: str, second: str, kind: str, orb: float) -> FakeAspect:
    return FakeAspect(first, second, kind, ANGLES[kind], ANGLES[kind] + orb, orb)


def chart(
    bodies: dict[str, FakeBody] | None = None,
    ascendant: str = "scorpio",
    midheaven: str = "leo",
    aspects: list[FakeAspect] | None = None,
) -> FakeChart:
    placements = {
        "sun": body("leo", 10),
        "moon": body("cancer", 9),
        "mercury": body("virgo", 11),
        "venus": body("libra", 12),
        "mars": body("aries", 6),
        "jupiter": body("sagittarius", 2),
        "saturn": body("capricorn", 3, retrograde=True),
        "uranus": body("aquarius", 4),
        "neptune": body("pisces", 5),
        "pluto": body("scorpio", 1),
    }
    placements.update(bodies or {})
    if aspects is None:
        aspects = [
            aspect("sun", "mars", "trine", 0.4),
            aspect("moon", "saturn", "opposition", 1.8),
            aspect("venus", "jupiter", "sextile", 2.6),
            aspect("mercury", "uranus", "square", 4.1),
        ]
    return FakeChart(
        chart_hash="c0ffee",
        calculation_version="1",
        utc="1990-08-01T12:00:00Z",
        house_system="placidus",
        ascendant=angle(ascendant),
        midheaven=angle(midheaven),
        houses=tuple(float(i * 30) for i in range(12)),
        aspects=aspects,
        **placements,
    )


def generate(fake: FakeChart, kind: str = "natal", label: str | None = None) -> ReadingText:
    # The generator only reads attributes, so the stand-in is passed where a Chart is typed.
    fake_chart: Any = fake
    any_kind: Any = kind
    return asyncio.run(BuiltinGenerator().generate(fake_chart, any_kind, label))


def sections(reading: ReadingText) -> dict[str, str]:
    return {s.key: s.body for s in reading.sections}


def sentence_count(paragraph: str) -> int:
    return len(re.findall(r"[.!?](?=\s|$)", paragraph))


SIGN_TABLES = {
    "SUN_SIGNS": texts.SUN_SIGNS,
    "MOON_SIGNS": texts.MOON_SIGNS,
    "ASCENDANT_SIGNS": texts.ASCENDANT_SIGNS,
    "VENUS_SIGNS": texts.VENUS_SIGNS,
    "MARS_SIGNS": texts.MARS_SIGNS,
    "SATURN_SIGNS": texts.SATURN_SIGNS,
    "MIDHEAVEN_SIGNS": texts.MIDHEAVEN_SIGNS,
    "SIGN_ARCHETYPES": texts.SIGN_ARCHETYPES,
    "SIGN_NAMES": texts.SIGN_NAMES,
}
SIGN_KEYED_TABLES = {**SIGN_TABLES, "SIGN_RULERS": texts.SIGN_RULERS}


# --- the shape of a reading ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("natal", ["sun", "moon", "ascendant", "aspects"]),
        ("love", ["sun", "moon", "ascendant", "aspects", "venus", "mars"]),
        ("career", ["sun", "moon", "ascendant", "aspects", "midheaven", "saturn"]),
    ],
)
def test_each_kind_yields_exactly_its_sections_in_order(kind: str, expected: list[str]) -> None:
    reading = generate(chart(), kind)
    assert [s.key for s in reading.sections] == expected


def test_section_keys_cover_every_reading_kind() -> None:
    assert set(SECTION_KEYS) == {"natal", "love", "career"}


def test_headings_name_the_placement() -> None:
    reading = generate(chart(), "career")
    headings = {s.key: s.heading for s in reading.sections}
    assert headings == {
        "sun": "Sun in Leo",
        "moon": "Moon in Cancer",
        "ascendant": "Scorpio Rising",
        "aspects": "The strongest aspects",
        "midheaven": "Midheaven in Leo",
        "saturn": "Saturn in Capricorn",
    }


def test_reading_records_the_builtin_generator_and_its_version() -> None:
    generator: ReadingGenerator = BuiltinGenerator()
    reading = generate(chart())
    assert (generator.name, generator.version) == ("builtin", "1")
    assert (reading.generator, reading.generator_version) == ("builtin", "1")


# --- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["natal", "love", "career"])
def test_same_chart_kind_and_label_give_identical_bytes(kind: str) -> None:
    first = msgspec.json.encode(generate(chart(), kind, "Ada"))
    second = msgspec.json.encode(generate(chart(), kind, "Ada"))
    assert first == second


def test_reading_round_trips_through_msgspec() -> None:
    reading = generate(chart(), "love", "Ada")
    assert msgspec.json.decode(msgspec.json.encode(reading), type=ReadingText) == reading


# --- placements change the words ----------------------------------------------------------


@pytest.mark.parametrize("table", SIGN_TABLES.values(), ids=SIGN_TABLES.keys())
def test_every_sign_table_gives_each_sign_its_own_words(table: dict[str, str]) -> None:
    assert len(set(table.values())) == 12


def test_no_prose_paragraph_is_reused_across_tables() -> None:
    paragraphs = [p for t in SIGN_TABLES.values() for p in t.values() if len(p) > 40]
    paragraphs += [*texts.HOUSE_SENTENCES.values(), *texts.RETROGRADE.values()]
    assert len(paragraphs) == len(set(paragraphs))


@pytest.mark.parametrize(("first", "second"), [("aries", "taurus"), ("cancer", "capricorn")])
def test_a_different_sun_sign_gives_a_different_sun_section(first: str, second: str) -> None:
    one = generate(chart({"sun": body(first, 10)}))
    other = generate(chart({"sun": body(second, 10)}))
    assert sections(one)["sun"] != sections(other)["sun"]
    assert sections(one)["moon"] == sections(other)["moon"]
    assert one.summary != other.summary


def test_every_sign_gives_a_distinct_section_for_each_placement() -> None:
    for key, kind in [("sun", "natal"), ("moon", "natal"), ("venus", "love"), ("mars", "love")]:
        bodies = {sections(generate(chart({key: body(s, 4)}), kind))[key] for s in texts.SIGNS}
        assert len(bodies) == 12, key
    rising = {sections(generate(chart(ascendant=s)))["ascendant"] for s in texts.SIGNS}
    assert len(rising) == 12
    calling = {sections(generate(chart(midheaven=s), "career"))["midheaven"] for s in texts.SIGNS}
    assert len(calling) == 12


def test_the_house_is_woven_into_a_body_section() -> None:
    in_fifth = sections(generate(chart({"moon": body("cancer", 5)})))["moon"]
    in_eighth = sections(generate(chart({"moon": body("cancer", 8)})))["moon"]
    assert "fifth house" in in_fifth
    assert "eighth house" in in_eighth
    assert "your emotional life" in in_fifth


def test_a_retrograde_planet_adds_its_nuance() -> None:
    direct = sections(generate(chart({"venus": body("leo", 5)}), "love"))["venus"]
    retro = sections(generate(chart({"venus": body("leo", 5, retrograde=True)}), "love"))["venus"]
    assert texts.RETROGRADE["venus"] not in direct
    assert retro == f"{direct} {texts.RETROGRADE['venus']}"


def test_the_rising_section_follows_the_chart_ruler() -> None:
    # Scorpio rising is ruled by Pluto, which the default chart puts in Scorpio, first house.
    rising = sections(generate(chart(ascendant="scorpio")))["ascendant"]
    assert "Pluto rules your rising sign, and from Scorpio in your first house" in rising
    leo_rising = sections(generate(chart(ascendant="leo")))["ascendant"]
    assert leo_rising.count("The Sun rules your rising sign") == 1


# --- title and summary --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["natal", "love", "career"])
def test_label_appears_in_the_title(kind: str) -> None:
    assert generate(chart(), kind, "Ada Lovelace").title == f"A {kind} reading for Ada Lovelace"


@pytest.mark.parametrize("label", [None, "", "   "])
def test_title_without_a_label_names_only_the_kind(label: str | None) -> None:
    assert generate(chart(), "natal", label).title == "A natal reading"


def test_a_label_with_braces_is_shown_as_typed() -> None:
    assert generate(chart(), "natal", "{sun}").title == "A natal reading for {sun}"


def test_summary_names_the_sun_moon_and_rising_signs_in_one_or_two_sentences() -> None:
    reading = generate(chart({"sun": body("gemini"), "moon": body("pisces")}, ascendant="virgo"))
    assert "Sun in Gemini" in reading.summary
    assert "Moon in Pisces" in reading.summary
    assert "Virgo rising" in reading.summary
    assert 1 <= sentence_count(reading.summary) <= 2


# --- aspects ------------------------------------------------------------------------------


def test_strongest_aspects_section_leads_with_the_tightest_aspects_planets() -> None:
    aspects = [
        aspect("mercury", "uranus", "square", 4.1),
        aspect("moon", "neptune", "trine", 0.2),
        aspect("sun", "mars", "opposition", 2.5),
    ]
    paragraphs = sections(generate(chart(aspects=aspects)))["aspects"].split("\n\n")
    assert paragraphs[0].startswith("The Moon is trine Neptune, less than a degree from exact.")
    assert "your emotional life and your imagination" in paragraphs[0]
    assert paragraphs[1].startswith("The Sun opposes Mars, within 2.5° of exact.")
    assert paragraphs[2].startswith("Mercury squares Uranus, with a looser orb of 4.1°.")


def test_only_the_three_tightest_aspects_are_read() -> None:
    text = sections(generate(chart()))["aspects"]
    assert text.count("\n\n") == 2
    assert "Uranus" not in text  # the fourth, widest aspect of the default chart


def test_aspects_to_the_angles_are_left_out() -> None:
    aspects = [aspect("sun", "ascendant", "conjunction", 0.1), aspect("sun", "moon", "trine", 3)]
    text = sections(generate(chart(aspects=aspects)))["aspects"]
    assert "\n\n" not in text
    assert text.startswith("The Sun is trine the Moon")


def test_two_aspects_of_one_kind_are_worded_differently() -> None:
    aspects = [aspect("sun", "mars", "square", 0.5), aspect("moon", "venus", "square", 0.7)]
    first, second = sections(generate(chart(aspects=aspects)))["aspects"].split("\n\n")
    square = texts.ASPECTS["square"]
    assert square.advice[0] in first
    assert square.advice[1] in second


def test_a_chart_without_aspects_still_has_an_aspects_section() -> None:
    assert sections(generate(chart(aspects=[])))["aspects"] == texts.NO_ASPECTS


# --- tables are complete, so no lookup can fail ------------------------------------------


@pytest.mark.parametrize("table", SIGN_KEYED_TABLES.values(), ids=SIGN_KEYED_TABLES.keys())
def test_every_sign_table_covers_all_twelve_signs(table: dict[str, str]) -> None:
    assert tuple(table) == texts.SIGNS


@pytest.mark.parametrize(
    "table",
    [texts.HOUSE_SENTENCES, texts.HOUSE_DOMAINS, texts.HOUSE_ORDINALS],
    ids=["HOUSE_SENTENCES", "HOUSE_DOMAINS", "HOUSE_ORDINALS"],
)
def test_every_house_table_covers_all_twelve_houses(table: dict[int, str]) -> None:
    assert tuple(table) == tuple(range(1, 13)) == texts.HOUSES


@pytest.mark.parametrize(
    "table", [texts.BODY_NAMES, texts.PRINCIPLES], ids=["BODY_NAMES", "PRINCIPLES"]
)
def test_every_body_table_covers_all_ten_bodies(table: dict[str, str]) -> None:
    assert tuple(table) == texts.BODIES
    assert len(texts.BODIES) == 10


def test_every_body_that_can_retrograde_has_a_nuance() -> None:
    assert set(texts.RETROGRADE) == set(texts.BODIES) - {"sun", "moon"}
    assert tuple(texts.RETROGRADE) == texts.RETROGRADE_BODIES


def test_every_aspect_kind_has_its_words() -> None:
    assert tuple(texts.ASPECTS) == texts.ASPECT_KINDS == tuple(ANGLES)


def test_every_sign_ruler_is_a_body() -> None:
    assert set(texts.SIGN_RULERS.values()) <= set(texts.BODIES)


def test_every_summary_closing_belongs_to_a_kind() -> None:
    assert set(texts.SUMMARY_CLOSINGS) == set(SECTION_KEYS)


@pytest.mark.parametrize(
    ("table", "low", "high"),
    [
        (texts.SUN_SIGNS, 2, 3),
        (texts.MOON_SIGNS, 2, 3),
        (texts.ASCENDANT_SIGNS, 2, 3),
        (texts.MIDHEAVEN_SIGNS, 2, 4),
        # Leave room for the house sentence and a retrograde note within four sentences.
        (texts.VENUS_SIGNS, 2, 2),
        (texts.MARS_SIGNS, 2, 2),
        (texts.SATURN_SIGNS, 2, 2),
    ],
)
def test_sign_paragraphs_are_short_enough_to_compose(
    table: dict[str, str], low: int, high: int
) -> None:
    for sign, paragraph in table.items():
        assert low <= sentence_count(paragraph) <= high, sign


def test_house_sentences_have_exactly_one_focus_slot_never_at_the_start() -> None:
    for house, sentence in texts.HOUSE_SENTENCES.items():
        assert sentence.count("{focus}") == 1, house
        assert not sentence.startswith("{"), house
        assert sentence_count(sentence) == 1, house


# --- failures -----------------------------------------------------------------------------


def test_an_unknown_sign_fails_as_a_non_retryable_generation_failure() -> None:
    with pytest.raises(GenerationFailed) as caught:
        generate(chart({"sun": msgspec.structs.replace(body("leo"), sign="ophiuchus")}))
    assert caught.value.retryable is False
    assert isinstance(caught.value, AlmanacError)


def test_an_unknown_kind_fails_as_a_generation_failure() -> None:
    with pytest.raises(GenerationFailed):
        generate(chart(), "horary")


def test_generation_failed_carries_whether_it_is_retryable() -> None:
    assert GenerationFailed("upstream timed out", retryable=True).retryable is True
    assert GenerationFailed("bad chart").retryable is False
    assert GenerationFailed("bad chart").detail == "bad chart"


# --- any chart at all ---------------------------------------------------------------------

signs = st.sampled_from(texts.SIGNS)
bodies = st.builds(body, signs, st.integers(min_value=1, max_value=12), retrograde=st.booleans())
aspect_lists = st.lists(
    st.tuples(
        st.lists(st.sampled_from(texts.BODIES), min_size=2, max_size=2, unique=True),
        st.sampled_from(texts.ASPECT_KINDS),
        st.floats(min_value=0, max_value=10, allow_nan=False),
    ).map(lambda t: aspect(t[0][0], t[0][1], t[1], t[2])),
    max_size=12,
)
charts = st.builds(
    chart,
    st.fixed_dictionaries(dict.fromkeys(texts.BODIES, bodies)),
    ascendant=signs,
    midheaven=signs,
    aspects=aspect_lists,
)


@settings(max_examples=200, deadline=None)
@given(
    fake=charts,
    kind=st.sampled_from(["natal", "love", "career"]),
    label=st.none() | st.text(alphabet="abc XYZ-'", max_size=20),
)
def test_any_chart_gives_complete_sections_with_no_unfilled_slot(
    fake: FakeChart, kind: str, label: str | None
) -> None:
    reading = generate(fake, kind, label)
    assert [s.key for s in reading.sections] == list(SECTION_KEYS[kind])
    for text in [reading.title, reading.summary, *(s.heading for s in reading.sections)]:
        assert text
        assert "{" not in text
        assert "}" not in text
    for section in reading.sections:
        assert section.body.strip()
        assert "{" not in section.body
        assert "}" not in section.body
        for paragraph in section.body.split("\n\n"):
            assert 2 <= sentence_count(paragraph) <= 4, (section.key, paragraph)
    assert msgspec.json.encode(reading) == msgspec.json.encode(generate(fake, kind, label))
