"""The admin CLI's launcher: find the database the console uses, then run proxy.admin.

bin/user_management_cli.sh runs `python -m runtime.admin ARGS`; bin/bootstrap_user_cli.sh
adds --bootstrap, which also creates and starts the private cluster and the schema.
proxy.admin itself knows nothing of the console: it gets POSTGRES_AUTH_DSN.
"""

from __future__ import annotations

import os
import sys

import click

from runtime import bootstrap
from runtime.database import Database, DatabaseError
from runtime.settings import ConfigError, load_settings, paths_from_env

BOOTSTRAP_FLAG = "--bootstrap"


def main(argv: list[str]) -> int:
    is_bootstrap = argv[:1] == [BOOTSTRAP_FLAG]
    args = argv[1:] if is_bootstrap else argv
    paths = paths_from_env()
    try:
        if is_bootstrap:
            bootstrap.ensure_config(paths)
        settings = load_settings(paths)
        database = Database(settings, echo=lambda line: click.echo(line, err=True))
        dsn = database.ensure_running() if is_bootstrap else database.dsn()
    except (ConfigError, DatabaseError) as error:
        click.echo(f"error: {error}", err=True)
        return 2 if isinstance(error, ConfigError) else 1
    if database.is_managed and not is_bootstrap and not database.cluster().is_running():
        click.echo(
            "error: the private PostgreSQL is not running; start it with ./console.sh start "
            "(or bin/bootstrap_user_cli.sh)",
            err=True,
        )
        return 1
    if is_bootstrap and not args:
        args = ["init-db"]
    environ = {
        **os.environ,
        "POSTGRES_AUTH_DSN": dsn,
        "LLAMA_PROXY_PORT": str(settings.gateway.port),
    }
    os.execve(sys.executable, [sys.executable, "-m", "proxy.admin", *args], environ)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
