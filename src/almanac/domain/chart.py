"""Natal chart calculation: birth data in, a tropical geocentric chart out.

The chart is a pure function of the birth data, the options and
``CALCULATION_VERSION``: the same input always encodes to the same bytes,
which is what lets ``chart_hash`` stand in for the chart in events and caches.

Conventions
-----------
* Longitudes are apparent geocentric ecliptic longitudes referred to the true
  equinox and ecliptic of date (tropical zodiac), in degrees in ``[0, 360)``.
* Every float in a result is rounded to 6 decimals (about 0.004 arcseconds):
  far below the ephemeris' own accuracy, and it makes the JSON byte-stable.
* The Ascendant and Midheaven come from apparent local sidereal time and the
  true obliquity of date. Charts are refused beyond the polar circles, where
  the Ascendant is undefined for part of every day.

Aspects
-------
Aspects are found between the ten bodies only. The Ascendant and Midheaven
are left out on purpose: they move a degree every four minutes, and most birth
times are known only to the nearest quarter hour, so aspects to them would be
noise presented as fact.

==============  =====  =====================  =====
aspect          angle  orb                    orb with Sun or Moon
==============  =====  =====================  =====
conjunction       0°   8°                     10°
sextile          60°   5°                      7°
square           90°   7°                      9°
trine           120°   7°                      9°
opposition      180°   8°                     10°
==============  =====  =====================  =====

The widened orbs never overlap, so a pair of bodies makes at most one aspect.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from typing import Final, Literal

import ephem
import msgspec

from almanac.errors import FieldError, ValidationFailed

__all__ = [
    "BODIES",
    "CALCULATION_VERSION",
    "MAX_DATE",
    "MAX_LATITUDE",
    "MIN_DATE",
    "SIGNS",
    "Angle",
    "Aspect",
    "AspectKind",
    "BirthData",
    "Body",
    "Chart",
    "ChartOptions",
    "HouseSystem",
    "Houses",
    "calculate_chart",
    "chart_hash",
    "resolve_birth",
]

# Part of every chart hash: anything that could change a stored chart's bytes
# (ephemeris, formulas, rounding, orbs, field layout) must bump it, so that
# stale cached charts are recomputed rather than served.
CALCULATION_VERSION: str = "1"

SIGNS: Final[tuple[str, ...]] = (
    "aries",
    "taurus",
    "gemini",
    "cancer",
    "leo",
    "virgo",
    "libra",
    "scorpio",
    "sagittarius",
    "capricorn",
    "aquarius",
    "pisces",
)

BODIES: Final[tuple[str, ...]] = (
    "sun",
    "moon",
    "mercury",
    "venus",
    "mars",
    "jupiter",
    "saturn",
    "uranus",
    "neptune",
    "pluto",
)

# libastro computes Jupiter to Pluto with Chapront's 1995 theory only from
# 1689-03-19 to 2247-10-01; outside it Pluto falls back to a model that is off
# by tens of degrees. Against the Swiss Ephemeris every body stays within
# 0.05° across this span, the Moon's drift near the end coming from the
# unknowable future Delta T rather than the theory. The margin inside the
# Chapront span also keeps the retrograde samples (one hour either side) valid.
MIN_DATE: Final[date] = date(1700, 1, 1)
MAX_DATE: Final[date] = date(2199, 12, 31)

# The Ascendant is undefined wherever the ecliptic can lie in the horizon,
# that is beyond 90° minus the obliquity. The obliquity falls from 23.48° in
# 1700 to 23.41° in 2199, so the polar circle never comes closer to the
# equator than 66.52° within the supported dates; one fixed round threshold
# inside it keeps the rule simple to state and date-independent.
MAX_LATITUDE: Final[float] = 66.5

# Offsets real time zones have used; nothing on Earth is further than ±14:00.
_MAX_OFFSET_MINUTES: Final[int] = 14 * 60

HouseSystem = Literal["equal", "whole_sign"]
AspectKind = Literal["conjunction", "sextile", "square", "trine", "opposition"]


class BirthData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When and where someone was born, as they would tell it.

    ``date`` is the local civil date (``YYYY-MM-DD``), ``time`` the local civil
    time (``HH:MM`` or ``HH:MM:SS``, 24-hour), ``timezone`` an IANA name
    (``Europe/London``) or a UTC offset (``+05:30``, ``-03:00``, ``UTC``,
    ``Z``), ``latitude`` degrees north positive, ``longitude`` degrees east
    positive.
    """

    date: str
    time: str
    timezone: str
    latitude: float
    longitude: float


class ChartOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to draw the chart.

    ``house_system`` decides which houses the bodies are placed in; the cusps
    of both systems are always returned.
    """

    house_system: HouseSystem = "equal"


# Frozen, so one shared default instance is safe.
_DEFAULT_OPTIONS: Final = ChartOptions()


class Body(msgspec.Struct, frozen=True):
    """A body's place: ecliptic longitude, its sign and degree within it."""

    longitude: float
    sign: str
    degree: float
    retrograde: bool
    house: int


class Angle(msgspec.Struct, frozen=True):
    """The Ascendant or the Midheaven."""

    longitude: float
    sign: str
    degree: float


class Houses(msgspec.Struct, frozen=True):
    """Twelve cusp longitudes per system, the first house's cusp first."""

    equal: list[float]
    whole_sign: list[float]


class Aspect(msgspec.Struct, frozen=True):
    """Two bodies ``separation`` degrees apart, ``orb`` from an exact ``angle``."""

    first: str
    second: str
    kind: AspectKind
    angle: float
    separation: float
    orb: float


class Chart(msgspec.Struct, frozen=True):
    """A natal chart. Bodies are named fields so clients can select one."""

    chart_hash: str
    calculation_version: str
    utc: str
    house_system: str
    sun: Body
    moon: Body
    mercury: Body
    venus: Body
    mars: Body
    jupiter: Body
    saturn: Body
    uranus: Body
    neptune: Body
    pluto: Body
    ascendant: Angle
    midheaven: Angle
    houses: Houses
    aspects: list[Aspect]


# --------------------------------------------------------------------------
# Validation and normalisation
# --------------------------------------------------------------------------

# ASCII digits only: ``\d`` would also let through other scripts' digits.
_DATE_RE: Final = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_TIME_RE: Final = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?")
_OFFSET_RE: Final = re.compile(r"([+-])([0-9]{2})(?::?([0-9]{2}))?")
_UTC_NAMES: Final = frozenset({"utc", "z"})

_FIELD_ORDER: Final = ("date", "time", "timezone", "latitude", "longitude")

_TIMEZONE_MESSAGE: Final = (
    'must be an IANA time zone name such as "Europe/London", '
    'or a UTC offset from -14:00 to +14:00 such as "+05:30" or "UTC"'
)


class _Normalised(msgspec.Struct, frozen=True):
    """Birth data in one canonical spelling, plus what it resolves to."""

    date: str
    time: str
    timezone: str
    latitude: float
    longitude: float
    utc: datetime


@functools.cache
def _known_zones() -> frozenset[str]:
    # available_timezones() leaves out the posix/ and right/ trees; right/
    # zones count leap seconds and would shift every chart by ~27 s.
    return frozenset(zoneinfo.available_timezones())


def _finite_number(value: object) -> float | None:
    # bool is an int subclass, but True is not a latitude.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _parse_date(text: object) -> tuple[date | None, str | None]:
    if not isinstance(text, str) or not _DATE_RE.fullmatch(text):
        return None, 'must be a date in the form YYYY-MM-DD, such as "1990-07-15"'
    try:
        # In the form the pattern allows, as ``date()`` of its three numbers would: a third
        # of the instructions (callgrind) of taking the numbers out of the match.
        day = date.fromisoformat(text)
    except ValueError:
        return None, f'"{text}" is not a calendar date: months run 01-12, days as the month has'
    if not MIN_DATE <= day <= MAX_DATE:
        return None, (
            f"must be between {MIN_DATE.isoformat()} and {MAX_DATE.isoformat()}, "
            "the span the ephemeris computes accurately"
        )
    return day, None


