"""PostgreSQL access for token limits and quotas: one function charges and reads.

llamagate_charge_tokens (migration m007) adds each charge to the user's minute window and
to the day's total, and answers what the user has used, in one round trip for a batch of
users. A charge of 0 only reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg


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
