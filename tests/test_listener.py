"""The gateway's one LISTEN connection (proxy/listener.py), alone and as the token limiter
uses it (proxy/tokenwatch.py), against a real PostgreSQL: it passes each channel's payloads
to its own owner, tells every owner when the connection goes and comes back, and outlives
an error nobody foresaw."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest
from gatewayhelpers import wait_until

from proxy import listener, store
from proxy.listener import Subscription, listen_forever
from proxy.migrations import AUTH_CHANNEL, TOKEN_CHANNEL
from proxy.tokenlimit import TokenLimiter
from proxy.tokenwatch import charge_subscription


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


class Owner:
    """A subscriber that writes down what the listener tells it."""

    def __init__(self, channel: str) -> None:
        self.payloads: list[str] = []
        self.events: list[str] = []
        self.subscription = Subscription(
            channel=channel,
            on_notify=self.payloads.append,
            on_listening=lambda: self.events.append("listening"),
            on_lost=lambda: self.events.append("lost"),
        )


async def notify(dsn: str, *notifications: tuple[str, str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for channel, payload in notifications:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
    finally:
        await conn.close()


async def terminate_listeners(dsn: str) -> int:
    """Cut the listener connections to this test's own database, as a database restart or
    an operator would; how many there were."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            listener.APPLICATION_NAME,
        )
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_one_listener_serves_each_owner_its_channel_and_tells_both_of_a_loss(
    pg_dsn,
) -> None:
    auth, tokens = Owner(AUTH_CHANNEL), Owner(TOKEN_CHANNEL)
    owners = (auth, tokens)
    async with running(listen_forever(pg_dsn, [auth.subscription, tokens.subscription])):
        await wait_until(
            lambda: all(o.events == ["listening"] for o in owners), "both owners to listen"
        )
        await notify(pg_dsn, (AUTH_CHANNEL, "users changed"), (TOKEN_CHANNEL, "gw alice"))
        await wait_until(lambda: all(o.payloads for o in owners), "both notifications")
        cut_at = time.monotonic()
        assert await terminate_listeners(pg_dsn) == 1  # one connection for both channels
        await wait_until(
            lambda: all(o.events == ["listening", "lost", "listening"] for o in owners),
            "both owners to hear of the loss, then listen again",
        )
        print(f"\nboth owners listening again {(time.monotonic() - cut_at) * 1000:.0f} ms after")
        await notify(pg_dsn, (TOKEN_CHANNEL, "gw bob"), (AUTH_CHANNEL, "keys changed"))
        await wait_until(lambda: all(len(o.payloads) == 2 for o in owners), "both again")
    assert auth.payloads == ["users changed", "keys changed"]
    assert tokens.payloads == ["gw alice", "gw bob"]
    assert auth.events == tokens.events == ["listening", "lost", "listening", "lost"]


@pytest.mark.asyncio
async def test_the_token_listener_passes_other_gateways_charges_to_the_limiter(pg_dsn) -> None:
    limiter = TokenLimiter(no_database)
    async with running(listen_forever(pg_dsn, [charge_subscription(limiter)])):
        await wait_until(lambda: limiter.is_listening, "the token listener to listen")
        await notify(
            pg_dsn,
            (TOKEN_CHANNEL, "othergateway alice"),
            (TOKEN_CHANNEL, f"{limiter.gateway_id} bob"),
        )
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
    async with running(listen_forever(pg_dsn, [charge_subscription(limiter)])) as task:
        await wait_until(
            lambda: limiter.is_listening or task.done(), "the token listener to listen again"
        )
        assert not task.done(), "the listener died of the error"
    assert len(calls) == 2


@pytest.mark.asyncio
async def test_the_listener_connection_is_named_in_pg_stat_activity(pg_dsn) -> None:
    limiter = TokenLimiter(no_database)
    async with running(listen_forever(pg_dsn, [charge_subscription(limiter)])):
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
