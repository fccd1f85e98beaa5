"""The user-admin CLI (proxy.admin) through click's CliRunner, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from click.testing import CliRunner, Result
from conftest import ConsoleHome

from proxy import store
from proxy.admin import cli
from proxy.adminsupport import AdminEnv, parse_duration, parse_since, run
from proxy.configschema import DatabaseKeys, keys_of
from proxy.migrations import migrate
from runtime.settings import CODE_DIR

KEY_PATTERN = re.compile(r"lgk_[0-9a-f]{12}_[A-Za-z0-9_-]{43,}")
UNREACHABLE_DSN = "postgresql://u:sekrit@127.0.0.1:1/x"
NO_DATABASE_ENV = {key.name: None for key in keys_of(DatabaseKeys)}


def invoke(dsn: str | None, *args: str, input: str | None = None) -> Result:
    env = {**NO_DATABASE_ENV, "POSTGRES_AUTH_DSN": dsn}
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def log_requests(dsn: str, *rows: dict[str, object]) -> None:
    """Insert request-log rows the way the gateway does (creating the schema if needed)."""
    defaults = {
        "key_id": None,
        "method": "POST",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "duration_ms": 100.0,
        "queue_ms": 0.0,
        "request_bytes": 100,
        "response_bytes": 200,
        "model": "m",
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "client_addr": "127.0.0.1",
        "error": None,
        "repeat_count": 1,
    }
    now = datetime.now(UTC)
    tuples = []
    for row in rows:
        values = {**defaults, "request_id": uuid.uuid4().hex, **row}
        values["created_at"] = now - values.pop("age", timedelta(0))
        tuples.append(tuple(values[column] for column in store.REQUEST_COLUMNS))

    async def insert() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await store.insert_requests(conn, tuples)
        finally:
            await conn.close()

    asyncio.run(insert())


def create(dsn: str, username: str, *options: str) -> dict[str, object]:
    result = invoke(dsn, "create-user", "--username", username, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def count_users(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM users")[0][0]


def keys_of(dsn: str, username: str) -> list[asyncpg.Record]:
    return query(
        dsn,
        "SELECT k.* FROM api_keys k JOIN users u ON u.id = k.user_id "
        "WHERE u.username = $1 ORDER BY k.id",
        username,
    )


def test_create_user_prints_the_key_once_and_stores_only_its_digest(pg_dsn: str) -> None:
    result = invoke(pg_dsn, "create-user", "--username", "alice")

    assert result.exit_code == 0, result.output
    [secret] = set(KEY_PATTERN.findall(result.stdout))
    assert "save it now" in result.stdout.lower()
    assert "cannot be shown again" in result.stdout
    assert f"curl -H 'Authorization: Bearer {secret}' http://localhost:8001/v1/models" in (
        result.stdout
    )
    [key] = keys_of(pg_dsn, "alice")
    assert bytes(key["digest"]) == hashlib.sha256(secret.encode()).digest()
    assert secret[4:16] == key["key_id"]
    secret_part = secret.rsplit("_", 1)[1]
    for table in ("users", "api_keys"):
        dumped = " ".join(
            r[0] for r in query(pg_dsn, f"SELECT row_to_json(t)::text FROM {table} t")
        )
        assert secret_part not in dumped


def test_create_user_json_prints_only_the_key_fields(pg_dsn: str) -> None:
    created = create(pg_dsn, "ci-bot", "--rate-limit", "600", "--expires-days", "90")

    assert set(created) == {"username", "key_id", "api_key", "rate_limit", "expires_at"}
    assert created["username"] == "ci-bot"
    assert created["rate_limit"] == 600
    assert KEY_PATTERN.fullmatch(created["api_key"])
    expires = datetime.fromisoformat(created["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=90))) < timedelta(minutes=5)
    [key] = keys_of(pg_dsn, "ci-bot")
    assert key["key_id"] == created["key_id"]
    assert key["expires_at"] == expires


def test_a_duplicate_user_is_refused_and_nothing_changes(pg_dsn: str) -> None:
    create(pg_dsn, "alice")

    result = invoke(pg_dsn, "create-user", "--username", "alice", "--rate-limit", "5")

    assert result.exit_code == 2
    assert "error: user 'alice' already exists" in result.stderr
    assert not KEY_PATTERN.search(result.output)
    assert len(keys_of(pg_dsn, "alice")) == 1
    assert query(pg_dsn, "SELECT rate_limit FROM users")[0][0] is None


@pytest.mark.parametrize(
    "args",
    [
        ("show-user", "ghost"),
        ("disable-user", "ghost"),
        ("enable-user", "--username", "ghost"),
        ("delete-user", "ghost", "-y"),
        ("delete-user", "ghost"),
        ("add-key", "ghost"),
        ("rotate-key", "--username", "ghost"),
        ("set-limit", "--username", "ghost", "5"),
        ("usage", "--user", "ghost"),
    ],
)
def test_an_unknown_user_is_bad_input_for_every_command(pg_dsn: str, args: tuple[str, ...]) -> None:
    create(pg_dsn, "alice")

    result = invoke(pg_dsn, *args)

    assert result.exit_code == 2, result.output
    assert "error: no user named 'ghost'" in result.stderr
    assert "list-users" in result.stderr
    assert len(keys_of(pg_dsn, "alice")) == 1


@pytest.mark.parametrize("key_id", ["0123456789ab", "not-a-key-id"])
def test_revoking_an_unknown_key_is_bad_input(pg_dsn: str, key_id: str) -> None:
    result = invoke(pg_dsn, "revoke-key", key_id)

    assert result.exit_code == 2
    assert f"error: no key with id {key_id!r}" in result.stderr


@pytest.mark.parametrize("username", ["", "a b", "x" * 65, "bob';--", "zoë", "bob\n"])
def test_an_invalid_username_is_refused_and_creates_no_row(pg_dsn: str, username: str) -> None:
    invoke(pg_dsn, "init-db")

    result = invoke(pg_dsn, "create-user", "--username", username)

    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert count_users(pg_dsn) == 0


def test_a_username_of_64_allowed_characters_is_accepted(pg_dsn: str) -> None:
    name = "a.b_c-d@e" + "x" * 55
    assert create(pg_dsn, name)["username"] == name


@pytest.mark.parametrize(
    "options",
    [
        ("--rate-limit", "-1"),
        ("--rate-limit", "0"),
        ("--rate-limit", "3000000000"),
        ("--expires-days", "0"),
        ("--expires-days", "-5"),
    ],
)
def test_an_invalid_number_is_refused_and_creates_no_user(
    pg_dsn: str, options: tuple[str, ...]
) -> None:
    invoke(pg_dsn, "init-db")

    result = invoke(pg_dsn, "create-user", "--username", "alice", *options)

    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid ")
    assert count_users(pg_dsn) == 0


def test_disable_and_enable_flip_is_disabled(pg_dsn: str) -> None:
    create(pg_dsn, "alice")

    def is_disabled() -> bool:
        return query(pg_dsn, "SELECT is_disabled FROM users WHERE username = 'alice'")[0][0]

    assert invoke(pg_dsn, "disable-user", "alice").exit_code == 0
    assert is_disabled() is True
    again = invoke(pg_dsn, "disable-user", "alice")
    assert again.exit_code == 0 and "already disabled" in again.stdout
    assert invoke(pg_dsn, "enable-user", "--username", "alice").exit_code == 0
    assert is_disabled() is False


def test_delete_user_removes_its_keys_but_keeps_its_request_log(pg_dsn: str) -> None:
    created = create(pg_dsn, "alice")
    log_requests(pg_dsn, {"username": "alice", "key_id": created["key_id"]})

    result = invoke(pg_dsn, "delete-user", "alice", "-y")

    assert result.exit_code == 0, result.output
    assert count_users(pg_dsn) == 0
    assert query(pg_dsn, "SELECT count(*) FROM api_keys")[0][0] == 0
    assert query(pg_dsn, "SELECT username FROM llama_requests")[0][0] == "alice"


def test_delete_user_asks_first_and_a_no_deletes_nothing(pg_dsn: str) -> None:
    create(pg_dsn, "alice")

    declined = invoke(pg_dsn, "delete-user", "alice", input="n\n")
    assert declined.exit_code == 1
    assert "delete user 'alice' and its 1 key(s)?" in declined.output
    assert count_users(pg_dsn) == 1

    accepted = invoke(pg_dsn, "delete-user", "alice", input="y\n")
    assert accepted.exit_code == 0
    assert count_users(pg_dsn) == 0


def test_revoke_key_sets_revoked_at_and_a_second_revoke_is_an_error(pg_dsn: str) -> None:
    key_id = create(pg_dsn, "alice")["key_id"]

    first = invoke(pg_dsn, "revoke-key", key_id)
    assert first.exit_code == 0, first.output
    assert f"revoked key {key_id} of user 'alice'" in first.stdout
    [key] = keys_of(pg_dsn, "alice")
    assert key["revoked_at"] is not None

    second = invoke(pg_dsn, "revoke-key", key_id)
    assert second.exit_code == 2
    assert "already revoked" in second.stderr
    assert keys_of(pg_dsn, "alice")[0]["revoked_at"] == key["revoked_at"]


def test_add_key_gives_the_user_a_second_working_key(pg_dsn: str) -> None:
    first = create(pg_dsn, "alice")

    result = invoke(pg_dsn, "add-key", "alice", "--expires-days", "30", "--json")

    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert added["key_id"] != first["key_id"]
    keys = keys_of(pg_dsn, "alice")
    assert [k["key_id"] for k in keys] == [first["key_id"], added["key_id"]]
    assert keys[0]["expires_at"] is None and keys[1]["expires_at"] is not None
    assert bytes(keys[1]["digest"]) == hashlib.sha256(added["api_key"].encode()).digest()


def test_rotate_key_gives_a_new_key_and_the_old_one_expires_after_a_day(pg_dsn: str) -> None:
    old = create(pg_dsn, "alice")

    result = invoke(pg_dsn, "rotate-key", "--username", "alice")

    assert result.exit_code == 0, result.output
    [secret] = set(KEY_PATTERN.findall(result.stdout))
    assert secret != old["api_key"]
    old_key, new_key = keys_of(pg_dsn, "alice")
    assert old_key["key_id"] == old["key_id"]
    assert old_key["revoked_at"] is None
    expected = datetime.now(UTC) + timedelta(hours=24)
    assert abs(old_key["expires_at"] - expected) < timedelta(minutes=5)
    assert new_key["expires_at"] is None and new_key["revoked_at"] is None
    assert bytes(new_key["digest"]) == hashlib.sha256(secret.encode()).digest()
    assert f"old key {old['key_id']}: expires" in result.stdout


def test_rotate_key_with_revoke_old_revokes_the_old_key_at_once(pg_dsn: str) -> None:
    old = create(pg_dsn, "alice")

    result = invoke(pg_dsn, "rotate-key", "-u", "alice", "--revoke-old", "--json")

    assert result.exit_code == 0, result.output
    rotated = json.loads(result.stdout)
    assert [k["key_id"] for k in rotated["old_keys"]] == [old["key_id"]]
    old_key, new_key = keys_of(pg_dsn, "alice")
    assert old_key["revoked_at"] is not None
    assert new_key["key_id"] == rotated["key_id"] and new_key["revoked_at"] is None


def test_set_limit_sets_a_number_and_returns_to_the_default(pg_dsn: str) -> None:
    create(pg_dsn, "alice")

    def limit() -> int | None:
        return query(pg_dsn, "SELECT rate_limit FROM users")[0][0]

    assert invoke(pg_dsn, "set-limit", "--username", "alice", "120").exit_code == 0
    assert limit() == 120
    for bad in ("abc", "0", "-3"):
        result = invoke(pg_dsn, "set-limit", "--username", "alice", "--", bad)
        assert result.exit_code == 2, bad
        assert "error: invalid" in result.stderr
        assert limit() == 120
    missing = invoke(pg_dsn, "set-limit", "alice")
    assert missing.exit_code == 2 and "set-limit --username NAME LIMIT" in missing.stderr
    assert invoke(pg_dsn, "set-limit", "alice", "default").exit_code == 0
    assert limit() is None


def usage_rows(dsn: str) -> None:
    log_requests(
        dsn,
        {"username": "alice", "prompt_tokens": 10, "completion_tokens": 20, "duration_ms": 100.0},
        {"username": "alice", "prompt_tokens": 5, "completion_tokens": 7, "duration_ms": 300.0},
        {
            "username": "alice",
            "status_code": 500,
            "prompt_tokens": None,
            "completion_tokens": None,
            "duration_ms": 200.0,
        },
        {"username": "bob", "status_code": 400, "prompt_tokens": None, "completion_tokens": None},
        {
            "username": None,
            "status_code": 401,
            "prompt_tokens": None,
            "completion_tokens": None,
            "repeat_count": 4,  # four refusals folded into one row
        },
        {"username": "bob", "age": timedelta(days=10), "prompt_tokens": 1000},
    )


def test_usage_aggregates_requests_errors_tokens_and_latency_per_user(pg_dsn: str) -> None:
    create(pg_dsn, "alice")
    usage_rows(pg_dsn)

    result = invoke(pg_dsn, "usage", "--json")

    assert result.exit_code == 0, result.output
    by_user = {row["username"]: row for row in json.loads(result.stdout)}
    assert set(by_user) == {"alice", "bob", None}
    alice = by_user["alice"]
    assert (alice["requests"], alice["errors"]) == (3, 1)
    assert (alice["prompt_tokens"], alice["completion_tokens"]) == (15, 27)
    assert alice["avg_duration_ms"] == pytest.approx(200.0)
    assert (by_user["bob"]["requests"], by_user["bob"]["errors"]) == (2, 1)
    assert by_user["bob"]["prompt_tokens"] == 1000
    assert (by_user[None]["requests"], by_user[None]["errors"]) == (4, 4)


def test_usage_csv_parses_and_filters_by_user_and_since(pg_dsn: str) -> None:
    usage_rows(pg_dsn)

    result = invoke(pg_dsn, "usage", "--csv", "--user", "bob", "--since", "7d")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["username"], r["requests"], r["prompt_tokens"]) for r in rows] == [("bob", "1", "0")]


def test_usage_since_a_date_leaves_out_older_rows(pg_dsn: str) -> None:
    usage_rows(pg_dsn)
    since = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()

    result = invoke(pg_dsn, "usage", "--since", since, "--json")

    assert result.exit_code == 0, result.output
    bob = next(r for r in json.loads(result.stdout) if r["username"] == "bob")
    assert bob["requests"] == 1


@pytest.mark.parametrize("args", [("--since", "yesterday"), ("--json", "--csv")])
def test_usage_refuses_bad_options(pg_dsn: str, args: tuple[str, ...]) -> None:
    result = invoke(pg_dsn, "usage", *args)

    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")


def test_prune_deletes_only_rows_older_than_the_age(pg_dsn: str) -> None:
    log_requests(
        pg_dsn,
        {"username": "old", "age": timedelta(days=100)},
        {"username": "recent", "age": timedelta(days=80)},
        {"username": "new"},
    )

    result = invoke(pg_dsn, "prune", "--older-than", "90d", "-y")

    assert result.exit_code == 0, result.output
    assert "deleted 1 request-log row(s)" in result.stdout
    names = {r[0] for r in query(pg_dsn, "SELECT username FROM llama_requests")}
    assert names == {"recent", "new"}


def test_prune_asks_first_and_a_no_deletes_nothing(pg_dsn: str) -> None:
    log_requests(pg_dsn, {"username": "old", "age": timedelta(days=100)})

    result = invoke(pg_dsn, "prune", "--older-than", "90d", input="n\n")

    assert result.exit_code == 1
    assert "delete 1 request-log row(s)" in result.output
    assert query(pg_dsn, "SELECT count(*) FROM llama_requests")[0][0] == 1


def test_prune_needs_an_age(pg_dsn: str) -> None:
    log_requests(pg_dsn, {"username": "old", "age": timedelta(days=100)})

    result = invoke(pg_dsn, "prune", "-y")

    assert result.exit_code == 2
    assert "--older-than" in result.stderr
    assert query(pg_dsn, "SELECT count(*) FROM llama_requests")[0][0] == 1


@pytest.mark.parametrize("age", ["90", "0d", "ninety days", "99999999w"])
def test_prune_refuses_a_bad_age(pg_dsn: str, age: str) -> None:
    log_requests(pg_dsn, {"username": "old", "age": timedelta(days=100)})

    result = invoke(pg_dsn, "prune", "--older-than", age, "-y")

    assert result.exit_code == 2
    assert "error: invalid duration" in result.stderr
    assert query(pg_dsn, "SELECT count(*) FROM llama_requests")[0][0] == 1


def test_list_users_and_show_user_name_key_ids_but_never_keys(pg_dsn: str) -> None:
    alice = create(pg_dsn, "alice", "--rate-limit", "30")
    create(pg_dsn, "bob")
    invoke(pg_dsn, "disable-user", "bob")
    log_requests(pg_dsn, {"username": "alice"}, {"username": "alice"})

    listed = invoke(pg_dsn, "list-users")
    shown = invoke(pg_dsn, "show-user", "alice")
    shown_json = json.loads(invoke(pg_dsn, "show-user", "--username", "alice", "--json").stdout)

    assert listed.exit_code == 0 and shown.exit_code == 0
    assert re.search(r"alice\s+active\s+30/window\s+1", listed.stdout)
    assert re.search(r"bob\s+disabled\s+default", listed.stdout)
    assert alice["key_id"] in shown.stdout and "requests:    2" in shown.stdout
    assert [k["key_id"] for k in shown_json["keys"]] == [alice["key_id"]]
    assert shown_json["request_count"] == 2 and shown_json["rate_limit"] == 30
    for output in (listed.output, shown.output, json.dumps(shown_json)):
        assert not KEY_PATTERN.search(output)


def test_init_db_creates_the_schema_and_can_run_again(pg_dsn: str) -> None:
    first = invoke(pg_dsn, "init-db")
    second = invoke(pg_dsn, "init-db")

    assert first.exit_code == 0 and "applied migrations [1, 2, 3, 4, 5, 6, 7]" in first.stdout
    assert second.exit_code == 0 and "already up to date" in second.stdout
    assert query(pg_dsn, "SELECT to_regclass('api_keys') IS NOT NULL")[0][0] is True


def test_any_command_sets_up_the_schema_on_an_empty_database(pg_dsn: str) -> None:
    result = invoke(pg_dsn, "list-users", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert "set up the schema" in result.stderr


@pytest.mark.parametrize(
    "args", [("list-users",), ("create-user", "--username", "alice"), ("init-db",)]
)
def test_an_unreachable_database_fails_without_showing_the_password(args: tuple[str, ...]) -> None:
    result = invoke(UNREACHABLE_DSN, *args)

    assert result.exit_code == 1
    assert "error: cannot reach the database at postgresql://u:***@127.0.0.1:1/x" in result.stderr
    assert "sekrit" not in result.output


def test_a_password_from_the_database_parts_is_never_shown() -> None:
    env = {
        **NO_DATABASE_ENV,
        "POSTGRES_AUTH_HOST": "127.0.0.1",
        "POSTGRES_AUTH_PORT": "1",
        "POSTGRES_AUTH_USER": "u",
        "POSTGRES_AUTH_PASSWORD": "sekrit",
    }
    result = CliRunner().invoke(cli, ["list-users"], env=env)

    assert result.exit_code == 1
    assert "u:***@127.0.0.1:1" in result.stderr
    assert "sekrit" not in result.output


@pytest.mark.parametrize(
    "dsn", ["postgresql://u:sekrit@127.0.0.1:port/x", "mysql://u:sekrit@h/x", "u:sekrit@[h/x"]
)
def test_a_malformed_dsn_is_bad_input_without_showing_the_password(dsn: str) -> None:
    result = invoke(dsn, "list-users")

    assert result.exit_code == 2
    assert "not a valid postgresql://" in result.stderr
    assert "sekrit" not in result.output


def test_without_a_database_setting_the_error_says_how_to_set_one() -> None:
    result = invoke(None, "list-users")

    assert result.exit_code == 1
    assert "bin/user_management_cli.sh" in result.stderr
    assert "POSTGRES_AUTH_DSN" in result.stderr


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_help_shows_an_example(command: str) -> None:
    result = invoke(None, command, "--help")

    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert "bin/user_management_cli.sh" in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["create-user", "--help"]])
def test_help_works_while_the_private_database_is_down(home: ConsoleHome, args: list[str]) -> None:
    result = run_admin_script(home, *args)

    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_a_command_while_the_private_database_is_down_says_how_to_start_it(
    home: ConsoleHome,
) -> None:
    result = run_admin_script(home, "list-users")

    assert result.returncode == 1
    assert "error: the private PostgreSQL is not running" in result.stderr
    assert "./console.sh start" in result.stderr


def run_admin_script(home: ConsoleHome, *args: str) -> subprocess.CompletedProcess[str]:
    """bin/user_management_cli.sh on a home whose private cluster was never started."""
    script = CODE_DIR / "bin" / "user_management_cli.sh"
    return subprocess.run(
        [str(script), *args], cwd=CODE_DIR, env=home.env, capture_output=True, text=True, timeout=60
    )


def test_parse_duration_reads_each_unit() -> None:
    assert parse_duration("45s") == timedelta(seconds=45)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration(" 7D ") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "7", "d", "7y", "-7d", "0h", "1.5d", "999999999d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to UTC+5:30 for one test."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_parse_since_reads_a_duration_a_date_or_a_time(far_from_utc: None) -> None:
    now = datetime(2026, 11, 10, 12, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2026, 11, 3, 12, tzinfo=UTC)
    # A date or time without a zone is UTC, whatever the machine's zone.
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    offset = parse_since("2026-11-01T10:00+02:00", now)
    assert offset == datetime(2026, 11, 1, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last week", now)


def test_a_connection_lost_mid_command_is_reported_as_unreachable(pg_dsn: str) -> None:
    async def lose_connection(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(store.StoreError, match="cannot reach the database"):
        run(AdminEnv(dsn=pg_dsn, gateway_url=""), lose_connection)
