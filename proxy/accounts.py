"""Users and their API keys: the admin's SQL, as plain async functions of one connection.

Times come from the database's clock (now()), so that a key's expiry means the same thing
to the admin CLI and to every gateway. Bad input raises an AccountError before anything
is written; each change that touches several rows runs in one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from proxy.keys import KEY_ID_HEX_CHARS, NewKey, generate_key

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
KEY_ID_PATTERN = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
MAX_RATE_LIMIT = 2_147_483_647  # the users.rate_limit column is a 4-byte integer
MAX_CONCURRENCY_LIMIT = 2_147_483_647  # users.concurrency_limit is one too
MAX_EXPIRES_DAYS = 36_500
DEFAULT_ROTATION_GRACE = timedelta(hours=24)


class AccountError(Exception):
    """Bad input for an account change; the message names the culprit and the fix."""


class InvalidValue(AccountError):
    """A username, limit or duration that can never be valid."""


class UserExists(AccountError):
    """A user of that name already exists."""


class UnknownUser(AccountError):
    """No user of that name."""


class UnknownKey(AccountError):
    """No key with that id."""


class KeyAlreadyRevoked(AccountError):
    """The key was revoked before."""


@dataclass(frozen=True)
class IssuedKey:
    """A key just added to a user: the only moment its secret is known."""

    username: str
    new_key: NewKey
    expires_at: datetime | None


@dataclass(frozen=True)
class UserRow:
    """A user, with the number of its keys that still work."""

    username: str
    rate_limit: int | None
    is_disabled: bool
    created_at: datetime
    active_keys: int
    concurrency_limit: int | None  # None: the gateway's default; 0: no cap
    # Token limits: None follows the gateway's default, 0 is unlimited (proxy/tokenaccounts.py).
    tokens_per_minute: int | None = None
    daily_token_quota: int | None = None
    monthly_token_quota: int | None = None


@dataclass(frozen=True)
class KeyRow:
    """A key's public facts; state is 'active', 'expired' or 'revoked'."""

    key_id: str
    state: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class UserDetail:
    """A user, its keys, and how much it has used the gateway."""

    user: UserRow
    keys: list[KeyRow]
    request_count: int
    last_request_at: datetime | None


def validate_username(username: str) -> str:
    """The username if it is 1-64 letters, digits or . _ - @; InvalidValue otherwise."""
    if not USERNAME_PATTERN.fullmatch(username):
        raise InvalidValue(
            f"invalid username {username!r}: use 1-64 letters, digits, '.', '_', '-' or '@'"
        )
    return username


def validate_rate_limit(rate_limit: int | None) -> int | None:
    """A per-user limit of requests per window, or None for the gateway's default."""
    if rate_limit is not None and not 1 <= rate_limit <= MAX_RATE_LIMIT:
        raise InvalidValue(f"invalid rate limit {rate_limit}: it must be 1 or more")
    return rate_limit


def validate_concurrency_limit(concurrency_limit: int | None) -> int | None:
    """A per-user cap on requests at the backend at once (0: none), or None for the default."""
    if concurrency_limit is not None and not 0 <= concurrency_limit <= MAX_CONCURRENCY_LIMIT:
        raise InvalidValue(
            f"invalid concurrency {concurrency_limit}: give how many requests at once, "
            f"0 for no cap, or 'default'"
        )
    return concurrency_limit


def key_lifetime(expires_days: int | None) -> timedelta | None:
    """How long a new key lives, or None for a key that never expires."""
    if expires_days is None:
        return None
    if not 1 <= expires_days <= MAX_EXPIRES_DAYS:
        raise InvalidValue(
            f"invalid expiry of {expires_days} days: use 1 to {MAX_EXPIRES_DAYS} days, "
            f"or leave it out for a key that never expires"
        )
    return timedelta(days=expires_days)


def unknown_user(username: str) -> UnknownUser:
    return UnknownUser(f"no user named {username!r}; see list-users")


