"""The gateway's connection pool (proxy/store.py), against the real PostgreSQL."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus

import asyncpg
import pytest

from proxy import store
from proxy.outage import Failure, classify


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
async def test_a_connection_left_mid_protocol_by_a_stopping_server_is_not_handed_out_again(
    pg_dsn,
):
    # A server stopping fast sends its error, then closes the socket; a query sent in
    # between fails with InternalClientError and the connection stays in that state.
    pool = await store.create_pool(pg_dsn, max_size=1)
    try:
        with pytest.raises(asyncpg.exceptions.InternalClientError):
            async with pool.acquire() as conn:
                broken_pid = conn.get_server_pid()
                raise asyncpg.exceptions.InternalClientError("cannot switch to state 12")
        async with pool.acquire() as conn:  # max_size 1: the old one or a new one
            assert conn.get_server_pid() != broken_pid
            assert await conn.fetchval("SELECT 1") == 1
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
    stored = await insert_and_read_back(pg_dsn, rows)
    assert len(stored) == len(rows)
    for row, record in zip(rows, stored, strict=True):
        for column, value in zip(store.REQUEST_COLUMNS, row, strict=True):
            assert record[column] == value, column
            assert type(record[column]) is type(value), column


async def insert_and_read_back(pg_dsn: str, rows: list[tuple]) -> list:
    """The rows as llama_requests holds them after one batch insert, by request_id."""
    pool = await store.create_pool(pg_dsn)
    try:
        await store.insert_requests(pool, rows)
        return await pool.fetch("SELECT * FROM llama_requests ORDER BY request_id")
    finally:
        await pool.close()


@pytest.fixture
def local_time_in_tokyo(monkeypatch):
    """Local time that is not the database's UTC, so that a naive time shows which it is."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.asyncio
async def test_request_rows_keep_special_floats_control_characters_and_naive_times(
    pg_dsn, local_time_in_tokyo
):
    """What only an encoder of our own could get wrong: NaN and infinities, control
    characters JSON escapes, a naive time (local, as asyncpg takes it), an int subclass."""
    controls = "bell \x07, escape \x1b, delete \x7f, separator \u2028, " + "\\x00 \\ud800"
    naive = datetime(2026, 1, 2, 3, 4, 5, 6)
    rows = [
        ("r-1", naive, controls, None, "POST", controls, HTTPStatus.OK, math.inf, -math.inf,
         0, 0, None, None, None, None, None, None, 1),
        ("r-2", naive, None, None, "POST", "/", 200, math.nan, -0.0, 0, 0, None, None,
         None, None, None, None, 1),
    ]  # fmt: skip
    stored = await insert_and_read_back(pg_dsn, rows)
    first, second = stored
    assert first["created_at"] == naive.astimezone(UTC)
    assert first["username"] == first["path"] == controls
    assert first["status_code"] == 200
    assert (first["duration_ms"], first["queue_ms"]) == (math.inf, -math.inf)
    assert math.isnan(second["duration_ms"]) and second["queue_ms"] == 0.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad_value",
    [{"a": "dict"}, "NUL \x00 unescaped", "lone \ud800 surrogate", "not a number"],
    ids=["dict", "nul", "surrogate", "text-in-int-column"],
)
async def test_a_row_the_database_can_never_take_is_a_data_failure(pg_dsn, bad_value):
    """Set aside by the request log (proxy/outage.py), not retried for ever as if the
    database were down, whichever side refuses it: the encoder, asyncpg or PostgreSQL."""
    column = "status_code" if bad_value == "not a number" else "path"
    row = dict.fromkeys(store.REQUEST_COLUMNS)
    row.update(request_id="r-bad", created_at=datetime.now(UTC), method="GET", path="/")
    row.update(status_code=200, duration_ms=1.0, request_bytes=0, response_bytes=0)
    row.update({column: bad_value}, repeat_count=1)
    pool = await store.create_pool(pg_dsn)
    try:
        with pytest.raises(Exception) as refused:
            await store.insert_requests(pool, [tuple(row.values())])
        assert await pool.fetchval("SELECT count(*) FROM llama_requests") == 0
    finally:
        await pool.close()
    assert classify(refused.value) is Failure.DATA, repr(refused.value)
