"""``almanac keys``: a key made on the command line works at once; a revoked one is refused."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from almanac.auth import KeyRing
from almanac.domain.access import ApiKey, key_id_for
from almanac.errors import Unauthorized
from almanac.eventstore import EventStore
from tests.conftest import embedded_settings
from tests.integration.support_processes import clean_env


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


def almanac(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``almanac *args`` on the embedded profile in ``data_dir``, in a process of its own (it
    sets logging up for itself, as a command does)."""
    return subprocess.run(
        [sys.executable, "-m", "almanac", *args],
        env=clean_env(ALMANAC_DATA_DIR=str(data_dir), COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_key(data_dir: Path, name: str) -> tuple[str, str]:
    """The printed key and the id ``keys create`` names beside it."""
    result = almanac(data_dir, "keys", "create", "--name", name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"alm_\S+\n", result.stdout), "stdout is the key alone"
    named = re.search(r"key ([0-9a-f-]{36}) for owner", result.stderr)
    assert named is not None, result.stderr
    return result.stdout.strip(), named.group(1)


def taken(data_dir: Path, secret: str) -> bool:
    """Whether a server starting now would take ``secret``."""
    store = EventStore(embedded_settings(data_dir))
    try:
        asyncio.run(KeyRing(store, cache_ttl=30).authenticate(secret))
    except Unauthorized:
        return False
    finally:
        store.close()
    return True


def revoke(data_dir: Path, key: str) -> tuple[int, str]:
    result = almanac(data_dir, "keys", "revoke", key)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def test_a_key_revoked_by_itself_or_by_its_id_is_refused(data_dir: Path) -> None:
    by_secret, by_id = create_key(data_dir, "mobile app"), create_key(data_dir, "batch job")
    assert by_id[1] == str(key_id_for(by_id[0]))
    assert taken(data_dir, by_secret[0]) and taken(data_dir, by_id[0])
    code, said = revoke(data_dir, by_secret[0])
    assert code == 0 and f"key {by_secret[1]} ('mobile app'" in said and "is revoked" in said
    code, said = revoke(data_dir, by_id[1])
    assert code == 0 and f"key {by_id[1]} ('batch job'" in said
    assert not taken(data_dir, by_secret[0]) and not taken(data_dir, by_id[0])
    store = EventStore(embedded_settings(data_dir))
    try:
        revoked = store.load_sync(ApiKey, key_id_for(by_secret[0]))
        assert revoked is not None and revoked.revoked and revoked.version == 2
        # Again: nothing more is appended.
        assert revoke(data_dir, by_secret[0])[0] == 0
        again = store.load_sync(ApiKey, key_id_for(by_secret[0]))
        assert again is not None and again.version == 2
    finally:
        store.close()


def test_revoking_names_what_is_wrong_with_the_key_given(data_dir: Path) -> None:
    code, said = revoke(data_dir, "00000000-0000-4000-8000-000000000000")
    assert code == 1 and "there is no API key 00000000-0000-4000-8000-000000000000" in said
    code, said = revoke(data_dir, "not-a-key")
    assert code == 2 and "expected an API key (alm_...) or a key id (a UUID)" in said