_USER_COLUMNS = """
    u.username, u.rate_limit, u.is_disabled, u.created_at,
    (SELECT count(*) FROM api_keys AS k
     WHERE k.user_id = u.id AND k.revoked_at IS NULL
       AND (k.expires_at IS NULL OR k.expires_at > now())) AS active_keys,
    u.concurrency_limit,
    u.tokens_per_minute, u.daily_token_quota, u.monthly_token_quota
"""


async def fetch_user(conn: asyncpg.Connection, username: str) -> UserRow:
    """The user of that name; UnknownUser if there is none."""
    row = await conn.fetchrow(
        f"SELECT {_USER_COLUMNS} FROM users AS u WHERE u.username = $1",
        validate_username(username),
    )
    if row is None:
        raise unknown_user(username)
    return UserRow(**dict(row))


async def insert_key(
    conn: asyncpg.Connection, username: str, lifetime: timedelta | None
) -> IssuedKey:
    """Add a fresh key to an existing user."""
    new_key = generate_key()
    expires_at = await conn.fetchval(
        """
        INSERT INTO api_keys (key_id, user_id, digest, expires_at)
        SELECT $1, u.id, $2, now() + $3::interval FROM users AS u WHERE u.username = $4
        RETURNING expires_at
        """,
        new_key.key_id,
        new_key.digest,
        lifetime,
        username,
    )
    return IssuedKey(username, new_key, expires_at)


async def create_user(
    conn: asyncpg.Connection,
    username: str,
    rate_limit: int | None = None,
    expires_days: int | None = None,
) -> tuple[UserRow, IssuedKey]:
    """Create a user with its first key, in one transaction."""
    validate_username(username)
    validate_rate_limit(rate_limit)
    lifetime = key_lifetime(expires_days)
    async with conn.transaction():
        is_created = await conn.fetchval(
            """
            INSERT INTO users (username, rate_limit) VALUES ($1, $2)
            ON CONFLICT (username) DO NOTHING RETURNING true
            """,
            username,
            rate_limit,
        )
        if not is_created:
            raise UserExists(
                f"user {username!r} already exists; see show-user {username}, "
                f"or add-key to give it another key"
            )
        issued = await insert_key(conn, username, lifetime)
        return await fetch_user(conn, username), issued


async def list_users(conn: asyncpg.Connection) -> list[UserRow]:
    """Every user, by name."""
    rows = await conn.fetch(f"SELECT {_USER_COLUMNS} FROM users AS u ORDER BY u.username")
    return [UserRow(**dict(row)) for row in rows]


async def show_user(conn: asyncpg.Connection, username: str) -> UserDetail:
    """A user, its keys (never their secrets) and its request count."""
    user = await fetch_user(conn, username)
    keys = await conn.fetch(
        """
        SELECT k.key_id,
               CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked'
                    WHEN k.expires_at <= now() THEN 'expired'
                    ELSE 'active' END AS state,
               k.created_at, k.expires_at, k.revoked_at
        FROM api_keys AS k JOIN users AS u ON u.id = k.user_id
        WHERE u.username = $1 ORDER BY k.created_at, k.id
        """,
        username,
    )
    usage = await conn.fetchrow(
        "SELECT count(*) AS n, max(created_at) AS last FROM llama_requests WHERE username = $1",
        username,
    )
    return UserDetail(user, [KeyRow(**dict(key)) for key in keys], usage["n"], usage["last"])


async def set_disabled(conn: asyncpg.Connection, username: str, is_disabled: bool) -> bool:
    """Disable or enable a user; return False if it already was in that state."""
    user = await fetch_user(conn, username)
    if user.is_disabled == is_disabled:
        return False
    await conn.execute(
        "UPDATE users SET is_disabled = $1 WHERE username = $2", is_disabled, username
    )
    return True


async def delete_user(conn: asyncpg.Connection, username: str) -> None:
    """Delete a user and its keys; its rows in the request log stay."""
    async with conn.transaction():
        deleted = await conn.fetchval(
            "DELETE FROM users WHERE username = $1 RETURNING id", validate_username(username)
        )
        if deleted is None:
            raise unknown_user(username)
        # So that a new user of the same name starts with empty windows and quotas.
        await conn.execute("DELETE FROM rate_windows WHERE username = $1", username)
        await conn.execute("DELETE FROM token_windows WHERE username = $1", username)
        await conn.execute("DELETE FROM token_days WHERE username = $1", username)


