"""The deliverer's durable state, in the read database: every message owed to an endpoint,
its schedule, and every attempt made.

A message is written (``pending``, due now) before the event that caused it is acknowledged,
so a deliverer killed at any point loses nothing: the event comes again and its message id
(stable per event and endpoint) makes the insert a no-op, or the message is already here.
An attempt *claims* its message by pushing ``next_attempt_at`` past the attempt's longest
possible duration under a fresh token; a deliverer that dies mid-attempt leaves the message
to fall due again when that lease runs out, for any deliverer to retry. Only the holder of
the token may record the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from almanac.errors import Unavailable
from almanac.readmodels import Dialect, ReadDatabase, Row, Write

_REAL = {"sqlite": "REAL", "postgres": "DOUBLE PRECISION"}
_INT = {"sqlite": "INTEGER", "postgres": "BIGINT"}


def _schema(dialect: Dialect) -> list[str]:
    real, int_ = _REAL[dialect], _INT[dialect]
    return [
        (
            "CREATE TABLE IF NOT EXISTS webhook_messages ("
            " id TEXT PRIMARY KEY, endpoint_id TEXT NOT NULL, owner TEXT NOT NULL,"
            " event_type TEXT NOT NULL, position " + int_ + ", payload TEXT NOT NULL,"
            " status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_at " + real + ", claim TEXT, requested_position " + int_ + " NOT NULL"
            " DEFAULT 0, created_at " + real + " NOT NULL, updated_at " + real + " NOT NULL)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS webhook_messages_due"
            " ON webhook_messages (status, next_attempt_at)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS webhook_messages_endpoint"
            " ON webhook_messages (endpoint_id, created_at)"
        ),
        (
            "CREATE TABLE IF NOT EXISTS webhook_attempts ("
            " id TEXT PRIMARY KEY, message_id TEXT NOT NULL, endpoint_id TEXT NOT NULL,"
            " attempted_at " + real + " NOT NULL, status_code INTEGER, latency_ms " + real + ","
            " error TEXT, response TEXT, outcome TEXT NOT NULL, trigger TEXT NOT NULL)"
        ),
        (
            "CREATE INDEX IF NOT EXISTS webhook_attempts_message"
            " ON webhook_attempts (message_id, attempted_at)"
        ),
        (
            "CREATE TABLE IF NOT EXISTS webhook_endpoint_health ("
            " endpoint_id TEXT PRIMARY KEY, last_success_at " + real + ","
            " failing_since " + real + ")"
        ),
    ]


class NewMessage(msgspec.Struct, frozen=True):
    id: str
    endpoint_id: str
    owner: str
    event_type: str
    position: int | None
    payload: str


class Claimed(msgspec.Struct, frozen=True):
    id: str
    endpoint_id: str
    owner: str
    event_type: str
    payload: str
    attempts: int
    created_at: float
    claim: str
    # When the claim's lease runs out: the message is due again, for any deliverer.
    leased_until: float


class AttemptRecord(msgspec.Struct, frozen=True):
    id: str
    message_id: str
    endpoint_id: str
    attempted_at: float
    status_code: int | None
    latency_ms: float | None
    error: str | None
    response: str | None
    outcome: str
    trigger: str


_INSERT = (
    "INSERT INTO webhook_messages (id, endpoint_id, owner, event_type, position, payload,"
    " status, attempts, next_attempt_at, created_at, updated_at) VALUES (:id, :endpoint_id,"
    " :owner, :event_type, :position, :payload, 'pending', 0, :now, :now, :now)"
    " ON CONFLICT (id) DO NOTHING"
)
_RECORD = (
    "INSERT INTO webhook_attempts (id, message_id, endpoint_id, attempted_at, status_code,"
    " latency_ms, error, response, outcome, trigger) VALUES (:id, :message_id, :endpoint_id,"
    " :attempted_at, :status_code, :latency_ms, :error, :response, :outcome, :trigger)"
    " ON CONFLICT (id) DO NOTHING"
)
# Only the claim's holder settles a message; a lost lease makes its late answer a no-op.
_SETTLE = (
    "UPDATE webhook_messages SET status = :status, attempts = :attempts,"
    " next_attempt_at = :next_attempt_at, claim = NULL, updated_at = :now"
    " WHERE id = :id AND claim = :claim"
)

# A request applies once (the event asking for it may be delivered twice).
_RESEND = (
    "UPDATE webhook_messages SET status = 'pending', attempts = 0, next_attempt_at = :now,"
    " claim = NULL, requested_position = :req, updated_at = :now"
    " WHERE id = :id AND endpoint_id = :endpoint_id AND requested_position < :req"
)
_RECOVER = (
    "UPDATE webhook_messages SET status = 'pending', attempts = 0, next_attempt_at = :now,"
    " claim = NULL, requested_position = :req, updated_at = :now"
    " WHERE endpoint_id = :endpoint_id AND status = 'failed' AND created_at >= :since"
    " AND requested_position < :req"
)


class DeliveryLog:
    def __init__(self, db: ReadDatabase) -> None:
        self.db = db
        # Settles waiting for the next transaction, and the task writing them.
        self._settles: list[tuple[dict[str, Any], AttemptRecord | None, asyncio.Future[None]]] = []
        self._settling: asyncio.Task[None] | None = None

    async def prepare(self) -> None:
        await self.db.migrate(_schema(self.db.dialect))

    def _durable(self, writes: list[Write]) -> list[Write]:
        # The read database commits asynchronously (derived data); these rows are not derived.
        if self.db.dialect == "postgres":
            return [("SET LOCAL synchronous_commit TO on", [{}]), *writes]
        return writes

    async def add(self, messages: Sequence[NewMessage]) -> None:
        if not messages:
            return
        now = time.time()
        rows = [{**msgspec.structs.asdict(m), "now": now} for m in messages]
        await self.db.write(self._durable([(_INSERT, rows)]))

    async def claim(
        self,
        limit: int,
        per_endpoint: int,
        lease: float,
        held: Mapping[str, int],
        token: str,
    ) -> list[Claimed]:
        """Up to ``limit`` due messages, leased for ``lease`` seconds under ``token``: of one
        endpoint at most ``per_endpoint``, less the ``held`` messages the caller has of it
        still (none of an endpoint that holds ``per_endpoint`` or more)."""
        now = time.time()
        params: dict[str, Any] = {
            "now": now,
            "lease": now + lease,
            "limit": limit,
            "per": per_endpoint,
            "claim": token,
        }
        excluded_params, excluded = _excluding([e for e, n in held.items() if n >= per_endpoint])
        params.update(excluded_params)
        room_params, room = _room(
            {e: n for e, n in held.items() if 0 < n < per_endpoint}, per_endpoint
        )
        params.update(room_params)
        # The outer condition is checked again on the row being updated, so of deliverers
        # racing for one message only the first claims it.
        sql = (
            "UPDATE webhook_messages SET next_attempt_at = :lease, claim = :claim"
            " WHERE status = 'pending' AND next_attempt_at <= :now AND id IN ("
            " SELECT id FROM (SELECT id, endpoint_id, next_attempt_at, ROW_NUMBER() OVER ("
            " PARTITION BY endpoint_id ORDER BY next_attempt_at) AS n FROM webhook_messages"
            " WHERE status = 'pending' AND next_attempt_at <= :now" + excluded + ") AS due"
            " WHERE n <= " + room + " ORDER BY next_attempt_at LIMIT :limit)"
            " RETURNING id, endpoint_id, owner, event_type, payload, attempts, created_at, claim,"
            " next_attempt_at AS leased_until"
        )
        # fetch_all commits: the pool commits a clean block (Postgres), SQLite autocommits.
        rows = await self.db.fetch_all(sql, params)
        return [msgspec.convert(dict(r), Claimed) for r in rows]

    async def settle(
        self,
        message: Claimed,
        *,
        status: str,
        attempts: int,
        next_attempt_at: float | None,
        attempt: AttemptRecord | None,
    ) -> None:
        """Record a message's outcome, durably, once this returns. Settles that arrive while
        one transaction is being written share the next one: a synchronous commit and its
        round trips per message were most of what a delivery cost the database."""
        row = {
            "id": message.id,
            "claim": message.claim,
            "status": status,
            "attempts": attempts,
            "next_attempt_at": next_attempt_at,
            "now": time.time(),
        }
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._settles.append((row, attempt, done))
        writing = self._settling
        if writing is None or writing.done() or writing.get_loop() is not loop:
            self._settling = loop.create_task(self._write_settles(), name="webhook-settles")
        await done

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the settles being written (a deliverer stopping)."""
        writing = self._settling
        if writing is not None and not writing.done():
            await asyncio.wait({writing}, timeout=timeout)

    async def _write_settles(self) -> None:
        taken: list[tuple[dict[str, Any], AttemptRecord | None, asyncio.Future[None]]] = []
        try:
            while self._settles:
                taken, self._settles = self._settles, []
                try:
                    await self._write(taken)
                except Unavailable as exc:
                    # The database is away: every row would wait out the pool on its own.
                    for _, _, done in taken:
                        if not done.done():
                            done.set_exception(exc)
                except Exception:  # noqa: BLE001 - each caller learns of its own failure
                    # One row the database refuses must not fail the others' settles: each
                    # is written again on its own.
                    for one in taken:
                        await self._write_one(one)
                else:
                    for _, _, done in taken:
                        if not done.done():
                            done.set_result(None)
                taken = []
        finally:
            # Cancelled (the loop closing): no caller is left waiting for ever.
            for _, _, done in [*taken, *self._settles]:
                if not done.done():
                    done.set_exception(Unavailable("the delivery log was not written"))
            self._settles = [s for s in self._settles if not s[2].done()]

    async def _write_one(
        self, one: tuple[dict[str, Any], AttemptRecord | None, asyncio.Future[None]]
    ) -> None:
        try:
            await self._write([one])
        except Exception as exc:  # noqa: BLE001 - the caller learns of it
            if not one[2].done():
                one[2].set_exception(exc)
        else:
            if not one[2].done():
                one[2].set_result(None)

    async def _write(
        self, taken: list[tuple[dict[str, Any], AttemptRecord | None, asyncio.Future[None]]]
    ) -> None:
        writes: list[Write] = [(_SETTLE, [row for row, _, _ in taken])]
        records = [msgspec.structs.asdict(a) for _, a, _ in taken if a is not None]
        if records:
            writes.append((_RECORD, records))
        await self.db.write(self._durable(writes))

    async def resend(self, endpoint_id: str, message_id: str, requested_at: int) -> None:
        """Make one message due again with a fresh schedule (once per request)."""
        await self.db.write(
            self._durable(
                [
                    (
                        _RESEND,
                        [
                            {
                                "id": message_id,
                                "endpoint_id": endpoint_id,
                                "req": requested_at,
                                "now": time.time(),
                            }
                        ],
                    )
                ]
            )
        )

    async def recover(self, endpoint_id: str, since: float, requested_at: int) -> None:
        """Make every message that failed since ``since`` due again."""
        await self.db.write(
            self._durable(
                [
                    (
                        _RECOVER,
                        [
                            {
                                "endpoint_id": endpoint_id,
                                "since": since,
                                "req": requested_at,
                                "now": time.time(),
                            }
                        ],
                    )
                ]
            )
        )

    async def health(self, endpoint_id: str, *, succeeded: bool) -> float | None:
        """Record an outcome; the time the endpoint has been failing since, if it is."""
        now = time.time()
        if succeeded:
            sql = (
                "INSERT INTO webhook_endpoint_health (endpoint_id, last_success_at, failing_since)"
                " VALUES (:id, :now, NULL) ON CONFLICT (endpoint_id) DO UPDATE"
                " SET last_success_at = excluded.last_success_at, failing_since = NULL"
            )
        else:
            sql = (
                "INSERT INTO webhook_endpoint_health (endpoint_id, last_success_at, failing_since)"
                " VALUES (:id, NULL, :now) ON CONFLICT (endpoint_id) DO UPDATE SET failing_since"
                " = COALESCE(webhook_endpoint_health.failing_since, excluded.failing_since)"
            )
        await self.db.write([(sql, [{"id": endpoint_id, "now": now}])])
        if succeeded:
            return None
        row = await self.db.fetch_one(
            "SELECT failing_since FROM webhook_endpoint_health WHERE endpoint_id = :id",
            {"id": endpoint_id},
        )
        return None if row is None or row["failing_since"] is None else float(row["failing_since"])

    async def endpoint(self, endpoint_id: str) -> Row | None:
        return await self.db.fetch_one(
            "SELECT id, owner, url, status, rate_limit, secret_sealed, previous_secret_sealed,"
            " previous_until FROM webhook_endpoints WHERE id = :id",
            {"id": endpoint_id},
        )

    async def endpoints_of(self, owners: Sequence[str]) -> list[Row]:
        if not owners:
            return []
        names = [f"o{i}" for i in range(len(owners))]
        return await self.db.fetch_all(
            "SELECT id, owner, event_types FROM webhook_endpoints WHERE status = 'enabled'"
            " AND owner IN (" + ", ".join(f":{n}" for n in names) + ")",
            dict(zip(names, owners, strict=True)),
        )

    async def next_due(self, busy: Sequence[str] = ()) -> float | None:
        """When the next message falls due, of the endpoints not ``busy``."""
        params, excluded = _excluding(busy)
        row = await self.db.fetch_one(
            "SELECT MIN(next_attempt_at) AS due FROM webhook_messages WHERE status = 'pending'"
            + excluded,
            params,
        )
        return None if row is None or row["due"] is None else float(row["due"])


def _room(held: Mapping[str, int], per_endpoint: int) -> tuple[dict[str, Any], str]:
    """How many more of an endpoint's messages may be claimed (``due.endpoint_id``), as SQL:
    ``per_endpoint`` less what is ``held`` of it."""
    if not held:
        return {}, ":per"
    params: dict[str, Any] = {}
    cases = []
    for i, (endpoint_id, count) in enumerate(held.items()):
        params[f"h{i}"], params[f"r{i}"] = endpoint_id, per_endpoint - count
        cases.append(f" WHEN :h{i} THEN :r{i}")
    return params, "CASE due.endpoint_id" + "".join(cases) + " ELSE :per END"


def _excluding(busy: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The condition (and its parameters) that leaves out the ``busy`` endpoints."""
    if not busy:
        return {}, ""
    names = [f"b{i}" for i in range(len(busy))]
    condition = " AND endpoint_id NOT IN (" + ", ".join(f":{n}" for n in names) + ")"
    return dict(zip(names, busy, strict=True)), condition
