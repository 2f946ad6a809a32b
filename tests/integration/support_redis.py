"""A private ``redis-server`` for outage tests: started, killed, restarted on the same port,
or frozen and thawed with its data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

from tests.integration.support_waiting import wait_until

REAP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str:
    """The ``redis-server`` on PATH; skip without one (fail when services are required)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed"
        if os.environ.get("ALMANAC_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (ALMANAC_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return binary


class PrivateRedis:
    """One ``redis-server`` on a free port, without persistence; always killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) and return once it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        wait_until(
            lambda: process.poll() is not None or answers_ping(self.port),
            within=10,
            what=f"redis-server answering on port {self.port}",
        )
        if process.poll() is not None:
            raise AssertionError(f"redis-server ended with {process.returncode}: {self.output()}")

    def kill(self) -> None:
        """SIGKILL, as in a crash: clients see their connections reset."""
        self._kill()
        wait_until(
            lambda: not answers_ping(self.port),
            within=5,
            what=f"redis-server gone from port {self.port}",
        )

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its data and its connections, and answers nothing (as
        behind a network partition) until ``thaw``."""
        assert self.process is not None and self.process.poll() is None, "not running"
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        wait_until(
            lambda: answers_ping(self.port),
            within=10,
            what=f"redis-server answering again on port {self.port}",
        )

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=REAP_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self._kill()
