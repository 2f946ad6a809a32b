"""Turning a calculated chart into the words of a reading.

A ``ReadingGenerator`` takes a ``Chart`` and a reading kind and returns a ``ReadingText``.
The built-in generator composes its prose from the tables in ``almanac.domain.texts``; it is
offline and deterministic, so the same chart, kind, label and generator version always give
byte-for-byte the same reading, which keeps replays and idempotent retries honest. Other
generators (a language model behind an HTTP API, say) can implement the same protocol, which
is why ``generate`` is a coroutine even though the built-in one never awaits anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from almanac.domain import texts
from almanac.errors import AlmanacError

if TYPE_CHECKING:
    # Imported for annotations only: chart.py and kinds.py must be importable without this
    # module and vice versa (reading.py imports both sides).
    from almanac.domain.chart import Aspect, Body, Chart
    from almanac.domain.kinds import ReadingKind


class ReadingSection(msgspec.Struct, frozen=True):
    """One part of a reading: ``key`` is stable for clients (``sun``, ``aspects``, ...)."""

    key: str
    heading: str
    body: str


class ReadingText(msgspec.Struct, frozen=True):
    """A finished reading and the generator (name and version) that wrote it."""

    title: str
    summary: str
    sections: list[ReadingSection]
    generator: str
    generator_version: str


class ReadingGenerator(Protocol):
    """Anything that can write a reading for a chart."""

    name: str
    version: str

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        """Write the reading; raise ``GenerationFailed`` if it cannot be written."""
        ...


class GenerationFailed(AlmanacError):
    """A generator could not write the reading.

    ``retryable`` tells the caller whether trying again later may succeed (a timed-out API)
    or is pointless (a chart the generator cannot read), so it knows whether to record the
    reading as failed.
    """

    def __init__(self, detail: str, retryable: bool = False) -> None:
        super().__init__(detail)
        self.retryable = retryable


SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "natal": ("sun", "moon", "ascendant", "aspects"),
    "love": ("sun", "moon", "ascendant", "aspects", "venus", "mars"),
    "career": ("sun", "moon", "ascendant", "aspects", "midheaven", "saturn"),
}
"""The sections each kind of reading has, in the order they are written."""

STRONGEST_ASPECTS = 3
"""How many aspects the aspects section talks about; more would drown the tight ones."""


class BuiltinGenerator:
    """The offline generator: prose composed from fixed tables, identical on every run.

    Changing any text in ``almanac.domain.texts`` changes what this generator writes, so
    ``version`` must be bumped with it; stored readings record the version that wrote them.
    """

    name: str = "builtin"
    version: str = "1"

    async def generate(self, chart: Chart, kind: ReadingKind, label: str | None) -> ReadingText:
        keys = SECTION_KEYS.get(kind)
        if keys is None:
            raise GenerationFailed(f"unknown reading kind {kind!r}")
        try:
            sections = [self._section(chart, key) for key in keys]
            summary = _summary(chart, kind)
        except KeyError as exc:
            # The tables cover every valid placement, so a miss means the chart itself is
            # malformed; another attempt would fail the same way.
            raise GenerationFailed(f"chart has an unreadable placement: {exc}") from exc
        return ReadingText(
            title=_title(kind, label),
            summary=summary,
            sections=sections,
            generator=self.name,
            generator_version=self.version,
        )

    def _section(self, chart: Chart, key: str) -> ReadingSection:
        if key == "ascendant":
            return _ascendant(chart)
        if key == "midheaven":
            sign = chart.midheaven.sign
            return ReadingSection(
                "midheaven", f"Midheaven in {_sign(sign)}", texts.MIDHEAVEN_SIGNS[sign]
            )
        if key == "aspects":
            return _aspects(chart)
        return _placement(chart, key)


# Which sign table tells each body's section, and whether a retrograde note belongs in it.
# The Sun and Moon never retrograde, so only the planets get the note.
_PLACEMENT_TABLES: dict[str, tuple[dict[str, str], bool]] = {
    "sun": (texts.SUN_SIGNS, False),
    "moon": (texts.MOON_SIGNS, False),
    "venus": (texts.VENUS_SIGNS, True),
    "mars": (texts.MARS_SIGNS, True),
    "saturn": (texts.SATURN_SIGNS, True),
}


def _placement(chart: Chart, name: str) -> ReadingSection:
    """A body's section: its sign paragraph, the house it works through, any retrograde."""
    table, may_retrograde = _PLACEMENT_TABLES[name]
    body = _body(chart, name)
    parts = [
        table[body.sign],
        texts.HOUSE_SENTENCES[body.house].format(focus=texts.PRINCIPLES[name]),
    ]
    if may_retrograde and body.retrograde:
        parts.append(texts.RETROGRADE[name])
    heading = f"{_capitalised(texts.BODY_NAMES[name])} in {_sign(body.sign)}"
    # "The Sun in Leo" reads like a sentence; headings drop the article.
    heading = heading.removeprefix("The ")
    return ReadingSection(name, heading, " ".join(parts))


