"""A short per-user cache of the figures /v1/me shows, so that polling it is cheap.

A client polling /v1/me in a loop costs one pair of database queries per
LLAMA_PROXY_ME_CACHE_SECONDS, and the figures it sees are at most that old.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Expired entries are swept once the cache holds this many users.
SWEEP_AT_ENTRIES = 1000


@dataclass(frozen=True)
class UserFigures:
    """What /v1/me reads from the database for one user."""

    rate_slots_used: int
    usage_last_24h: dict[str, int]
    tokens: dict[str, dict] | None = None  # each token budget (proxy/tokengate.py)


class UserFiguresCache:
    """Each user's figures, kept for `ttl` seconds; the clock is injected for tests."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.entries: dict[str, tuple[float, UserFigures]] = {}

    def get(self, username: str) -> UserFigures | None:
        entry = self.entries.get(username)
        if entry is None or self.clock() >= entry[0]:
            return None
        return entry[1]

    def put(self, username: str, figures: UserFigures) -> None:
        now = self.clock()
        if len(self.entries) >= SWEEP_AT_ENTRIES:
            self.entries = {name: e for name, e in self.entries.items() if now < e[0]}
        self.entries[username] = (now + self.ttl, figures)
