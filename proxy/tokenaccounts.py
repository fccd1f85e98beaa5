"""The admin's side of token limits: reading `--tpm`, `--daily` and `--monthly` values, and
writing them to a user (set-limit --tpm, set-quota). SQL as plain functions of one connection.

Each value is a number of tokens, `none` (or 0) for unlimited whatever the gateway's
default, or `default` to follow the gateway's setting again (stored as NULL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from proxy.accounts import InvalidValue, update_user

UNLIMITED_WORDS = frozenset({"none", "unlimited", "0"})


@dataclass(frozen=True)
class TokenSetting:
    """One per-user token column: its option, its gateway-wide default key, its ceiling."""

    column: str
    option: str
    default_key: str
    maximum: int
    label: str


TOKENS_PER_MINUTE = TokenSetting(
    "tokens_per_minute", "--tpm", "LLAMA_PROXY_TOKENS_PER_MINUTE", 2_147_483_647, "tokens/minute"
)
DAILY_QUOTA = TokenSetting(
    "daily_token_quota", "--daily", "LLAMA_PROXY_DAILY_TOKEN_QUOTA", 10**15, "daily token quota"
)
MONTHLY_QUOTA = TokenSetting(
    "monthly_token_quota",
    "--monthly",
    "LLAMA_PROXY_MONTHLY_TOKEN_QUOTA",
    10**15,
    "monthly token quota",
)
TOKEN_SETTINGS = (TOKENS_PER_MINUTE, DAILY_QUOTA, MONTHLY_QUOTA)


def parse_token_value(setting: TokenSetting, text: str) -> int | None:
    """A number of tokens, 0 for `none`, or None for `default`; InvalidValue otherwise."""
    word = text.strip().lower()
    if word == "default":
        return None
    if word in UNLIMITED_WORDS:
        return 0
    try:
        value = int(word)
    except ValueError:
        value = -1
    if not 1 <= value <= setting.maximum:
        raise InvalidValue(
            f"invalid {setting.option} {text!r}: give a number of tokens from 1 to "
            f"{setting.maximum}, 'none' for unlimited, or 'default' for the gateway's "
            f"{setting.default_key}"
        )
    return value


def describe_tokens(value: int | None) -> str:
    if value is None:
        return "default"
    return "unlimited" if value == 0 else str(value)


async def set_token_limits(
    conn: asyncpg.Connection, username: str, values: Mapping[TokenSetting, int | None]
) -> None:
    """Set some of a user's token columns at once; UnknownUser if there is no such user."""
    await update_user(conn, username, {setting.column: value for setting, value in values.items()})
