"""Helpers for the gateway tests: a test ProxyConfig, users and keys by plain SQL, polling.

Users and keys are written with plain SQL, so these tests do not depend on the admin code.
The fixtures that use these live in gatewayfixture.py.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg

from proxy.config import ProxyConfig
from proxy.configparse import parse_backend_urls
from proxy.keys import generate_key

BACKEND_KEY = "backend-key-only-the-gateway-knows"
DEADLINE = 5.0  # seconds; only there so that a broken gateway fails instead of hanging


def gateway_config(dsn: str, backend_url: str, tmp_path: Path, **overrides) -> ProxyConfig:
    """A ProxyConfig for tests: small limits, short waits, files under tmp_path; else defaults.

    backend_url may list several backends, comma-separated, as LLAMA_PROXY_BACKEND_URL does.
    """
    config = ProxyConfig(
        host="127.0.0.1",
        port=0,
        backend_urls=parse_backend_urls(backend_url),
        backend_key=BACKEND_KEY,
        dsn=dsn,
        spool_path=tmp_path / "requests.spool",
        rate_limit=100,
        max_body_bytes=10_000,
        backend_wait_seconds=5.0,
        queue_timeout_seconds=30.0,
        upstream_timeout_seconds=30.0,
        drain_seconds=1.0,
        auth_outage_grace_seconds=300.0,
        auth_failures_per_minute=10_000,  # tests that exercise it set their own
    )
    return replace(config, **overrides)


async def add_user(
    pool: asyncpg.Pool,
    username: str,
    *,
    rate_limit: int | None = None,
    is_disabled: bool = False,
    key_sql: str = "NULL, NULL",
) -> str:
    """Create a user (if new) with one fresh key; return the key's secret text.

    key_sql gives the key's `expires_at, revoked_at` as SQL, e.g. "now() - interval '1 s', NULL".
    """
    await pool.execute(
        "INSERT INTO users (username, rate_limit, is_disabled) VALUES ($1, $2, $3) "
        "ON CONFLICT (username) DO NOTHING",
        username,
        rate_limit,
        is_disabled,
    )
    new_key = generate_key()
    await pool.execute(
        "INSERT INTO api_keys (key_id, user_id, digest, expires_at, revoked_at) "
        f"SELECT $1, id, $2, {key_sql} FROM users WHERE username = $3",
        new_key.key_id,
        new_key.digest,
        username,
    )
    return new_key.secret_key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(stream: bool = False, **extra) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


async def wait_until(
    condition: Callable[[], object | Awaitable[object]],
    what: str = "the condition",
    timeout: float = DEADLINE,
):
    """Poll condition() (sync or async) until truthy; fail naming `what` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def log_rows(pool: asyncpg.Pool, where: str = "true", *args) -> list[asyncpg.Record]:
    return await pool.fetch(f"SELECT * FROM llama_requests WHERE {where} ORDER BY id", *args)
