"""Who is calling: the API key from the headers, checked against a cache of the database.

The cache makes the hot path free of database round trips. It stays correct because
PostgreSQL notifies every gateway (LISTEN/NOTIFY, sent by triggers) when users or keys
change, and the cache is then emptied; revocation reaches all gateways within about a
notification's latency. While the notification connection is down, every request goes
to the database, and if the database itself is unreachable, keys that were verified
within LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS keep working; everything else gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from proxy import store
from proxy.errors import unauthorized, unavailable
from proxy.keys import digest_key, is_plausible_key
from proxy.migrations import AUTH_CHANNEL

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 100_000
# A safety net: even with notifications flowing, re-check a key this often.
CACHE_TTL_SECONDS = 300.0
LISTENER_RETRY_SECONDS = 1.0
HOW_TO_SEND = "send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    username: str
    key_id: str
    rate_limit: int | None


def extract_key(headers: Mapping[str, str]) -> str:
    """The one API key the request carries; GatewayError(401) if none or ambiguous."""
    bearer = headers.getall("Authorization", [])  # type: ignore[attr-defined]
    api_key = headers.getall("X-API-Key", [])  # type: ignore[attr-defined]
    if not bearer and not api_key:
        raise unauthorized(f"no API key; {HOW_TO_SEND}")
    if len(bearer) + len(api_key) > 1:
        raise unauthorized(f"more than one API key in the request; {HOW_TO_SEND} once")
    if api_key:
        return api_key[0].strip()
    scheme, _, token = bearer[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(f"the Authorization header is not 'Bearer KEY'; {HOW_TO_SEND}")
    return token.strip()


@dataclass
class CacheEntry:
    record: store.KeyRecord | None  # None: no such key
    checked_at: float


class AuthCache:
    """Key digest -> what the database said, and when. Emptied on every notification."""

    def __init__(self, max_entries: int = MAX_CACHED_KEYS) -> None:
        self.entries: dict[bytes, CacheEntry] = {}
        self.max_entries = max_entries
        # Bumped by clear(), so a lookup that raced with a change is not cached stale.
        self.generation = 0
        self.is_listening = False

    def get(self, digest: bytes) -> CacheEntry | None:
        return self.entries.get(digest)

    def put(self, digest: bytes, entry: CacheEntry, generation: int) -> None:
        if generation != self.generation:
            return
        if len(self.entries) >= self.max_entries:
            # Random keys from an attacker must not grow memory without bound.
            self.entries.clear()
        self.entries[digest] = entry

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()


def judge(record: store.KeyRecord | None, now: datetime) -> Identity:
    """The caller behind a key record, or a 401 that says why (never the key itself)."""
    if record is None:
        raise unauthorized("invalid API key; ask the operator for a key")
    if record.revoked_at is not None:
        raise unauthorized(f"API key {record.key_id} has been revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise unauthorized(f"API key {record.key_id} has expired")
    if record.is_disabled:
        raise unauthorized(f"user {record.username!r} is disabled")
    return Identity(record.username, record.key_id, record.rate_limit)


class Authenticator:
    """Turns a request's key into an Identity, through the cache or the database."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: AuthCache,
        outage_grace_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.outage_grace_seconds = outage_grace_seconds
        self.clock = clock

    async def authenticate(self, secret_key: str) -> Identity:
        if not is_plausible_key(secret_key):
            raise unauthorized("invalid API key; ask the operator for a key")
        digest = digest_key(secret_key)
        entry = self.cache.get(digest)
        now = self.clock()
        if entry and self.cache.is_listening and now - entry.checked_at < CACHE_TTL_SECONDS:
            return judge(entry.record, datetime.now(UTC))
        generation = self.cache.generation
        try:
            record = await store.fetch_key(self.pool, digest)
        except store.UNAVAILABLE_ERRORS as error:
            return self._judge_during_outage(entry, now, error)
        self.cache.put(digest, CacheEntry(record, now), generation)
        return judge(record, datetime.now(UTC))

    def _judge_during_outage(
        self, entry: CacheEntry | None, now: float, error: BaseException
    ) -> Identity:
        log.warning("auth: database unreachable (%s); using cached keys", type(error).__name__)
        if entry is None or now - entry.checked_at >= self.outage_grace_seconds:
            raise unavailable(
                "the key database is unreachable; try again shortly", retry_after=5, code="db_down"
            ) from None
        return judge(entry.record, datetime.now(UTC))


async def listen_for_changes(dsn: str, cache: AuthCache) -> None:
    """Forever: LISTEN for user and key changes and empty the cache on each one."""
    has_warned = False
    while True:
        try:
            conn = await store.connect(dsn)
        except store.StoreError as error:
            if not has_warned:  # once per outage, not once a second
                log.warning("auth listener: %s; retrying every %ss", error, LISTENER_RETRY_SECONDS)
                has_warned = True
        else:
            has_warned = False
            try:
                await _listen_until_lost(conn, cache)
            except store.UNAVAILABLE_ERRORS as error:
                log.warning("auth listener lost its connection (%s)", type(error).__name__)
            finally:
                cache.is_listening = False
                conn.terminate()
        await asyncio.sleep(LISTENER_RETRY_SECONDS)


async def _listen_until_lost(conn: asyncpg.Connection, cache: AuthCache) -> None:
    lost = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _conn: lost.done() or lost.set_result(None))
    await conn.add_listener(AUTH_CHANNEL, lambda *_args: cache.clear())
    # Changes made while nobody listened were missed: start from empty.
    cache.clear()
    cache.is_listening = True
    # The termination callback is not fired when the server vanishes without a word
    # (kill -9, network), so also probe now and then.
    while not lost.done():
        try:
            await asyncio.wait_for(asyncio.shield(lost), timeout=2.0)
        except TimeoutError:
            await conn.fetchval("SELECT 1", timeout=2.0)
