"""The command line's own behaviour, apart from the roles it starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from almanac.cli import _this_command


def test_the_welcome_names_the_almanac_command_as_it_was_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """So that ``keys create`` pastes as printed: ``.venv/bin/almanac`` under ``make run``."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / ".venv" / "bin" / "almanac"
    monkeypatch.setattr(sys, "argv", [str(script), "serve"])
    assert _this_command() == ".venv/bin/almanac"
    monkeypatch.setattr(sys, "argv", ["/opt/elsewhere/bin/almanac", "serve"])
    assert _this_command() == "/opt/elsewhere/bin/almanac"
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/site-packages/almanac/__main__.py"])
    assert _this_command() == "almanac"
