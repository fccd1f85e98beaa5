"""The user-admin CLI, `python -m proxy.admin`; bin/user_management_cli.sh runs it.

This module holds the click group and init-db; the commands live by concern in
proxy/adminusers.py, proxy/adminkeys.py, proxy/adminlimits.py, proxy/adminreports.py and
proxy/adminbackends.py, and what they share in proxy/adminsupport.py. Each command is a
small function whose docstring is its --help. The SQL lives in proxy.accounts,
proxy.tokenaccounts, proxy.reports and proxy.backendstore; domain errors become
`error: ...` lines and exit codes only at the edge, in AdminGroup (see
proxy/clierrors.py). Exit codes: 0 ok, 1 failure (database or backend unreachable),
2 bad input.
"""

from __future__ import annotations

import asyncpg
import click

from proxy.adminbackends import BACKEND_COMMANDS
from proxy.adminkeys import KEY_COMMANDS
from proxy.adminlimits import LIMIT_COMMANDS
from proxy.adminreports import REPORT_COMMANDS
from proxy.adminsupport import AdminEnv, AdminGroup, pass_env, read_environment, run
from proxy.adminusers import USER_COMMANDS
from proxy.migrations import migrate, schema_version


@click.group(cls=AdminGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Manage llamagate's users, their API keys, and the backends on other hosts.

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


for command in (
    *USER_COMMANDS,
    *KEY_COMMANDS,
    *LIMIT_COMMANDS,
    *REPORT_COMMANDS,
    *BACKEND_COMMANDS,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="user_management_cli.sh")


if __name__ == "__main__":
    main()
