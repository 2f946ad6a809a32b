"""Real ``almanac serve`` processes for tests: started, watched, killed, always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from almanac.settings import Settings

SERVE = [sys.executable, "-m", "almanac", "serve"]
REAP_TIMEOUT = 10.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without its ``ALMANAC_`` settings (so that a child process is
    configured by ``extra`` alone), and with ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALMANAC_")}
    env.update(extra)
    return env


def role_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a process that uses the same data as ``settings``."""
    env = clean_env()
    if settings.store.postgres_url is None:
        env["ALMANAC_DATA_DIR"] = str(settings.store.data_dir)
    else:
        assert settings.cache.redis_url is not None
        assert settings.feed.nats_url is not None
        env["ALMANAC_POSTGRES_URL"] = settings.store.postgres_url
        env["ALMANAC_REDIS_URL"] = settings.cache.redis_url
        env["ALMANAC_NATS_URL"] = settings.feed.nats_url
        if settings.store.read_postgres_url:
            env["ALMANAC_READ_POSTGRES_URL"] = settings.store.read_postgres_url
        env["ALMANAC_NATS_STREAM"] = settings.relay.stream
        env["ALMANAC_NATS_SUBJECT_PREFIX"] = settings.relay.subject_prefix
    hooks = settings.webhooks
    if hooks.secret_key:
        env["ALMANAC_WEBHOOK_SECRET_KEY"] = hooks.secret_key
    env.update(
        ALMANAC_WEBHOOK_ALLOWED_NETWORKS=",".join(hooks.allowed_networks),
        ALMANAC_WEBHOOK_ALLOW_HTTP="1" if hooks.allow_http else "0",
        ALMANAC_WEBHOOK_RETRY_SCALE=repr(hooks.retry_scale),
        ALMANAC_WEBHOOK_BREAKER_COOLDOWN=repr(hooks.breaker_cooldown),
        ALMANAC_WEBHOOK_POLL_INTERVAL=repr(hooks.poll_interval),
        ALMANAC_WEBHOOK_TIMEOUT=repr(hooks.timeout),
    )
    env.update(
        ALMANAC_POOL_SIZE=str(settings.store.pool_size),
        ALMANAC_BOOTSTRAP_ADMIN="0",
        ALMANAC_FEED_POLL_INTERVAL="0.05",
        ALMANAC_HOST="127.0.0.1",
        # INFO, as JSON lines: tests read the lifecycle events from the output.
        ALMANAC_LOG_LEVEL="INFO",
        ALMANAC_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


class RoleProcess:
    """One ``almanac serve --roles …`` process; its output goes to a file."""

    def __init__(self, roles: str, env: dict[str, str], output: Path, port: int = 0) -> None:
        self.roles = roles
        self.port = port
        self.output_path = output
        with output.open("wb") as sink:
            self.popen = subprocess.Popen(
                [*SERVE, "--roles", roles, "--port", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far, in order."""
        records = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                record: Any = json.loads(line)
                if isinstance(record, dict) and "event" in record:
                    records.append(record)
        return records

    def log_events(self) -> list[str]:
        """The ``event`` names of the JSON log lines written so far, in order."""
        return [str(record["event"]) for record in self.log_records()]

    def ensure_running(self) -> None:
        """Fail with the process's output if it has ended."""
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(
                f"almanac serve --roles {self.roles} ended with {code}:\n{self.output()[-4000:]}"
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=REAP_TIMEOUT)

    def freeze(self) -> None:
        """SIGSTOP: the process does nothing more, and its log stands still, until thawed."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def terminate(self, timeout: float) -> int:
        """SIGTERM, then wait up to ``timeout`` s for the process to end by itself."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"no exit within {timeout} s of SIGTERM:\n{self.output()[-4000:]}"
            ) from None


class RoleProcesses:
    """Starts role processes on one set of data; any still running at exit are killed."""

    def __init__(self, settings: Settings, workdir: Path, **env: str) -> None:
        self.env = role_env(settings, **env)
        self.workdir = workdir
        self.started: list[RoleProcess] = []

    def start(self, roles: str = "worker", port: int = 0) -> RoleProcess:
        """``almanac serve --roles roles``; on ``port`` for a process clients talk to."""
        output = self.workdir / f"serve-{len(self.started) + 1}-{roles.replace(',', '-')}.log"
        process = RoleProcess(roles, self.env, output, port)
        self.started.append(process)
        return process

    def __enter__(self) -> RoleProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in self.started:
            if process.returncode is None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    process.kill()
