"""The user-admin CLI, `python -m proxy.admin`; bin/user_management_cli.sh runs it.

Each command is a small function whose docstring is its --help. The SQL lives in
proxy.accounts; domain errors become `error: ...` lines and exit codes only at the edge,
in AdminGroup (see proxy/clierrors.py). Exit codes: 0 ok, 1 failure (database
unreachable), 2 bad input.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta

import asyncpg
import click

from proxy import accounts, reports
from proxy.adminsupport import (
    MAX_DURATION,
    USAGE_HEADINGS,
    AdminEnv,
    AdminGroup,
    describe_concurrency,
    describe_duration,
    describe_limit,
    duration_option,
    echo_csv,
    echo_json,
    echo_new_key,
    echo_table,
    iso,
    json_option,
    key_json,
    pass_env,
    pick_username,
    read_environment,
    record,
    run,
    since_option,
    usage_fields,
    usage_record,
    user_argument,
    when,
)
from proxy.clierrors import EXIT_BAD_INPUT, CliError
from proxy.migrations import migrate, schema_version
from proxy.tokenaccounts import (
    DAILY_QUOTA,
    MONTHLY_QUOTA,
    TOKENS_PER_MINUTE,
    describe_tokens,
    parse_token_value,
    set_token_limits,
)


@click.group(cls=AdminGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Manage llamagate's users and their API keys.

    The database comes from POSTGRES_AUTH_DSN (or POSTGRES_AUTH_HOST and friends);
    bin/user_management_cli.sh sets it for you. Every command first creates or updates
    the schema if needed, so init-db is optional. Exit codes: 0 ok, 1 failure (such as
    an unreachable database), 2 bad input.

    \b
    Example:
        bin/user_management_cli.sh create-user --username alice
        bin/user_management_cli.sh usage --since 7d
    """
    if ctx.obj is None:
        ctx.obj = read_environment


@cli.command("init-db")
@pass_env
def init_db(env: AdminEnv) -> None:
    """Create or migrate the schema; safe to run any number of times.

    \b
    Example:
        bin/user_management_cli.sh init-db
    """

    async def migrate_schema(conn: asyncpg.Connection) -> tuple[list[int], int]:
        return await migrate(conn), await schema_version(conn)

    applied, version = run(env, migrate_schema, should_migrate=False)
    done = f"applied migrations {applied}" if applied else "already up to date"
    click.echo(f"schema at version {version}: {done}")


@cli.command("create-user")
@user_argument
@click.option(
    "--rate-limit", type=int, metavar="N", help="Requests per window [default: the gateway's]."
)
@click.option("--expires-days", type=int, metavar="D", help="The key stops working after D days.")
@json_option
@pass_env
def create_user(
    env: AdminEnv,
    username: str,
    rate_limit: int | None,
    expires_days: int | None,
    as_json: bool,
) -> None:
    """Create a user and its first API key, and print the key (only this once).

    Names are 1-64 letters, digits, '.', '_', '-' or '@'.

    \b
    Example:
        bin/user_management_cli.sh create-user --username alice
        bin/user_management_cli.sh create-user -u ci-bot --rate-limit 600 --expires-days 90
    """
    accounts.validate_rate_limit(rate_limit)
    accounts.key_lifetime(expires_days)
    user, issued = run(
        env,
        functools.partial(
            accounts.create_user,
            username=username,
            rate_limit=rate_limit,
            expires_days=expires_days,
        ),
    )
    if as_json:
        echo_json({**key_json(issued), "rate_limit": user.rate_limit})
        return
    click.echo(f"created user {username!r} (rate limit: {describe_limit(user.rate_limit)})")
    echo_new_key(env, issued)


@cli.command("list-users")
@json_option
@pass_env
def list_users(env: AdminEnv, as_json: bool) -> None:
    """List every user: status, limits and working keys (never the keys themselves).

    \b
    Example:
        bin/user_management_cli.sh list-users
    """
    users = run(env, accounts.list_users)
    if as_json:
        echo_json([record(user) for user in users])
    elif not users:
        click.echo("no users yet; create one with: create-user --username NAME")
    else:
        echo_table(
            ("USER", "STATUS", "RATE LIMIT", "CONCURRENCY", "ACTIVE KEYS", "CREATED"),
            (
                (
                    u.username,
                    status(u),
                    describe_limit(u.rate_limit),
                    describe_concurrency(u.concurrency_limit),
                    u.active_keys,
                    when(u.created_at),
                )
                for u in users
            ),
        )


