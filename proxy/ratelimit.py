"""Per-user rate limits: at most N requests in any sliding window of W seconds.

The count is exact, not a fixed window: a user never gets more than N admissions in
any W-second span. It is kept in PostgreSQL (llamagate_take_slots) so that every
gateway sharing the database counts together. To keep the round trips down, requests
that arrive while one round trip is in flight are sent together in the next one, and a
user known to be over the limit is refused locally until a slot frees. If the database
is unreachable, each gateway falls back to its own exact local window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from proxy import store

log = logging.getLogger(__name__)

TakeSlots = Callable[
    [Sequence[str], Sequence[int], Sequence[int], Sequence[float]],
    Awaitable[dict[str, store.SlotGrant]],
]


@dataclass(frozen=True)
class Decision:
    """The limiter's answer for one request, with what the X-RateLimit headers say."""

    is_allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the whole allowance is back
    retry_after: float = 0.0  # until the next request is allowed, when refused

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_seconds)),
        }


class SlidingWindow:
    """An exact sliding-window log per user, in memory. Pure logic: the caller gives now."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.stamps: dict[str, deque[float]] = defaultdict(deque)

    def _live(self, user: str, now: float) -> deque[float]:
        stamps = self.stamps[user]
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        return stamps

    def allow(self, user: str, limit: int, now: float) -> Decision:
        """Admit and record one request if the window has room."""
        stamps = self._live(user, now)
        if len(stamps) >= limit:
            retry_after = stamps[-limit] + self.window - now
            return Decision(False, limit, 0, stamps[-1] + self.window - now, retry_after)
        stamps.append(now)
        return Decision(True, limit, limit - len(stamps), stamps[-1] + self.window - now)

    def record(self, user: str, now: float) -> None:
        """Note an admission decided elsewhere (the database), for the fallback."""
        self._live(user, now).append(now)


@dataclass
class _Pending:
    user: str
    limit: int
    future: asyncio.Future


class SharedLimiter:
    """Asks the database for slots, batching concurrent requests into one round trip."""

    def __init__(
        self, take_slots: TakeSlots, window: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.take_slots = take_slots
        self.window = window
        self.clock = clock
        self.local = SlidingWindow(window)
        # user -> (refused until, for which limit, full allowance back at); local clock.
        self.refused_until: dict[str, tuple[float, int, float]] = {}
        self.pending: list[_Pending] = []
        self.flusher: asyncio.Task | None = None
        self.is_database_down = False

    async def acquire(self, user: str, limit: int) -> Decision:
        """Admit one request for user, or refuse it with the true wait."""
        known = self._refused_locally(user, limit)
        if known is not None:
            return known
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(user, limit, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush_all())
        return await future

    def _refused_locally(self, user: str, limit: int) -> Decision | None:
        # The database said this user is full until a slot frees: no need to ask again.
        until, known_limit, reset_at = self.refused_until.get(user, (0.0, 0, 0.0))
        now = self.clock()
        if until <= now or known_limit != limit:
            return None
        return Decision(False, limit, 0, reset_at - now, until - now)

    async def _flush_all(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self._flush(batch)
            except Exception as error:  # the limiter must never strand a request
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)

    async def _flush(self, batch: list[_Pending]) -> None:
        by_user: dict[str, list[_Pending]] = defaultdict(list)
        for item in batch:
            by_user[item.user].append(item)
        users = list(by_user)
        limits = [by_user[user][0].limit for user in users]
        try:
            grants = await self.take_slots(
                users, [len(by_user[u]) for u in users], limits, [self.window] * len(users)
            )
        except store.UNAVAILABLE_ERRORS as error:
            self._note_database(is_down=True, error=error)
            for item in batch:
                item.future.set_result(self.local.allow(item.user, item.limit, self.clock()))
            return
        self._note_database(is_down=False)
        for user, items in by_user.items():
            self._answer(items, grants[user])

    def _answer(self, items: list[_Pending], grant: store.SlotGrant) -> None:
        limit = items[0].limit
        before = grant.used - grant.granted
        reset = (grant.newest or grant.now) + self.window - grant.now
        local_now = self.clock()
        for index, item in enumerate(items):
            if index < grant.granted:
                self.local.record(item.user, local_now)
                decision = Decision(True, limit, limit - (before + index + 1), reset)
            else:
                retry_after = max((grant.oldest or grant.now) + self.window - grant.now, 0.001)
                self.refused_until[item.user] = (
                    local_now + retry_after,
                    limit,
                    local_now + reset,
                )
                decision = Decision(False, limit, 0, reset, retry_after)
            item.future.set_result(decision)

    def _note_database(self, is_down: bool, error: BaseException | None = None) -> None:
        if is_down and not self.is_database_down:
            log.warning(
                "rate limits: database unreachable (%s); counting per gateway until it returns",
                type(error).__name__,
            )
        elif not is_down and self.is_database_down:
            log.warning("rate limits: database is back; counting across gateways again")
        self.is_database_down = is_down
