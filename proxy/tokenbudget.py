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
    pairs = zip(own, defaults, strict=True)
    values = [mine if mine is not None else fallback for mine, fallback in pairs]
    return TokenLimits(*values)


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


@dataclass
class TokenView:
    """One user's use as this gateway knows it: the database's answer plus its own charges."""

    day: date
    day_used: int = 0
    month_used: int = 0
    # [stamp, tokens] of the charges inside the minute window, oldest first.
    charges: deque[list[float]] = field(default_factory=deque)
    synced_at: float | None = None  # when the database last answered for this user
    has_charged: bool = False

    def roll(self, today: date) -> None:
        """A new UTC day (or month) starts from nothing."""
        if today == self.day:
            return
        if (today.year, today.month) != (self.day.year, self.day.month):
            self.month_used = 0
        self.day, self.day_used = today, 0

    def add(self, now: float, tokens: int) -> None:
        self.roll(day_of(now))
        self.charges.append([now, tokens])
        self.day_used += tokens
        self.month_used += tokens

    def minute_used(self, now: float) -> int:
        while self.charges and self.charges[0][0] <= now - MINUTE:
            self.charges.popleft()
        return int(sum(tokens for _, tokens in self.charges))


@dataclass(frozen=True)
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
    view.roll(day_of(now))
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
        ("daily token quota", limits.daily, view.day_used, next_day(now)),
        ("monthly token quota", limits.monthly, view.month_used, next_month(now)),
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
