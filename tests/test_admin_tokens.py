"""set-limit --tpm and set-quota (proxy/adminlimits.py, proxy/tokenaccounts.py), against a real
PostgreSQL through click's CliRunner."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from click.testing import CliRunner, Result

from proxy.admin import cli
from proxy.configschema import DatabaseKeys, keys_of

NO_DATABASE_ENV = {key.name: None for key in keys_of(DatabaseKeys)}
TOKEN_COLUMNS = "rate_limit, tokens_per_minute, daily_token_quota, monthly_token_quota"


def invoke(dsn: str, *args: str) -> Result:
    env = {**NO_DATABASE_ENV, "POSTGRES_AUTH_DSN": dsn}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def limits_of(dsn: str, username: str) -> tuple:
    async def fetch() -> tuple:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                f"SELECT {TOKEN_COLUMNS} FROM users WHERE username = $1", username
            )
            return tuple(row)
        finally:
            await conn.close()

    return asyncio.run(fetch())


@pytest.fixture
def alice(pg_dsn: str) -> str:
    assert invoke(pg_dsn, "create-user", "--username", "alice").exit_code == 0
    return pg_dsn


def test_set_limit_tpm_sets_unlimited_and_default_and_keeps_the_rate_limit(alice: str):
    result = invoke(alice, "set-limit", "alice", "--tpm", "20000")
    assert result.exit_code == 0, result.output
    assert "tokens/minute of 'alice': 20000" in result.output
    assert limits_of(alice, "alice") == (None, 20000, None, None)
    both = invoke(alice, "set-limit", "--username", "alice", "600", "--tpm", "none")
    assert both.exit_code == 0, both.output
    assert "rate limit of 'alice': 600/window" in both.output
    assert "tokens/minute of 'alice': unlimited" in both.output
    assert limits_of(alice, "alice") == (600, 0, None, None)
    assert invoke(alice, "set-limit", "alice", "--tpm", "default").exit_code == 0
    assert limits_of(alice, "alice") == (600, None, None, None)
    # The positional request limit alone works as it always did.
    assert invoke(alice, "set-limit", "alice", "default").exit_code == 0
    assert limits_of(alice, "alice") == (None, None, None, None)
    shown = invoke(alice, "show-user", "alice", "--json").output
    assert '"tokens_per_minute": null' in shown


def test_set_limit_refuses_a_bad_tpm_and_changes_nothing(alice: str):
    assert invoke(alice, "set-limit", "alice", "--tpm", "100").exit_code == 0
    for bad in ("-5", "abc", "1.5", "99999999999"):
        result = invoke(alice, "set-limit", "alice", "600", "--tpm", bad)
        assert result.exit_code == 2, bad
        assert f"invalid --tpm {bad!r}" in result.stderr
        assert "'none' for unlimited, or 'default'" in result.stderr
        assert limits_of(alice, "alice") == (None, 100, None, None)  # nor the 600


def test_set_quota_sets_each_quota_and_returns_to_the_default(alice: str):
    result = invoke(alice, "set-quota", "alice", "--daily", "200000", "--monthly", "3000000")
    assert result.exit_code == 0, result.output
    assert "daily token quota of 'alice': 200000" in result.output
    assert "monthly token quota of 'alice': 3000000" in result.output
    assert limits_of(alice, "alice") == (None, None, 200000, 3000000)
    assert invoke(alice, "set-quota", "-u", "alice", "--daily", "default").exit_code == 0
    assert limits_of(alice, "alice") == (None, None, None, 3000000)
    assert invoke(alice, "set-quota", "alice", "--monthly", "none").exit_code == 0
    assert limits_of(alice, "alice") == (None, None, None, 0)
    shown = invoke(alice, "show-user", "alice").output
    assert "month quota: unlimited" in shown and "daily quota: default" in shown


BAD_TOKEN_COMMANDS = [
    (("set-quota", "alice"), "give --daily N, --monthly N or both"),
    (("set-quota", "alice", "--daily", "lots"), "invalid --daily 'lots'"),
    (("set-quota", "alice", "--daily", "5", "--monthly", "-1"), "invalid --monthly '-1'"),
    (("set-quota", "ghost", "--daily", "5"), "no user named 'ghost'"),
    (("set-limit", "ghost", "--tpm", "5"), "no user named 'ghost'"),
    (("set-limit", "alice"), "set-limit NAME --tpm N"),
]


def test_bad_token_settings_get_a_clear_error_and_change_nothing(alice: str):
    assert invoke(alice, "set-quota", "alice", "--daily", "7").exit_code == 0
    for args, message in BAD_TOKEN_COMMANDS:
        result = invoke(alice, *args)
        assert result.exit_code == 2, args
        assert message in result.stderr
        assert limits_of(alice, "alice") == (None, None, 7, None)
