"""The admin CLI's request-log commands: usage (reports) and prune.
proxy/admin.py puts them in its group.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta

import click

from proxy import accounts, reports
from proxy.adminsupport import (
    USAGE_HEADINGS,
    AdminEnv,
    describe_duration,
    duration_option,
    echo_csv,
    echo_json,
    echo_table,
    json_option,
    pass_env,
    run,
    since_option,
    usage_fields,
    usage_record,
    when,
)
from proxy.clierrors import EXIT_BAD_INPUT, CliError


@click.command()
@click.option("--since", callback=since_option, metavar="WHEN", help="From: 7d, 24h or 2026-11-01.")
@click.option(
    "--until", callback=since_option, metavar="WHEN", help="Up to (not including), as --since."
)
@click.option(
    "--by",
    default="user",
    show_default=True,
    metavar="user|day|model",
    help="Group by user, UTC day or model.",
)
@click.option("--user", "username", metavar="NAME", help="Only this user.")
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@pass_env
def usage(
    env: AdminEnv,
    since: datetime | None,
    until: datetime | None,
    by: str,
    username: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Requests, errors, tokens and latency per user, UTC day or model, from the request log.

    Unauthenticated requests (401s) are counted under an empty user.

    \b
    Example:
        bin/user_management_cli.sh usage --since 7d
        bin/user_management_cli.sh usage --since 2026-11-01 --user alice --csv
        bin/user_management_cli.sh usage --by day --since 2026-11-01 --until 2026-12-01
        bin/user_management_cli.sh usage --by model --since 24h --json
    """
    if as_json and as_csv:
        raise CliError("choose one of --json and --csv", EXIT_BAD_INPUT)
    column = reports.group_column(by)
    reports.check_span(since, until)
    if username is not None:
        accounts.validate_username(username)
    rows = run(
        env,
        functools.partial(reports.usage, since=since, until=until, username=username, by=by),
    )
    records = [usage_record(row, column) for row in rows]
    if as_json:
        echo_json(records)
    elif as_csv:
        echo_csv(records, usage_fields(column))
    elif not rows:
        click.echo("no requests logged in that period")
    else:
        echo_table(
            (USAGE_HEADINGS[by], "REQUESTS", "ERRORS", "PROMPT TOK", "COMPL TOK", "AVG MS", "LAST"),
            (
                (
                    r.group or "-",
                    r.requests,
                    r.errors,
                    r.prompt_tokens,
                    r.completion_tokens,
                    f"{r.avg_duration_ms:.1f}",
                    when(r.last_request_at),
                )
                for r in rows
            ),
        )


@click.command()
@click.option(
    "--older-than", required=True, callback=duration_option, metavar="AGE", help="Such as 90d."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_env
def prune(env: AdminEnv, older_than: timedelta, yes: bool) -> None:
    """Delete request-log rows older than AGE (s, m, h, d or w), and daily token totals
    older than AGE that the quotas no longer read.

    The token totals of the current and the previous UTC month are always kept, whatever
    AGE: the monthly quota sums the days of the month.

    \b
    Example:
        bin/user_management_cli.sh prune --older-than 90d -y    # e.g. nightly from cron
    """
    age = describe_duration(older_than)
    if not yes:
        rows = run(env, functools.partial(reports.count_older_requests, older_than=older_than))
        days = run(env, functools.partial(reports.count_older_token_days, older_than=older_than))
        click.confirm(
            f"delete {rows} request-log row(s) and {days} daily token total(s) older than {age}?",
            abort=True,
        )
    deleted = run(env, functools.partial(reports.prune, older_than=older_than))
    days = run(env, functools.partial(reports.prune_token_days, older_than=older_than))
    click.echo(
        f"deleted {deleted} request-log row(s) and {days} daily token total(s) older than {age}"
    )


REPORT_COMMANDS = (usage, prune)
