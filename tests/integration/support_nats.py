"""NATS for relay tests: a plain nats-py reader of a whole stream, and a private nats-server.

The reader is deliberately not Almanac code: it is what any outside subscriber would write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from tests.integration.support_redis import REAP_TIMEOUT, free_port
from tests.integration.support_waiting import eventually, wait_until


@dataclass(frozen=True)
class Received:
    sequence: int
    subject: str
    headers: dict[str, str]
    payload: dict[str, Any]

    @property
    def position(self) -> int:
        return int(self.headers["Almanac-Position"])


class StreamReader:
    """Subscribes to a stream from sequence 1 with an ordered consumer; keeps every message."""

    def __init__(self, url: str, stream: str, subjects: str) -> None:
        self.url = url
        self.stream = stream
        self.subjects = subjects
        self.received: list[Received] = []
        self._client: Any = None

    async def __aenter__(self) -> StreamReader:
        self._client = await nats.connect(self.url, connect_timeout=2)
        js = self._client.jetstream()

        async def stream_exists() -> bool:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.stream_info(self.stream)
                return True
            return False

        await eventually(stream_exists, within=30, what=f"stream {self.stream} created")
        await js.subscribe(
            self.subjects,
            stream=self.stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            cb=self._on_message,
        )
        return self

    async def _on_message(self, msg: Any) -> None:
        self.received.append(
            Received(
                sequence=msg.metadata.sequence.stream,
                subject=msg.subject,
                headers=dict(msg.headers or {}),
                payload=msgspec.json.decode(msg.data),
            )
        )

    async def until_count(self, count: int, *, within: float = 60) -> list[Received]:
        async def enough() -> bool:
            return len(self.received) >= count

        try:
            await eventually(enough, within=within, what=f"{count} messages in {self.stream}")
        except pytest.fail.Exception as exc:
            in_stream = await stream_message_count(self.url, self.stream)
            raise AssertionError(
                f"{exc}; the reader has {len(self.received)}, the stream {in_stream}"
            ) from None
        return self.received

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


async def stream_message_count(url: str, stream: str) -> int:
    """How many messages the stream holds now; 0 while NATS or the stream is not there."""
    try:
        client = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    except (OSError, TimeoutError, nats.errors.Error):
        return 0
    try:
        info = await client.jetstream(timeout=2).stream_info(stream)
    except (OSError, TimeoutError, nats.errors.Error):
        return 0
    finally:
        await client.close()
    return int(info.state.messages)


def nats_server_binary() -> str:
    """The ``nats-server`` binary; skip without one (fail when services are required)."""
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if binary is None:
        reason = "nats-server is not installed"
        if os.environ.get("ALMANAC_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (ALMANAC_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return binary


def answers_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.recv(4096)  # the INFO line
            conn.sendall(b"CONNECT {}\r\nPING\r\n")
            return b"PONG" in conn.recv(4096)
    except OSError:
        return False


class PrivateNats:
    """One JetStream ``nats-server`` on a free port; killed and restarted with its store kept.

    ``max_payload`` (such as ``"2MB"``), when set, goes into a configuration file for the
    next start: the server takes it from nowhere else."""

    def __init__(self, workdir: Path) -> None:
        self.binary = nats_server_binary()
        self.port = free_port()
        self.store_dir = workdir / f"nats-{self.port}"
        self.log = workdir / f"nats-{self.port}.log"
        self.config = workdir / f"nats-{self.port}.conf"
        self.max_payload: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        options: list[str] = []
        if self.max_payload is not None:
            self.config.write_text(f"max_payload: {self.max_payload}\n")
            options = ["-c", str(self.config)]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    *options,
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "-sd",
                    str(self.store_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        wait_until(
            lambda: process.poll() is not None or answers_ping(self.port),
            within=15,
            what=f"nats-server answering on port {self.port}",
        )
        if process.poll() is not None:
            raise AssertionError(f"nats-server ended with {process.returncode}: {self.output()}")

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        self._kill()
        wait_until(
            lambda: not answers_ping(self.port),
            within=5,
            what=f"nats-server gone from port {self.port}",
        )

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=REAP_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def __enter__(self) -> PrivateNats:
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


async def consumer_backlog(url: str, stream: str, consumer: str) -> int | None:
    """Messages a durable consumer has not had acknowledged yet (waiting or in flight);
    ``None`` while NATS, the stream or the consumer is not there."""
    try:
        client = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    except (OSError, TimeoutError, nats.errors.Error):
        return None
    try:
        info = await client.jetstream(timeout=2).consumer_info(stream, consumer)
    except (OSError, TimeoutError, nats.errors.Error):
        return None
    finally:
        await client.close()
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
