"""The gateway's connection pool (proxy/store.py), against the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

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


@pytest.mark.asyncio
async def test_request_rows_land_exactly_whatever_their_text_numbers_and_times(pg_dsn):
    """Every kind of value the log writes comes out of the table as it went in."""
    tokyo = timezone(timedelta(hours=9))
    awkward = 'emoji 😀, "quotes", back\\slash, tab\t, newline\n, ünïcödé'
    rows = [
        ("r-1", datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "alice", "kid1", "POST",
         "/v1/chat/completions", 200, 1.2345678901234567, 0.0, 2**40, 0, awkward, True, 7,
         11, "::1", awkward, 1),
        ("r-2", datetime(2026, 1, 2, 12, 0, tzinfo=tokyo), None, None, "GET", "/nowhere",
         404, 1e-9, None, 0, 2**62, None, False, None, None, None, None, 3),
    ]  # fmt: skip
    pool = await store.create_pool(pg_dsn)
    try:
        await store.insert_requests(pool, rows)
        stored = await pool.fetch("SELECT * FROM llama_requests ORDER BY request_id")
    finally:
        await pool.close()
    assert len(stored) == len(rows)
    for row, record in zip(rows, stored, strict=True):
        for column, value in zip(store.REQUEST_COLUMNS, row, strict=True):
            assert record[column] == value, column
            assert type(record[column]) is type(value), column
