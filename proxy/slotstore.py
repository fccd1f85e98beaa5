"""The lease SQL behind the shared backends' slots: one statement per step, the pool first.

A gateway may send a request to a shared member only while it holds one of the member's
rows in llama_backend_slots (gateway_id = its id). A slot is free when nobody holds it or
its holder has not heartbeaten llama_gateways for `lease_seconds` (a gateway killed or cut
off from the database). Taking one is a single UPDATE ... FOR UPDATE SKIP LOCKED, so two
gateways racing for the last free slot never both get it: the loser skips the locked row,
or re-reads it after the winner committed and finds it held.

Fairness across gateways: a gateway with requests waiting for a slot sets its
waiting_since once; a gateway may take a free slot only if no live gateway has waited
longer than it has (one not waiting counts as waiting since now). Taking one while others
of its requests still wait moves it to the back of the line (waiting_since = now()); with
none left it clears the mark, or it would hold the others back until its row goes stale.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from proxy.migrations import SLOTS_CHANNEL

# A holder not seen for this long has lost its slots (design: LEASE_SECONDS).
LEASE_SECONDS = 5.0

# Returns when the server started: a new start time means a restart, after which the
# gateway reconciles (RECONCILE_SQL).
HEARTBEAT_SQL = """
INSERT INTO llama_gateways AS g (gateway_id, host, waiting_since)
VALUES ($1, $2, CASE WHEN $3 THEN now() END)
ON CONFLICT (gateway_id) DO UPDATE SET
    last_seen = now(),
    waiting_since = CASE WHEN $3 THEN coalesce(g.waiting_since, now()) END
RETURNING pg_postmaster_start_time()
"""

# The rule of the module docstring, in one statement: the function of migration m011
# (its plan made once per connection). $1 gateway, $2 member ids, $3 lease seconds, $4
# whether other requests of this gateway still wait once this one has its slot.
TAKE_SQL = """
SELECT taken_backend, taken_slot FROM llamagate_take_slot($1, $2::bigint[], $3, $4)
"""

GIVE_BACK_SQL = """
WITH given AS (
    UPDATE llama_backend_slots SET
        gateway_id = NULL, leased_at = NULL, last_used = now(),
        requests = requests + $4, errors = errors + $5
    WHERE backend_id = $2 AND slot = $3 AND gateway_id = $1
    RETURNING backend_id
)
SELECT pg_notify($6, $1) FROM given
"""


# After a restart the leases may have lost their last commits (they do not wait for the
# disk, see proxy/app.py): the slots this gateway holds ($2, $3: backend ids and slot
# numbers) get its id back if free, and those in its name it does not hold are freed.
# Which were lost is written to the log. Committed synchronously: it is what repairs.
RECONCILE_SQL = """
WITH held AS (
    SELECT * FROM unnest($2::bigint[], $3::integer[]) AS h (backend_id, slot)
), freed AS (
    UPDATE llama_backend_slots s SET gateway_id = NULL, leased_at = NULL
    WHERE s.gateway_id = $1
      AND NOT EXISTS (SELECT 1 FROM held h
                      WHERE h.backend_id = s.backend_id AND h.slot = s.slot)
    RETURNING s.backend_id, s.slot
), restored AS (
    UPDATE llama_backend_slots s SET gateway_id = $1, leased_at = now()
    FROM held h
    WHERE s.backend_id = h.backend_id AND s.slot = h.slot
      AND (s.gateway_id IS NULL OR (s.gateway_id <> $1 AND NOT EXISTS (
          SELECT 1 FROM llama_gateways g
          WHERE g.gateway_id = s.gateway_id
            AND g.last_seen > now() - make_interval(secs => $4))))
    RETURNING s.backend_id, s.slot
), lost AS (
    SELECT h.backend_id, h.slot FROM held h JOIN llama_backend_slots s USING (backend_id, slot)
    WHERE s.gateway_id IS DISTINCT FROM $1
      AND NOT EXISTS (SELECT 1 FROM restored r
                      WHERE r.backend_id = h.backend_id AND r.slot = h.slot)
)
SELECT (SELECT count(*) FROM freed) AS freed, (SELECT count(*) FROM restored) AS restored,
       (SELECT array_agg(backend_id || '/' || slot) FROM lost) AS taken_by_others,
       (SELECT pg_notify($5, $1) FROM freed LIMIT 1) AS notified