def _parse_time(text: object) -> tuple[time | None, str | None]:
    if not isinstance(text, str) or not _TIME_RE.fullmatch(text):
        return None, 'must be a 24-hour time in the form HH:MM or HH:MM:SS, such as "14:30"'
    try:
        # Refuses an hour past 23, a minute or second past 59 (24:00 and leap seconds too).
        return time.fromisoformat(text), None
    except ValueError:
        return None, f'"{text}" is not a time of day; hours run 00-23, minutes and seconds 00-59'


def _parse_timezone(text: object) -> tuple[tzinfo | None, str, str | None]:
    """The zone, its canonical spelling, and an error message if any."""
    if not isinstance(text, str):
        return None, "", _TIMEZONE_MESSAGE
    if text.lower() in _UTC_NAMES:
        return UTC, "+00:00", None
    if m := _OFFSET_RE.fullmatch(text):
        hours, minutes = int(m[2]), int(m[3] or 0)
        total = hours * 60 + minutes
        if minutes > 59 or total > _MAX_OFFSET_MINUTES:
            return None, "", _TIMEZONE_MESSAGE
        if m[1] == "-":
            total = -total
        sign = "-" if total < 0 else "+"
        canonical = f"{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"
        return timezone(timedelta(minutes=total)), canonical, None
    # Checking the known names first keeps arbitrary strings ("../x") away
    # from the zoneinfo search path.
    if text in _known_zones():
        try:
            return zoneinfo.ZoneInfo(text), text, None
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    return None, "", _TIMEZONE_MESSAGE


def _check_latitude(value: object) -> str | None:
    latitude = _finite_number(value)
    if latitude is None:
        return "must be a finite number of degrees, north positive"
    if not -90.0 <= latitude <= 90.0:
        return "must be between -90 and 90 degrees, north positive"
    if abs(latitude) > MAX_LATITUDE:
        return (
            f"must be between -{MAX_LATITUDE} and {MAX_LATITUDE} degrees: beyond the "
            "polar circles the Ascendant is undefined for part of each day"
        )
    return None


def _check_longitude(value: object) -> str | None:
    longitude = _finite_number(value)
    if longitude is None:
        return "must be a finite number of degrees, east positive"
    if not -180.0 <= longitude <= 180.0:
        return "must be between -180 and 180 degrees, east positive"
    return None


def _round6(value: float) -> float:
    # Adding 0.0 turns -0.0 into 0.0, which would otherwise encode differently.
    return round(value, 6) + 0.0


def _skipped(utc: datetime, zone: tzinfo, day: date, clock: time) -> bool:
    """Whether the clocks skipped the wall time ``clock`` on ``day`` in ``zone``, given its
    instant ``utc`` (taken at fold=0). A wall time that happened comes back from its instant
    as it was, the first of two in a fold included; one in a gap comes back moved by the
    change. Converting the instant back costs a third of the instructions (callgrind) of
    comparing the offsets at both folds: ``datetime.replace(fold=1)`` parses keywords."""
    back = utc.astimezone(zone)
    return back.date() != day or back.time() != clock


def _checked(birth: BirthData) -> tuple[datetime, datetime, str]:
    """The birth's aware local time, its UTC instant and its zone's canonical name, after
    validating every field (``ValidationFailed`` naming every bad one)."""
    problems: dict[str, str] = {}
    day, problem = _parse_date(birth.date)
    if problem:
        problems["date"] = problem
    clock, problem = _parse_time(birth.time)
    if problem:
        problems["time"] = problem
    zone, zone_name, problem = _parse_timezone(birth.timezone)
    if problem:
        problems["timezone"] = problem
    if problem := _check_latitude(birth.latitude):
        problems["latitude"] = problem
    if problem := _check_longitude(birth.longitude):
        problems["longitude"] = problem

    local: datetime | None = None
    utc: datetime | None = None
    if day is not None and clock is not None and zone is not None:
        # fold=0 is the first of two readings of an ambiguous wall time.
        local = datetime.combine(day, clock, zone)
        utc = local.astimezone(UTC)
        # A fixed offset (a ``timezone``) has no clock changes.
        if not isinstance(zone, timezone) and _skipped(utc, zone, day, clock):
            problems["time"] = (
                f"{clock.isoformat()} did not happen on {day.isoformat()} in {zone_name}: "
                "the clocks skipped it; give a time before or after the change"
            )

    # local and utc are set whenever no field failed; the check is for mypy.
    if problems or local is None or utc is None:
        raise ValidationFailed([FieldError(f, problems[f]) for f in _FIELD_ORDER if f in problems])
    return local, utc, zone_name


