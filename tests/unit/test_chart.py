"""Specification of natal chart calculation (almanac.domain.chart)."""

from __future__ import annotations

import math
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, time, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from almanac.domain.chart import (
    BODIES,
    CALCULATION_VERSION,
    MAX_DATE,
    MAX_LATITUDE,
    MIN_DATE,
    SIGNS,
    BirthData,
    Body,
    Chart,
    ChartOptions,
    calculate_chart,
    chart_hash,
    resolve_birth,
)
from almanac.errors import ValidationFailed

# ---------------------------------------------------------------------------
# Reference charts
#
# Computed outside this project, independently of ephem, in a throwaway
# environment with pyswisseph 2.10.3.2 (Swiss Ephemeris 2.10.03), skyfield 1.55
# and skyfield-data 7.0.0, from the UTC instants below (converted by hand from
# the local times, see each comment):
#
# * longitudes: Skyfield 1.55 with JPL DE421 (the de421.bsp shipped in
#   skyfield-data 7.0.0), ``ts = load.timescale(builtin=True)``,
#   ``earth.at(ts.from_datetime(utc)).observe(target).apparent()
#   .frame_latlon(ecliptic_frame)``: apparent geocentric longitude on the true
#   ecliptic and equinox of date. Targets are "sun", "moon", "mercury",
#   "venus" and the "<planet> barycenter" DE421 gives for Mars to Pluto (the
#   barycentre moves Pluto by 0.1" at most, Jupiter far less).
# * ascendant, midheaven: pyswisseph 2.10.3.2, ``swe.houses_ex(jd_ut, lat, lon,
#   b"E", swe.FLG_MOSEPH)``, ascmc[0] and ascmc[1] (built-in Moshier
#   ephemeris, no data files), jd_ut from ``swe.julday`` of the UTC instant.
# * retrograde: bodies whose longitude speed from ``swe.calc_ut(jd_ut, body,
#   swe.FLG_MOSEPH | swe.FLG_SPEED)`` is negative. ``stationary`` lists bodies
#   moving under 0.002°/day, whose flag depends on which theory one asks and
#   is not asserted.
#
# The two sources agree with each other within 2" for every body except the
# Moon in 1905 (23", from their different Delta T for that year).
# ---------------------------------------------------------------------------

PLANET_TOLERANCE = 0.05
# Both the reference and the chart take sidereal time from the same UTC
# instant (standing in for UT1 on both sides) with IAU precession-nutation,
# so they differ only by series truncation, about 0.0001° (observed: 0.4"
# at most). 0.02° leaves room for that even where the Ascendant magnifies a
# sidereal-time error at mid latitudes, while still catching any quadrant,
# sign or time-zone slip, each of which is worth a degree or more.
ANGLE_TOLERANCE = 0.02


class Reference(msgspec.Struct, frozen=True):
    birth: BirthData
    utc: str
    longitudes: dict[str, float]
    ascendant: float
    midheaven: float
    retrograde: frozenset[str]
    stationary: frozenset[str] = frozenset()


# Europe/London in summer time: 14:30 BST is 13:30 UTC.
LONDON_1990_BST = Reference(
    birth=BirthData("1990-07-15", "14:30", "Europe/London", 51.5074, -0.1278),
    utc="1990-07-15T13:30:00Z",
    longitudes={
        "sun": 112.805777,
        "moon": 24.135045,
        "mercury": 126.890362,
        "venus": 84.486222,
        "mars": 31.983964,
        "jupiter": 112.563163,
        "saturn": 291.958970,
        "uranus": 276.964306,
        "neptune": 282.919529,
        "pluto": 224.999094,
    },
    ascendant=211.968131,
    midheaven=133.048776,
    retrograde=frozenset({"saturn", "uranus", "neptune", "pluto"}),
)

# Southern hemisphere, west longitude, a bare offset: 06:15 at -03:00 is 09:15 UTC.
BUENOS_AIRES_1975_OFFSET = Reference(
    birth=BirthData("1975-03-21", "06:15", "-03:00", -34.6037, -58.3816),
    utc="1975-03-21T09:15:00Z",
    longitudes={
        "sun": 0.136811,
        "moon": 97.042881,
        "mercury": 336.906434,
        "venus": 31.796696,
        "mars": 313.714583,
        "jupiter": 0.650781,
        "saturn": 101.989867,
        "uranus": 211.674570,
        "neptune": 251.782693,
        "pluto": 188.112731,
    },
    ascendant=350.475544,
    midheaven=259.556253,
    retrograde=frozenset({"uranus", "neptune", "pluto"}),
)

