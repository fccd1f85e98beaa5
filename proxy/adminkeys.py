"""The admin CLI's key commands: add-key, revoke-key and rotate-key.
proxy/admin.py puts them in its group.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import click

from proxy import accounts
from proxy.adminsupport import (
    MAX_DURATION,
    AdminEnv,
    echo_json,
    echo_new_key,
    expires_days_option,
    json_option,
    key_json,
    pass_env,
    record,
    run,
    user_argument,
    when,
)


@click.command("add-key")
@user_argument
@expires_days_option()
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


@click.command("revoke-key")
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


@click.command("rotate-key")
@user_argument
@click.option(
    "--grace-hours",
    type=click.FloatRange(min=0, max=MAX_DURATION.days * 24),
    default=accounts.DEFAULT_ROTATION_GRACE.total_seconds() / 3600,
    show_default=True,
    help="How long the old keys keep working.",
)
@click.option("--revoke-old", is_flag=True, help="Revoke the old keys at once instead.")
@expires_days_option("The new key")
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


KEY_COMMANDS = (add_key, revoke_key, rotate_key)
