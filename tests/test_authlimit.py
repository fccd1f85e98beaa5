"""proxy/authlimit.py and its use: refused keys per client address, and what a flood costs."""

from __future__ import annotations

import pytest
from gatewayhelpers import add_user, bearer, chat, wait_until

from proxy import appkeys, store
from proxy.authlimit import AuthFailureLimiter
from proxy.keys import digest_key, generate_key

pytest_plugins = ["gatewayfixture"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_address_may_fail_a_burst_then_earns_attempts_back_at_the_rate():
    clock = Clock()
    limiter = AuthFailureLimiter(per_minute=3, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("198.51.100.7") is None
        limiter.note_failure("198.51.100.7")
    assert limiter.retry_after("198.51.100.7") == pytest.approx(20.0)  # 60 s / 3
    assert limiter.retry_after("198.51.100.8") is None  # other addresses are not affected
    clock.now += 15.0
    assert limiter.retry_after("198.51.100.7") == pytest.approx(5.0)
    clock.now += 5.0
    assert limiter.retry_after("198.51.100.7") is None


def test_zero_turns_the_limit_off():
    limiter = AuthFailureLimiter(per_minute=0, clock=Clock())
    for _ in range(100):
        limiter.note_failure("198.51.100.7")
    assert limiter.retry_after("198.51.100.7") is None


def test_the_table_of_addresses_is_bounded():
    limiter = AuthFailureLimiter(per_minute=1, max_addresses=2, clock=Clock())
    for address in ("a", "b", "c"):
        limiter.note_failure(address)
    assert [limiter.retry_after(a) is None for a in ("a", "b", "c")] == [True, False, False]


@pytest.mark.asyncio
async def test_a_flood_of_made_up_keys_gets_429_without_lookups_and_spares_valid_users(
    start_gateway, db, monkeypatch
):
    gateway = await start_gateway(auth_failures_per_minute=5)
    alice = await add_user(db, "alice")
    cache = gateway.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")
    assert (await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(alice))).ok
    lookups = []
    real_fetch_key = store.fetch_key

    async def counting_fetch_key(pool, digest):
        lookups.append(digest)
        return await real_fetch_key(pool, digest)

    monkeypatch.setattr(store, "fetch_key", counting_fetch_key)
    statuses = []
    for _ in range(50):
        made_up = bearer(generate_key().secret_key)
        response = await gateway.post("/v1/chat/completions", json=chat(), headers=made_up)
        statuses.append(response.status)
    assert statuses == [401] * 5 + [429] * 45
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["error"]["code"] == "too_many_auth_failures"
    assert len(lookups) <= 5
    # Same address, but a key the gateway knows valid: served, and still cached.
    answer = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(alice))
    assert answer.status == 200
    assert digest_key(alice) in cache.entries