def status(user: accounts.UserRow) -> str:
    return "disabled" if user.is_disabled else "active"


@cli.command("show-user")
@user_argument
@json_option
@pass_env
def show_user(env: AdminEnv, username: str, as_json: bool) -> None:
    """Show a user, its keys by id, and its request count.

    \b
    Example:
        bin/user_management_cli.sh show-user alice
    """
    detail = run(env, functools.partial(accounts.show_user, username=username))
    user = detail.user
    if as_json:
        echo_json(
            {
                **record(user),
                "request_count": detail.request_count,
                "last_request_at": iso(detail.last_request_at),
                "keys": [record(key) for key in detail.keys],
            }
        )
        return
    click.echo(f"user:        {user.username}")
    click.echo(f"status:      {status(user)}")
    click.echo(f"rate limit:  {describe_limit(user.rate_limit)}")
    click.echo(f"concurrency: {describe_concurrency(user.concurrency_limit)}")
    click.echo(f"tokens/min:  {describe_tokens(user.tokens_per_minute)}")
    click.echo(f"daily quota: {describe_tokens(user.daily_token_quota)}")
    click.echo(f"month quota: {describe_tokens(user.monthly_token_quota)}")
    click.echo(f"created:     {when(user.created_at)}")
    click.echo(f"requests:    {detail.request_count} (last: {when(detail.last_request_at)})")
    click.echo("keys:")
    echo_table(
        ("KEY ID", "STATE", "CREATED", "EXPIRES", "REVOKED"),
        (
            (k.key_id, k.state, when(k.created_at), when(k.expires_at, "never"), when(k.revoked_at))
            for k in detail.keys
        ),
        indent="  ",
    )


@cli.command("disable-user")
@user_argument
@pass_env
def disable_user(env: AdminEnv, username: str) -> None:
    """Disable a user: all its keys stop working within a second, on every gateway.

    \b
    Example:
        bin/user_management_cli.sh disable-user alice
    """
    is_changed = run(
        env, functools.partial(accounts.set_disabled, username=username, is_disabled=True)
    )
    click.echo(
        f"disabled user {username!r}" if is_changed else f"{username!r} was already disabled"
    )


@cli.command("enable-user")
@user_argument
@pass_env
def enable_user(env: AdminEnv, username: str) -> None:
    """Enable a disabled user again; its keys that are not revoked or expired work again.

    \b
    Example:
        bin/user_management_cli.sh enable-user alice
    """
    is_changed = run(
        env, functools.partial(accounts.set_disabled, username=username, is_disabled=False)
    )
    click.echo(f"enabled user {username!r}" if is_changed else f"{username!r} was already enabled")


@cli.command("delete-user")
@user_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_env
def delete_user(env: AdminEnv, username: str, yes: bool) -> None:
    """Delete a user and all its keys. Its rows in the request log stay.

    \b
    Example:
        bin/user_management_cli.sh delete-user alice
        bin/user_management_cli.sh delete-user alice -y
    """
    if not yes:
        detail = run(env, functools.partial(accounts.show_user, username=username))
        click.confirm(
            f"delete user {username!r} and its {len(detail.keys)} key(s)? "
            f"(its {detail.request_count} logged requests stay)",
            abort=True,
        )
    run(env, functools.partial(accounts.delete_user, username=username))
    click.echo(f"deleted user {username!r} and its keys")


@cli.command("add-key")
@user_argument
@click.option("--expires-days", type=int, metavar="D", help="The key stops working after D days.")
@json_option
@pass_env
def add_key(
    env: AdminEnv,
    username: str,
    expires_days: int | None,
    as_json: bool,
) -> None:
    """Give a user one more API key, and print it (only this once).

    \b
    Example:
        bin/user_management_cli.sh add-key alice --expires-days 30
    """
    accounts.key_lifetime(expires_days)
    issued = run(
        env, functools.partial(accounts.add_key, username=username, expires_days=expires_days)
    )
    if as_json:
        echo_json(key_json(issued))
    else:
        echo_new_key(env, issued)


