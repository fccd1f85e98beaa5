"""Token limits and quotas as pure logic: what a user has used, and whether they may go on.

Three budgets, each 0 for unlimited: tokens per minute (a sliding 60-second window of
charges, exact like the request limit's), and token quotas per UTC day and per UTC month.
A request is admitted while every budget that applies has something left (used < limit);
its tokens are charged after the answer, so one request may overshoot by its own size.
Nothing here reads a clock: the caller gives `now` in epoch seconds (UTC).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

MINUTE = 60.0
BUCKET_SECONDS = 0.1  # charges this close together share one entry of the minute window
TOKENS_EXCEEDED = "tokens_exceeded"
QUOTA_EXCEEDED = "quota_exceeded"


@dataclass(frozen=True)
class TokenLimits:
    """A user's budgets in tokens, after their own settings and the gateway's defaults."""

    per_minute: int = 0
    daily: int = 0
    monthly: int = 0

    @property
    def is_limited(self) -> bool:
        return bool(self.per_minute or self.daily or self.monthly)


def pick_limits(own: tuple[int | None, ...], defaults: tuple[int, ...]) -> TokenLimits:
    """The user's own values where set (0 unlimited), else the gateway's defaults."""
    per_minute, daily, monthly = own
    return TokenLimits(
        defaults[0] if per_minute is None else per_minute,
        defaults[1] if daily is None else daily,
        defaults[2] if monthly is None else monthly,
    )


def day_of(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def next_day(now: float) -> float:
    """Epoch seconds of the next UTC midnight."""
    start = datetime.combine(day_of(now) + timedelta(days=1), datetime.min.time(), UTC)
    return start.timestamp()


def next_month(now: float) -> float:
    """Epoch seconds of the first of the next month, 00:00 UTC."""
    today = day_of(now)
    first = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return datetime.combine(first, datetime.min.time(), UTC).timestamp()


def format_reset(seconds: float) -> str:
    """A wait as OpenAI writes X-RateLimit-Reset-Tokens (Go durations): 6s, 1m0s, 23h59m5s."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _midnight(day: date) -> float:
    return datetime.combine(day, datetime.min.time(), UTC).timestamp()


@dataclass
class TokenView:
    """One user's use as this gateway knows it: the database's answer plus its own charges."""

    day: date
    day_used: int = 0
    month_used: int = 0
    # [stamp, tokens] of the charges inside the minute window, oldest first; charges
    # within one BUCKET_SECONDS share an entry stamped with the latest of them.
    charges: deque[list[float]] = field(default_factory=deque)
    minute_total: int = 0  # the sum of charges' tokens, kept so that no check sums them
    synced_at: float | None = None  # when the database last answered for this user
    has_charged: bool = False
    day_ends: float = field(init=False)  # epoch seconds: the next midnight...
    month_ends: float = field(init=False)  # ...and the next first of the month, UTC

    def __post_init__(self) -> None:
        self._set_ends()

    def _set_ends(self) -> None:
        noon = _midnight(self.day) + 43_200
        self.day_ends, self.month_ends = next_day(noon), next_month(noon)

    def roll(self, now: float) -> None:
        """A new UTC day (or month) starts from nothing."""
        if now < self.day_ends:
            return  # the same day (or a clock stepped back: go on counting)
        today = day_of(now)
        if now >= self.month_ends:
            self.month_used = 0
        self.day, self.day_used = today, 0
        self._set_ends()

    def add(self, now: float, tokens: int) -> None:
        self.roll(now)
        self.day_used += tokens
        self.month_used += tokens
        self.add_to_minute(now, tokens)

    def add_to_minute(self, stamp: float, tokens: int) -> None:
        """One charge in the minute window. Merged into the newest entry within its bucket,
        and stamped later (never earlier), so a busy user's window holds at most
        MINUTE / BUCKET_SECONDS entries and a charge only ever counts a little longer."""
        last = self.charges[-1] if self.charges else None
        if last is not None and _bucket(last[0]) == _bucket(stamp):
            last[0] = max(last[0], stamp)
            last[1] += tokens
        else:
            self.charges.append([stamp, tokens])
        self.minute_total += tokens

    def minute_used(self, now: float) -> int:
        while self.charges and self.charges[0][0] <= now - MINUTE:
            self.minute_total -= int(self.charges.popleft()[1])
        return self.minute_total


def _bucket(stamp: float) -> int:
    return int(stamp / BUCKET_SECONDS)


@dataclass(slots=True)
class Budget:
    """One budget's state now: what the headers and /v1/me show, and the wait when spent."""

    name: str  # "tokens per minute", "daily token quota", "monthly token quota"
    limit: int
    used: int
    reset_seconds: float  # until all of it is back
    retry_after: float  # until a request is admitted again (0 while it has some left)

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    @property
    def is_spent(self) -> bool:
        return self.used >= self.limit

    @property
    def code(self) -> str:
        return TOKENS_EXCEEDED if self.name == "tokens per minute" else QUOTA_EXCEEDED


def budgets(view: TokenView, limits: TokenLimits, now: float) -> list[Budget]:
    """The budgets that apply to the user, each with its use and its waits."""
    view.roll(now)
    found = []
    if limits.per_minute:
        used = view.minute_used(now)
        newest = view.charges[-1][0] + MINUTE - now if view.charges else 0.0
        found.append(
            Budget(
                "tokens per minute",
                limits.per_minute,
                used,
                newest,
                _minute_retry(view, limits.per_minute, used, now),
            )
        )
    for name, limit, used, ends in (
        ("daily token quota", limits.daily, view.day_used, view.day_ends),
        ("monthly token quota", limits.monthly, view.month_used, view.month_ends),
    ):
        if limit:
            wait = ends - now if used else 0.0
            found.append(Budget(name, limit, used, wait, ends - now if used >= limit else 0.0))
    return found


def _minute_retry(view: TokenView, limit: int, used: int, now: float) -> float:
    """How long until enough charges leave the window that the user is under the limit."""
    if used < limit:
        return 0.0
    for stamp, tokens in view.charges:
        used -= tokens
        if used < limit:
            return max(stamp + MINUTE - now, 0.001)
    return 0.001


@dataclass(frozen=True)
class TokenDecision:
    """Admitted or not, and the budget the X-RateLimit-*-Tokens headers describe: the one
    that refused, or else the one with the least left."""

    is_allowed: bool
    budget: Budget

    @property
    def retry_after(self) -> float:
        return self.budget.retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit-Tokens": str(self.budget.limit),
            "X-RateLimit-Remaining-Tokens": str(self.budget.remaining),
            "X-RateLimit-Reset-Tokens": format_reset(self.budget.reset_seconds),
        }


def decide(view: TokenView, limits: TokenLimits, now: float) -> TokenDecision | None:
    """Whether the user may send one more request now; None when no budget applies."""
    found = budgets(view, limits, now)
    if not found:
        return None
    spent = [budget for budget in found if budget.is_spent]
    if spent:
        # Every spent budget must come back: the longest wait is the true one.
        return TokenDecision(False, max(spent, key=lambda budget: budget.retry_after))
    return TokenDecision(True, min(found, key=lambda budget: budget.remaining))