def _normalise(birth: BirthData) -> _Normalised:
    local, utc, zone_name = _checked(birth)
    return _Normalised(
        date=local.date().isoformat(),
        time=local.time().isoformat(),
        timezone=zone_name,
        latitude=_round6(float(birth.latitude)),
        longitude=_round6(float(birth.longitude)),
        utc=utc,
    )


def resolve_birth(birth: BirthData) -> datetime:
    """The aware UTC instant of a birth, after validating every field.

    A wall time that happens twice (clocks going back) is taken at its first
    occurrence, the one still on summer time; a wall time that never happened
    (clocks going forward) is rejected on ``time``.

    Raises ``ValidationFailed`` naming every bad field at once, with field
    names ``date``, ``time``, ``timezone``, ``latitude`` and ``longitude``.
    """
    return _checked(birth)[1]


def _hash(normalised: _Normalised, options: ChartOptions) -> str:
    # A list, not a dict: its order is part of the hash and must not depend
    # on how any encoder happens to order keys.
    canonical = msgspec.json.encode(
        [
            "almanac.chart",
            CALCULATION_VERSION,
            normalised.date,
            normalised.time,
            normalised.timezone,
            normalised.latitude,
            normalised.longitude,
            options.house_system,
        ]
    )
    return hashlib.sha256(canonical).hexdigest()


def chart_hash(birth: BirthData, options: ChartOptions = _DEFAULT_OPTIONS) -> str:
    """Hex SHA-256 identifying the chart these inputs produce.

    Inputs that mean the same thing hash the same: ``14:30`` and ``14:30:00``,
    ``Z``, ``UTC`` and ``+00:00``, latitudes equal to 6 decimals. Raises
    ``ValidationFailed`` like ``resolve_birth``: invalid input has no chart.
    """
    return _hash(_normalise(birth), options)


# --------------------------------------------------------------------------
# Astronomy
# --------------------------------------------------------------------------

_J2000_UTC: Final = datetime(2000, 1, 1, 12, tzinfo=UTC)
_J2000_JD: Final = 2451545.0
# ephem counts days from 1899-12-31 12:00 (the "Dublin Julian Date").
_EPHEM_EPOCH_JD: Final = 2415020.0
# Long enough to dwarf rounding noise in the theory, short enough that the
# mean motion across the window has the sign of the motion at the instant
# except within minutes of a station.
_RETROGRADE_HALF_WINDOW_DAYS: Final = 1.0 / 24.0

_EPHEM_BODIES: Final = {
    "sun": ephem.Sun,
    "moon": ephem.Moon,
    "mercury": ephem.Mercury,
    "venus": ephem.Venus,
    "mars": ephem.Mars,
    "jupiter": ephem.Jupiter,
    "saturn": ephem.Saturn,
    "uranus": ephem.Uranus,
    "neptune": ephem.Neptune,
    "pluto": ephem.Pluto,
}
# The Sun and Moon never appear to move backwards, and get wider orbs.
_LUMINARIES: Final = frozenset({"sun", "moon"})

_ASPECTS: Final[tuple[tuple[AspectKind, float, float], ...]] = (
    ("conjunction", 0.0, 8.0),
    ("sextile", 60.0, 5.0),
    ("square", 90.0, 7.0),
    ("trine", 120.0, 7.0),
    ("opposition", 180.0, 8.0),
)
_LUMINARY_ORB_BONUS: Final = 2.0