@cli.command("revoke-key")
@click.argument("key_id")
@pass_env
def revoke_key(env: AdminEnv, key_id: str) -> None:
    """Revoke one key by its id: it stops working within a second, on every gateway.

    \b
    Example:
        bin/user_management_cli.sh show-user alice      # lists the key ids
        bin/user_management_cli.sh revoke-key 0123456789ab
    """
    username = run(env, functools.partial(accounts.revoke_key, key_id=key_id.strip().lower()))
    click.echo(f"revoked key {key_id} of user {username!r}")


@cli.command("rotate-key")
@user_argument
@click.option(
    "--grace-hours",
    type=click.FloatRange(min=0, max=MAX_DURATION.days * 24),
    default=accounts.DEFAULT_ROTATION_GRACE.total_seconds() / 3600,
    show_default=True,
    help="How long the old keys keep working.",
)
@click.option("--revoke-old", is_flag=True, help="Revoke the old keys at once instead.")
@click.option(
    "--expires-days", type=int, metavar="D", help="The new key stops working after D days."
)
@json_option
@pass_env
def rotate_key(
    env: AdminEnv,
    username: str,
    grace_hours: float,
    revoke_old: bool,
    expires_days: int | None,
    as_json: bool,
) -> None:
    """Give a user a new key; its other keys expire after a grace period (or at once).

    \b
    Example:
        bin/user_management_cli.sh rotate-key --username alice
        bin/user_management_cli.sh rotate-key --username alice --revoke-old
    """
    accounts.key_lifetime(expires_days)
    issued, old_keys = run(
        env,
        functools.partial(
            accounts.rotate_key,
            username=username,
            grace=timedelta(hours=grace_hours),
            is_revoking_old=revoke_old,
            expires_days=expires_days,
        ),
    )
    if as_json:
        echo_json({**key_json(issued), "old_keys": [record(key) for key in old_keys]})
        return
    echo_new_key(env, issued)
    for key in old_keys:
        fate = "revoked" if key.revoked_at else f"expires {when(key.expires_at)}"
        click.echo(f"old key {key.key_id}: {fate}")
    if not old_keys:
        click.echo("the user had no other working keys")


@cli.command("set-limit")
@click.argument("values", nargs=-1, metavar="[NAME] [LIMIT]")
@click.option("--username", "-u", "option_name", metavar="NAME", help="The user.")
@click.option(
    "--concurrency",
    metavar="N",
    help="Requests at the backend at once: N, 0 for no cap, or 'default'.",
)
@click.option("--tpm", metavar="N", help="Tokens per minute: N, 'none' (unlimited) or 'default'.")
@pass_env
def set_limit(
    env: AdminEnv,
    values: tuple[str, ...],
    option_name: str | None,
    concurrency: str | None,
    tpm: str | None,
) -> None:
    """Set a user's limits: LIMIT requests per window, --tpm tokens per minute, and/or
    --concurrency requests at once.

    LIMIT is per LLAMA_PROXY_RATE_WINDOW_SECONDS, 'default' for LLAMA_PROXY_RATE_LIMIT.
    --tpm counts prompt plus completion tokens per minute: 'none' is unlimited, 'default'
    LLAMA_PROXY_TOKENS_PER_MINUTE. --concurrency caps the user's requests at the backend at
    once, on each gateway; the rest wait their turn in the queue. 0 is no cap, 'default'
    LLAMA_PROXY_USER_CONCURRENCY. All that is given changes together, or nothing does.

    \b
    Example:
        bin/user_management_cli.sh set-limit --username alice 600
        bin/user_management_cli.sh set-limit --username alice default
        bin/user_management_cli.sh set-limit alice --concurrency 1
        bin/user_management_cli.sh set-limit alice --tpm 20000
        bin/user_management_cli.sh set-limit alice --tpm none
    """
    has_option = concurrency is not None or tpm is not None
    name, limit_text = split_limit_arguments(values, option_name, has_option)
    username = pick_username(name, option_name)
    rate_limit = parse_limit(limit_text) if limit_text is not None else None
    concurrency_limit = parse_concurrency(concurrency) if concurrency is not None else None
    tokens = {} if tpm is None else {TOKENS_PER_MINUTE: parse_token_value(TOKENS_PER_MINUTE, tpm)}

    async def apply(conn: asyncpg.Connection) -> None:
        async with conn.transaction():  # all or nothing
            if limit_text is not None:
                await accounts.set_limit(conn, username, rate_limit)
            if concurrency is not None:
                await accounts.set_concurrency_limit(conn, username, concurrency_limit)
            if tokens:
                await set_token_limits(conn, username, tokens)

    run(env, apply)
    if limit_text is not None:
        click.echo(f"rate limit of {username!r}: {describe_limit(rate_limit)}")
    if concurrency is not None:
        click.echo(f"concurrency of {username!r}: {describe_concurrency(concurrency_limit)}")
    for setting, value in tokens.items():
        click.echo(f"{setting.label} of {username!r}: {describe_tokens(value)}")


