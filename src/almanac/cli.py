"""The ``almanac`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.panel import Panel

from almanac.container import ROLES, SERVICES_ROLES
from almanac.settings import Profile, Settings, SettingsError

if TYPE_CHECKING:
    from almanac.auth import KeyRing

console = Console()


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(2)


def _parse_roles(raw: str) -> tuple[str, ...]:
    roles = tuple(r.strip() for r in raw.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        named = ", ".join(unknown) or "(none given)"
        raise click.BadParameter(f"unknown role(s) {named}; choose from {', '.join(ROLES)}")
    return roles


@click.group()
@click.version_option(package_name="almanac")
def main() -> None:
    """Almanac: astrology readings on an event-sourced CQRS backend."""


@main.command()
@click.option(
    "--host", default=None, help="Interface to listen on (ALMANAC_HOST, default 127.0.0.1)."
)
@click.option("--port", type=int, default=None, help="Port (ALMANAC_PORT, default 8000).")
@click.option(
    "--roles",
    default=",".join(ROLES),
    show_default=True,
    help="Comma-separated roles to run in this process.",
)
def serve(host: str | None, port: int | None, roles: str) -> None:
    """Run the chosen roles (API, worker, projector, relay, deliver) in one process.

    The relay publishes to NATS JetStream, so it runs on the services profile only.
    """
    import msgspec

    from almanac.app import create_app
    from almanac.bootstrap import bootstrap
    from almanac.logs import configure_logging
    from almanac.server import serve as serve_app

    chosen = _parse_roles(roles)
    settings = load_settings()
    http = msgspec.structs.replace(
        settings.http,
        host=host or settings.http.host,
        port=settings.http.port if port is None else port,
    )
    settings = msgspec.structs.replace(settings, http=http)
    configure_logging(settings.log)
    try:
        container = bootstrap(settings, roles=chosen)
    except Exception as exc:  # noqa: BLE001 - a start-up failure is reported, not dumped
        _fail(f"cannot open the event store: {exc}")
    issued = None
    if "api" in chosen and settings.access.bootstrap_admin:
        issued = container.keyring.issue_first_admin()
    _welcome(settings, chosen, issued.secret if issued else None)
    serve_app(create_app(settings, container), host=http.host, port=http.port)


@main.command()
@click.option("--port", type=int, default=None, help="Health port (ALMANAC_PORT, default 8000).")
@click.pass_context
def deliver(ctx: click.Context, port: int | None) -> None:
    """Run the webhook deliverer alone (the same as `serve --roles deliver`)."""
    ctx.invoke(serve, host=None, port=port, roles="deliver")


def _this_command() -> str:
    """How this ``almanac`` was run (``.venv/bin/almanac`` under ``make run``), so that a
    command it prints pastes as is; plain ``almanac`` when that cannot be told."""
    ran = Path(sys.argv[0])
    if ran.name != "almanac":
        return "almanac"  # python -m almanac, or a wrapper
    with contextlib.suppress(ValueError):
        return str(ran.resolve().relative_to(Path.cwd()))
    return str(ran)


def _welcome(settings: Settings, roles: tuple[str, ...], admin_key: str | None) -> None:
    base = settings.http.public_url or f"http://{settings.http.host}:{settings.http.port}"
    where = ", ".join(f"{k} {v}" for k, v in settings.locations().items())
    # The relay publishes to NATS: on the embedded profile there is nothing for it to do.
    idle = [r for r in roles if r in SERVICES_ROLES and settings.profile is Profile.EMBEDDED]
    running = ", ".join(r for r in roles if r not in idle)
    lines = [f"[bold]Almanac[/] · {settings.profile.value} profile · roles: {running}"]
    if idle:
        lines.append(f"not on this profile: {', '.join(idle)} (services profile only)")
    lines.append(f"data: {where}")
    if "api" in roles:
        lines += [f"API:  {base}/api/v1", f"Docs: {base}/docs", f"Health: {base}/health/ready"]
    follow_up: list[str] = []
    if admin_key:
        lines += [
            "",
            "[bold yellow]Admin API key (shown once; only its hash is stored):[/]",
            f"  {admin_key}",
        ]
        body = (
            '{"birth": {"date": "1990-04-12", "time": "14:30", "timezone": "Europe/London", '
            '"latitude": 51.5074, "longitude": -0.1278}, "label": "Ada"}'
        )
        follow_up = [
            "Next, generate a reading:",
            f"  export ALMANAC_KEY={admin_key}",
            (
                f"  curl -si -X POST {base}/api/v1/readings"
                ' -H "Authorization: Bearer $ALMANAC_KEY"'
                f" -H 'Content-Type: application/json' -d '{body}'"
            ),
            "then GET the Location it returns (README.md walks through the rest).",
        ]
    elif "api" in roles:
        lines += [
            "",
            "The admin key was shown on first start. Make another with:",
            f"  {_this_command()} keys create --name me --role admin",
        ]
    console.print(Panel("\n".join(lines), expand=False), highlight=False)
    for line in follow_up:
        # Printed outside the panel so that the command copies and pastes whole.
        console.print(line, highlight=False, soft_wrap=True, markup=False)


@main.group()
def keys() -> None:
    """Manage API keys."""


@contextlib.contextmanager
def _key_ring() -> Iterator[KeyRing]:
    """The installation's key ring, for a key command; its log lines go to stderr, so that
    what the command prints on stdout can be captured (``KEY=$(almanac keys create ...)``)."""
    from almanac.bootstrap import bootstrap
    from almanac.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log, stream=sys.stderr)
    container = bootstrap(settings, roles=())
    try:
        yield container.keyring
    finally:
        container.store.close()


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. 'mobile app'.")
@click.option("--role", type=click.Choice(["admin", "client"]), default="client", show_default=True)
@click.option(
    "--owner", default=None, help="Owner (tenant) the key acts for; default: a new owner."
)
def keys_create(name: str, role: str, owner: str | None) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from uuid import uuid4

    with _key_ring() as ring:
        issued = ring.issue(
            name=name,
            role="admin" if role == "admin" else "client",
            owner=owner or f"own_{uuid4().hex[:16]}",
        )
    console.print(f"[bold]{issued.secret}[/]", highlight=False)
    Console(stderr=True).print(
        f"key {issued.principal.key_id} for owner {issued.principal.owner} (role {role}); "
        "it is shown only this once",
        highlight=False,
    )


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke KEY, given as the key itself (alm_...) or as its id.

    Running API processes refuse it, and close the WebSockets it opened, as they hear of
    the revocation; one that does not (NATS away, no relay running) once its check of the
    key expires, within ALMANAC_KEY_CACHE_TTL seconds (30 by default).
    """
    from uuid import UUID

    from almanac.domain.access import KEY_PREFIX, key_id_for

    if key.startswith(KEY_PREFIX):
        key_id = key_id_for(key)
    else:
        try:
            key_id = UUID(key)
        except ValueError:
            raise click.BadParameter(
                f"expected an API key ({KEY_PREFIX}...) or a key id (a UUID), got {key!r}",
                param_hint="KEY",
            ) from None
    with _key_ring() as ring:
        revoked = ring.revoke(key_id)
    if revoked is None:
        raise click.ClickException(f"there is no API key {key_id}")
    console.print(
        f"key {key_id} ({revoked.name!r}, owner {revoked.owner}, role {revoked.role}) is revoked",
        highlight=False,
    )


