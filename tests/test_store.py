"""The gateway's connection pool (proxy/store.py), against the real PostgreSQL."""

from __future__ import annotations

import pytest

from proxy import store


@pytest.mark.asyncio
async def test_a_connection_goes_back_to_the_pool_without_a_reset_round_trip(pg_dsn):
    pool = await store.create_pool(pg_dsn, max_size=1)
    try:
        queries: list[str] = []
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda logged: queries.append(logged.query))
            await conn.fetchval("SELECT 1")
        # asyncpg's default reset (RESET ALL, UNLISTEN *, CLOSE ALL, advisory unlocks) is
        # one more round trip on the event loop per use, for state the gateway never sets.
        assert queries == ["SELECT 1"]
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_transaction_left_open_is_still_rolled_back_on_release(pg_dsn):
    pool = await store.create_pool(pg_dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE left_open (id int)")
        async with pool.acquire() as conn:  # max_size 1: the same connection
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await pool.close()
