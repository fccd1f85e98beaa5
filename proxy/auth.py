"""Who is calling: the API key from the headers, checked against a cache of the database.

The cache makes the hot path free of database round trips. It stays correct because
PostgreSQL notifies every gateway (LISTEN/NOTIFY, sent by triggers) when users or keys
change, and the cache is then emptied; revocation reaches all gateways within about a
notification's latency (auth's channel is one of those the gateway's one LISTEN
connection hears, proxy/listener.py). While that connection is down, every request goes
to the database, and if the database itself is unreachable, keys whose valid verdict was
known to be current within LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS keep working (0: none);
everything else gets 503.

The cache holds two bounded LRU maps: known keys, and digests the database did not know.
Made-up keys therefore never push a valid user's entry out, and a made-up key sent again
and again costs one lookup, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from proxy import store
from proxy.errors import unauthorized, unavailable
from proxy.keys import digest_key, is_plausible_key
from proxy.listener import Subscription
from proxy.migrations import AUTH_CHANNEL

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 100_000
# Unknown digests are cheap to forget and an attacker makes up as many as they like.
MAX_CACHED_UNKNOWN = 10_000
# A safety net: even with notifications flowing, re-check a key this often.
CACHE_TTL_SECONDS = 300.0
# A new key clears the cache by notification anyway; this only bounds a missed one.
UNKNOWN_TTL_SECONDS = 30.0
HOW_TO_SEND = "send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    username: str
    key_id: str
    rate_limit: int | None
    digest: bytes = field(default=b"", repr=False)  # to re-check the key later, cheaply
    concurrency_limit: int | None = None  # None: the gateway's default; 0: no cap
    # The user's own token limits (None: the gateway's default); see proxy/tokenbudget.py.
    token_limits: tuple[int | None, int | None, int | None] = (None, None, None)


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

    def __init__(
        self, max_entries: int = MAX_CACHED_KEYS, max_unknown: int = MAX_CACHED_UNKNOWN
    ) -> None:
        self.entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self.unknown: OrderedDict[bytes, float] = OrderedDict()  # digest -> checked_at
        self.max_entries = max_entries
        self.max_unknown = max_unknown
        # Bumped by clear(), so a lookup that raced with a change is not cached stale.
        self.generation = 0
        self.is_listening = False
        # When the listener last confirmed its connection: every cached verdict was
        # current then, since any change since would have emptied the cache first.
        self.confirmed_at = float("-inf")

    def get(self, digest: bytes) -> CacheEntry | None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.entries.move_to_end(digest)
            return entry
        checked_at = self.unknown.get(digest)
        return None if checked_at is None else CacheEntry(None, checked_at)

    def put(self, digest: bytes, entry: CacheEntry, generation: int) -> None:
        if generation != self.generation:
            return
        if entry.record is None:
            _put_bounded(self.unknown, digest, entry.checked_at, self.max_unknown)
        else:
            _put_bounded(self.entries, digest, entry, self.max_entries)

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()
        self.unknown.clear()

    def confirm(self, now: float) -> None:
        """The listener's connection is alive: every cached verdict is current as of now."""
        self.confirmed_at = now

    def verified_at(self, entry: CacheEntry) -> float:
        """The latest moment the entry's verdict is known to have been current."""
        return max(entry.checked_at, self.confirmed_at)


def _put_bounded(lru: OrderedDict, digest: bytes, value: object, max_size: int) -> None:
    """Insert as most recently used; evict the least recently used past max_size."""
    lru[digest] = value
    lru.move_to_end(digest)
    while len(lru) > max_size:
        lru.popitem(last=False)


def refusal(record: store.KeyRecord | None, now: datetime) -> tuple[str, str] | None:
    """Why a key record is refused: (reason code, message, never the key), or None."""
    if record is None:
        return "unknown_key", "invalid API key; ask the operator for a key"
    if record.revoked_at is not None:
        return "key_revoked", f"API key {record.key_id} has been revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "key_expired", f"API key {record.key_id} has expired"
    if record.is_disabled:
        return "user_disabled", f"user {record.username!r} is disabled"
    return None