def _ascendant(chart: Chart) -> ReadingSection:
    """The rising sign's paragraph, then where the chart ruler sends the whole chart."""
    sign = chart.ascendant.sign
    ruler_name = texts.SIGN_RULERS[sign]
    ruler = _body(chart, ruler_name)
    ruler_sentence = texts.RULER_SENTENCE.format(
        ruler=_capitalised(texts.BODY_NAMES[ruler_name]),
        sign=_sign(ruler.sign),
        house=texts.HOUSE_ORDINALS[ruler.house],
        domain=texts.HOUSE_DOMAINS[ruler.house],
    )
    body = f"{texts.ASCENDANT_SIGNS[sign]} {ruler_sentence}"
    return ReadingSection("ascendant", f"{_sign(sign)} Rising", body)


def _aspects(chart: Chart) -> ReadingSection:
    """A paragraph for each of the tightest aspects between two of the ten bodies."""
    heading = "The strongest aspects"
    # Aspects to the angles, if a chart lists any, are left out: the principles table speaks
    # for bodies only. Sorting again (stably) keeps this right even if a chart's aspects are
    # not in orb order.
    between_bodies = [
        a for a in chart.aspects if a.first in texts.PRINCIPLES and a.second in texts.PRINCIPLES
    ]
    strongest = sorted(between_bodies, key=lambda a: a.orb)[:STRONGEST_ASPECTS]
    if not strongest:
        return ReadingSection("aspects", heading, texts.NO_ASPECTS)
    seen: dict[str, int] = {}
    paragraphs = []
    for aspect in strongest:
        # Alternate the wording between aspects of the same kind so that two squares in a
        # row do not read word for word alike.
        variant = seen.get(aspect.kind, 0) % 2
        seen[aspect.kind] = seen.get(aspect.kind, 0) + 1
        paragraphs.append(_aspect_paragraph(aspect, variant))
    return ReadingSection("aspects", heading, "\n\n".join(paragraphs))


def _aspect_paragraph(aspect: Aspect, variant: int) -> str:
    words = texts.ASPECTS[aspect.kind]
    first, second = texts.BODY_NAMES[aspect.first], texts.BODY_NAMES[aspect.second]
    opening = f"{_capitalised(first)} {words.verb} {second}, {_orb(aspect.orb)}."
    meaning = words.meanings[variant].format(
        first=texts.PRINCIPLES[aspect.first], second=texts.PRINCIPLES[aspect.second]
    )
    return f"{opening} {meaning} {words.advice[variant]}"


def _orb(orb: float) -> str:
    """How close to exact an aspect is, in words a reader can weigh."""
    if orb < 1:
        return "less than a degree from exact"
    if orb < 3:
        return f"within {orb:.1f}° of exact"
    return f"with a looser orb of {orb:.1f}°"


def _title(kind: str, label: str | None) -> str:
    # The label is inserted last and never passed through str.format, so braces or other
    # odd characters in it are shown as typed.
    label = label.strip() if label else None
    return f"A {kind} reading for {label}" if label else f"A {kind} reading"


def _summary(chart: Chart, kind: str) -> str:
    sun, moon, rising = chart.sun.sign, chart.moon.sign, chart.ascendant.sign
    opening = texts.SUMMARY_OPENING.format(
        sun=_sign(sun),
        moon=_sign(moon),
        rising=_sign(rising),
        sun_archetype=texts.SIGN_ARCHETYPES[sun],
        moon_archetype=texts.SIGN_ARCHETYPES[moon],
        rising_archetype=texts.SIGN_ARCHETYPES[rising],
    )
    return f"{opening} {texts.SUMMARY_CLOSINGS[kind]}"


def _body(chart: Chart, name: str) -> Body:
    # Bodies are plain attributes named like the tables' keys, so look them up by name.
    body: Body = getattr(chart, name)
    return body


def _sign(sign: str) -> str:
    return texts.SIGN_NAMES[sign]


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]
