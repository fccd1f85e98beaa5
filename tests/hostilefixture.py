"""Fixtures for the hostile-client tests (test_hostile_input.py, test_hostile_clients.py).

Registered by those modules through `pytest_plugins`, after gatewayfixture.py. A plugin's
fixtures are visible to every test in the session, so nothing here is autouse and no name
shadows another plugin's (gatewayfixture's `gateway` serves other modules): each hostile
module opts in with `pytestmark = pytest.mark.usefixtures("no_error_is_logged")`. The
helpers are fixtures too, so no test module imports this one, and pytest, importing it
first, rewrites its asserts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from fakeupstream import FakeUpstream
from gatewayhelpers import add_user, bearer, chat

CLIENT_TIMEOUT = 1.0  # seconds; LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS for these tests
CHAT = "/v1/chat/completions"


@pytest.fixture
def no_error_is_logged(caplog):
    """Hostile input is the client's doing: the gateway must log no error or traceback."""
    yield
    errors = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR or record.exc_info
    ]
    assert errors == []


@pytest_asyncio.fixture
async def hostile_gateway(start_gateway) -> TestClient:
    """A gateway with a short client timeout and a rate limit no hostile test reaches."""
    return await start_gateway(
        client_timeout_seconds=CLIENT_TIMEOUT, rate_limit=100_000, max_body_bytes=100_000
    )


@pytest_asyncio.fixture
async def alice_key(db) -> str:
    return await add_user(db, "alice")


async def _assert_serves(gateway: TestClient, key: str) -> None:
    """An ordinary request still gets its answer."""
    response = await gateway.post(CHAT, json=chat(), headers=bearer(key))
    assert response.status == 200


def _chats_seen(upstream: FakeUpstream) -> int:
    return sum(seen.path == CHAT for seen in upstream.seen)


@pytest.fixture
def assert_serves() -> Callable[[TestClient, str], Awaitable[None]]:
    """`await assert_serves(gateway, key)`: an ordinary request still gets its answer."""
    return _assert_serves


@pytest.fixture
def chats_seen() -> Callable[[FakeUpstream], int]:
    """`chats_seen(upstream)`: how many chat completions reached the backend."""
    return _chats_seen
