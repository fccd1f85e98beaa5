"""PostgreSQL access for token limits and quotas: one function charges and reads.

llamagate_charge_tokens (migration m007) adds each charge to the user's minute window and
to the day's total, and answers what the user has used, in one round trip for a batch of
users. A charge of 0 only reads.

replay_charges applies charges spooled during an outage (proxy/chargebacklog.py) exactly
once, each batch under its id (token_charge_replays, migration m009).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg

from proxy.chargespool import ChargeBatch
from proxy.migrations import TOKEN_CHANNEL


@dataclass(frozen=True)
class TokenUsage:
    """What the database knows of one user's tokens (stamps in its epoch seconds)."""

    username: str
    day: date
    stamps: tuple[float, ...]  # charges inside the minute window, oldest first...
    counts: tuple[int, ...]  # ...and their tokens
    day_used: int
    month_used: int
    now: float  # the database's clock when it answered


async def charge_tokens(
    pool: asyncpg.Pool,
    users: Sequence[str],
    tokens: Sequence[int],
    days: Sequence[date],
    window: float,
    gateway_id: str,
) -> list[TokenUsage]:
    """Charge tokens[i] to users[i] on days[i] and return each user's usage for that day."""
    rows = await pool.fetch(
        "SELECT * FROM llamagate_charge_tokens($1::text[], $2::int8[], $3::date[], $4, $5)",
        list(users),
        list(tokens),
        list(days),
        window,
        gateway_id,
    )
    return [
        TokenUsage(
            row["username"],
            row["day"],
            tuple(row["stamps"]),
            tuple(row["counts"]),
            row["day_used"],
            row["month_used"],
            row["now_epoch"],
        )
        for row in rows
    ]


async def replay_charges(
    pool: asyncpg.Pool, batches: Sequence[ChargeBatch], window: float, gateway_id: str
) -> int:
    """Apply spooled batches not applied before, in one transaction; how many were new.

    Each batch's id goes into token_charge_replays first: a batch already there was
    applied by an earlier replay, and is skipped. The tokens go to token_days; those
    charged less than `window` seconds ago also go to the minute window, with their own
    stamps. Other gateways are notified, as for any charge. Locks are taken as
    llamagate_charge_tokens takes them (windows, then days, by user), so no deadlock.
    """
    async with pool.acquire() as conn, conn.transaction():
        fresh = {
            row["batch_id"]
            for row in await conn.fetch(
                """
                INSERT INTO token_charge_replays (batch_id) SELECT unnest($1::text[])
                ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id
                """,
                [batch.batch_id for batch in batches],
            )
        }
        charges = [
            (user, day, tokens, batch.at)
            for batch in batches
            if batch.batch_id in fresh
            for user, day, tokens in batch.charges
        ]
        if charges:
            users, days, tokens, stamps = (list(column) for column in zip(*charges, strict=True))
            await _add_to_windows(conn, users, tokens, stamps, window)
            await _add_to_days(conn, users, days, tokens)
            await conn.execute(
                "SELECT pg_notify($1, $2 || ' ' || name) FROM unnest($3::text[]) AS u(name) "
                "GROUP BY name",
                TOKEN_CHANNEL,
                gateway_id,
                users,
            )
    return len(fresh)


async def _add_to_windows(
    conn: asyncpg.Connection,
    users: list[str],
    tokens: list[int],
    stamps: list[float],
    window: float,
) -> None:
    """Merge the charges still inside the minute window into the users' windows."""
    await conn.execute(
        """
        INSERT INTO token_windows (username)
        SELECT DISTINCT name FROM unnest($1::text[]) AS u(name) ORDER BY 1
        ON CONFLICT (username) DO NOTHING
        """,
        users,
    )
    await conn.execute(
        """
        WITH locked AS (
            SELECT w.username, w.stamps, w.counts FROM token_windows AS w
            WHERE w.username = ANY($1::text[]) ORDER BY w.username FOR UPDATE
        ), merged AS (
            SELECT l.username,
                   coalesce(array_agg(t.s ORDER BY t.s), '{}') AS stamps,
                   coalesce(array_agg(t.c ORDER BY t.s), '{}') AS counts
            FROM locked AS l
            CROSS JOIN LATERAL (
                SELECT o.s, o.c FROM unnest(l.stamps, l.counts) AS o(s, c)
                UNION ALL
                SELECT n.s, n.c FROM unnest($1::text[], $3::float8[], $2::int8[]) AS n(u, s, c)
                WHERE n.u = l.username
            ) AS t
            WHERE t.s > extract(epoch FROM clock_timestamp()) - $4
            GROUP BY l.username
        )
        UPDATE token_windows AS w SET stamps = m.stamps, counts = m.counts
        FROM merged AS m WHERE w.username = m.username
        """,
        users,
        tokens,
        stamps,
        window,
    )


async def _add_to_days(
    conn: asyncpg.Connection, users: list[str], days: list[date], tokens: list[int]
) -> None:
    await conn.execute(
        """
        INSERT INTO token_days AS d (username, day, tokens)
        SELECT name, day, sum(count) FROM unnest($1::text[], $2::date[], $3::int8[])
            AS c(name, day, count)
        GROUP BY name, day ORDER BY name, day
        ON CONFLICT (username, day) DO UPDATE SET tokens = d.tokens + excluded.tokens
        """,
        users,
        days,
        tokens,
    )


async def forget_replays(pool: asyncpg.Pool, batch_ids: Sequence[str]) -> None:
    """Drop the ids of batches whose spool offset is saved: they cannot be sent again."""
    await pool.execute(
        "DELETE FROM token_charge_replays WHERE batch_id = ANY($1::text[])", list(batch_ids)
    )
