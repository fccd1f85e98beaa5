"""Token limits and quotas across gateways: PostgreSQL holds the count, gateways a view.

Tokens are known only after an answer, so they are charged then, and checked before the
next admission (proxy/tokenbudget.py). The count is kept in PostgreSQL
(llamagate_charge_tokens, migration m007), so every gateway on one database counts
together. What keeps it cheap:
- A user served by this gateway alone is admitted from the gateway's own view, with no
  round trip: no other gateway can have charged them. Charges are written in the
  background, a batch every FLUSH_SECONDS.
- Every charge notifies the other gateways (LISTEN/NOTIFY on TOKEN_CHANNEL). A user
  charged by another gateway within SHARED_SECONDS is shared: their admissions ask the
  database (batched, one round trip for all requests waiting), and their charges are
  written before the answer is released, so that a request that follows on another
  gateway sees them. The first request of a user on a gateway is treated the same way.
- Refusals never need the database: other gateways only ever add charges.
While the notifications are not heard, every user counts as shared. If the database is
unreachable, each gateway counts alone from its view, as the request limit does, and
parks its charges on disk (proxy/chargebacklog.py) to replay them, exactly once, before
anything new once the database answers: they survive a stop or a crash of the gateway,
as the request rows of the same requests do (proxy/spool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime

from proxy import store, tokenstore
from proxy.chargebacklog import ChargeBacklog
from proxy.flushloop import flush_forever
from proxy.outage import log_limiter_database
from proxy.tokenbudget import TokenDecision, TokenLimits, TokenView, day_of, decide, next_day

log = logging.getLogger(__name__)

MAX_VIEWS = 100_000  # past this, views not refreshed lately are forgotten
CLOSE_SECONDS = 2.0  # the last flush at shutdown

# (users, tokens, days, window seconds, gateway id) -> each user's usage
SyncTokens = Callable[
    [Sequence[str], Sequence[int], Sequence[date], float, str],
    Awaitable[list[tokenstore.TokenUsage]],
]


class TokenLimiter:
    """Admits and charges tokens per user; see the module docstring."""

    FLUSH_SECONDS = 0.2  # background charges of users served by this gateway alone
    SHARED_SECONDS = 60.0  # a user another gateway charged this recently is shared
    VIEW_TTL_SECONDS = 30.0  # a safety net: even unshared, ask the database this often
    RETRY_SECONDS = 1.0  # while the database is down, how often a request may try it
    WINDOW = 60.0

    def __init__(
        self,
        sync: SyncTokens,
        clock: Callable[[], float] = time.time,
        backlog: ChargeBacklog | None = None,
    ) -> None:
        self.sync = sync
        self.backlog = backlog  # None: unsent charges only wait in memory
        self.clock = clock
        self.gateway_id = uuid.uuid4().hex[:16]
        self.views: dict[str, TokenView] = {}
        self.foreign_at: dict[str, float] = {}
        self.charges: dict[tuple[str, date], int] = defaultdict(int)  # not yet sent
        self.reads: set[str] = set()
        self.waiters: list[asyncio.Future] = []
        self.wakeup = asyncio.Event()
        self.is_listening = False
        self.is_database_down = False
        self.retry_at = 0.0
        self._day, self._day_starts, self._day_ends = day_of(0), 0.0, 0.0

    async def admit(self, user: str, limits: TokenLimits) -> TokenDecision | None:
        """Whether the user may send one more request; None when no token limit applies."""
        if not limits.is_limited:
            return None
        now = self.clock()
        view = self.views.get(user)
        if view is not None:
            decision = decide(view, limits, now)
            if decision is None or not decision.is_allowed or not self._needs_sync(user, view):
                return decision
        await self.read(user)
        return decide(self.views[user], limits, self.clock())

    def snapshot(self, user: str, limits: TokenLimits) -> TokenDecision | None:
        """The decision from this gateway's view as it is (after a charge), no round trip."""
        view = self.views.get(user)
        return decide(view, limits, self.clock()) if view is not None else None

    def charge(self, user: str, tokens: int) -> asyncio.Future | None:
        """Charge tokens; a future to await before releasing the answer when others may
        look (a shared user, or this gateway's first charge for them), else None."""
        if tokens <= 0:
            return None
        now = self.clock()
        self.charges[(user, self._today(now))] += tokens
        view = self.views.get(user)
        if view is None:
            return None  # no token limit applies: counted for the quotas, in the background
        view.add(now, tokens)
        if view.has_charged and not self._is_shared(user):
            return None
        view.has_charged = True
        return self._wait_for_flush()

    async def read(self, user: str) -> TokenView:
        """The user's view, fresh from the database (or as it is while the database is down)."""
        if not (self.is_database_down and self.clock() < self.retry_at):
            self.reads.add(user)
            await self._wait_for_flush()
        if len(self.views) > MAX_VIEWS:
            self._sweep()
        return self.views.setdefault(user, TokenView(day_of(self.clock())))

    def start_listening(self) -> None:
        """Notifications flow again: what happened meanwhile is read before it is trusted."""
        for view in self.views.values():
            view.synced_at, view.has_charged = None, False
        self.is_listening = True

    def note_foreign_charge(self, payload: str) -> None:
        """A notification: another gateway charged this user (our own are ignored)."""
        gateway_id, _, user = payload.partition(" ")
        if gateway_id != self.gateway_id:
            self.foreign_at[user] = self.clock()

    def _wait_for_flush(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.wakeup.set()
        return future

    def _today(self, now: float) -> date:
        """The UTC day, worked out again only once it has ended (it is on every charge)."""
        if not self._day_starts <= now < self._day_ends:
            self._day = day_of(now)
            self._day_starts = datetime.combine(self._day, datetime.min.time(), UTC).timestamp()
            self._day_ends = next_day(now)
        return self._day

    def _is_shared(self, user: str) -> bool:
        seen = self.foreign_at.get(user)
        recent = seen is not None and self.clock() - seen < self.SHARED_SECONDS
        return recent or not self.is_listening

    def _needs_sync(self, user: str, view: TokenView) -> bool:
        if view.synced_at is None or self.clock() - view.synced_at > self.VIEW_TTL_SECONDS:
            return True
        return self._is_shared(user)

    async def run(self) -> None:
        """Flush forever: at once for whoever waits, else every FLUSH_SECONDS."""
        await flush_forever(self.flush, self.wakeup, self.FLUSH_SECONDS, "token limits")

    async def flush(self) -> None:
        """Replay parked charges, then send the charges and reads gathered so far in one
        round trip; wake their waiters."""
        charges, self.charges = self.charges, defaultdict(int)
        reads, self.reads = self.reads, set()
        waiters, self.waiters = self.waiters, []
        started = self.clock()
        try:
            answers = await self._exchange(charges, reads)
        except BaseException as error:
            _wake(waiters)  # they go on with this gateway's own view
            if not isinstance(error, Exception):
                self._hold(charges)  # cancelled, at shutdown: close() keeps them
                raise
            if not isinstance(error, store.UNAVAILABLE_ERRORS):
                log.error("token limits: the database refuses the charges: %s", error)
            self._note_database(is_down=True, error=error)
            await self._keep(started, charges)
            return
        if answers is None:  # behind parked charges not yet replayed
            await self._keep(started, charges)
        for usage in answers or ():
            if usage.username in self.views or usage.username in reads:
                self._take(usage)
        _wake(waiters)

    async def _exchange(
        self, charges: dict[tuple[str, date], int], reads: set[str]
    ) -> list[tokenstore.TokenUsage] | None:
        """The database's answers; None if the charges were not sent (they must wait
        behind parked ones). Raises what the database raises."""
        if not await self._replay_backlog():
            return None
        if not charges and not reads:
            return []
        users, tokens, days = _batch(charges, reads, day_of(self.clock()))
        answers = await self.sync(users, tokens, days, self.WINDOW, self.gateway_id)
        self._note_database(is_down=False)
        if self.backlog is not None:
            self.backlog.settled()  # what the disk refused went with this batch
        return answers

    async def _replay_backlog(self) -> bool:
        """True once no parked charge waits; tries the database once a RETRY_SECONDS."""
        if self.backlog is None or not await self.backlog.has_pending():
            return True
        if self.is_database_down and self.clock() < self.retry_at:
            return False
        is_done = await self.backlog.replay()
        self._note_database(is_down=False)
        return is_done

    async def _keep(self, at: float, charges: dict[tuple[str, date], int]) -> None:
        """Unsent charges: parked on disk if possible, else in memory for the next flush."""
        if not charges:
            return
        if self.backlog is not None and await self.backlog.park(at, charges):
            return
        self._hold(charges)

    def _hold(self, charges: dict[tuple[str, date], int]) -> None:
        for key, count in charges.items():
            self.charges[key] += count

    def _sweep(self) -> None:
        """Forget views no request has refreshed lately; they are read again when needed."""
        cutoff = self.clock() - self.VIEW_TTL_SECONDS
        self.views = {
            user: view
            for user, view in self.views.items()
            if view.synced_at is not None and view.synced_at > cutoff
        }
        self.foreign_at = {
            user: seen
            for user, seen in self.foreign_at.items()
            if seen > cutoff - self.SHARED_SECONDS
        }

    def _take(self, usage: tokenstore.TokenUsage) -> None:
        """The database's view of a user, plus the charges made since the batch left."""
        now = self.clock()
        if usage.day != day_of(now):
            return  # a charge for a day that has ended: today's figures come with a read
        old = self.views.get(usage.username)
        view = TokenView(usage.day, usage.day_used, usage.month_used)
        view.has_charged = old is not None and old.has_charged
        offset = now - usage.now  # the database's clock to ours
        for stamp, tokens in zip(usage.stamps, usage.counts, strict=True):
            view.add_to_minute(stamp + offset, tokens)
        unsent = self.charges.get((usage.username, usage.day), 0)
        if unsent:
            view.add(now, unsent)
        view.synced_at = now
        self.views[usage.username] = view

    def _note_database(self, is_down: bool, error: BaseException | None = None) -> None:
        if is_down:
            self.retry_at = self.clock() + self.RETRY_SECONDS
        log_limiter_database(log, "token limits", self.is_database_down, is_down, error)
        self.is_database_down = is_down

    async def close(self) -> None:
        """Write what is still unsent, if the database takes it soon: a stalled one must
        not hold up the shutdown. What it does not take is parked on disk."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_SECONDS)
        charges, self.charges = self.charges, defaultdict(int)
        await self._keep(self.clock(), charges)
        if self.charges:
            log.warning("token limits: %d charges not written at shutdown", len(self.charges))
        if self.backlog is not None:
            self.backlog.close()


def _batch(
    charges: dict[tuple[str, date], int], reads: set[str], today: date
) -> tuple[list[str], list[int], list[date]]:
    """Arrays for one round trip: every charge, and a read of today for users read."""
    users, tokens, days = [], [], []
    for (user, day), count in charges.items():
        users.append(user)
        tokens.append(count)
        days.append(day)
    charged_today = {user for user, day in charges if day == today}
    for user in reads - charged_today:
        users.append(user)
        tokens.append(0)
        days.append(today)
    return users, tokens, days


def _wake(waiters: list[asyncio.Future]) -> None:
    for future in waiters:
        if not future.done():  # else its request was cancelled meanwhile
            future.set_result(None)
