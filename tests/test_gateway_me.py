"""/v1/me answers each user's figures from a short cache (proxy/me.py, proxy/usercache.py)."""

from __future__ import annotations

import pytest
from gatewayhelpers import add_user, bearer, chat, log_rows, wait_until

from proxy.usercache import UserFigures, UserFiguresCache

pytest_plugins = ["gatewayfixture"]

FIGURES = UserFigures(3, {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3})


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cached_figures_are_kept_for_the_ttl_and_not_after():
    clock = FakeClock()
    cache = UserFiguresCache(ttl=1.0, clock=clock)
    assert cache.get("alice") is None
    cache.put("alice", FIGURES)
    clock.now += 0.999
    assert cache.get("alice") == FIGURES
    assert cache.get("bob") is None  # per user
    clock.now += 0.001
    assert cache.get("alice") is None


def test_expired_figures_are_swept_once_the_cache_is_large(monkeypatch):
    monkeypatch.setattr("proxy.usercache.SWEEP_AT_ENTRIES", 3)
    clock = FakeClock()
    cache = UserFiguresCache(ttl=1.0, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(name, FIGURES)
    clock.now += 2
    cache.put("d", FIGURES)
    assert set(cache.entries) == {"d"}


async def me(gateway, key: str) -> dict:
    response = await gateway.get("/v1/me", headers=bearer(key))
    assert response.status == 200
    return await response.json()


async def chat_and_wait_for_its_row(gateway, db, key: str) -> None:
    """A chat request whose log row (with tokens) has reached the database."""
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status == 200
    await wait_until(
        lambda: log_rows(db, "path = '/v1/chat/completions'"), "the chat's row in the database"
    )


@pytest.mark.asyncio
async def test_two_quick_calls_to_me_cost_one_database_read(start_gateway, db):
    gateway = await start_gateway(me_cache_seconds=3600)
    key = await add_user(db, "alice")
    first = await me(gateway, key)
    await chat_and_wait_for_its_row(gateway, db, key)
    # The database now has one more request and one more rate slot for alice; an answer
    # that does not show them was not read from the database.
    second = await me(gateway, key)
    assert second == first
    assert first["usage_last_24h"]["prompt_tokens"] == 0


@pytest.mark.asyncio
async def test_me_shows_a_change_once_its_cache_expires(start_gateway, db):
    gateway = await start_gateway(me_cache_seconds=0.2)
    key = await add_user(db, "alice")
    before = await me(gateway, key)
    await chat_and_wait_for_its_row(gateway, db, key)

    async def shows_the_chat() -> bool:
        now = await me(gateway, key)
        return now["usage_last_24h"]["prompt_tokens"] == 7  # fakeupstream's USAGE

    await wait_until(shows_the_chat, "/v1/me to show the chat")
    after = await me(gateway, key)
    assert after["rate_limit"]["remaining"] < before["rate_limit"]["remaining"]
