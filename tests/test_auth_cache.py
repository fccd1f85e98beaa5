"""proxy/auth.py's cache and outage rules as pure logic: LRU, unknown digests, the grace.

A stand-in pool answers or fails the one query auth makes; the gateway tests run the same
code against the real database.
"""

from __future__ import annotations

import pytest

from proxy import auth
from proxy.auth import AuthCache, Authenticator, CacheEntry
from proxy.config import ProxyConfigError, load_config
from proxy.errors import GatewayError
from proxy.keys import generate_key
from proxy.store import KeyRecord

VALID = KeyRecord("0123456789ab", "alice", None, False, None, None)


def digest(number: int) -> bytes:
    return number.to_bytes(32, "big")


def test_a_full_cache_evicts_the_least_recently_used_key_only():
    cache = AuthCache(max_entries=3)
    for number in range(3):
        cache.put(digest(number), CacheEntry(VALID, 0.0), cache.generation)
    assert cache.get(digest(0)) is not None  # used: now the most recent
    cache.put(digest(3), CacheEntry(VALID, 0.0), cache.generation)
    assert [cache.get(digest(n)) is not None for n in range(4)] == [True, False, True, True]


def test_a_flood_of_unknown_digests_leaves_known_keys_cached():
    cache = AuthCache(max_entries=10, max_unknown=5)
    cache.put(digest(0), CacheEntry(VALID, 0.0), cache.generation)
    for number in range(1, 1000):
        cache.put(digest(number), CacheEntry(None, 0.0), cache.generation)
    assert cache.get(digest(0)).record == VALID
    assert len(cache.unknown) == 5 and len(cache.entries) == 1
    assert cache.get(digest(999)).record is None  # the newest unknown are remembered


class CountingPool:
    """Answers auth's one query from a dict, or fails as an unreachable database does."""

    def __init__(self, records: dict[bytes, KeyRecord]) -> None:
        self.records = records
        self.queries = 0
        self.is_down = False

    async def fetchrow(self, _sql: str, digest: bytes):
        self.queries += 1
        if self.is_down:
            raise ConnectionRefusedError(111, "Connection refused")
        record = self.records.get(digest)
        return None if record is None else record.__dict__


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listening_authenticator(pool: CountingPool, grace: float) -> tuple[Authenticator, Clock]:
    clock = Clock()
    cache = AuthCache()
    cache.is_listening = True
    cache.confirm(clock.now)
    return Authenticator(pool, cache, grace, clock), clock


@pytest.mark.asyncio
async def test_an_unknown_key_sent_again_costs_one_database_lookup():
    pool = CountingPool({})
    authenticator, clock = listening_authenticator(pool, grace=30)
    made_up = generate_key().secret_key
    for _ in range(50):
        with pytest.raises(GatewayError) as refused:
            await authenticator.authenticate(made_up)
        assert refused.value.status == 401
    assert pool.queries == 1
    clock.now += auth.UNKNOWN_TTL_SECONDS  # remembered briefly only
    with pytest.raises(GatewayError):
        await authenticator.authenticate(made_up)
    assert pool.queries == 2


async def cache_then_lose_the_database(grace: float) -> tuple[Authenticator, Clock, str]:
    """A key checked at t=1000; the listener confirms the cache until t=1100, then the
    database goes away."""
    key = generate_key()
    pool = CountingPool({key.digest: VALID})
    authenticator, clock = listening_authenticator(pool, grace)
    await authenticator.authenticate(key.secret_key)
    clock.now = 1100.0
    authenticator.cache.confirm(clock.now)
    authenticator.cache.is_listening = False  # the listener noticed the outage
    pool.is_down = True
    return authenticator, clock, key.secret_key


@pytest.mark.asyncio
async def test_outage_grace_counts_from_when_the_cache_was_last_known_current():
    authenticator, clock, key = await cache_then_lose_the_database(grace=30)
    clock.now = 1125.0  # 125 s after the check, 25 s after the last confirmation
    assert (await authenticator.authenticate(key)).username == "alice"
    clock.now = 1130.0
    with pytest.raises(GatewayError) as refused:
        await authenticator.authenticate(key)
    assert (refused.value.status, refused.value.code) == (503, "db_down")


@pytest.mark.asyncio
async def test_outage_grace_zero_fails_closed():
    authenticator, clock, key = await cache_then_lose_the_database(grace=0)
    with pytest.raises(GatewayError) as refused:
        await authenticator.authenticate(key)
    assert (refused.value.status, refused.value.code) == (503, "db_down")


@pytest.mark.asyncio
async def test_an_unseen_key_is_never_accepted_without_the_database():
    authenticator, clock, _ = await cache_then_lose_the_database(grace=30)
    with pytest.raises(GatewayError) as refused:
        await authenticator.authenticate(generate_key().secret_key)
    assert refused.value.status == 503


def test_outage_grace_accepts_zero_and_defaults_to_30_seconds():
    dsn = {"POSTGRES_AUTH_DSN": "postgresql://gate@db/llama"}
    assert load_config(dsn).auth_outage_grace_seconds == 30.0
    zero = {**dsn, "LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS": "0"}
    assert load_config(zero).auth_outage_grace_seconds == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ProxyConfigError, match="LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS"):
            load_config({**dsn, "LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS": bad})