"""


async def heartbeat(
    pool: asyncpg.Pool, gateway_id: str, host: str, is_waiting: bool, is_durable: bool = False
) -> datetime:
    """Say this gateway is alive (and whether requests of its own wait for a slot); return
    when the server started. is_durable: the commit waits for the disk (the first one,
    the row the grace after a restart looks for; see migration m012)."""
    if not is_durable:
        return await pool.fetchval(HEARTBEAT_SQL, gateway_id, host, is_waiting)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        return await conn.fetchval(HEARTBEAT_SQL, gateway_id, host, is_waiting)


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile after a restart changed."""

    freed: int  # in this gateway's name, not held: given back (a lost give-back)
    restored: int  # held, but shown free: this gateway's again (a lost take)
    taken_by_others: list[str]  # held, but another live gateway has it ("backend/slot")


async def reconcile(
    pool: asyncpg.Pool,
    gateway_id: str,
    held: Collection[tuple[int, int]],
    lease_seconds: float = LEASE_SECONDS,
) -> Reconciled:
    """Make the slot rows say what this gateway holds (RECONCILE_SQL)."""
    backend_ids = [backend_id for backend_id, _ in held]
    slots = [slot for _, slot in held]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        row = await conn.fetchrow(
            RECONCILE_SQL, gateway_id, backend_ids, slots, lease_seconds, SLOTS_CHANNEL
        )
    return Reconciled(row["freed"], row["restored"], list(row["taken_by_others"] or []))


async def take_slot(
    pool: asyncpg.Pool,
    gateway_id: str,
    backend_ids: Sequence[int],
    still_waiting: bool,
    lease_seconds: float = LEASE_SECONDS,
) -> tuple[int, int] | None:
    """(backend id, slot) of a free slot of one of these members, now held; None if none
    is free or a live gateway has waited longer."""
    row = await pool.fetchrow(TAKE_SQL, gateway_id, list(backend_ids), lease_seconds, still_waiting)
    return None if row["taken_backend"] is None else (row["taken_backend"], row["taken_slot"])


async def give_back(
    pool: asyncpg.Pool, gateway_id: str, backend_id: int, slot: int, requests: int, errors: int
) -> None:
    """Free a slot this gateway holds, count its figures, and wake the waiting gateways."""
    await pool.execute(GIVE_BACK_SQL, gateway_id, backend_id, slot, requests, errors, SLOTS_CHANNEL)


async def record_use(
    pool: asyncpg.Pool, backend_id: int, slot: int, requests: int, errors: int
) -> None:
    """Count a slot's figures without freeing it (a slot kept for the next turn)."""
    await pool.execute(
        "UPDATE llama_backend_slots SET last_used = now(), requests = requests + $3, "
        "errors = errors + $4 WHERE backend_id = $1 AND slot = $2",
        backend_id,
        slot,
        requests,
        errors,
    )


async def others_wait(pool: asyncpg.Pool, gateway_id: str, lease_seconds: float) -> bool:
    """Whether another live gateway has requests waiting for a slot."""
    return await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM llama_gateways WHERE gateway_id <> $1 "
        "AND waiting_since IS NOT NULL AND last_seen > now() - make_interval(secs => $2))",
        gateway_id,
        lease_seconds,
    )


async def give_back_all(pool: asyncpg.Pool, gateway_id: str) -> None:
    """At shutdown: free every slot this gateway holds and forget the gateway."""
    async with pool.acquire() as conn, conn.transaction():
        freed = await conn.execute(
            "UPDATE llama_backend_slots SET gateway_id = NULL, leased_at = NULL "
            "WHERE gateway_id = $1",
            gateway_id,
        )
        await conn.execute("DELETE FROM llama_gateways WHERE gateway_id = $1", gateway_id)
        if freed != "UPDATE 0":
            await conn.execute("SELECT pg_notify($1, $2)", SLOTS_CHANNEL, gateway_id)


async def forget_gone_gateways(pool: asyncpg.Pool, after_seconds: float) -> None:
    """Delete the rows of gateways not seen for long (killed ones never delete theirs).

    Their slots were free anyway: a holder without a live row holds nothing.
    """
    await pool.execute(
        "DELETE FROM llama_gateways WHERE last_seen < now() - make_interval(secs => $1)",
        after_seconds,
    )


async def set_waiting(pool: asyncpg.Pool, gateway_id: str, is_waiting: bool) -> None:
    """Mark that requests of this gateway wait for a slot (kept if already set), or none do.

    Marking it also tells the gateways (SLOTS_CHANNEL, 'wait:<id>'): those that keep idle
    slots for their next turn give them back at once."""
    await pool.execute(
        "WITH marked AS (UPDATE llama_gateways SET waiting_since = "
        "CASE WHEN $2 THEN coalesce(waiting_since, now()) END WHERE gateway_id = $1 "
        "RETURNING gateway_id) SELECT pg_notify($3, 'wait:' || $1) FROM marked WHERE $2",
        gateway_id,
        is_waiting,
        SLOTS_CHANNEL,
    )