# Southern summer time in the 2030s: 21:45 AEDT (+11:00) is 10:45 UTC.
SYDNEY_2034_AEDT = Reference(
    birth=BirthData("2034-11-02", "21:45", "Australia/Sydney", -33.8688, 151.2093),
    utc="2034-11-02T10:45:00Z",
    longitudes={
        "sun": 220.080752,
        "moon": 121.345775,
        "mercury": 202.962390,
        "venus": 202.167765,
        "mars": 194.393180,
        "jupiter": 5.218080,
        "saturn": 125.189726,
        "uranus": 100.444782,
        "neptune": 20.424967,
        "pluto": 315.955022,
    },
    ascendant=70.163938,
    midheaven=353.731354,
    retrograde=frozenset({"venus", "jupiter", "uranus", "neptune"}),
    stationary=frozenset({"pluto"}),  # +0.00176°/day
)

# Early 1900s, standard time: 08:00 EST (-05:00) is 13:00 UTC.
NEW_YORK_1905 = Reference(
    birth=BirthData("1905-01-20", "08:00", "America/New_York", 40.7128, -74.006),
    utc="1905-01-20T13:00:00Z",
    longitudes={
        "sun": 299.836629,
        "moon": 109.772373,
        "mercury": 275.527163,
        "venus": 344.887008,
        "mars": 213.319005,
        "jupiter": 22.361784,
        "saturn": 320.695742,
        "uranus": 271.818526,
        "neptune": 96.161004,
        "pluto": 80.023074,
    },
    ascendant=312.432841,
    midheaven=242.310845,
    retrograde=frozenset({"neptune", "pluto"}),
)

# Northern hemisphere, far east: 14:00 JST (+09:00) is 05:00 UTC.
TOKYO_1964 = Reference(
    birth=BirthData("1964-10-10", "14:00", "Asia/Tokyo", 35.6762, 139.6503),
    utc="1964-10-10T05:00:00Z",
    longitudes={
        "sun": 196.921022,
        "moon": 249.000941,
        "mercury": 192.811016,
        "venus": 155.101145,
        "mars": 135.013742,
        "jupiter": 55.063883,
        "saturn": 328.773776,
        "uranus": 162.686021,
        "neptune": 226.452162,
        "pluto": 165.127352,
    },
    ascendant=307.197452,
    midheaven=235.808789,
    retrograde=frozenset({"jupiter", "saturn"}),
)

# Mercury retrograde (21 April to 14 May 2023), on the equator: 12:00 at +03:00 is 09:00 UTC.
NAIROBI_2023_MERCURY_RETROGRADE = Reference(
    birth=BirthData("2023-05-01", "12:00:00", "+03:00", -1.2921, 36.8219),
    utc="2023-05-01T09:00:00Z",
    longitudes={
        "sun": 40.745213,
        "moon": 169.136525,
        "mercury": 41.716956,
        "venus": 83.093950,
        "mars": 109.203331,
        "jupiter": 26.420819,
        "saturn": 335.431764,
        "uranus": 48.447428,
        "neptune": 356.741593,
        "pluto": 300.364070,
    },
    ascendant=118.268615,
    midheaven=33.073088,
    retrograde=frozenset({"mercury"}),
    stationary=frozenset({"pluto"}),  # +0.00016°/day: Pluto stationed that day
)

REFERENCES = {
    "london_1990_bst": LONDON_1990_BST,
    "buenos_aires_1975_offset": BUENOS_AIRES_1975_OFFSET,
    "sydney_2034_aedt": SYDNEY_2034_AEDT,
    "new_york_1905": NEW_YORK_1905,
    "tokyo_1964": TOKYO_1964,
    "nairobi_2023_mercury_retrograde": NAIROBI_2023_MERCURY_RETROGRADE,
}

reference_charts = pytest.mark.parametrize(
    "reference", list(REFERENCES.values()), ids=list(REFERENCES.keys())
)


