"""What a process loads: an API process goes without the webhook deliverer's HTTP client."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.integration.support_processes import clean_env

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter of this environment (nothing imported before it)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        # This checkout's code, whatever the environment's install points at.
        env=clean_env(ALMANAC_DATA_DIR=str(tmp_path), PYTHONPATH=f"{ROOT / 'src'}:{ROOT}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_api_process_does_not_load_aiohttp_until_it_delivers_webhooks(
    tmp_path: Path,
) -> None:
    """aiohttp (~9 MB of RSS) is loaded by the deliverer when it runs, not by bootstrap,
    the app or nats-py; nats-py gets it only for a server reached over WebSocket."""
    done = run_python(
        """
        import sys
        from almanac.app import create_app
        from almanac.bootstrap import bootstrap
        from almanac.settings import Settings

        settings = Settings.from_env()
        container = bootstrap(settings, roles=("api",))
        create_app(settings, container)
        print("after the app:", "aiohttp" in sys.modules)

        from nats.aio import transport
        from almanac.adapters.nats import _websocket_transport

        _websocket_transport()
        print("for ws:", transport.aiohttp is sys.modules["aiohttp"])
        print("its headers:", transport.multidict is sys.modules["multidict"])
        container.store.close()
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "after the app: False" in done.stdout, done.stdout
    assert "for ws: True" in done.stdout, done.stdout
    assert "its headers: True" in done.stdout, done.stdout
