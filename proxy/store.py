"""PostgreSQL access for the gateway's hot path: pools, key lookup, rate slots, log rows.

SQL stays visible in small async functions that take the pool first. Connection
failures become StoreError, whose message shows the DSN without its password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from proxy import logbatch
from proxy.config import redact_dsn
from proxy.migrations import migrate
from proxy.outage import UNAVAILABLE_ERRORS

CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_COMMAND_TIMEOUT_SECONDS = 5.0
DEFAULT_ACQUIRE_TIMEOUT_SECONDS = 5.0
__all__ = ["UNAVAILABLE_ERRORS"]  # re-exported: callers catch store.UNAVAILABLE_ERRORS


class StoreError(Exception):
    """The database cannot be reached or used; the message says which and how to fix it."""


def unreachable(dsn: str, error: BaseException) -> StoreError:
    reason = str(error) or type(error).__name__
    return StoreError(
        f"cannot reach the database at {redact_dsn(dsn)}: {reason}; is PostgreSQL running? "
        f"(./console.sh start starts the private one; see ./console.sh info)"
    )


async def connect(dsn: str, application_name: str | None = None) -> asyncpg.Connection:
    """One connection, or StoreError naming the (redacted) DSN; application_name is how
    pg_stat_activity shows it."""
    settings = {"application_name": application_name} if application_name else None
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS, server_settings=settings)
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
        raise unreachable(dsn, error) from None


class TimedPool:
    """An asyncpg pool whose every call has a deadline, acquiring a connection included.

    asyncpg's own pool.fetch() waits for a free connection for ever, and command_timeout
    alone does not bound that wait. A stalled database (a table locked by an open
    transaction, a frozen server, a partition) then raises TimeoutError, which is
    "unavailable" (proxy/outage.py), instead of hanging auth, limits and the log.
    """

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None):
        async with self.pool.acquire(timeout=timeout or self.acquire_timeout) as conn:
            try:
                yield conn
            except asyncpg.exceptions.InternalClientError:
                # The session was ended under us (proxy/outage.py). asyncpg would put the
                # connection back in the pool as it is and fail the next caller too.
                conn.terminate()
                raise

    async def execute(self, query: str, *args, timeout: float | None = None) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args, timeout=timeout)

    async def fetch(self, query: str, *args, timeout: float | None = None) -> list:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args, timeout: float | None = None):
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args, timeout: float | None = None):
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=timeout)

    async def close(self) -> None:
        await self.pool.close()


async def keep_session(conn: asyncpg.Connection) -> None:
    """How a connection is reset on its way back to the pool: not at all, beyond the
    rollback of an open transaction that asyncpg always does.

    asyncpg's default (RESET ALL, UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all) is one
    more round trip per use, on the event loop, after every flush of the request log,
    the rate stamps and the token charges. The gateway leaves none of that state on a
    pooled connection: it never SETs (set_config is transaction-local), LISTENs on
    connections of its own, and the migrations release their advisory lock themselves.
    """


async def create_pool(
    dsn: str,
    max_size: int = 10,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT_SECONDS,
    acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT_SECONDS,
    server_settings: dict[str, str] | None = None,
) -> TimedPool:
    """A pool, with the schema migrated; StoreError if the database is unreachable.

    server_settings are set on each of its sessions (the shared slots' lease pool
    commits asynchronously, see proxy/sharedslots.py).
    """
    try:
        # min_size 0: asyncpg would otherwise log a traceback every few seconds while
        # it fails to restore its floor of connections during a database outage.
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max_size,
            timeout=CONNECT_TIMEOUT_SECONDS,
            command_timeout=command_timeout,
            reset=keep_session,
            server_settings=server_settings,
        )
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
        raise unreachable(dsn, error) from None
    async with pool.acquire() as conn:
        # Migrations may wait for locks of other gateways migrating; no command deadline.
        await migrate(conn)
    return TimedPool(pool, acquire_timeout)


@dataclass(frozen=True)
class KeyRecord:
    """What auth needs to know about one key and its user."""

    key_id: str
    username: str
    rate_limit: int | None
    is_disabled: bool
    expires_at: datetime | None
    revoked_at: datetime | None
    concurrency_limit: int | None = None  # None: the gateway's default; 0: no cap
    # Token limits (proxy/tokenbudget.py): None takes the gateway's default, 0 is unlimited.
    tokens_per_minute: int | None = None
    daily_token_quota: int | None = None
    monthly_token_quota: int | None = None


async def fetch_key(pool: asyncpg.Pool, digest: bytes) -> KeyRecord | None:
    """The key with this digest and its user, or None."""
    row = await pool.fetchrow(
        """
        SELECT k.key_id, u.username, u.rate_limit, u.is_disabled, k.expires_at, k.revoked_at,
               u.concurrency_limit,
               u.tokens_per_minute, u.daily_token_quota, u.monthly_token_quota
        FROM api_keys AS k JOIN users AS u ON u.id = k.user_id
        WHERE k.digest = $1
        """,
        digest,
    )
    return KeyRecord(**dict(row)) if row else None


@dataclass(frozen=True)
class SlotGrant:
    """The database's answer for one user's batch of rate-limit slots (times in epoch s).

    `granted` slots are for the requests asked about; `leased` more may be handed out by
    the gateway itself until the lease ends (see llamagate_lease_slots).
    """

    username: str
    granted: int
    used: int
    oldest: float | None
    newest: float | None
    now: float
    leased: int = 0


async def take_rate_slots(
    pool: asyncpg.Pool,
    users: Sequence[str],
    wanted: Sequence[int],
    limits: Sequence[int],
    windows: Sequence[float],
    extra: Sequence[int],
    hold_seconds: float,
) -> dict[str, SlotGrant]:
    """Admit up to `wanted` requests per user inside their sliding windows, atomically,
    and lease up to `extra` more slots for `hold_seconds`."""
    rows = await pool.fetch(
        "SELECT * FROM llamagate_lease_slots("
        "$1::text[], $2::int[], $3::int[], $4::int[], $5::float8[], $6::float8)",
        list(users),
        list(wanted),
        list(extra),
        list(limits),
        list(windows),
        hold_seconds,
    )
    return {
        row["username"]: SlotGrant(
            row["username"],
            row["granted"],
            row["used"],
            row["oldest"],
            row["newest"],
            row["now_epoch"],
            row["leased"],
        )
        for row in rows
    }


async def count_rate_slots(pool: asyncpg.Pool, username: str, window: float) -> int:
    """How many of the user's admissions are inside the sliding window now (no side effect)."""
    return await pool.fetchval(
        """
        SELECT coalesce(sum(coalesce(t.c, 1)), 0)
        FROM rate_windows AS w, unnest(w.stamps, w.counts) AS t(s, c)
        WHERE w.username = $1 AND t.s > extract(epoch FROM clock_timestamp()) - $2
        """,
        username,
        window,
    )


