"""What the admin CLI's commands share: the database connection, durations, output.

Kept apart from the command modules (proxy/adminusers.py, adminkeys.py, adminlimits.py,
adminreports.py) so that they read as lists of small functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import functools
import io
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import click

from proxy import accounts, reports, store
from proxy.backendcheck import MemberUnreachable
from proxy.backendstore import BackendError
from proxy.clierrors import EXIT_BAD_INPUT, CliError, ErrorMappingGroup
from proxy.config import ProxyConfigError, database_dsn, load_pool_view, load_section
from proxy.configschema import DatabaseKeys, GatewayKeys, values_of
from proxy.migrations import migrate
from proxy.sealing import SealingError

DURATION_PATTERN = re.compile(r"(\d{1,9})\s*([smhdw])")
MAX_DURATION = timedelta(days=36_525)
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NO_DATABASE = (
    "no database configured: run this through bin/user_management_cli.sh, which finds the "
    "private cluster or the server set in .env, or set POSTGRES_AUTH_DSN"
)
BAD_DSN = (
    "the database address is not a valid postgresql://user:password@host:port/db URL; "
    "check POSTGRES_AUTH_DSN, or POSTGRES_AUTH_HOST, _PORT, _DB, _USER and _PASSWORD"
)
# The first column of usage's table, per grouping.
USAGE_HEADINGS = {"user": "USER", "day": "DAY", "model": "MODEL"}
T = TypeVar("T")


@dataclass(frozen=True)
class AdminEnv:
    """What the commands take from the environment."""

    dsn: str
    gateway_url: str
    is_dsn_invalid: bool = False
    # For add-backend and list-backends: the secret that seals members' keys, the pool's
    # model name (as the gateway gets it) and this host's replicas; "" and () if unknown.
    backend_secret: str = ""
    model_name: str = ""
    local_backends: tuple[str, ...] = ()


def read_environment(environ: Mapping[str, str] | None = None) -> AdminEnv:
    """The settings the commands use, read through the gateway's loader.

    An invalid value is kept as a flag rather than raised, so that --help still works;
    a command that needs the database reports it.
    """
    try:
        gateway = load_section(GatewayKeys, environ)
    except ProxyConfigError:
        gateway = GatewayKeys()
    pool = pool_settings(gateway, environ)
    gateway_url = f"http://localhost:{gateway.port}"
    try:
        dsn = database_dsn(values_of(load_section(DatabaseKeys, environ)))
    except ProxyConfigError:
        return AdminEnv(dsn="", gateway_url=gateway_url, is_dsn_invalid=True, **pool)
    return AdminEnv(dsn=dsn, gateway_url=gateway_url, **pool)


def pool_settings(gateway: GatewayKeys, environ: Mapping[str, str] | None) -> dict[str, Any]:
    """AdminEnv's backend fields, from the keys the console gives the gateway too."""
    model_name, local_backends = load_pool_view(environ)
    return {
        "backend_secret": gateway.backend_secret,
        "model_name": model_name,
        "local_backends": local_backends,
    }


