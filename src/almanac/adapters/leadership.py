"""Leases that let exactly one process at a time run a singleton role (a projection).

Services: a Postgres session-level advisory lock, held on a connection of its own; when
the holder dies or its connection drops, Postgres releases the lock and a standby's next
try wins. Embedded: an exclusive ``flock`` on a file under the data directory, which the
kernel releases when the holder dies.

A lease can be lost without the holder noticing at once (a dropped connection is seen
on the next check), so two holders may briefly overlap. Everything run under a lease
must therefore stay idempotent: projector writes are guarded by positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import psycopg
import structlog

from almanac.timeouts import wait_event, within

log = structlog.get_logger("almanac.leadership")


class Lease(Protocol):
    async def acquire(self) -> bool:
        """Try once, without waiting; True if this process now holds the lease."""
        ...

    async def held(self) -> bool:
        """Whether the lease is still ours (False once its connection is gone)."""
        ...

    async def release(self) -> None:
        """Give the lease up if it is held, and let go of what trying for it keeps open."""
        ...


async def take_turns(
    lease: Lease,
    lead: Callable[[], Awaitable[None]],
    *,
    role: str,
    interval: float,
    stopping: asyncio.Event,
    standing_by: Callable[[], None] | None = None,
    **context: Any,
) -> None:
    """Run ``lead`` whenever this process holds ``lease``, and stand by while another does,
    asking again every ``interval`` seconds, until ``stopping`` is set.

    ``lead`` returns once it finds the lease lost (or stopping set); the lease is then given
    up and asked for again. A ``lead`` that raises is logged (``<role>.lead_failed``), and
    the lease is given up before a pause of an interval, in which a standby may take over.
    A standby logs ``<role>.standby`` once per wait, and ``<role>.lease_unavailable`` once
    per run of tries that could not even ask for the lease; ``standing_by`` is called on
    every try that did not win it.
    """
    waiting = unreachable = False
    try:
        while not stopping.is_set():
            try:
                won = await lease.acquire()
                unreachable = False
            except Exception as exc:  # noqa: BLE001 - a standby keeps trying, whatever went wrong
                if not unreachable:
                    log.warning(f"{role}.lease_unavailable", error=str(exc) or repr(exc), **context)
                    unreachable = True
                won = False
            if not won:
                if not waiting:
                    log.info(f"{role}.standby", **context)
                    waiting = True
                if standing_by is not None:
                    standing_by()
                await wait_event(stopping, interval)
                continue
            waiting = failed = False
            try:
                await lead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - give the lease up and try again
                log.warning(f"{role}.lead_failed", error=repr(exc), **context)
                failed = True
            finally:
                await lease.release()
            if failed:
                await wait_event(stopping, interval)
    finally:
        await lease.release()  # a standby's connection, kept for its next try


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    digest = hashlib.blake2b(f"almanac:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresLease:
    """A session-level advisory lock, taken and held on a connection of its own.

    A standby keeps that connection between its tries and asks again on it: opening one
    for every try meant a new backend each ``standby_interval`` for every standby lease of
    every process (each projection, the batch manager, the relay), for as long as it waits.
    The connection is replaced only once it fails. Holding is the lock's alone: a
    connection lost while leading is the lease lost, as Postgres releases the lock with
    the session.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.key = lock_key(name)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # Whether the lock was won on ``_conn``; a standby's connection holds nothing.
        self._holding = False

    async def acquire(self) -> bool:
        if self._holding and await self.held():
            return True
        kept = self._conn
        if kept is not None and not kept.closed:
            try:
                return await self._try(kept)
            except (psycopg.Error, TimeoutError) as exc:
                # The connection kept for trying has failed (a restart, a dropped link): a
                # new one tries at once rather than a standby interval later.
                log.debug("leadership.reconnecting", lease=self.name, error=str(exc))
        await self._drop()
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=5,
                application_name=f"almanac-lease-{self.name}"[:63],
                # Dead peers are noticed by the kernel too, not only by the next check.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                # And by the server: the lock is the server's, and it lets go of it only once
                # it sees the session gone. A holder whose host died or was cut off sends no
                # reset; the server's own keepalives (by default after two hours) would keep
                # every standby waiting that long.
                options="-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
                " -c tcp_keepalives_count=3",
            )
            return await self._try(self._conn)
        except (psycopg.Error, TimeoutError) as exc:
            log.warning("leadership.unreachable", lease=self.name, error=str(exc))
            await self._drop()
            return False

    async def _try(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Ask for the lock on ``conn``; whether it was won."""
        cursor = await within(conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)), 5)
        row = await cursor.fetchone()
        self._holding = row is not None and bool(row[0])
        return self._holding

    async def held(self) -> bool:
        conn = self._conn
        if not self._holding:
            return False
        if conn is None or conn.closed:
            await self._drop()
            return False
        try:
            await within(conn.execute("SELECT 1"), 5)
        except (psycopg.Error, TimeoutError):
            await self._drop()
            return False
        return True

    async def release(self) -> None:
        conn = self._conn
        if self._holding and conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn, self._holding = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


class FileLease:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    async def acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # Who holds it, for people looking at the file; the lock is what counts.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    async def held(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