def judge(record: store.KeyRecord | None, now: datetime, digest: bytes = b"") -> Identity:
    """The caller behind a key record, or a 401 that says why (never the key itself)."""
    refused = refusal(record, now)
    if refused is not None:
        raise unauthorized(refused[1])
    assert record is not None
    own_tokens = (record.tokens_per_minute, record.daily_token_quota, record.monthly_token_quota)
    return Identity(
        record.username,
        record.key_id,
        record.rate_limit,
        digest,
        concurrency_limit=record.concurrency_limit,
        token_limits=own_tokens,
    )


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
        """The caller behind a key, or GatewayError 401 (bad key) or 503 (no database)."""
        if not is_plausible_key(secret_key):
            raise unauthorized("invalid API key; ask the operator for a key")
        return await self.identify(digest_key(secret_key))

    async def identify(self, digest: bytes) -> Identity:
        """authenticate() for a key digest."""
        return judge(await self.lookup(digest), datetime.now(UTC), digest)

    async def lookup(self, digest: bytes) -> store.KeyRecord | None:
        """What is known of a key: from the cache while it is kept fresh, else the database.

        Without the database, a cached record within the outage grace, else 503.
        """
        entry = self.cache.get(digest)
        now = self.clock()
        if entry and self.cache.is_listening and now - entry.checked_at < _ttl(entry):
            return entry.record
        generation = self.cache.generation
        try:
            record = await store.fetch_key(self.pool, digest)
        except store.UNAVAILABLE_ERRORS as error:
            return self._record_during_outage(entry, now, error)
        self.cache.put(digest, CacheEntry(record, now), generation)
        return record

    def is_cached_valid(self, secret_key: str) -> bool:
        """Whether the cache holds this key as valid right now (no database involved)."""
        if not is_plausible_key(secret_key):
            return False
        entry = self.cache.entries.get(digest_key(secret_key))
        if entry is None or not self.cache.is_listening:
            return False
        return refusal(entry.record, datetime.now(UTC)) is None

    def _record_during_outage(
        self, entry: CacheEntry | None, now: float, error: BaseException
    ) -> store.KeyRecord | None:
        log.warning("auth: database unreachable (%s); using cached keys", type(error).__name__)
        # Only a verdict known to be current within the grace counts, and never an unknown
        # digest: with grace 0 (fail closed) nothing is accepted without the database.
        if entry is None or entry.record is None or self._is_stale(entry, now):
            raise unavailable(
                "the key database is unreachable; try again shortly", retry_after=5, code="db_down"
            ) from None
        return entry.record

    def _is_stale(self, entry: CacheEntry, now: float) -> bool:
        return now - self.cache.verified_at(entry) >= self.outage_grace_seconds


def _ttl(entry: CacheEntry) -> float:
    return CACHE_TTL_SECONDS if entry.record is not None else UNKNOWN_TTL_SECONDS


def change_subscription(
    cache: AuthCache, on_change: Callable[[], None] = lambda: None
) -> Subscription:
    """Auth's part of the gateway's LISTEN connection (proxy/listener.py): on each user or
    key change, empty the cache and call on_change; distrust the cache while not listening.
    """

    def changed() -> None:
        cache.clear()
        on_change()

    def start_listening() -> None:
        changed()  # changes made while nobody listened were missed: start from empty
        cache.is_listening = True
        cache.confirm(time.monotonic())

    def stop_listening() -> None:
        cache.is_listening = False

    return Subscription(
        channel=AUTH_CHANNEL,
        on_notify=lambda _payload: changed(),
        on_listening=start_listening,
        on_lost=stop_listening,
        on_probe=lambda: cache.confirm(time.monotonic()),
    )
