"""Sparse field selection: ``fields=id,status,chart.sun`` keeps just those parts of a view."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import msgspec
import msgspec.inspect as mi

from almanac.errors import FieldError, ValidationFailed

MAX_FIELDS = 50


@functools.cache
def known_paths(view: type[msgspec.Struct]) -> frozenset[str]:
    """Every dotted path into ``view`` that names a Struct field, at any depth."""
    paths: set[str] = set()

    def walk(t: mi.Type, prefix: str) -> None:
        if isinstance(t, mi.UnionType):
            for member in t.types:
                walk(member, prefix)
            return
        if isinstance(t, mi.StructType):
            for field in t.fields:
                path = f"{prefix}{field.encode_name}"
                paths.add(path)
                walk(field.type, f"{path}.")

    walk(mi.type_info(view), "")
    return frozenset(paths)


def parse_fields(
    raw: str | Sequence[str] | None, view: type[msgspec.Struct]
) -> tuple[str, ...] | None:
    """The requested paths, or None for the whole view; unknown paths are a 422 on ``fields``.

    A repeated ``fields`` parameter comes as a sequence; its values are merged, as though
    they had been given comma-separated in one.
    """
    if raw is None:
        return None
    values = [raw] if isinstance(raw, str) else raw
    requested = tuple(
        dict.fromkeys(p.strip() for value in values for p in value.split(",") if p.strip())
    )
    if not requested:
        raise ValidationFailed([FieldError("fields", "name at least one field")])
    if len(requested) > MAX_FIELDS:
        raise ValidationFailed([FieldError("fields", f"at most {MAX_FIELDS} fields")])
    unknown = [p for p in requested if p not in known_paths(view)]
    if unknown:
        top = sorted(p for p in known_paths(view) if "." not in p)
        raise ValidationFailed(
            [
                FieldError(
                    "fields",
                    f"unknown field(s) {', '.join(unknown)}; fields are dotted paths into the "
                    f"resource, e.g. {', '.join(top)}",
                )
            ]
        )
    return requested


def select(value: msgspec.Struct, paths: tuple[str, ...]) -> dict[str, Any]:
    """A nested dict with only ``paths`` of ``value`` (a null parent stays null)."""
    data = msgspec.to_builtins(value)
    out: dict[str, Any] = {}
    for path in paths:
        source: Any = data
        target = out
        parts = path.split(".")
        for i, part in enumerate(parts):
            if source is None:
                break
            source = source.get(part) if isinstance(source, dict) else None
            if i == len(parts) - 1:
                target[part] = source
            elif source is None:
                target.setdefault(part, None)
            else:
                existing = target.get(part)
                target = target.setdefault(part, {}) if existing is None else existing
    return out
