"""Usage reports from the request log: requests, errors, tokens and latency, grouped by
user, UTC day or model, over a span of time; and pruning old request rows and daily token
totals. Plain async functions of one connection.

Each group is one SQL expression over llama_requests, chosen from a fixed table (never
from the caller's text), so the query stays a single GROUP BY on the indexed created_at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from proxy.accounts import InvalidValue, UnknownUser, validate_username

# The group's SQL expression, how groups are ordered, and the name of its column in
# JSON and CSV. Days are UTC, whatever the server's or the database's time zone.
GROUPS: dict[str, tuple[str, str, str]] = {
    "user": ("username", "requests DESC, 1 NULLS LAST", "username"),
    "day": ("to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "1", "day"),
    "model": ("model", "requests DESC, 1 NULLS LAST", "model"),
}


@dataclass(frozen=True)
class UsageRow:
    """One group's traffic; `group` is the user, the day or the model (None: no user/model)."""

    group: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    avg_duration_ms: float
    last_request_at: datetime


def group_column(by: str) -> str:
    """The name the group's value goes by in JSON and CSV: username, day or model."""
    return GROUPS[validate_grouping(by)][2]


def validate_grouping(by: str) -> str:
    if by not in GROUPS:
        raise InvalidValue(f"invalid grouping {by!r}: use --by user, --by day or --by model")
    return by


def check_span(since: datetime | None, until: datetime | None) -> None:
    """InvalidValue unless `until` comes after `since` (either may be open)."""
    if since is not None and until is not None and until <= since:
        raise InvalidValue(
            f"--until ({until:%Y-%m-%d %H:%M:%S %Z}) is not after --since "
            f"({since:%Y-%m-%d %H:%M:%S %Z}): the span is empty; give an earlier --since "
            f"or a later --until"
        )


async def usage(
    conn: asyncpg.Connection,
    since: datetime | None = None,
    until: datetime | None = None,
    username: str | None = None,
    by: str = "user",
) -> list[UsageRow]:
    """Requests per group in [since, until), busiest first (days in order); optionally one user."""
    expression, order, _ = GROUPS[validate_grouping(by)]
    check_span(since, until)
    if username is not None:
        await check_known_user(conn, username)
    rows = await conn.fetch(
        f"""
        SELECT {expression} AS "group",
               sum(repeat_count) AS requests,  -- folded anonymous refusals count each
               coalesce(sum(repeat_count) FILTER (WHERE status_code >= 400), 0) AS errors,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               avg(duration_ms) AS avg_duration_ms,
               max(created_at) AS last_request_at
        FROM llama_requests
        WHERE ($1::timestamptz IS NULL OR created_at >= $1)
          AND ($2::timestamptz IS NULL OR created_at < $2)
          AND ($3::text IS NULL OR username = $3)
        GROUP BY 1
        ORDER BY {order}
        """,
        since,
        until,
        username,
    )
    return [UsageRow(**dict(row)) for row in rows]


async def check_known_user(conn: asyncpg.Connection, username: str) -> None:
    """UnknownUser for a name that is neither a user nor in the log."""
    validate_username(username)
    # A deleted user's log rows are still worth showing; only a name never seen is an error.
    is_known = await conn.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)
            OR EXISTS (SELECT 1 FROM llama_requests WHERE username = $1)
        """,
        username,
    )
    if not is_known:
        raise UnknownUser(f"no user named {username!r} and no requests from one; see list-users")


async def count_older_requests(conn: asyncpg.Connection, older_than: timedelta) -> int:
    """How many request-log rows prune would delete."""
    return await conn.fetchval(
        "SELECT count(*) FROM llama_requests WHERE created_at < now() - $1::interval", older_than
    )


async def prune(conn: asyncpg.Connection, older_than: timedelta) -> int:
    """Delete request-log rows older than `older_than`; return how many."""
    if older_than <= timedelta(0):
        raise InvalidValue("prune needs a positive age, such as 90d")
    status = await conn.execute(
        "DELETE FROM llama_requests WHERE created_at < now() - $1::interval", older_than
    )
    return int(status.split()[-1])


# Daily token totals prune may delete: older than the age asked for, and older than the
# previous UTC month. llamagate_charge_tokens (m007) sums the days of the charged day's
# month into month_used, and a gateway charges its own clock's day: the current month,
# or the previous one for a charge made just before midnight on the first and flushed
# after, or a gateway whose clock lags. So both months stay, whatever the age.
PRUNABLE_TOKEN_DAYS = """
    day < least(
        ((now() - $1::interval) AT TIME ZONE 'UTC')::date,
        (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month')::date
    )
"""


async def count_older_token_days(conn: asyncpg.Connection, older_than: timedelta) -> int:
    """How many daily token totals prune would delete."""
    return await conn.fetchval(
        f"SELECT count(*) FROM token_days WHERE {PRUNABLE_TOKEN_DAYS}", older_than
    )


async def prune_token_days(conn: asyncpg.Connection, older_than: timedelta) -> int:
    """Delete daily token totals older than `older_than` that no quota reads any more (see
    PRUNABLE_TOKEN_DAYS); return how many."""
    if older_than <= timedelta(0):
        raise InvalidValue("prune needs a positive age, such as 90d")
    status = await conn.execute(f"DELETE FROM token_days WHERE {PRUNABLE_TOKEN_DAYS}", older_than)
    return int(status.split()[-1])
