"""Shared members of the pool (llama_backends) behind two gateways on one database: a new
member reaches every gateway within a second, a slot is never used by two gateways at
once, drained members take nothing new. Fake upstreams, the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakeupstream import FakeUpstream
from gatewayhelpers import add_user, bearer, chat, wait_until
from sharedmembers import BACKEND_SECRET, MEMBER_KEY, add_member, holders

from proxy import appkeys

pytest_plugins = ["gatewayfixture"]
pytestmark = pytest.mark.asyncio


class CountingUpstream(FakeUpstream):
    """A fake member that takes `seconds` per chat and counts the chats it runs at once."""

    def __init__(self, seconds: float = 0.02) -> None:
        super().__init__()
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.chats = 0

    async def chat(self, request):
        self.running += 1
        self.chats += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.seconds)  # the work of generating, not synchronisation
            return await super().chat(request)
        finally:
            self.running -= 1


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def shared_gateway(start_gateway, **overrides):
    """A gateway with no local replica, whose registry has loaded and listens."""
    gateway = await start_gateway(backend_urls=(), backend_secret=BACKEND_SECRET, **overrides)
    # Loaded once at start, once more when its LISTEN is in place: from then on it hears.
    await wait_until(lambda: gateway.app[appkeys.REGISTRY].loaded >= 2, "the registry listening")
    return gateway


async def post_chat(gateway, key: str, **extra):
    return await gateway.post("/v1/chat/completions", json=chat(**extra), headers=bearer(key))


async def test_a_gateway_with_no_backend_at_all_answers_no_backend(start_gateway, db):
    gateway = await shared_gateway(start_gateway)
    key = await add_user(db, "alice")
    response = await post_chat(gateway, key)
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "no_backend"
    assert "LLAMA_SERVER_REPLICAS" in error["message"] and "add-backend" in error["message"]
    ready = await gateway.get("/readyz")
    assert ready.status == 503
    assert "no backend in the pool" in (await ready.json())["backend"]


async def test_a_member_added_while_two_gateways_run_is_used_by_b_within_one_second(
    start_gateway, db, aiohttp_server
):
    member = FakeUpstream()
    server = await aiohttp_server(member.make_app())
    first = await shared_gateway(start_gateway)
    second = await shared_gateway(start_gateway)
    key = await add_user(db, "alice")
    added = time.monotonic()
    await add_member(db, url_of(server), "gpu1")
    await wait_until(
        lambda: second.app[appkeys.BACKENDS].members, "gateway B to see the member", timeout=1.0
    )
    response = await post_chat(second, key)
    assert response.status == 200, await response.text()
    assert time.monotonic() - added < 1.0
    assert first.app[appkeys.BACKENDS].members  # A too
    # The member's own key went upstream, never the gateway's local one.
    assert member.seen[-1].headers["Authorization"] == f"Bearer {MEMBER_KEY}"
    assert second.app[appkeys.QUEUE]._concurrency == 1
    # The slot was given back (the NOTIFY wakes other gateways' waiters).
    member_id = next(iter(second.app[appkeys.BACKENDS].members))
    await wait_until(_all_free(db, member_id), "the slot given back")


def _all_free(db, member_id):
    async def check():
        return all(holder is None for holder in await holders(db, member_id))

    return check


async def test_two_gateways_never_send_two_requests_at_once_to_a_slot(
    start_gateway, db, aiohttp_server
):
    members = [CountingUpstream(), CountingUpstream()]
    servers = [await aiohttp_server(member.make_app()) for member in members]
    gateways = [await shared_gateway(start_gateway) for _ in range(2)]
    for number, server in enumerate(servers):
        await add_member(db, url_of(server), f"gpu{number}")
    for gateway in gateways:
        await wait_until(lambda g=gateway: len(g.app[appkeys.BACKENDS].members) == 2, "members")
    keys = [await add_user(db, f"user{n}") for n in range(4)]
    responses = await asyncio.gather(*(post_chat(gateways[n % 2], keys[n % 4]) for n in range(24)))
    assert [response.status for response in responses] == [200] * 24
    assert [member.peak for member in members] == [1, 1]
    assert sum(member.chats for member in members) == 24
    assert all(member.chats for member in members)  # both members served