def split_limit_arguments(
    values: tuple[str, ...], option_name: str | None, is_limit_optional: bool
) -> tuple[str | None, str | None]:
    """set-limit's positional NAME (unless --username gave it) and LIMIT (None: not given)."""
    rest = list(values)
    name = None if option_name or not rest else rest.pop(0)
    if len(rest) > 1 or not (rest or is_limit_optional):
        raise CliError(
            "give the user and the limit: set-limit --username NAME LIMIT, "
            "or set-limit NAME --tpm N, or set-limit NAME --concurrency N",
            EXIT_BAD_INPUT,
        )
    return name, rest[0] if rest else None


def parse_limit(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    try:
        return accounts.validate_rate_limit(int(text))
    except ValueError:
        raise CliError(
            f"invalid limit {text!r}: give a number of requests per window, or 'default'",
            EXIT_BAD_INPUT,
        ) from None


def parse_concurrency(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    try:
        return accounts.validate_concurrency_limit(int(text))
    except ValueError:
        raise CliError(
            f"invalid concurrency {text!r}: give how many requests at once, 0 for no cap, "
            f"or 'default'",
            EXIT_BAD_INPUT,
        ) from None


@cli.command("set-quota")
@user_argument
@click.option("--daily", metavar="N", help="Tokens per UTC day: N, 'none' or 'default'.")
@click.option("--monthly", metavar="N", help="Tokens per UTC month: N, 'none' or 'default'.")
@pass_env
def set_quota(env: AdminEnv, username: str, daily: str | None, monthly: str | None) -> None:
    """Set a user's token quotas: prompt plus completion tokens per UTC day and per month.

    Each takes a number, 'none' (unlimited, whatever the gateway's default) or 'default'
    (LLAMA_PROXY_DAILY_TOKEN_QUOTA, LLAMA_PROXY_MONTHLY_TOKEN_QUOTA). A quota resets at
    00:00 UTC, on the first of the month for the monthly one.

    \b
    Example:
        bin/user_management_cli.sh set-quota alice --daily 200000 --monthly 3000000
        bin/user_management_cli.sh set-quota alice --daily default
    """
    given = ((DAILY_QUOTA, daily), (MONTHLY_QUOTA, monthly))
    quotas = {setting: parse_token_value(setting, text) for setting, text in given if text}
    if not quotas:
        raise CliError("give --daily N, --monthly N or both", EXIT_BAD_INPUT)
    run(env, functools.partial(set_token_limits, username=username, values=quotas))
    for setting, value in quotas.items():
        click.echo(f"{setting.label} of {username!r}: {describe_tokens(value)}")


@cli.command()
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


@cli.command()
@click.option(
    "--older-than", required=True, callback=duration_option, metavar="AGE", help="Such as 90d."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_env
def prune(env: AdminEnv, older_than: timedelta, yes: bool) -> None:
    """Delete request-log rows older than AGE (s, m, h, d or w).

    \b
    Example:
        bin/user_management_cli.sh prune --older-than 90d -y    # e.g. nightly from cron
    """
    if not yes:
        count = run(env, functools.partial(accounts.count_older_requests, older_than=older_than))
        age = describe_duration(older_than)
        click.confirm(f"delete {count} request-log row(s) older than {age}?", abort=True)
    deleted = run(env, functools.partial(accounts.prune, older_than=older_than))
    click.echo(f"deleted {deleted} request-log row(s) older than {describe_duration(older_than)}")


def main() -> None:
    cli(prog_name="user_management_cli.sh")


if __name__ == "__main__":
    main()
