"""Token charges through a database outage and a gateway stop: a real `python -m proxy`
charges while its PostgreSQL is stopped, is stopped itself (SIGTERM), and a new gateway
replays the charges once the database is back (proxy/chargebacklog.py).

The cluster is this module's own, so that stopping it disturbs no other test's database
(as in test_faults_outage.py). The gateway runs in front of the fake upstream, whose
answers carry usage: 7 prompt and 5 completion tokens each.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from conftest import free_port
from fakeupstream import USAGE
from gatewayhelpers import BACKEND_KEY, add_user, bearer, chat, wait_until
from gatewayprocess import GatewayProcess, start_gateway_process

from proxy.chargespool import charge_spool_path

pytest_plugins = ["gatewayfixture", "outagefixture"]

TOKENS = USAGE["total_tokens"]
DEADLINE = 30.0  # generous: 2 shared cores; only there to turn a hang into a failure


async def _query(dsn: str, sql: str):
    """One value, on a connection of its own; None while the database is down."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _ask(session: aiohttp.ClientSession, gateway: GatewayProcess, key: str) -> int:
    async with session.post(
        f"{gateway.url}/v1/chat/completions", json=chat(), headers=bearer(key)
    ) as response:
        await response.read()
        return response.status


@pytest.mark.asyncio
async def test_tokens_charged_during_an_outage_survive_a_gateway_stop_and_count_once(
    own_dsn, own_cluster, upstream_server, tmp_path: Path
) -> None:
    pool = await asyncpg.create_pool(own_dsn, min_size=1, max_size=1)
    try:
        key = await add_user(pool, "alice")
        await pool.execute("UPDATE users SET daily_token_quota = 1000000 WHERE username = 'alice'")
    finally:
        await pool.close()
    spool_path = tmp_path / "spool" / "requests.spool"
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_BACKEND_URL": str(upstream_server.make_url("")).rstrip("/"),
        "LLAMA_API_KEY": BACKEND_KEY,
        "POSTGRES_AUTH_DSN": own_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(spool_path),
        "LLAMA_PROXY_DRAIN_SECONDS": "1",
        "LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS": "300",
    }
    day_total = "SELECT coalesce(sum(tokens), 0) FROM token_days WHERE username = 'alice'"
    async with aiohttp.ClientSession() as session:
        first = await _start(settings, tmp_path / "first.log")
        try:
            assert await _ask(session, first, key) == 200  # the key is cached from now on
            await wait_until(lambda: _equals(own_dsn, day_total, TOKENS), "a charge", DEADLINE)
            await asyncio.to_thread(own_cluster.stop)
            statuses = [await _ask(session, first, key) for _ in range(3)]
        finally:
            first.stop()
        assert statuses == [200] * 3
        assert charge_spool_path(spool_path).exists()  # on disk, not lost with the process

        await asyncio.to_thread(own_cluster.start)
        second = await _start(settings, tmp_path / "second.log")
        started = time.monotonic()
        try:
            await wait_until(lambda: _is_replayed(spool_path), "the spools' replay", DEADLINE)
        finally:
            second.stop()
        print(f"both spools replayed {time.monotonic() - started:.2f}s after /healthz answered")
    assert await _query(own_dsn, day_total) == 4 * TOKENS
    assert await _query(own_dsn, "SELECT count(*) FROM llama_requests") == 4


async def _equals(dsn: str, sql: str, expected: int) -> bool:
    return await _query(dsn, sql) == expected


def _is_replayed(spool_path: Path) -> bool:
    return not charge_spool_path(spool_path).exists() and not spool_path.exists()


async def _start(settings: dict[str, str], log_path: Path) -> GatewayProcess:
    return await start_gateway_process({**settings, "LLAMA_PROXY_PORT": str(free_port())}, log_path)