def pass_env(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command its AdminEnv as first argument, made only once the command runs.

    ctx.obj holds a function that makes it: the console's launcher finds (and may start)
    its database there, which --help must not need.
    """

    @click.pass_context
    @functools.wraps(command)
    def with_env(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return command(ctx.obj(), *args, **kwargs)

    return with_env


def checked_dsn(env: AdminEnv) -> str:
    if env.is_dsn_invalid:
        raise CliError(BAD_DSN, EXIT_BAD_INPUT)
    if not env.dsn:
        raise CliError(NO_DATABASE)
    return env.dsn


def run(
    env: AdminEnv,
    action: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    should_migrate: bool = True,
) -> T:
    """Run one action on one fresh connection, after bringing the schema up to date."""
    return asyncio.run(run_on_connection(checked_dsn(env), action, should_migrate))


async def run_on_connection(
    dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]], should_migrate: bool
) -> T:
    try:
        conn = await store.connect(dsn)
    except ValueError:
        raise CliError(BAD_DSN, EXIT_BAD_INPUT) from None
    try:
        if should_migrate:
            applied = await migrate(conn)
            if applied:
                click.echo(f"note: set up the schema (migrations {applied})", err=True)
        return await action(conn)
    except store.UNAVAILABLE_ERRORS as error:
        raise store.unreachable(dsn, error) from None
    finally:
        with contextlib.suppress(*store.UNAVAILABLE_ERRORS):
            await conn.close(timeout=store.CONNECT_TIMEOUT_SECONDS)


class AdminGroup(ErrorMappingGroup):
    """Turns domain errors into `error: ...` and an exit code, at the edge."""

    domain_errors = (
        accounts.AccountError,
        BackendError,
        SealingError,
        store.StoreError,
        asyncpg.PostgresError,
    )

    def cli_error(self, error: Exception) -> CliError:
        if isinstance(error, MemberUnreachable):
            return CliError(str(error))
        if isinstance(error, accounts.AccountError | BackendError | SealingError):
            return CliError(str(error), EXIT_BAD_INPUT)
        if isinstance(error, asyncpg.PostgresError):
            return CliError(f"the database refused: {error}")
        return CliError(str(error))


def parse_duration(text: str) -> timedelta:
    """'90d', '24h', '30m', '2w' or '45s' as a timedelta; ValueError otherwise."""
    # Hand-written: the libraries that read durations (pytimeparse, dateutil) would be a
    # dependency for five units, and accept forms such as '1.5d' that we refuse on purpose.
    match = DURATION_PATTERN.fullmatch(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, such as 7d or 24h")
    try:
        duration = timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        duration = MAX_DURATION * 2
    if duration > MAX_DURATION:
        raise ValueError(f"invalid duration {text!r}: at most 100 years")
    return duration


def parse_since(text: str, now: datetime, option: str = "--since") -> datetime:
    """A duration back from now ('7d'), or a date or time ('2026-11-01', UTC unless given).

    `option` names the option in the error: --until is read the same way.
    """
    with contextlib.suppress(ValueError):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"invalid {option} {text!r}: use a duration such as 7d or 24h, "
            f"or a date such as 2026-11-01"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def describe_duration(duration: timedelta) -> str:
    """'90 days' rather than timedelta's '90 days, 0:00:00'."""
    if duration.seconds or duration.microseconds:
        return str(duration)
    return f"{duration.days} day{'s' if duration.days != 1 else ''}"


def since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A click callback for --since and --until: a moment, read by parse_since."""
    if value is None:
        return None
    try:
        return parse_since(value, datetime.now(UTC), f"--{param.name}")
    except ValueError as error:
        raise CliError(str(error), EXIT_BAD_INPUT) from None


def duration_option(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as error:
        raise CliError(str(error), EXIT_BAD_INPUT) from None


def user_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command its user as NAME or --username NAME, passed on as `username`."""

    @click.argument("name", required=False, metavar="[NAME]")
    @click.option("--username", "-u", "option_name", metavar="NAME", help="The user.")
    @functools.wraps(command)
    def with_username(*args: Any, name: str | None, option_name: str | None, **kwargs: Any) -> Any:
        return command(*args, username=pick_username(name, option_name), **kwargs)

    return with_username


def pick_username(name: str | None, option_name: str | None) -> str:
    if name and option_name and name != option_name:
        raise CliError(f"two users given ({name!r}, {option_name!r}); give one", EXIT_BAD_INPUT)
    username = name or option_name
    if not username:
        raise CliError("which user? give NAME or --username NAME", EXIT_BAD_INPUT)
    return accounts.validate_username(username)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(command)


def expires_days_option(which: str = "The key") -> Callable[..., Any]:
    """--expires-days D, passed on as `expires_days`; `which` names the key in its help."""
    return click.option(
        "--expires-days", type=int, metavar="D", help=f"{which} stops working after D days."
    )


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def when(moment: datetime | None, default: str = "-") -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else default


def record(row: Any) -> dict[str, Any]:
    """A dataclass row as a JSON-ready dict, times in ISO 8601."""
    values = {field.name: getattr(row, field.name) for field in dataclasses.fields(row)}
    return {name: iso(v) if isinstance(v, datetime) else v for name, v in values.items()}


def usage_fields(column: str) -> list[str]:
    """usage's CSV columns: the group's (username, day or model), then the figures."""
    return [column] + [field.name for field in dataclasses.fields(reports.UsageRow)][1:]


def usage_record(row: reports.UsageRow, column: str) -> dict[str, Any]:
    """A usage row as JSON or CSV wants it: the group under its own name."""
    return {column if name == "group" else name: v for name, v in record(row).items()}


def describe_limit(rate_limit: int | None) -> str:
    return "default" if rate_limit is None else f"{rate_limit}/window"


def describe_concurrency(concurrency_limit: int | None) -> str:
    if concurrency_limit is None:
        return "default"
    return "no cap" if concurrency_limit == 0 else f"{concurrency_limit} at once"


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def echo_csv(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    click.echo(out.getvalue(), nl=False)


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> None:
    # Hand-written rather than tabulate: left-aligned columns are all these tables need.
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(indent + line.rstrip())


def echo_new_key(env: AdminEnv, issued: accounts.IssuedKey) -> None:
    """The one place a key is ever printed."""
    secret = issued.new_key.secret_key
    click.echo(
        f"API key for {issued.username!r} (key id {issued.new_key.key_id}, "
        f"expires {when(issued.expires_at, 'never')}):\n\n    {secret}\n\n"
        f"Save it now: it cannot be shown again (only its SHA-256 digest is stored).\n"
        f"Try it:\n    curl -H 'Authorization: Bearer {secret}' {env.gateway_url}/v1/models"
    )


def key_json(issued: accounts.IssuedKey) -> dict[str, Any]:
    return {
        "username": issued.username,
        "key_id": issued.new_key.key_id,
        "api_key": issued.new_key.secret_key,
        "expires_at": iso(issued.expires_at),
    }