def _nutation_and_obliquity(jd: float) -> tuple[float, float]:
    """Nutation in longitude and true obliquity of date, both in degrees.

    Meeus, Astronomical Algorithms ch. 22 (IAU 1980, main terms): good to
    0.5" in longitude and 0.1" in obliquity, far inside what a chart needs.
    UT stands in for TT: a minute's difference moves neither measurably.
    """
    t = (jd - _J2000_JD) / 36525.0
    node = math.radians(125.04452 - 1934.136261 * t)
    sun = math.radians(280.4665 + 36000.7698 * t)
    moon = math.radians(218.3165 + 481267.8813 * t)
    dpsi = (
        -17.20 * math.sin(node)
        - 1.32 * math.sin(2 * sun)
        - 0.23 * math.sin(2 * moon)
        + 0.21 * math.sin(2 * node)
    )
    deps = (
        9.20 * math.cos(node)
        + 0.57 * math.cos(2 * sun)
        + 0.10 * math.cos(2 * moon)
        - 0.09 * math.cos(2 * node)
    )
    mean_obliquity = 84381.448 - 46.8150 * t - 0.00059 * t * t + 0.001813 * t * t * t
    return dpsi / 3600.0, (mean_obliquity + deps) / 3600.0


def _ecliptic_longitude(ra: float, dec: float, obliquity: float) -> float:
    """Degrees of ecliptic longitude for an apparent RA/Dec (radians)."""
    eps = math.radians(obliquity)
    return (
        math.degrees(
            math.atan2(math.sin(ra) * math.cos(eps) + math.tan(dec) * math.sin(eps), math.cos(ra))
        )
        % 360.0
    )


def _body_longitude(name: str, jd: float, obliquity: float) -> float:
    # A fresh ephem object per computation: ephem bodies are mutable, so a
    # shared one would race between threads. libastro's internal caches are
    # safe because its extension never releases the GIL.
    body = _EPHEM_BODIES[name]()
    body.compute(ephem.Date(jd - _EPHEM_EPOCH_JD))
    # g_ra/g_dec are apparent geocentric (light time, aberration, nutation),
    # referred to the true equator and equinox of date.
    return _ecliptic_longitude(float(body.g_ra), float(body.g_dec), obliquity)


def _angles(
    jd: float, latitude: float, longitude: float, dpsi: float, obliquity: float
) -> tuple[float, float]:
    """(Ascendant, Midheaven) ecliptic longitudes in degrees."""
    d = jd - _J2000_JD
    t = d / 36525.0
    # IAU 1982 GMST; UTC stands in for UT1 (under 0.9 s, i.e. 0.004°).
    gmst = 280.46061837 + 360.98564736629 * d + 0.000387933 * t * t - t * t * t / 38710000.0
    eps = math.radians(obliquity)
    ramc = math.radians((gmst + dpsi * math.cos(eps) + longitude) % 360.0)
    phi = math.radians(latitude)
    mc = math.degrees(math.atan2(math.sin(ramc), math.cos(ramc) * math.cos(eps))) % 360.0
    asc_y = math.cos(ramc)
    asc_x = -(math.sin(ramc) * math.cos(eps) + math.tan(phi) * math.sin(eps))
    asc = math.degrees(math.atan2(asc_y, asc_x)) % 360.0
    # The Ascendant is the eastern intersection, which the zodiac reaches
    # within half a turn after the MC. This atan2 form already yields it at
    # every latitude inside the polar circles; the tangent form it derives
    # from does not, and this check keeps that slip from ever reaching the
    # houses should the formula be rewritten.
    if (asc - mc) % 360.0 >= 180.0:
        asc = (asc + 180.0) % 360.0
    return asc, mc


def _longitude(value: float) -> float:
    """Rounded to 6 decimals and kept in [0, 360) even when rounding hits 360."""
    rounded = _round6(value % 360.0)
    return 0.0 if rounded >= 360.0 else rounded


