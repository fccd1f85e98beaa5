"""The admin CLI's limit commands: set-limit (requests per window, tokens per minute,
requests at once) and set-quota (tokens per day and month). proxy/admin.py puts them in
its group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import asyncpg
import click

from proxy import accounts
from proxy.adminsupport import (
    AdminEnv,
    describe_concurrency,
    describe_limit,
    pass_env,
    pick_username,
    run,
    user_argument,
)
from proxy.clierrors import EXIT_BAD_INPUT, CliError
from proxy.tokenaccounts import (
    DAILY_QUOTA,
    MONTHLY_QUOTA,
    TOKENS_PER_MINUTE,
    describe_tokens,
    parse_token_value,
    set_token_limits,
)


@click.command("set-limit")
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
    return parse_number_or_default(
        text,
        accounts.validate_rate_limit,
        f"invalid limit {text!r}: give a number of requests per window, or 'default'",
    )


def parse_concurrency(text: str) -> int | None:
    return parse_number_or_default(
        text,
        accounts.validate_concurrency_limit,
        f"invalid concurrency {text!r}: give how many requests at once, 0 for no cap, or 'default'",
    )


def parse_number_or_default(
    text: str, validate: Callable[[int], int | None], not_a_number: str
) -> int | None:
    """None for 'default', else the validated number; `not_a_number` is the error otherwise."""
    if text.strip().lower() == "default":
        return None
    try:
        return validate(int(text))
    except ValueError:
        raise CliError(not_a_number, EXIT_BAD_INPUT) from None


@click.command("set-quota")
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


LIMIT_COMMANDS = (set_limit, set_quota)
