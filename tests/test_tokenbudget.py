"""Token budgets as pure logic (proxy/tokenbudget.py): a given `now`, no clock, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from proxy.tokenbudget import (
    TokenLimits,
    TokenView,
    day_of,
    decide,
    format_reset,
    next_month,
    pick_limits,
)


def at(moment: str) -> float:
    return datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()


def view_with(now: float, *charges: tuple[float, int]) -> TokenView:
    view = TokenView(day_of(now))
    for stamp, tokens in charges:
        view.add(stamp, tokens)
    return view


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.2, "1s"), (6, "6s"), (59.2, "1m0s"), (61, "1m1s"), (86_399.5, "24h0m0s")],
)
def test_reset_is_written_as_openai_writes_it(seconds: float, text: str):
    assert format_reset(seconds) == text


def test_a_users_own_value_wins_and_zero_means_unlimited():
    limits = pick_limits((None, 0, 500), (100, 1000, 0))
    assert limits == TokenLimits(per_minute=100, daily=0, monthly=500)
    assert not pick_limits((0, 0, 0), (100, 100, 100)).is_limited


def test_tokens_per_minute_refuse_once_used_and_say_when_enough_leaves():
    now = at("2026-11-30T12:00:00")
    view = view_with(now, (now - 50, 40), (now - 20, 40), (now - 5, 30))
    refused = decide(view, TokenLimits(per_minute=100), now)
    assert not refused.is_allowed
    assert refused.budget.code == "tokens_exceeded"
    # 110 used: the 40 from 50 s ago leaving (in 10 s) brings it to 70, under 100.
    assert refused.retry_after == pytest.approx(10)
    assert refused.headers == {
        "X-RateLimit-Limit-Tokens": "100",
        "X-RateLimit-Remaining-Tokens": "0",
        "X-RateLimit-Reset-Tokens": "55s",
    }
    assert decide(view, TokenLimits(per_minute=100), now + 10).is_allowed


def test_a_request_is_admitted_with_anything_left_so_it_may_overshoot():
    now = at("2026-11-30T12:00:00")
    view = view_with(now, (now - 1, 99))
    assert decide(view, TokenLimits(per_minute=100), now).is_allowed
    view.add(now, 30)  # its answer: 129 used now
    assert not decide(view, TokenLimits(per_minute=100), now).is_allowed


def test_the_daily_quota_resets_at_utc_midnight_and_the_monthly_on_the_first():
    evening = at("2026-11-30T23:59:30")
    view = view_with(evening, (evening, 1000))
    both = TokenLimits(daily=1000, monthly=5000)
    refused = decide(view, both, evening)
    assert not refused.is_allowed and refused.budget.code == "quota_exceeded"
    assert refused.retry_after == pytest.approx(30)
    assert not decide(view, both, at("2026-11-30T23:59:59.999")).is_allowed
    assert decide(view, both, at("2026-12-01T00:00:00")).is_allowed
    assert view.day == date(2026, 12, 1) and view.day_used == 0 and view.month_used == 0

    monthly = TokenLimits(monthly=1000)
    view = view_with(at("2026-11-02T08:00:00"), (at("2026-11-02T08:00:00"), 1000))
    late = decide(view, monthly, at("2026-11-30T23:00:00"))  # days later, same month
    assert not late.is_allowed and late.retry_after == pytest.approx(3600)
    assert decide(view, monthly, at("2026-12-01T00:00:00")).is_allowed


def test_the_headers_describe_the_budget_with_the_least_left_or_the_last_to_come_back():
    now = at("2026-11-30T12:00:00")
    view = view_with(now, (now - 30, 900))
    limits = TokenLimits(per_minute=20_000, daily=1000)
    decision = decide(view, limits, now)
    assert decision.is_allowed
    assert decision.headers["X-RateLimit-Limit-Tokens"] == "1000"
    assert decision.headers["X-RateLimit-Remaining-Tokens"] == "100"
    view.add(now, 19_100)  # both spent: the day comes back last
    refused = decide(view, limits, now)
    assert refused.budget.name == "daily token quota"
    assert refused.retry_after == pytest.approx(12 * 3600)


def test_december_rolls_over_into_the_next_year():
    assert next_month(at("2026-12-31T23:00:00")) == at("2027-01-01T00:00:00")


def test_a_busy_minute_keeps_few_entries_and_the_exact_sum():
    start = at("2026-11-30T12:00:00")
    view = TokenView(day_of(start))
    for index in range(10_000):  # 10,000 charges in one second
        view.add(start + index / 10_000, 3)
    assert len(view.charges) <= 11
    assert view.minute_used(start + 1) == 30_000
    # Merged charges are stamped later, never earlier: each counts a full minute, and at
    # most one bucket (0.1 s) longer.
    assert view.minute_used(start + 60.0) == 30_000
    assert 0 < view.minute_used(start + 60.5) < 30_000
    assert view.minute_used(start + 61.0 + 0.1) == 0