def _sign_index(longitude: float) -> int:
    return int(longitude // 30.0)


def _degree(longitude: float) -> float:
    return _round6(longitude - 30.0 * _sign_index(longitude))


def _separation(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return _round6(min(d, 360.0 - d))


def _aspects(longitudes: dict[str, float]) -> list[Aspect]:
    found: list[tuple[float, int, int, Aspect]] = []
    for i, first in enumerate(BODIES):
        for j in range(i + 1, len(BODIES)):
            second = BODIES[j]
            separation = _separation(longitudes[first], longitudes[second])
            luminary = first in _LUMINARIES or second in _LUMINARIES
            bonus = _LUMINARY_ORB_BONUS if luminary else 0.0
            for kind, angle, orb_limit in _ASPECTS:
                orb = _round6(abs(separation - angle))
                if orb <= orb_limit + bonus:
                    found.append((orb, i, j, Aspect(first, second, kind, angle, separation, orb)))
                    break
    # Pairs are unique, so (orb, pair order) is a total, stable order.
    found.sort(key=lambda entry: entry[:3])
    return [entry[3] for entry in found]


def calculate_chart(birth: BirthData, options: ChartOptions = _DEFAULT_OPTIONS) -> Chart:
    """The natal chart for ``birth``.

    Validates like ``resolve_birth`` (raising ``ValidationFailed``), then
    computes from the normalised input, so inputs with equal ``chart_hash``
    give byte-identical charts. Pure and safe to call from many threads.
    """
    normalised = _normalise(birth)
    jd = (normalised.utc - _J2000_UTC).total_seconds() / 86400.0 + _J2000_JD
    dpsi, obliquity = _nutation_and_obliquity(jd)

    asc_raw, mc_raw = _angles(jd, normalised.latitude, normalised.longitude, dpsi, obliquity)
    asc, mc = _longitude(asc_raw), _longitude(mc_raw)
    asc_sign = _sign_index(asc)
    equal_cusps = [_longitude(asc + 30.0 * k) for k in range(12)]
    whole_sign_cusps = [_longitude(30.0 * (asc_sign + k)) for k in range(12)]

    longitudes: dict[str, float] = {}
    bodies: dict[str, Body] = {}
    for name in BODIES:
        lon = _longitude(_body_longitude(name, jd, obliquity))
        longitudes[name] = lon
        retrograde = False
        if name not in _LUMINARIES:
            before = _body_longitude(name, jd - _RETROGRADE_HALF_WINDOW_DAYS, obliquity)
            after = _body_longitude(name, jd + _RETROGRADE_HALF_WINDOW_DAYS, obliquity)
            # Signed shortest step, so a move across 0° Aries is not taken
            # for a 359° step backwards.
            retrograde = ((after - before + 180.0) % 360.0) - 180.0 < 0.0
        sign = _sign_index(lon)
        if options.house_system == "whole_sign":
            house = (sign - asc_sign) % 12 + 1
        else:
            house = int(((lon - asc) % 360.0) // 30.0) % 12 + 1
        bodies[name] = Body(lon, SIGNS[sign], _degree(lon), retrograde, house)

    return Chart(
        chart_hash=_hash(normalised, options),
        calculation_version=CALCULATION_VERSION,
        utc=normalised.utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        house_system=options.house_system,
        sun=bodies["sun"],
        moon=bodies["moon"],
        mercury=bodies["mercury"],
        venus=bodies["venus"],
        mars=bodies["mars"],
        jupiter=bodies["jupiter"],
        saturn=bodies["saturn"],
        uranus=bodies["uranus"],
        neptune=bodies["neptune"],
        pluto=bodies["pluto"],
        ascendant=Angle(asc, SIGNS[asc_sign], _degree(asc)),
        midheaven=Angle(mc, SIGNS[_sign_index(mc)], _degree(mc)),
        houses=Houses(equal=equal_cusps, whole_sign=whole_sign_cusps),
        aspects=_aspects(longitudes),
    )
