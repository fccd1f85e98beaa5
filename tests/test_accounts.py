"""proxy.accounts against a real PostgreSQL: what the SQL guarantees beyond the CLI tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from proxy import accounts, reports, store
from proxy.migrations import migrate


@pytest_asyncio.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection)
    try:
        yield connection
    finally:
        await connection.close()


async def log_request(conn: asyncpg.Connection, username: str, age: timedelta) -> None:
    row = {
        "request_id": uuid.uuid4().hex,
        "created_at": datetime.now(UTC) - age,
        "username": username,
        "method": "POST",
        "path": "/v1/completions",
        "status_code": 200,
        "duration_ms": 5.0,
        "request_bytes": 1,
        "response_bytes": 1,
        "repeat_count": 1,
    }
    await store.insert_requests(conn, [tuple(row.get(c) for c in store.REQUEST_COLUMNS)])


@pytest.mark.asyncio
async def test_create_user_is_one_transaction_with_its_first_key(conn: asyncpg.Connection) -> None:
    user, issued = await accounts.create_user(conn, "alice", rate_limit=5, expires_days=1)

    assert (user.username, user.rate_limit, user.is_disabled, user.active_keys) == (
        "alice",
        5,
        False,
        1,
    )
    assert issued.username == "alice" and issued.expires_at is not None
    with pytest.raises(accounts.UserExists, match="'alice' already exists"):
        await accounts.create_user(conn, "alice")
    assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1


@pytest.mark.asyncio
async def test_show_user_marks_expired_and_revoked_keys(conn: asyncpg.Connection) -> None:
    _, first = await accounts.create_user(conn, "alice")
    second = await accounts.add_key(conn, "alice")
    third = await accounts.add_key(conn, "alice")
    await conn.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE key_id = $1",
        first.new_key.key_id,
    )
    await accounts.revoke_key(conn, second.new_key.key_id)

    detail = await accounts.show_user(conn, "alice")

    assert [(k.key_id, k.state) for k in detail.keys] == [
        (first.new_key.key_id, "expired"),
        (second.new_key.key_id, "revoked"),
        (third.new_key.key_id, "active"),
    ]
    assert detail.user.active_keys == 1


@pytest.mark.asyncio
async def test_rotation_keeps_an_expiry_sooner_than_the_grace_and_skips_dead_keys(
    conn: asyncpg.Connection,
) -> None:
    _, soon = await accounts.create_user(conn, "alice")
    await conn.execute(
        "UPDATE api_keys SET expires_at = now() + interval '1 hour' WHERE key_id = $1",
        soon.new_key.key_id,
    )
    revoked = await accounts.add_key(conn, "alice")
    await accounts.revoke_key(conn, revoked.new_key.key_id)
    lasting = await accounts.add_key(conn, "alice")

    issued, old = await accounts.rotate_key(conn, "alice", grace=timedelta(hours=2))

    by_id = {key.key_id: key for key in old}
    assert set(by_id) == {soon.new_key.key_id, lasting.new_key.key_id}
    assert by_id[soon.new_key.key_id].expires_at < by_id[lasting.new_key.key_id].expires_at
    now = await conn.fetchval("SELECT now()")
    assert by_id[lasting.new_key.key_id].expires_at - now == pytest.approx(
        timedelta(hours=2), abs=timedelta(minutes=1)
    )
    assert issued.new_key.key_id not in by_id


@pytest.mark.asyncio
async def test_delete_user_empties_its_rate_window_so_a_new_namesake_starts_fresh(
    conn: asyncpg.Connection,
) -> None:
    await accounts.create_user(conn, "alice")
    await conn.execute("INSERT INTO rate_windows (username, stamps) VALUES ('alice', '{1,2}')")

    await accounts.delete_user(conn, "alice")

    assert await conn.fetchval("SELECT count(*) FROM rate_windows") == 0
    with pytest.raises(accounts.UnknownUser, match="no user named 'alice'; see list-users"):
        await accounts.delete_user(conn, "alice")


@pytest.mark.asyncio
async def test_usage_still_shows_a_deleted_users_requests(conn: asyncpg.Connection) -> None:
    await accounts.create_user(conn, "alice")
    await log_request(conn, "alice", timedelta(0))
    await accounts.delete_user(conn, "alice")

    [row] = await reports.usage(conn, username="alice")

    assert (row.group, row.requests) == ("alice", 1)
    with pytest.raises(accounts.UnknownUser):
        await reports.usage(conn, username="nobody")


@pytest.mark.asyncio
async def test_prune_counts_what_it_deletes_and_refuses_a_zero_age(
    conn: asyncpg.Connection,
) -> None:
    await log_request(conn, "a", timedelta(days=3))
    await log_request(conn, "b", timedelta(hours=1))

    assert await reports.count_older_requests(conn, timedelta(days=1)) == 1
    assert await reports.prune(conn, timedelta(days=1)) == 1
    with pytest.raises(accounts.InvalidValue):
        await reports.prune(conn, timedelta(0))
    assert await conn.fetchval("SELECT count(*) FROM llama_requests") == 1


@pytest.mark.parametrize("name", ["alice", "a", "x" * 64, "first.last@example.com", "a_b-c"])
def test_validate_username_accepts_the_allowed_characters(name: str) -> None:
    assert accounts.validate_username(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "a'b", "é", "bob\n", "a\x00"])
def test_validate_username_refuses_anything_else_and_says_what_is_allowed(name: str) -> None:
    with pytest.raises(accounts.InvalidValue, match="1-64 letters, digits"):
        accounts.validate_username(name)
