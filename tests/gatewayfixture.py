"""Fixtures for the gateway tests: a fake upstream, the real PostgreSQL, make_app, and
`python -m proxy` as its own process.

Registered by the tests/test_gateway_*.py modules through `pytest_plugins`; the plain
helpers they import live in gatewayhelpers.py, so that this plugin is imported (and its
asserts rewritten) by pytest first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from conftest import free_port
from fakeupstream import FakeUpstream
from gatewayhelpers import BACKEND_KEY, gateway_config
from gatewayprocess import GatewayProcess, start_gateway_process

from proxy import store
from proxy.app import make_app
from proxy.server import server_options


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest_asyncio.fixture
async def upstream_server(upstream: FakeUpstream, aiohttp_server) -> TestServer:
    """The fake upstream, listening on a free port (client disconnects cancel its handlers)."""
    return await aiohttp_server(upstream.make_app())


@pytest_asyncio.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own database, with the schema migrated."""
    pool = await store.create_pool(pg_dsn)
    yield pool
    await pool.close()


StartGateway = Callable[..., Awaitable[TestClient]]


@pytest_asyncio.fixture
async def start_gateway(
    pg_dsn: str, db: asyncpg.Pool, aiohttp_client, upstream_server: TestServer, tmp_path: Path
) -> StartGateway:
    """Start a gateway (call it twice for two gateways sharing the database).

    The TestServer runs with proxy/server.py's options, as `python -m proxy` does: so a
    client that disconnects cancels its handler, and slow clients meet the same timeouts.
    """
    count = 0

    async def start(backend_url: str | None = None, **overrides) -> TestClient:
        nonlocal count
        count += 1
        url = backend_url or str(upstream_server.make_url("")).rstrip("/")
        config = gateway_config(pg_dsn, url, tmp_path / f"gateway{count}", **overrides)
        server = TestServer(make_app(config))
        options = server_options(config)
        del options["handler_cancellation"]  # TestServer always sets it, to True
        await server.start_server(**options)
        return await aiohttp_client(server)

    return start


@pytest_asyncio.fixture
async def gateway(start_gateway: StartGateway) -> TestClient:
    """One gateway with the default test config, in front of the fake upstream."""
    return await start_gateway()


@pytest_asyncio.fixture
async def proxy_process(
    pg_dsn: str, db: asyncpg.Pool, upstream_server: TestServer, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """A real `python -m proxy` in front of the fake upstream: the server as it runs in
    production, with none of TestServer's own settings (it forces handler_cancellation on).
    """
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(free_port()),
        "LLAMA_PROXY_BACKEND_URL": str(upstream_server.make_url("")).rstrip("/"),
        "LLAMA_API_KEY": BACKEND_KEY,
        "POSTGRES_AUTH_DSN": pg_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(tmp_path / "requests.spool"),
        "LLAMA_PROXY_DRAIN_SECONDS": "1",
    }
    gateway = await start_gateway_process(settings, tmp_path / "proxy.log")
    yield gateway
    gateway.stop()