async def user_usage(pool: asyncpg.Pool, username: str, hours: float) -> dict[str, int]:
    """The user's requests and tokens over the last `hours`, from the request log."""
    row = await pool.fetchrow(
        """
        SELECT count(*) AS requests,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens
        FROM llama_requests
        WHERE username = $1 AND created_at > now() - make_interval(secs => $2)
        """,
        username,
        hours * 3600,
    )
    return dict(row)


REQUEST_COLUMNS = (
    "request_id",
    "created_at",
    "username",
    "key_id",
    "method",
    "path",
    "status_code",
    "duration_ms",
    "queue_ms",
    "request_bytes",
    "response_bytes",
    "model",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "client_addr",
    "error",
    "repeat_count",
)
_REQUEST_TYPES = (
    "text",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "int",
    "float8",
    "float8",
    "int8",
    "int8",
    "text",
    "bool",
    "int",
    "int",
    "text",
    "text",
    "int",
)
# One statement per batch, and ON CONFLICT makes a replayed spool harmless. The batch is
# one JSON text (proxy/logbatch.py): encoding it as 18 typed arrays took asyncpg one
# event-loop step of milliseconds.
_INSERT_REQUESTS = (
    f"INSERT INTO llama_requests ({', '.join(REQUEST_COLUMNS)}) "
    f"SELECT "
    + ", ".join(f"(r->>{i})::{kind}" for i, kind in enumerate(_REQUEST_TYPES))
    + " FROM jsonb_array_elements($1::jsonb) AS r ON CONFLICT (request_id) DO NOTHING"
)


async def insert_requests(pool: asyncpg.Pool, rows: Sequence[Sequence[object]]) -> None:
    """Insert request-log rows, given as tuples in REQUEST_COLUMNS order."""
    try:
        batch = await logbatch.encode_batch(rows)
    except TypeError as error:
        # asyncpg's own error for a value it cannot encode, so that the request log sets
        # the batch aside (proxy/outage.py) instead of retrying it for ever.
        message = f"a request-log row cannot be written: {error}"
        raise asyncpg.exceptions.DataError(message) from None
    await pool.execute(_INSERT_REQUESTS, batch)