@main.command()
def migrate() -> None:
    """Create the databases and tables of the active profile, then exit."""
    from almanac.bootstrap import bootstrap
    from almanac.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log)

    async def run() -> None:
        container = bootstrap(settings, roles=())
        await container.start()
        await container.stop()

    asyncio.run(run())
    console.print(f"migrated ({settings.profile.value} profile)")


@main.command()
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
@click.option(
    "--seconds", type=float, default=None, help="Length of each measurement (default: each's)."
)
@click.option(
    "--profile",
    type=click.Choice(["services", "embedded", "all"]),
    default="services",
    show_default=True,
    help="Profile to measure; 'all': every profile where the benchmark means something.",
)
@click.option("--events", type=int, default=None, help="Size of what a sized benchmark seeds.")
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "granian"]),
    default="uvicorn",
    show_default=True,
    help="ASGI server of the HTTP benchmarks.",
)
@click.option("--pyspy", is_flag=True, help="Profile the API process with py-spy (api).")
@click.option(
    "--disk-probe",
    is_flag=True,
    help="Time an fsync every 10 ms beside the run and report the slow ones (lag, websocket).",
)
def bench(
    *,
    names: tuple[str, ...],
    list_only: bool,
    seconds: float | None,
    profile: str,
    events: int | None,
    server: str,
    pyspy: bool,
    disk_probe: bool,
) -> None:
    """Run benchmarks (all of them without NAMES); results go to benchmarks/results/.

    The benchmarks live in the repository, not in the installed package: run this from a
    checkout (it is what `python -m benchmarks` runs).
    """
    suite = _benchmark_suite()
    if list_only:
        print(suite.listing())
        return
    unknown = [n for n in names if n not in suite.BENCHMARKS]
    if unknown:
        raise click.BadParameter(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(suite.BENCHMARKS)}",
            param_hint="NAMES",
        )
    suite.run_benchmarks(
        list(names),
        seconds=seconds,
        profile=profile,
        events=events,
        server=server,
        pyspy=pyspy,
        disk_probe=disk_probe,
    )


def _benchmark_suite() -> Any:
    """The ``benchmarks`` package of the checkout in the working directory (or on the path)."""
    import importlib
    from pathlib import Path

    checkout = Path.cwd()
    if (checkout / "benchmarks" / "__main__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module("benchmarks.__main__")
    except ImportError:
        _fail("the benchmarks are not here: run `almanac bench` from a checkout of Almanac")


if __name__ == "__main__":
    main()
