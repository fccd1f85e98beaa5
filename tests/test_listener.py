"""The shared LISTEN loop (proxy/listener.py) as the token limiter uses it (proxy/tokenwatch.py),
against a real PostgreSQL: it passes payloads on, and outlives an error nobody foresaw."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from gatewayhelpers import wait_until

from proxy import listener, store
from proxy.migrations import TOKEN_CHANNEL
from proxy.tokenlimit import TokenLimiter
from proxy.tokenwatch import listen_for_charges


async def no_database(*_args: object) -> list:
    raise AssertionError("the limiter should not sync in this test")


@contextlib.asynccontextmanager
async def running(task_coroutine):
    task = asyncio.create_task(task_coroutine)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_the_token_listener_passes_other_gateways_charges_to_the_limiter(pg_dsn) -> None:
    limiter = TokenLimiter(no_database)
    async with running(listen_for_charges(pg_dsn, limiter)):
        await wait_until(lambda: limiter.is_listening, "the token listener to listen")
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("SELECT pg_notify($1, $2)", TOKEN_CHANNEL, "othergateway alice")
            await conn.execute(
                "SELECT pg_notify($1, $2)", TOKEN_CHANNEL, f"{limiter.gateway_id} bob"
            )
        finally:
            await conn.close()
        await wait_until(lambda: "alice" in limiter.foreign_at, "alice's foreign charge")
    assert "bob" not in limiter.foreign_at  # this gateway's own charge
    assert not limiter.is_listening  # told when the listener stopped


@pytest.mark.asyncio
async def test_the_token_listener_survives_an_unexpected_error_while_connecting(
    pg_dsn, monkeypatch
) -> None:
    real_connect = store.connect
    calls = []

    async def fail_once(dsn: str, *args, **kwargs):
        calls.append(dsn)
        if len(calls) == 1:
            raise RuntimeError("an error nobody foresaw")
        return await real_connect(dsn, *args, **kwargs)

    monkeypatch.setattr(store, "connect", fail_once)
    limiter = TokenLimiter(no_database)
    async with running(listen_for_charges(pg_dsn, limiter)) as task:
        await wait_until(
            lambda: limiter.is_listening or task.done(), "the token listener to listen again"
        )
        assert not task.done(), "the listener died of the error"
    assert len(calls) == 2


@pytest.mark.asyncio
async def test_the_listener_connection_is_named_in_pg_stat_activity(pg_dsn) -> None:
    limiter = TokenLimiter(no_database)
    async with running(listen_for_charges(pg_dsn, limiter)):
        await wait_until(lambda: limiter.is_listening, "the token listener to listen")
        conn = await asyncpg.connect(pg_dsn)
        try:
            names = await conn.fetch(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
    # This test's own database: the listener's is the only other connection to it.
    assert [row["application_name"] for row in names] == [listener.APPLICATION_NAME]