async def add_key(
    conn: asyncpg.Connection, username: str, expires_days: int | None = None
) -> IssuedKey:
    """Give a user one more key."""
    lifetime = key_lifetime(expires_days)
    await fetch_user(conn, username)
    return await insert_key(conn, username, lifetime)


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> str:
    """Revoke one key at once; return its user's name."""
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise UnknownKey(
            f"no key with id {key_id!r}: a key id is {KEY_ID_HEX_CHARS} hex digits, "
            f"as show-user lists them"
        )
    async with conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT u.username, k.revoked_at FROM api_keys AS k JOIN users AS u ON u.id = k.user_id
            WHERE k.key_id = $1 FOR UPDATE OF k
            """,
            key_id,
        )
        if row is None:
            raise UnknownKey(f"no key with id {key_id!r}; see show-user NAME for a user's keys")
        if row["revoked_at"] is not None:
            raise KeyAlreadyRevoked(
                f"key {key_id} of user {row['username']!r} is already revoked "
                f"(at {row['revoked_at']:%Y-%m-%d %H:%M:%S %Z})"
            )
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", key_id)
        return row["username"]


async def rotate_key(
    conn: asyncpg.Connection,
    username: str,
    grace: timedelta = DEFAULT_ROTATION_GRACE,
    is_revoking_old: bool = False,
    expires_days: int | None = None,
) -> tuple[IssuedKey, list[KeyRow]]:
    """Add a new key, and retire the user's other working keys after `grace` (or at once).

    Returns the new key and the old keys as they are now.
    """
    lifetime = key_lifetime(expires_days)
    if grace < timedelta(0):
        raise InvalidValue("the grace period before old keys expire cannot be negative")
    async with conn.transaction():
        await fetch_user(conn, username)
        # A key that already expires sooner than the grace period keeps its expiry.
        old_keys = await conn.fetch(
            """
            UPDATE api_keys AS k SET
                revoked_at = CASE WHEN $3 THEN now() END,
                expires_at = CASE WHEN $3 THEN k.expires_at
                                  ELSE least(k.expires_at, now() + $2::interval) END
            FROM users AS u
            WHERE u.id = k.user_id AND u.username = $1 AND k.revoked_at IS NULL
              AND (k.expires_at IS NULL OR k.expires_at > now())
            RETURNING k.key_id, CASE WHEN $3 THEN 'revoked' ELSE 'active' END AS state,
                      k.created_at, k.expires_at, k.revoked_at
            """,
            username,
            grace,
            is_revoking_old,
        )
        issued = await insert_key(conn, username, lifetime)
    return issued, [KeyRow(**dict(key)) for key in old_keys]


async def set_limit(conn: asyncpg.Connection, username: str, rate_limit: int | None) -> None:
    """Set a user's own rate limit; None returns it to the gateway's default."""
    await update_user(conn, username, {"rate_limit": validate_rate_limit(rate_limit)})


async def set_concurrency_limit(
    conn: asyncpg.Connection, username: str, concurrency_limit: int | None
) -> None:
    """Set a user's own cap on requests at the backend at once; None returns it to the default."""
    await update_user(
        conn, username, {"concurrency_limit": validate_concurrency_limit(concurrency_limit)}
    )


async def update_user(
    conn: asyncpg.Connection, username: str, columns: Mapping[str, int | None]
) -> None:
    """Set some of a user's columns in one UPDATE; UnknownUser if there is no such user.

    The column names come from this package's constants, never from the caller's text.
    """
    names = list(columns)
    assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
    updated = await conn.fetchval(
        f"UPDATE users SET {assignments} WHERE username = $1 RETURNING id",
        validate_username(username),
        *(columns[name] for name in names),
    )
    if updated is None:
        raise unknown_user(username)
