"""How many refused keys (401s) one client address may cause: a token bucket per address.

Each address may run up `per_minute` refusals at once, and earns them back at that rate.
Past that, its requests get 429 before any key lookup, so a flood of made-up keys costs
neither the database nor the valid users' cache. Keys the cache holds as valid are still
let through (the caller checks that), so a user behind the same address (NAT, a reverse
proxy) is not locked out by someone else's typos, or their own. The table of addresses
is bounded: past `max_addresses` the least recently refused one is forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_ADDRESSES = 10_000


class AuthFailureLimiter:
    """Refusals per client address; `per_minute` 0 turns the limit off."""

    def __init__(
        self,
        per_minute: int,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self.max_addresses = max_addresses
        self.clock = clock
        # address -> (tokens left, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until this address may try a key again; None if it may now."""
        if not self.capacity or address not in self._buckets:
            return None
        tokens = self._tokens(address, self.clock())
        if tokens >= 1.0:
            return None
        return max((1.0 - tokens) / self.refill_per_second, 0.001)

    def note_failure(self, address: str) -> None:
        """Count one refused key from this address."""
        if not self.capacity:
            return
        now = self.clock()
        tokens = self._tokens(address, now) if address in self._buckets else self.capacity
        self._buckets[address] = (max(tokens - 1.0, 0.0), now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def _tokens(self, address: str, now: float) -> float:
        tokens, counted_at = self._buckets[address]
        tokens = min(self.capacity, tokens + (now - counted_at) * self.refill_per_second)
        if tokens >= self.capacity:
            del self._buckets[address]  # back to full: nothing left to remember
        return tokens
