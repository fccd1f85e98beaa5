"""The admin CLI's user commands: create-user, list-users, show-user, disable-user,
enable-user and delete-user. proxy/admin.py puts them in its group.
"""

from __future__ import annotations

import functools

import click

from proxy import accounts
from proxy.adminsupport import (
    AdminEnv,
    describe_concurrency,
    describe_limit,
    echo_json,
    echo_new_key,
    echo_table,
    expires_days_option,
    iso,
    json_option,
    key_json,
    pass_env,
    record,
    run,
    user_argument,
    when,
)
from proxy.tokenaccounts import describe_tokens


@click.command("create-user")
@user_argument
@click.option(
    "--rate-limit", type=int, metavar="N", help="Requests per window [default: the gateway's]."
)
@expires_days_option()
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


@click.command("list-users")
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


@click.command("show-user")
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


@click.command("disable-user")
@user_argument
@pass_env
def disable_user(env: AdminEnv, username: str) -> None:
    """Disable a user: all its keys stop working within a second, on every gateway.

    \b
    Example:
        bin/user_management_cli.sh disable-user alice
    """
    switch_user(env, username, is_disabled=True)


@click.command("enable-user")
@user_argument
@pass_env
def enable_user(env: AdminEnv, username: str) -> None:
    """Enable a disabled user again; its keys that are not revoked or expired work again.

    \b
    Example:
        bin/user_management_cli.sh enable-user alice
    """
    switch_user(env, username, is_disabled=False)


def switch_user(env: AdminEnv, username: str, is_disabled: bool) -> None:
    """disable-user's and enable-user's work: say whether it changed anything."""
    is_changed = run(
        env, functools.partial(accounts.set_disabled, username=username, is_disabled=is_disabled)
    )
    state = "disabled" if is_disabled else "enabled"
    click.echo(f"{state} user {username!r}" if is_changed else f"{username!r} was already {state}")


@click.command("delete-user")
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


USER_COMMANDS = (create_user, list_users, show_user, disable_user, enable_user, delete_user)
