"""The admin's SQL for the shared backends: llama_backends and its llama_backend_slots.

Each function takes a connection first and does one change in one statement or one
transaction. The gateways learn of every change through the trigger of migration m010
(pg_notify on llamagate_backends), so nothing here needs to tell them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

ACTIVE, DRAINING, REFUSED = "active", "draining", "refused"
# A slot counts as busy while its holder heartbeats; a holder not seen for this long has
# died or lost the database, and its slots are free for anyone (the gateways' lease rule).
BUSY_WITHIN_SECONDS = 5
LISTS_NAMES = "list-backends shows the names"


class BackendError(Exception):
    """A registry change that cannot be made; the message names the culprit and the fix."""


class UnknownBackend(BackendError):
    """No shared backend has that name."""


class BackendTaken(BackendError):
    """Another shared backend already has that name or URL."""


@dataclass(frozen=True)
class NewBackend:
    """A member to add; sealed_key is already sealed (proxy/sealing.py), never the key."""

    name: str
    url: str
    concurrency: int
    sealed_key: str
    model: str


@dataclass(frozen=True)
class BackendRow:
    """One shared member as list-backends shows it, with figures summed over its slots."""

    name: str
    url: str
    concurrency: int
    state: str
    problem: str
    model: str
    busy: int
    requests: int
    errors: int
    last_used: datetime | None


@dataclass(frozen=True)
class StateChange:
    """What drain-backend or enable-backend did: the member's state before and after."""

    name: str
    before: str
    after: str


async def find_taken(conn: asyncpg.Connection, name: str, url: str) -> str | None:
    """Why name or url cannot be added (one is taken), or None if both are free."""
    row = await conn.fetchrow(
        "SELECT name, url FROM llama_backends WHERE name = $1 OR url = $2 "
        "ORDER BY name = $1 DESC LIMIT 1",
        name,
        url,
    )
    if row is None:
        return None
    if row["name"] == name:
        return f"a backend named {name!r} exists already ({row['url']}): pick another --name"
    return (
        f"{url} is registered already, as {row['name']!r}: one row per backend; "
        f"remove-backend {row['name']} first to add it again"
    )


async def add_backend(conn: asyncpg.Connection, backend: NewBackend) -> None:
    """Insert the member and its `concurrency` slot rows, all or nothing."""
    async with conn.transaction():
        taken = await find_taken(conn, backend.name, backend.url)
        if taken:
            raise BackendTaken(taken)
        try:
            backend_id = await conn.fetchval(
                "INSERT INTO llama_backends (name, url, concurrency, sealed_key, model) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                backend.name,
                backend.url,
                backend.concurrency,
                backend.sealed_key,
                backend.model,
            )
        except asyncpg.UniqueViolationError:
            # Another admin added the same name or URL between the check and the insert.
            raise BackendTaken(
                f"backend {backend.name!r} or {backend.url} was added meanwhile; {LISTS_NAMES}"
            ) from None
        await conn.execute(
            "INSERT INTO llama_backend_slots (backend_id, slot) "
            "SELECT $1, generate_series(0, $2 - 1)",
            backend_id,
            backend.concurrency,
        )


async def list_backends(conn: asyncpg.Connection) -> list[BackendRow]:
    """Every shared member by name, with its busy slots and its figures."""
    rows = await conn.fetch(
        """
        SELECT b.name, b.url, b.concurrency, b.state, b.problem, b.model,
               count(g.gateway_id) AS busy,
               coalesce(sum(s.requests), 0)::bigint AS requests,
               coalesce(sum(s.errors), 0)::bigint AS errors,
               max(s.last_used) AS last_used
        FROM llama_backends b
        LEFT JOIN llama_backend_slots s ON s.backend_id = b.id
        LEFT JOIN llama_gateways g ON g.gateway_id = s.gateway_id
            AND g.last_seen > now() - make_interval(secs => $1)
        GROUP BY b.id
        ORDER BY b.name
        """,
        BUSY_WITHIN_SECONDS,
    )
    return [BackendRow(**dict(row)) for row in rows]


async def set_state(conn: asyncpg.Connection, name: str, state: str) -> StateChange:
    """Drain (DRAINING) or enable (ACTIVE, which also clears a refusal and its problem)."""
    clears_problem = state == ACTIVE
    row = await conn.fetchrow(
        """
        UPDATE llama_backends AS b
        SET state = $2, changed_at = now(),
            problem = CASE WHEN $3 THEN '' ELSE b.problem END
        FROM llama_backends AS before
        WHERE b.name = $1 AND before.id = b.id
        RETURNING before.state AS before
        """,
        name,
        state,
        clears_problem,
    )
    if row is None:
        raise UnknownBackend(f"no backend named {name!r}: {LISTS_NAMES}")
    return StateChange(name=name, before=row["before"], after=state)


async def remove_backend(conn: asyncpg.Connection, name: str) -> str:
    """Delete the member (its slot rows go with it); return its URL."""
    url = await conn.fetchval("DELETE FROM llama_backends WHERE name = $1 RETURNING url", name)
    if url is None:
        raise UnknownBackend(f"no backend named {name!r}: {LISTS_NAMES}")
    return url
