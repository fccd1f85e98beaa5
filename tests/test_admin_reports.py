"""usage --by user|day|model with --since/--until, as JSON, CSV and a table, on seeded rows;
and what prune keeps of the daily token totals."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from test_admin import invoke, log_requests, query


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def seed(dsn: str) -> None:
    """Three UTC days of traffic by two users, on two models and none, and some 401s."""
    log_requests(
        dsn,
        {"username": "alice", "created_at": at("2026-11-01T10:00"), "prompt_tokens": 10},
        # One second apart, on either side of midnight UTC: two days.
        {
            "username": "alice",
            "created_at": at("2026-11-01T23:59:59"),
            "prompt_tokens": 1,
            "completion_tokens": 2,
        },
        {
            "username": "bob",
            "model": "big",
            "created_at": at("2026-11-02T00:00"),
            "prompt_tokens": 100,
            "completion_tokens": 50,
        },
        {
            "username": "bob",
            "model": "big",
            "created_at": at("2026-11-02T12:00"),
            "status_code": 500,
            "prompt_tokens": None,
            "completion_tokens": None,
        },
        {
            "username": None,
            "model": None,
            "created_at": at("2026-11-02T05:00"),
            "status_code": 401,
            "prompt_tokens": None,
            "completion_tokens": None,
            "repeat_count": 3,
        },
        {"username": "alice", "model": None, "created_at": at("2026-11-03T08:00")},
    )


def report(dsn: str, *args: str) -> list[dict]:
    result = invoke(dsn, "usage", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def figures(rows: list[dict], column: str) -> list[tuple]:
    return [
        (r[column], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"])
        for r in rows
    ]


def test_usage_by_day_sums_each_utc_day_within_since_and_until(pg_dsn: str) -> None:
    seed(pg_dsn)

    rows = report(pg_dsn, "--by", "day", "--since", "2026-11-01", "--until", "2026-11-03")

    # 2026-11-03 is left out: --until is the first moment not reported.
    assert figures(rows, "day") == [
        ("2026-11-01", 2, 0, 11, 7),
        ("2026-11-02", 5, 4, 100, 50),
    ]


def test_usage_by_model_as_csv_names_its_column_and_leaves_no_model_empty(pg_dsn: str) -> None:
    seed(pg_dsn)

    result = invoke(pg_dsn, "usage", "--by", "model", "--csv")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "model,requests,errors,prompt_tokens,completion_tokens,avg_duration_ms,last_request_at"
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["model"], r["requests"], r["prompt_tokens"]) for r in rows] == [
        ("", "4", "10"),
        ("big", "2", "100"),
        ("m", "2", "11"),
    ]


def test_usage_by_user_until_a_moment_and_by_day_for_one_user(pg_dsn: str) -> None:
    seed(pg_dsn)

    before_bob = report(pg_dsn, "--by", "user", "--until", "2026-11-02T00:00")
    alices_days = report(pg_dsn, "--by", "day", "--user", "alice")

    assert figures(before_bob, "username") == [("alice", 2, 0, 11, 7)]
    assert figures(alices_days, "day") == [("2026-11-01", 2, 0, 11, 7), ("2026-11-03", 1, 0, 10, 5)]


def test_usage_by_day_prints_a_table_headed_by_the_day(pg_dsn: str) -> None:
    seed(pg_dsn)

    result = invoke(pg_dsn, "usage", "--by", "day", "--since", "2026-11-03")

    assert result.exit_code == 0, result.output
    heading, row = result.stdout.splitlines()
    assert heading.split()[:2] == ["DAY", "REQUESTS"]
    assert row.split()[:5] == ["2026-11-03", "1", "0", "10", "5"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--by", "week"), "error: invalid grouping 'week': use --by user, --by day or --by model"),
        (("--until", "yesterday"), "error: invalid --until 'yesterday': use a duration"),
        (
            ("--since", "2026-11-03", "--until", "2026-11-01"),
            "error: --until (2026-11-01 00:00:00 UTC) is not after --since",
        ),
    ],
)
def test_usage_refuses_a_bad_grouping_or_span_naming_it(
    pg_dsn: str, args: tuple[str, ...], message: str
) -> None:
    result = invoke(pg_dsn, "usage", *args)

    assert result.exit_code == 2
    assert result.stderr.startswith(message)


def test_prune_deletes_old_token_days_but_keeps_what_the_monthly_quota_reads(
    pg_dsn: str,
) -> None:
    today = datetime.now(UTC).date()
    previous_month = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    days = {
        today - timedelta(days=100): 1,
        previous_month - timedelta(days=1): 10,  # the month before the previous one
        previous_month: 100,
        today: 1000,
    }
    invoke(pg_dsn, "init-db")
    for day, tokens in days.items():
        query(pg_dsn, "INSERT INTO token_days VALUES ('alice', $1, $2)", day, tokens)
    month_used = "SELECT month_used FROM llamagate_charge_tokens('{alice}', '{0}', $1, 60, 'x')"
    used_before = query(pg_dsn, month_used, [today])[0][0]

    by_age = invoke(pg_dsn, "prune", "--older-than", "90d", "-y")
    kept_by_age = {row[0] for row in query(pg_dsn, "SELECT day FROM token_days")}
    by_month = invoke(pg_dsn, "prune", "--older-than", "1d", "-y")

    assert "and 1 daily token total(s) older than 90 days" in by_age.stdout
    assert kept_by_age == set(days) - {today - timedelta(days=100)}
    assert "and 1 daily token total(s) older than 1 day" in by_month.stdout
    assert {row[0] for row in query(pg_dsn, "SELECT day FROM token_days")} == {
        previous_month,
        today,
    }
    assert query(pg_dsn, month_used, [today])[0][0] == used_before
