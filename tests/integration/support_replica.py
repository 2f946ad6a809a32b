"""Private Postgres servers built from the server binaries: one alone, or a primary with a
streaming hot standby.

The machine's own Postgres allows no replication connections, and is shared by the tests
running beside each other, so it is left alone: this builds a throwaway server (``initdb``),
which a test may stop and start, or a primary and a standby of it (``pg_basebackup -R -X
stream``), in a temporary directory, each on a free port of 127.0.0.1 with its sockets in
that directory. Postgres refuses to run as root, so as root every server command runs as
``postgres``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.integration.support_redis import free_port
from tests.integration.support_waiting import wait_until

PG_BIN = Path(os.environ.get("ALMANAC_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
COMMAND_TIMEOUT = 60.0
# Appended to the primary's postgresql.conf; the standby inherits it through the base backup.
SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockets}'
wal_level = replica
max_wal_senders = 4
hot_standby = on
max_connections = 40
shared_buffers = 16MB
# Throwaway clusters: durability buys nothing here and costs seconds.
fsync = off
full_page_writes = off
"""
HBA = """
local all all trust
local replication all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


def missing_prerequisites() -> str | None:
    """Why a streaming pair cannot be built here, or None when it can."""
    absent = [name for name in PROGRAMS if not (PG_BIN / name).is_file()]
    if absent:
        return f"Postgres server binaries not found in {PG_BIN}: {', '.join(absent)}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "runuser is not installed (needed to run Postgres as a non-root user)"
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"there is no {SERVER_USER!r} user to run Postgres as"
    return None


def require_server_binaries() -> None:
    """Skip the test where private servers cannot be built, or fail it where services are
    required (``ALMANAC_REQUIRE_SERVICES=1``, as in CI)."""
    reason = missing_prerequisites()
    if reason is None:
        return
    if os.environ.get("ALMANAC_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + " (ALMANAC_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def _as_server_user(*command: str | Path) -> list[str]:
    args = [str(part) for part in command]
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *args]
    return args


def _run(*command: str | Path) -> None:
    args = _as_server_user(*command)
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} ended with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )


@dataclass
class Server:
    """One Postgres server: its data directory, port and log."""

    name: str
    data_dir: Path
    port: int
    log_file: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        try:
            _run(
                PG_BIN / "pg_ctl",
                "-D",
                self.data_dir,
                "-l",
                self.log_file,
                "-w",
                "-t",
                "30",
                "start",
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from None

    def stop(self, mode: str = "fast") -> None:
        _run(PG_BIN / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "-t", "30", "stop")

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def kill(self) -> None:
        """Stop the server however it can be: immediate shutdown, else SIGKILL."""
        if not self.running:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class StreamingPair:
    primary: Server
    standby: Server
    root: Path

    def wait_until_streaming(self, within: float = 20) -> None:
        def streaming() -> bool:
            with (
                contextlib.suppress(psycopg.OperationalError),
                psycopg.connect(self.standby.url(), connect_timeout=2, autocommit=True) as conn,
            ):
                row = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
                return row is not None and row[0] == "streaming"
            return False

        wait_until(streaming, within=within, what="the standby streaming from the primary")


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_USER)
        os.chown(path, account.pw_uid, account.pw_gid)


def _initdb(root: Path, name: str, servers: list[Server]) -> Server:
    """A new cluster under ``root`` (whose ``sockets`` directory exists), started, and listed
    in ``servers`` before it starts (so that a failed start is cleaned up too)."""
    server = Server(name, root / name, free_port(), root / f"{name}.log")
    servers.append(server)
    _run(
        PG_BIN / "initdb", "-D", server.data_dir, "-U", SERVER_USER, "--auth=trust",
        "--encoding=UTF8", "--no-sync", "--no-instructions",
    )  # fmt: skip
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(SERVER_CONF.format(sockets=root / "sockets"))
        conf.write(f"port = {server.port}\n")
    (server.data_dir / "pg_hba.conf").write_text(HBA)
    server.start()
    return server


@contextlib.contextmanager
def _servers_root() -> Iterator[tuple[Path, list[Server]]]:
    """A private directory for servers; every server listed in it is killed on the way out."""
    root = Path(tempfile.mkdtemp(prefix="almanac-pg-"))
    servers: list[Server] = []
    try:
        root.chmod(0o700)
        _own(root)
        sockets = root / "sockets"
        sockets.mkdir(mode=0o700)
        _own(sockets)
        yield root, servers
    finally:
        for server in reversed(servers):
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def private_server() -> Iterator[Server]:
    """A running Postgres server of the test's own, which it may stop and start at will."""
    with _servers_root() as (root, servers):
        yield _initdb(root, "private", servers)


@contextlib.contextmanager
def streaming_pair() -> Iterator[StreamingPair]:
    """A running primary and a hot standby streaming from it; both removed on the way out."""
    with _servers_root() as (root, servers):
        primary = _initdb(root, "primary", servers)
        standby = Server("standby", root / "standby", free_port(), root / "standby.log")
        servers.append(standby)
        _run(
            PG_BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
            "-U", SERVER_USER, "-D", standby.data_dir, "-R", "-X", "stream",
            "--checkpoint=fast", "--no-sync",
        )  # fmt: skip
        with (standby.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\n")
        standby.start()
        pair = StreamingPair(primary, standby, root)
        pair.wait_until_streaming()
        yield pair
