"""The webhook secrets' key file a process makes when no key is configured."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from almanac.adapters.secretbox import SecretBox


@pytest.mark.parametrize(("shared", "level"), [(False, "info"), (True, "warning")])
def test_a_key_made_for_this_machine_alone_is_a_warning_only_where_machines_share(
    tmp_path: Path, shared: bool, level: str
) -> None:
    """Embedded, one process reads the secrets; on services others do, with keys of their own."""
    path = tmp_path / "var" / "webhook-secret.key"
    with structlog.testing.capture_logs() as logs:
        made = SecretBox.from_key_file(path, shared=shared)
        again = SecretBox.from_key_file(path, shared=shared)
    assert [(e["event"], e["log_level"]) for e in logs] == [("webhook.secret_key_created", level)]
    assert again.open(made.seal("whsec_x")) == "whsec_x"
    assert path.stat().st_mode & 0o777 == 0o600
