"""The fair queue in front of the backend, which generates for one request at a time.

At most `concurrency` requests hold a slot at the backend; the rest wait. When a slot
frees, it goes to the user who was *least recently granted* one, and within a user to
the oldest waiter. That one rule gives round-robin across users: once a user is served,
every other user with a waiter has an older grant and so comes first, and a user who has
not been served for a while (or ever) is at the front of the line. A flooder with fifteen
requests waiting therefore delays a newcomer's single request by at most the one request
that is already running, whatever the order of arrival.

A user may also have a cap of their own: at most that many of their requests hold a slot
at once (set-limit --concurrency). A capped user is simply not a candidate for a free slot
while at their cap, so the slot goes to the next user by the same rule, and their own
next request becomes a candidate again when one of theirs finishes. Requests over the cap
wait; they are not refused. So a free slot can coexist with waiters only when every one
of them belongs to a user at their cap.

Over a cap, or after waiting too long, a request is refused with a Retry-After estimated
from how long slots have been held recently. Turning refusals into HTTP is the caller's job.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

# Weight of the newest hold time in the moving average: recent enough to follow a change
# of model or prompt sizes within a few requests, smooth enough to ignore one outlier.
HOLD_SMOOTHING = 0.2
# Before any slot has been released there is no data; one second is a modest guess.
INITIAL_HOLD_SECONDS = 1.0

Waiter = tuple[int, asyncio.Future[None]]  # (arrival number, future set when granted)


class QueueRejected(Exception):
    """A request the queue will not serve; `status` and `retry_after` are for the edge."""

    status = 503

    def __init__(self, reason: str, retry_after: int):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class QueueFull(QueueRejected):
    """Too many requests waiting, for this user (429) or for everyone (503)."""

    def __init__(self, scope: Literal["user", "total"], retry_after: int):
        super().__init__(f"too many requests waiting in the queue ({scope})", retry_after)
        self.scope = scope
        self.status = 429 if scope == "user" else 503


class QueueTimeout(QueueRejected):
    """Waited longer than the queue timeout."""


@dataclass(frozen=True)
class QueueStats:
    active: int
    waiting: int
    waiting_by_user: dict[str, int]


class FairQueue:
    """Admit at most `concurrency` requests at once, granting turns fairly across users."""

    def __init__(
        self,
        concurrency: int,
        max_waiting_per_user: int,
        max_waiting_total: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._concurrency = concurrency
        self._max_per_user = max_waiting_per_user
        self._max_total = max_waiting_total
        self._timeout = timeout
        self._clock = clock
        self._free = concurrency
        self._waiting = 0
        self._queues: dict[str, deque[Waiter]] = {}  # only users with waiters
        self._last_grant: dict[str, int] = {}  # user -> number of their latest grant
        self._holding: dict[str, int] = {}  # user -> slots they hold, only users holding any
        self._caps: dict[str, int] = {}  # user -> their cap, for capped users holding or waiting
        self._grants = itertools.count()
        self._arrivals = itertools.count()
        self._avg_hold = INITIAL_HOLD_SECONDS

    @asynccontextmanager
    async def slot(self, user: str, cap: int = 0) -> AsyncIterator[float]:
        """Wait for a turn at the backend; yield the seconds spent waiting.

        `cap` is how many slots this user may hold at once (0: no cap of their own).
        """
        arrived = self._clock()
        self._note_cap(user, cap)
        # A free slot with waiters means they are all at their caps (see the docstring),
        # so a user below theirs, with nothing waiting, may take it at once.
        if self._free > 0 and user not in self._queues and self._is_below_cap(user):
            self._grant(user)
            granted = arrived
        else:
            try:
                await self._wait_turn(user)
            finally:
                self._forget_cap_if_idle(user)  # a refused or abandoned request leaves none
            granted = self._clock()
        try:
            yield granted - arrived
        finally:
            self._record_hold(self._clock() - granted)
            self._release(user)

    def set_capacity(self, concurrency: int) -> None:
        """Admit `concurrency` at once from now on (the pool's members changed).

        Turns granted beyond a lowered capacity keep their slots; no new one is granted
        until enough of them have ended.
        """
        self._free += concurrency - self._concurrency
        self._concurrency = concurrency
        if self._queues:
            self._dispatch()

    def stats(self) -> QueueStats:
        """Slots in use and requests waiting, for /metrics and /readyz."""
        by_user = {user: len(queue) for user, queue in self._queues.items()}
        return QueueStats(self._concurrency - self._free, self._waiting, by_user)

    def _retry_after(self) -> int:
        """Seconds until a request joining now would likely get a slot, at least 1."""
        estimate = self._avg_hold * (self._waiting + 1) / self._concurrency
        return max(1, math.ceil(estimate))

    async def _wait_turn(self, user: str) -> None:
        queue = self._queues.get(user)
        if queue is not None and len(queue) >= self._max_per_user:
            raise QueueFull("user", self._retry_after())
        if self._waiting >= self._max_total:
            raise QueueFull("total", self._retry_after())
        waiter: Waiter = (next(self._arrivals), asyncio.get_running_loop().create_future())
        self._queues.setdefault(user, deque()).append(waiter)
        self._waiting += 1
        try:
            async with asyncio.timeout(self._timeout):
                await waiter[1]
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter[1].cancelled():
                self._forget(user, waiter)
            else:
                # Granted in the same instant it was cancelled: the slot is ours, pass it on.
                self._release(user)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout("waited too long in the queue", self._retry_after()) from None
            raise

    def _note_cap(self, user: str, cap: int) -> None:
        # The newest request carries the user's current cap (an admin may have changed it);
        # a raised cap may let their waiting requests in at once. Only caps are stored, so
        # the common uncapped request costs one dictionary lookup here.
        if cap == self._caps.get(user, 0):
            return
        if cap:
            self._caps[user] = cap
        else:
            del self._caps[user]
        if user in self._queues:
            self._dispatch()

    def _is_below_cap(self, user: str) -> bool:
        cap = self._caps.get(user)
        return not cap or self._holding.get(user, 0) < cap

    def _forget_cap_if_idle(self, user: str) -> None:
        if user in self._caps and user not in self._holding and user not in self._queues:
            del self._caps[user]

    def _grant(self, user: str) -> None:
        self._free -= 1
        self._holding[user] = self._holding.get(user, 0) + 1
        self._last_grant[user] = next(self._grants)

    def _release(self, user: str) -> None:
        held = self._holding[user] - 1
        if held:
            self._holding[user] = held
        else:
            del self._holding[user]
        self._free += 1
        if self._queues:
            self._dispatch()
        self._forget_cap_if_idle(user)

    def _dispatch(self) -> None:
        """Hand free slots to waiters, by the rule in the module docstring."""
        # Cancelled waiters may still be queued until their task runs; skip them, or the
        # slot would go to a request that is already gone.
        while self._free > 0 and (turn := self._pop_next()) is not None:
            user, future = turn
            if not future.done():
                self._grant(user)
                future.set_result(None)

    def _pop_next(self) -> tuple[str, asyncio.Future[None]] | None:
        # Never granted sorts first (-1); ties between such users go by arrival.
        user = min(
            (u for u in self._queues if self._is_below_cap(u)),
            key=lambda u: (self._last_grant.get(u, -1), self._queues[u][0][0]),
            default=None,
        )
        if user is None:
            return None
        queue = self._queues[user]
        _, future = queue.popleft()
        if not queue:
            del self._queues[user]
        self._waiting -= 1
        return user, future

    def _forget(self, user: str, waiter: Waiter) -> None:
        queue = self._queues.get(user)
        if queue is None or waiter not in queue:  # already skipped over by _dispatch
            return
        queue.remove(waiter)
        if not queue:
            del self._queues[user]
        self._waiting -= 1

    def _record_hold(self, seconds: float) -> None:
        self._avg_hold += HOLD_SMOOTHING * (seconds - self._avg_hold)
