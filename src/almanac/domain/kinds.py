"""The kinds of reading a client can ask for."""

from __future__ import annotations

from typing import Literal

ReadingKind = Literal["natal", "love", "career"]
READING_KINDS: tuple[ReadingKind, ...] = ("natal", "love", "career")
