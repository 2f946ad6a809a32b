"""Granian, for the server comparison: the bare app or Almanac's API under granian.

``almanac serve`` runs uvicorn (almanac.server); this runs the same apps under granian with
the closest settings it has (one worker, uvloop, HTTP/1.1, access log off), so that the
``api`` benchmark can measure both servers on this machine.

Run: ``python -m benchmarks.servers --port 8002 [--roles api]`` (Almanac, settings from the
environment like ``almanac serve``).
"""

from __future__ import annotations

import argparse
import os

from litestar import Litestar

ROLES_VAR = "ALMANAC_BENCH_ROLES"


def serve_granian(target: str, *, port: int) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    Granian(
        target,
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=True,
        log_access=False,
        log_level="warning",  # type: ignore[arg-type]
    ).serve()


def almanac_from_env() -> Litestar:
    """What ``almanac serve --roles ROLES`` builds, as a factory granian can import."""
    from almanac.app import create_app
    from almanac.bootstrap import bootstrap
    from almanac.logs import configure_logging
    from almanac.settings import Settings

    settings = Settings.from_env()
    configure_logging(settings.log)
    roles = tuple(os.environ.get(ROLES_VAR, "api").split(","))
    return create_app(settings, bootstrap(settings, roles=roles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--roles", default="api")
    args = parser.parse_args()
    os.environ[ROLES_VAR] = args.roles
    serve_granian("benchmarks.servers:almanac_from_env", port=args.port)


if __name__ == "__main__":
    main()