def arc(a: float, b: float) -> float:
    """Shortest angular distance between two longitudes, in degrees."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def body(chart: Chart, name: str) -> Body:
    value = getattr(chart, name)
    assert isinstance(value, Body)
    return value


def field_errors(excinfo: pytest.ExceptionInfo[ValidationFailed]) -> dict[str, str]:
    return {e.field: e.message for e in excinfo.value.errors}


LONDON = LONDON_1990_BST.birth


def london(**changes: object) -> BirthData:
    return msgspec.structs.replace(LONDON, **changes)


# ---------------------------------------------------------------------------
# Accuracy against the references
# ---------------------------------------------------------------------------


@reference_charts
def test_resolves_local_birth_time_to_the_reference_utc_instant(reference: Reference) -> None:
    assert calculate_chart(reference.birth).utc == reference.utc
    assert resolve_birth(reference.birth).strftime("%Y-%m-%dT%H:%M:%SZ") == reference.utc


@reference_charts
def test_body_longitudes_match_jpl_de421_within_a_twentieth_of_a_degree(
    reference: Reference,
) -> None:
    chart = calculate_chart(reference.birth)
    for name in BODIES:
        assert arc(body(chart, name).longitude, reference.longitudes[name]) < PLANET_TOLERANCE, name


@reference_charts
def test_ascendant_and_midheaven_match_swiss_ephemeris(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    assert arc(chart.ascendant.longitude, reference.ascendant) < ANGLE_TOLERANCE
    assert arc(chart.midheaven.longitude, reference.midheaven) < ANGLE_TOLERANCE


@reference_charts
def test_retrograde_flags_match_swiss_ephemeris_speeds(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    for name in BODIES:
        if name in reference.stationary:
            continue
        assert body(chart, name).retrograde == (name in reference.retrograde), name


def test_mercury_is_retrograde_on_1_may_2023() -> None:
    chart = calculate_chart(NAIROBI_2023_MERCURY_RETROGRADE.birth)
    assert chart.mercury.retrograde
    assert not chart.venus.retrograde


@reference_charts
def test_sun_and_moon_are_never_retrograde(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    assert not chart.sun.retrograde
    assert not chart.moon.retrograde


@reference_charts
def test_signs_and_degrees_follow_from_longitude(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    for name in BODIES:
        b = body(chart, name)
        assert b.sign == SIGNS[int(b.longitude // 30)]
        assert math.isclose(b.degree, b.longitude % 30, abs_tol=1e-6)


def test_london_1990_sun_is_in_cancer_with_a_scorpio_ascendant_and_leo_midheaven() -> None:
    chart = calculate_chart(LONDON)
    assert (chart.sun.sign, chart.moon.sign) == ("cancer", "aries")
    assert chart.ascendant.sign == "scorpio"
    assert chart.midheaven.sign == "leo"


def test_ascendant_is_the_eastern_intersection_within_half_a_turn_after_the_midheaven() -> None:
    for reference in REFERENCES.values():
        chart = calculate_chart(reference.birth)
        ahead = (chart.ascendant.longitude - chart.midheaven.longitude) % 360
        assert 0 < ahead < 180


# ---------------------------------------------------------------------------
# Houses and aspects
# ---------------------------------------------------------------------------


def test_equal_house_cusps_start_at_the_ascendant_and_step_by_thirty_degrees() -> None:
    chart = calculate_chart(LONDON)
    assert chart.houses.equal[0] == chart.ascendant.longitude
    for i, cusp in enumerate(chart.houses.equal):
        assert math.isclose(cusp, (chart.ascendant.longitude + 30 * i) % 360, abs_tol=1e-6)


def test_whole_sign_cusps_start_at_the_beginning_of_the_ascendant_sign() -> None:
    chart = calculate_chart(LONDON)  # Ascendant in Scorpio
    assert chart.houses.whole_sign == [210.0 + 30 * i - (360 if i >= 5 else 0) for i in range(12)]


def test_equal_houses_place_bodies_by_distance_from_the_ascendant() -> None:
    chart = calculate_chart(LONDON, ChartOptions(house_system="equal"))
    assert chart.house_system == "equal"
    for name in BODIES:
        b = body(chart, name)
        assert b.house == int(((b.longitude - chart.ascendant.longitude) % 360) // 30) + 1


def test_whole_sign_houses_place_bodies_by_sign_counted_from_the_ascendant_sign() -> None:
    chart = calculate_chart(LONDON, ChartOptions(house_system="whole_sign"))
    assert chart.house_system == "whole_sign"
    asc_sign = SIGNS.index(chart.ascendant.sign)
    for name in BODIES:
        b = body(chart, name)
        assert b.house == (SIGNS.index(b.sign) - asc_sign) % 12 + 1
    # Sun in Cancer with a Scorpio Ascendant: the ninth sign from Scorpio.
    assert chart.sun.house == 9


def test_both_cusp_sets_are_returned_whichever_system_places_the_bodies() -> None:
    equal = calculate_chart(LONDON, ChartOptions(house_system="equal"))
    whole = calculate_chart(LONDON, ChartOptions(house_system="whole_sign"))
    assert equal.houses == whole.houses


ORBS = {"conjunction": 8.0, "sextile": 5.0, "square": 7.0, "trine": 7.0, "opposition": 8.0}
ANGLES = {"conjunction": 0.0, "sextile": 60.0, "square": 90.0, "trine": 120.0, "opposition": 180.0}


@reference_charts
def test_aspects_respect_the_orb_table_with_two_extra_degrees_for_sun_and_moon(
    reference: Reference,
) -> None:
    chart = calculate_chart(reference.birth)
    for aspect in chart.aspects:
        assert BODIES.index(aspect.first) < BODIES.index(aspect.second)
        assert aspect.angle == ANGLES[aspect.kind]
        separation = arc(body(chart, aspect.first).longitude, body(chart, aspect.second).longitude)
        assert math.isclose(aspect.separation, separation, abs_tol=1e-5)
        assert math.isclose(aspect.orb, abs(aspect.separation - aspect.angle), abs_tol=1e-6)
        luminary = {"sun", "moon"} & {aspect.first, aspect.second}
        assert aspect.orb <= ORBS[aspect.kind] + (2.0 if luminary else 0.0)


@reference_charts
def test_every_pair_within_orb_is_reported_exactly_once(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    expected = set()
    for i, first in enumerate(BODIES):
        for second in BODIES[i + 1 :]:
            separation = arc(body(chart, first).longitude, body(chart, second).longitude)
            bonus = 2.0 if {"sun", "moon"} & {first, second} else 0.0
            for kind, angle in ANGLES.items():
                if abs(separation - angle) <= ORBS[kind] + bonus - 1e-5:
                    expected.add((first, second, kind))
    reported = [(a.first, a.second, a.kind) for a in chart.aspects]
    assert len(reported) == len(set(reported))
    assert expected <= set(reported)


@reference_charts
def test_aspects_are_sorted_tightest_orb_first(reference: Reference) -> None:
    chart = calculate_chart(reference.birth)
    keys = [(a.orb, BODIES.index(a.first), BODIES.index(a.second)) for a in chart.aspects]
    assert keys == sorted(keys)


def test_london_1990_has_a_sun_jupiter_conjunction_as_its_tightest_aspect() -> None:
    tightest = calculate_chart(LONDON).aspects[0]
    assert (tightest.first, tightest.second, tightest.kind) == ("sun", "jupiter", "conjunction")


def test_ascendant_and_midheaven_take_no_aspects() -> None:
    for reference in REFERENCES.values():
        for aspect in calculate_chart(reference.birth).aspects:
            assert aspect.first in BODIES
            assert aspect.second in BODIES


# ---------------------------------------------------------------------------
# Shape, stability and hashing
# ---------------------------------------------------------------------------


def test_chart_exposes_each_body_as_a_named_field() -> None:
    encoded = msgspec.to_builtins(calculate_chart(LONDON))
    for name in (*BODIES, "ascendant", "midheaven", "houses", "aspects"):
        assert name in encoded
    assert set(encoded["sun"]) == {"longitude", "sign", "degree", "retrograde", "house"}


def test_chart_carries_its_hash_and_calculation_version() -> None:
    chart = calculate_chart(LONDON)
    assert chart.chart_hash == chart_hash(LONDON)
    assert chart.calculation_version == CALCULATION_VERSION


def test_every_float_in_the_chart_has_at_most_six_decimals() -> None:
    def floats(value: object) -> list[float]:
        if isinstance(value, float):
            return [value]
        if isinstance(value, dict):
            return [f for v in value.values() for f in floats(v)]
        if isinstance(value, list):
            return [f for v in value for f in floats(v)]
        return []

    for reference in REFERENCES.values():
        for number in floats(msgspec.to_builtins(calculate_chart(reference.birth))):
            assert number == round(number, 6)


def test_chart_hash_is_pinned_so_that_its_canonical_form_cannot_drift_silently() -> None:
    # If this changes on purpose, bump CALCULATION_VERSION: stored hashes
    # would otherwise stop matching the charts they name.
    assert chart_hash(LONDON) == PINNED_LONDON_HASH


def test_house_system_is_part_of_the_hash() -> None:
    assert chart_hash(LONDON, ChartOptions("equal")) != chart_hash(
        LONDON, ChartOptions("whole_sign")
    )


def test_charts_computed_concurrently_are_identical() -> None:
    births = [r.birth for r in REFERENCES.values()] * 8
    expected = [msgspec.json.encode(calculate_chart(b)) for b in births]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda b: msgspec.json.encode(calculate_chart(b)), births))
    assert got == expected


def test_chart_options_reject_unknown_house_systems_and_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"house_system": "placidus"}', type=ChartOptions)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"date": "1990-07-15", "time": "14:30", "timezone": "UTC",'
            b' "latitude": 1, "longitude": 2, "name": "x"}',
            type=BirthData,
        )


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Z",
    "+05:30",
    "-03:00",
    "+14:00",
    "-12:00",
    "Europe/London",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "America/St_Johns",
]


@st.composite
def valid_births(draw: st.DrawFn) -> BirthData:
    day = draw(st.dates(min_value=MIN_DATE, max_value=MAX_DATE))
    hour, minute, second = (
        draw(st.integers(0, 23)),
        draw(st.integers(0, 59)),
        draw(st.integers(0, 59)),
    )
    clock = f"{hour:02d}:{minute:02d}" + (f":{second:02d}" if draw(st.booleans()) else "")
    birth = BirthData(
        date=day.isoformat(),
        time=clock,
        timezone=draw(st.sampled_from(ZONES)),
        latitude=draw(st.floats(-MAX_LATITUDE, MAX_LATITUDE, allow_nan=False)),
        longitude=draw(st.floats(-180.0, 180.0, allow_nan=False)),
    )
    try:
        resolve_birth(birth)
    except ValidationFailed:
        # The only way a drawn birth can fail is a wall time skipped by a
        # clock change; those are covered by their own tests.
        reject()
    return birth


options = st.builds(ChartOptions, house_system=st.sampled_from(["equal", "whole_sign"]))
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(valid_births(), options)
def test_hash_and_encoded_chart_are_deterministic(birth: BirthData, opts: ChartOptions) -> None:
    copy = msgspec.json.decode(msgspec.json.encode(birth), type=BirthData)
    assert chart_hash(birth, opts) == chart_hash(copy, opts)
    assert msgspec.json.encode(calculate_chart(birth, opts)) == msgspec.json.encode(
        calculate_chart(copy, opts)
    )


def _shift_date(text: str, days: int) -> str:
    shifted = date.fromisoformat(text) + timedelta(days=days)
    return min(max(shifted, MIN_DATE), MAX_DATE).isoformat()


@PROPERTY_SETTINGS
@given(valid_births(), st.sampled_from(["date", "time", "timezone", "latitude", "longitude"]))
def test_hash_differs_when_any_field_differs(birth: BirthData, field: str) -> None:
    if field == "date":
        step = -1 if birth.date == MAX_DATE.isoformat() else 1
        other = msgspec.structs.replace(birth, date=_shift_date(birth.date, step))
    elif field == "time":
        hh, mm = birth.time[:5].split(":")
        minute = (int(hh) * 60 + int(mm) + 1) % 1440
        other = msgspec.structs.replace(birth, time=f"{minute // 60:02d}:{minute % 60:02d}:07")
    elif field == "timezone":
        zone = "Asia/Tokyo" if birth.timezone != "Asia/Tokyo" else "Europe/Paris"
        other = msgspec.structs.replace(birth, timezone=zone)
    else:
        value: float = getattr(birth, field)
        other = msgspec.structs.replace(birth, **{field: value - math.copysign(0.001, value)})
    try:
        resolve_birth(other)
    except ValidationFailed:
        reject()
    assert chart_hash(birth) != chart_hash(other)


@PROPERTY_SETTINGS
@given(valid_births())
def test_house_system_changes_the_hash(birth: BirthData) -> None:
    assert chart_hash(birth, ChartOptions("equal")) != chart_hash(birth, ChartOptions("whole_sign"))


@PROPERTY_SETTINGS
@given(
    valid_births(), st.sampled_from(["Z", "UTC", "utc", "z", "+00:00", "-00:00", "+0000", "+00"])
)
def test_equivalent_spellings_hash_equally_and_give_the_same_chart(
    birth: BirthData, utc_spelling: str
) -> None:
    hh_mm = birth.time[:5]
    spelled_short = msgspec.structs.replace(birth, time=hh_mm, timezone="Z")
    spelled_long = msgspec.structs.replace(birth, time=f"{hh_mm}:00", timezone=utc_spelling)
    assert chart_hash(spelled_short) == chart_hash(spelled_long)
    assert msgspec.json.encode(calculate_chart(spelled_short)) == msgspec.json.encode(
        calculate_chart(spelled_long)
    )


def test_offset_spellings_with_and_without_colon_hash_equally() -> None:
    assert chart_hash(london(timezone="+05:30")) == chart_hash(london(timezone="+0530"))
    assert chart_hash(london(timezone="-03:00")) == chart_hash(london(timezone="-03"))


def test_coordinates_equal_to_six_decimals_hash_equally() -> None:
    assert chart_hash(london(latitude=51.5074)) == chart_hash(london(latitude=51.50740000001))
    assert chart_hash(london(longitude=0.0)) == chart_hash(london(longitude=-0.0))
    assert chart_hash(london(latitude=51)) == chart_hash(london(latitude=51.0))


@PROPERTY_SETTINGS
@given(valid_births(), options)
def test_every_valid_chart_is_well_formed(birth: BirthData, opts: ChartOptions) -> None:
    chart = calculate_chart(birth, opts)
    for name in BODIES:
        b = body(chart, name)
        assert 0.0 <= b.longitude < 360.0
        assert 0.0 <= b.degree < 30.0
        assert b.sign in SIGNS
        assert 1 <= b.house <= 12
    for angle in (chart.ascendant, chart.midheaven):
        assert 0.0 <= angle.longitude < 360.0
        assert 0.0 <= angle.degree < 30.0
        assert angle.sign == SIGNS[int(angle.longitude // 30)]
    assert 0 < (chart.ascendant.longitude - chart.midheaven.longitude) % 360 < 180
    for cusps in (chart.houses.equal, chart.houses.whole_sign):
        assert len(cusps) == 12
        assert all(0.0 <= c < 360.0 for c in cusps)
        for a, b2 in zip(cusps, cusps[1:] + cusps[:1], strict=True):
            assert math.isclose((b2 - a) % 360, 30.0, abs_tol=1e-5)
    assert chart.houses.equal[0] == chart.ascendant.longitude
    assert chart.houses.whole_sign[0] % 30 == 0
    orbs = [a.orb for a in chart.aspects]
    assert orbs == sorted(orbs)
    utc = datetime.strptime(chart.utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert utc == resolve_birth(birth)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["2023-02-30", "2023-13-01", "2023-00-10", "2023-04-31", "1900-02-29"],
)
def test_rejects_impossible_calendar_dates(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(date=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["date"]
    assert "calendar date" in errors["date"]


@pytest.mark.parametrize(
    "text", ["15/07/1990", "1990-7-15", "19900715", "", "1990-07-15T14:30", "１９９０-07-15"]
)
def test_rejects_dates_not_written_as_yyyy_mm_dd(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(date=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["date"]
    assert "YYYY-MM-DD" in errors["date"]


def test_accepts_leap_day_in_a_leap_year() -> None:
    assert resolve_birth(london(date="2000-02-29")).date() == date(2000, 2, 29)


@pytest.mark.parametrize("text", ["1699-12-31", "2200-01-01", "0001-01-01", "9999-12-31"])
def test_rejects_dates_outside_the_supported_ephemeris_range(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(date=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["date"]
    assert "1700-01-01" in errors["date"]
    assert "2199-12-31" in errors["date"]


@pytest.mark.parametrize("text", ["1700-01-01", "2199-12-31"])
def test_accepts_the_first_and_last_supported_dates(text: str) -> None:
    chart = calculate_chart(london(date=text))
    assert chart.sun.sign in SIGNS


@pytest.mark.parametrize("text", ["25:00", "24:00", "12:61", "12:30:60", "99:99"])
def test_rejects_impossible_times(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(time=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["time"]
    assert "00-23" in errors["time"]


@pytest.mark.parametrize("text", ["2pm", "1430", "14.30", "14:3", "", "14:30:00.5", " 14:30"])
def test_rejects_times_not_written_as_hh_mm_or_hh_mm_ss(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(time=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["time"]
    assert "HH:MM" in errors["time"]


@pytest.mark.parametrize(
    "text",
    [
        "Mars/Olympus_Mons",
        "Europe/london",
        "",
        "../etc/passwd",
        "Europe",
        "right/UTC",
        "posix/Europe/London",
        "GMT+25",
        "+14:30",
        "-14:01",
        "+15:00",
        "+05:60",
        "05:30",
        "UTC+1",
    ],
)
def test_rejects_unknown_time_zones_and_out_of_range_offsets(text: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(timezone=text))
    errors = field_errors(excinfo)
    assert list(errors) == ["timezone"]
    assert "IANA" in errors["timezone"]
    assert "+05:30" in errors["timezone"]


@pytest.mark.parametrize(
    ("zone", "utc_hour", "utc_minute"),
    [
        ("+14:00", 0, 30),  # 14:30 at +14:00 is 00:30 UTC the same day
        ("-12:00", 2, 30),  # and at -12:00 02:30 UTC the next day
        ("Asia/Kathmandu", 8, 45),
        ("UTC", 14, 30),
        ("Z", 14, 30),
    ],
)
def test_accepts_iana_names_and_offsets_up_to_fourteen_hours(
    zone: str, utc_hour: int, utc_minute: int
) -> None:
    instant = resolve_birth(london(timezone=zone))
    assert (instant.hour, instant.minute) == (utc_hour, utc_minute)
    assert instant.tzinfo is not None
    assert instant.utcoffset() == timedelta(0)


@pytest.mark.parametrize("value", [90.5, -91.0, 180.0, math.nan, math.inf, -math.inf])
def test_rejects_latitudes_that_are_not_on_earth(value: float) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(latitude=value))
    errors = field_errors(excinfo)
    assert list(errors) == ["latitude"]
    assert "north positive" in errors["latitude"]


@pytest.mark.parametrize("value", [66.500001, -66.6, 70.0, -78.2232, 90.0, -90.0])
def test_rejects_latitude_beyond_polar_circle(value: float) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(latitude=value))
    errors = field_errors(excinfo)
    assert list(errors) == ["latitude"]
    assert "66.5" in errors["latitude"]
    assert "Ascendant" in errors["latitude"]


@pytest.mark.parametrize("value", [66.5, -66.5, 0.0])
def test_accepts_latitudes_up_to_the_polar_threshold(value: float) -> None:
    chart = calculate_chart(london(latitude=value))
    assert 0.0 <= chart.ascendant.longitude < 360.0


@pytest.mark.parametrize("value", [180.5, -181.0, 360.0, math.nan, math.inf])
def test_rejects_longitudes_outside_plus_minus_180(value: float) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(longitude=value))
    errors = field_errors(excinfo)
    assert list(errors) == ["longitude"]
    assert "east positive" in errors["longitude"]


@pytest.mark.parametrize("value", [180.0, -180.0])
def test_accepts_longitudes_on_the_antimeridian(value: float) -> None:
    calculate_chart(london(longitude=value))


def test_rejects_booleans_strings_and_overflowing_integers_as_coordinates() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(latitude=True, longitude="12"))
    assert list(field_errors(excinfo)) == ["latitude", "longitude"]
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(latitude=10**400))
    assert list(field_errors(excinfo)) == ["latitude"]


@pytest.mark.parametrize(
    ("day", "clock", "zone"),
    [
        ("2021-03-28", "01:30", "Europe/London"),  # clocks went 01:00 -> 02:00
        ("2021-03-14", "02:30", "America/New_York"),  # 02:00 -> 03:00
        ("2021-10-03", "02:15:30", "Australia/Sydney"),  # southern spring, 02:00 -> 03:00
        ("2021-10-03", "02:15", "Australia/Lord_Howe"),  # a half-hour change, 02:00 -> 02:30
        ("2011-12-30", "12:00", "Pacific/Apia"),  # a whole day skipped, -10:00 -> +14:00
    ],
)
def test_rejects_local_time_skipped_by_a_clock_change(day: str, clock: str, zone: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(date=day, time=clock, timezone=zone))
    errors = field_errors(excinfo)
    assert list(errors) == ["time"]
    assert "did not happen" in errors["time"]
    assert zone in errors["time"]


@pytest.mark.parametrize(
    ("day", "zone"),
    [
        ("2021-03-28", "Europe/London"),
        ("2021-10-31", "Europe/London"),
        ("2021-10-03", "Australia/Lord_Howe"),
        ("2021-04-04", "Australia/Lord_Howe"),
        ("2011-12-29", "Pacific/Apia"),
        ("2011-12-30", "Pacific/Apia"),  # the day skipped whole
        ("2011-12-31", "Pacific/Apia"),
    ],
)
def test_a_wall_time_is_refused_exactly_when_its_zone_skipped_it(day: str, zone: str) -> None:
    """Every minute of a change day, against the definition: a skipped wall time has a
    smaller offset at fold=0 (before the change) than at fold=1 (after it)."""
    tz = zoneinfo.ZoneInfo(zone)
    for minute in range(24 * 60):
        clock = f"{minute // 60:02d}:{minute % 60:02d}"
        local = datetime.combine(date.fromisoformat(day), time.fromisoformat(clock), tz)
        before, after = local.utcoffset(), local.replace(fold=1).utcoffset()
        assert before is not None and after is not None
        try:
            utc = resolve_birth(london(date=day, time=clock, timezone=zone))
        except ValidationFailed:
            assert before < after, clock
        else:
            assert before >= after, clock
            assert utc == local.astimezone(UTC)


@pytest.mark.parametrize(
    ("day", "clock", "zone", "utc"),
    [
        # 01:30 happened twice: first on BST (+01:00), then on GMT.
        ("2021-10-31", "01:30", "Europe/London", datetime(2021, 10, 31, 0, 30, tzinfo=UTC)),
        # 01:30 happened first on EDT (-04:00), then on EST.
        ("2021-11-07", "01:30", "America/New_York", datetime(2021, 11, 7, 5, 30, tzinfo=UTC)),
    ],
)
def test_ambiguous_time_in_a_dst_fold_takes_the_first_occurrence(
    day: str, clock: str, zone: str, utc: datetime
) -> None:
    assert resolve_birth(london(date=day, time=clock, timezone=zone)) == utc


def test_times_just_around_a_clock_change_are_accepted() -> None:
    before = resolve_birth(london(date="2021-03-28", time="00:59:59"))
    after = resolve_birth(london(date="2021-03-28", time="02:00"))
    assert after - before == timedelta(seconds=1)


def test_reports_every_bad_field_together_in_field_order() -> None:
    bad = BirthData(
        date="2023-02-30", time="25:00", timezone="Nowhere/Special", latitude=95.0, longitude=200.0
    )
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(bad)
    assert [e.field for e in excinfo.value.errors] == [
        "date",
        "time",
        "timezone",
        "latitude",
        "longitude",
    ]
    assert all(e.message for e in excinfo.value.errors)


def test_reports_polar_latitude_together_with_a_date_out_of_range() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(date="1600-01-01", latitude=-80.0))
    assert list(field_errors(excinfo)) == ["date", "latitude"]


def test_errors_can_be_prefixed_by_the_caller() -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        resolve_birth(london(time="12:61"))
    assert [e.field for e in excinfo.value.prefixed("birth").errors] == ["birth.time"]


def test_calculate_chart_and_chart_hash_validate_like_resolve_birth() -> None:
    bad = london(latitude=75.0)
    with pytest.raises(ValidationFailed):
        calculate_chart(bad)
    with pytest.raises(ValidationFailed):
        chart_hash(bad)


PINNED_LONDON_HASH = "69bd080188dad1e5b0da595ad83e7503db3a29b66f8b314688da424f5db7062b"
