"""Per-user rate limits: at most N requests in any sliding window of W seconds.

The count is exact, not a fixed window: a user never gets more than N admissions in
any W-second span. It is kept in PostgreSQL (llamagate_lease_slots) so that every
gateway sharing the database counts together. To keep the round trips down, requests
that arrive while one round trip is in flight are sent together in the next one, a
user who keeps sending spends small leases of slots without asking (see SharedLimiter),
and a user known to be over the limit is refused locally until a slot frees. If the
database is unreachable, each gateway falls back to its own exact local window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from proxy import store
from proxy.outage import log_limiter_database

log = logging.getLogger(__name__)

# (users, wanted, limits, windows, extra to lease, lease seconds) -> grants by user
TakeSlots = Callable[
    [Sequence[str], Sequence[int], Sequence[int], Sequence[float], Sequence[int], float],
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


class Lease:
    """Slots the database leased to this gateway for one user, spendable without asking.

    Kept as chunks (slots, usable until), oldest first: each chunk was stamped in the
    database at its own end time, so a slot must never be spent after its chunk ends.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: deque[list[float]] = deque()  # [slots, usable until]
        self.size = 0  # how many slots the last lease asked for
        self.is_refilling = False

    def add(self, slots: int, until: float) -> None:
        if slots > 0:
            self.chunks.append([slots, until])

    def slots(self, now: float) -> int:
        while self.chunks and self.chunks[0][1] <= now:
            self.chunks.popleft()
        return int(sum(chunk[0] for chunk in self.chunks))

    def take(self, now: float) -> bool:
        """Spend one slot if a live chunk has one."""
        if self.slots(now) == 0:
            return False
        self.chunks[0][0] -= 1
        if self.chunks[0][0] == 0:
            self.chunks.popleft()
        return True


@dataclass
class _Pending:
    user: str
    limit: int
    future: asyncio.Future | None  # None: a lease refill that no request waits for


class SharedLimiter:
    """Asks the database for slots, batching concurrent requests into one round trip.

    A user who keeps sending gets a small lease with each answer (at most LEASE_SHARE of
    the limit, and no more than they used in the last LEASE_SECONDS), which is refilled
    in the background before it runs out, so a steady stream of requests never waits
    for the database. Limits under 1 / LEASE_SHARE are never leased, so they are counted
    one request at a time. A lease's unspent slots count against the user until they
    leave the window: that is the price, at most LEASE_SHARE of the limit per burst.
    """

    LEASE_SECONDS = 1.0
    LEASE_SHARE = 0.01

    def __init__(
        self, take_slots: TakeSlots, window: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.take_slots = take_slots
        self.window = window
        self.clock = clock
        self.local = SlidingWindow(window)
        # user -> (refused until, for which limit, full allowance back at); local clock.
        self.refused_until: dict[str, tuple[float, int, float]] = {}
        self.leases: dict[str, Lease] = {}
        # user -> (allowance in use when the database last answered, full allowance back at)
        self.last_seen: dict[str, tuple[int, float]] = {}
        self.pending: list[_Pending] = []
        self.flusher: asyncio.Task | None = None
        self.is_database_down = False

    async def acquire(self, user: str, limit: int) -> Decision:
        """Admit one request for user, or refuse it with the true wait."""
        known = self._refused_locally(user, limit)
        if known is not None:
            return known
        leased = self._spend_lease(user, limit)
        if leased is not None:
            return leased
        future = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(user, limit, future))
        return await future

    async def close(self) -> None:
        """Cancel the round trip in flight, if any; at shutdown no request waits for it."""
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher

    def _refused_locally(self, user: str, limit: int) -> Decision | None:
        # The database said this user is full until a slot frees: no need to ask again.
        until, known_limit, reset_at = self.refused_until.get(user, (0.0, 0, 0.0))
        now = self.clock()
        if until <= now or known_limit != limit:
            return None
        return Decision(False, limit, 0, reset_at - now, until - now)

    def _spend_lease(self, user: str, limit: int) -> Decision | None:
        lease = self.leases.get(user)
        now = self.clock()
        if lease is None or lease.limit != limit or not lease.take(now):
            return None
        self.local.record(user, now)
        left = lease.slots(now)
        if left <= lease.size // 2 and not lease.is_refilling:
            lease.is_refilling = True
            self._enqueue(_Pending(user, limit, None))
        in_use, reset_at = self.last_seen.get(user, (limit, now + self.window))
        return Decision(True, limit, max(limit - in_use + left, 0), max(reset_at - now, 0.0))

    def _lease_size(self, user: str, limit: int) -> int:
        """How many slots to lease: recent demand, capped at a small share of the limit."""
        cap = int(limit * self.LEASE_SHARE)
        if cap == 0:
            return 0
        since = self.clock() - self.LEASE_SECONDS
        recent = 0
        for stamp in reversed(self.local.stamps.get(user, ())):
            if stamp <= since or recent == cap:
                break
            recent += 1
        return recent

    def _enqueue(self, item: _Pending) -> None:
        self.pending.append(item)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush_all())

    async def _flush_all(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self._flush(batch)
            except Exception as error:  # the limiter must never strand a request
                for item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(error)
            finally:
                for item in batch:
                    if item.future is None and item.user in self.leases:
                        self.leases[item.user].is_refilling = False

    async def _flush(self, batch: list[_Pending]) -> None:
        by_user: dict[str, list[_Pending]] = defaultdict(list)
        for item in batch:
            by_user[item.user].append(item)
        users = list(by_user)
        limits = [by_user[user][0].limit for user in users]
        wanted = [sum(item.future is not None for item in by_user[user]) for user in users]
        extra = [self._lease_size(user, limit) for user, limit in zip(users, limits, strict=True)]
        leased_at = self.clock()  # before asking: a lease must end no later than its stamps
        try:
            grants = await self.take_slots(
                users, wanted, limits, [self.window] * len(users), extra, self.LEASE_SECONDS
            )
        except store.UNAVAILABLE_ERRORS as error:
            self._note_database(is_down=True, error=error)
            for item in batch:
                if _is_waiting(item):
                    item.future.set_result(self.local.allow(item.user, item.limit, self.clock()))
            return
        self._note_database(is_down=False)
        for user, items in by_user.items():
            self._keep_lease(user, items[0].limit, grants[user], leased_at)
            self._answer([item for item in items if _is_waiting(item)], grants[user])

    def _keep_lease(self, user: str, limit: int, grant: store.SlotGrant, leased_at: float) -> None:
        lease = self.leases.get(user)
        if lease is None or lease.limit != limit:
            lease = self.leases[user] = Lease(limit)
        lease.add(grant.leased, leased_at + self.LEASE_SECONDS)
        lease.size = max(lease.size, grant.leased)
        reset = (grant.newest or grant.now) + self.window - grant.now
        self.last_seen[user] = (grant.used, self.clock() + reset)

    def _answer(self, items: list[_Pending], grant: store.SlotGrant) -> None:
        if not items:
            return
        limit = items[0].limit
        before = grant.used - grant.leased - grant.granted
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
        log_limiter_database(log, "rate limits", self.is_database_down, is_down, error)
        self.is_database_down = is_down


def _is_waiting(item: _Pending) -> bool:
    """A request still waiting for its answer: not a refill, and its client has not gone
    (a cancelled future refuses a result, which would fail the whole batch)."""
    return item.future is not None and not item.future.done()
