"""Per-user concurrency: a user's cap on requests at the backend at once, in the fair queue."""

from __future__ import annotations

import asyncio

import pytest
from gatewayhelpers import DEADLINE, add_user, bearer, chat, wait_until

from proxy import appkeys
from proxy.auth import Identity
from proxy.handlers import concurrency_cap

pytest_plugins = ["gatewayfixture"]


def test_a_users_own_cap_overrides_the_gateway_default_and_zero_means_none():
    def identity(limit: int | None) -> Identity:
        return Identity("alice", "0123456789ab", None, concurrency_limit=limit)

    assert concurrency_cap(identity(None), 2) == 2
    assert concurrency_cap(identity(1), 2) == 1
    assert concurrency_cap(identity(0), 2) == 0  # no cap for this user, whatever the default


@pytest.mark.asyncio
async def test_a_capped_users_requests_never_overlap_at_the_backend_while_others_run(
    start_gateway, db, upstream
):
    gateway = await start_gateway(backend_concurrency=2)
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    queue = gateway.app[appkeys.QUEUE]
    cache = gateway.app[appkeys.AUTHENTICATOR].cache

    async def call(key: str, user: str) -> int:
        response = await gateway.post(
            "/v1/chat/completions", json=chat(user=user), headers=bearer(key)
        )
        await response.read()
        return response.status

    assert await call(alice, "alice") == 200  # the gateway now holds alice, uncapped
    generation = cache.generation
    await db.execute("UPDATE users SET concurrency_limit = 1 WHERE username = 'alice'")
    await wait_until(lambda: cache.generation != generation, "the change to reach the gateway")

    upstream.gate = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(call(alice, "alice"))]
    await wait_until(lambda: upstream.answering["alice"] == 1, "alice's first at the backend")
    tasks.append(asyncio.create_task(call(alice, "alice")))
    await wait_until(
        lambda: queue.stats().waiting or upstream.answering["alice"] == 2, "alice's second"
    )
    tasks.append(asyncio.create_task(call(bob, "bob")))
    await wait_until(
        lambda: "bob" in upstream.answering or "bob" in queue.stats().waiting_by_user, "bob"
    )
    # bob runs alongside alice's first, though alice's second came before him.
    assert upstream.answering == {"alice": 1, "bob": 1}
    assert queue.stats().waiting_by_user == {"alice": 1}

    upstream.allow(3)
    assert await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE) == [200] * 3
    assert upstream.peak_answering == {"alice": 1, "bob": 1}
    assert [s.body["user"] for s in upstream.seen] == ["alice", "alice", "bob", "alice"]


@pytest.mark.asyncio
async def test_v1_me_shows_the_gateway_default_cap_then_the_users_own(start_gateway, db):
    gateway = await start_gateway(user_concurrency=3)
    key = await add_user(db, "alice")
    cache = gateway.app[appkeys.AUTHENTICATOR].cache

    async def shown_cap() -> int | None:
        response = await gateway.get("/v1/me", headers=bearer(key))
        assert response.status == 200
        return (await response.json())["concurrency"]["limit"]

    assert await shown_cap() == 3
    for own, shown in ((1, 1), (0, None)):  # 0: no cap for alice, shown as null
        generation = cache.generation
        await db.execute("UPDATE users SET concurrency_limit = $1 WHERE username = 'alice'", own)
        await wait_until(lambda g=generation: cache.generation != g, "the change to arrive")
        assert await shown_cap() == shown
