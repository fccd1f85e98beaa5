"""/readyz's checks, remembered for about a second and shared by concurrent callers.

Each check costs a backend probe and a database round trip. A load balancer polling every
gateway often, or anyone hammering the unauthenticated route, would otherwise multiply
them; now they cost at most one of each per `max_age` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

READY_CACHE_SECONDS = 1.0

Checks = dict[str, str]


class ReadinessCache:
    """The last result of `check`, for up to max_age seconds; one check runs at a time."""

    def __init__(
        self,
        check: Callable[[], Awaitable[Checks]],
        max_age: float = READY_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.max_age = max_age
        self.clock = clock
        self._result: Checks | None = None
        self._checked_at = float("-inf")
        self._running: asyncio.Future[Checks] | None = None

    async def get(self) -> Checks:
        if self._result is not None and self.clock() - self._checked_at < self.max_age:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        # Shielded: a caller that hangs up must not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _refresh(self) -> Checks:
        try:
            result = await self.check()
            self._result, self._checked_at = result, self.clock()
            return result
        finally:
            self._running = None
