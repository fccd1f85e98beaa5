"""The admin CLI's launcher: runs proxy.admin in this process, on the database the console uses.

bin/user_management_cli.sh runs `python -m runtime.admin ARGS`; bin/bootstrap_user_cli.sh
adds --bootstrap, which also creates and starts the private cluster and the schema.
proxy.admin itself knows nothing of the console: it gets an AdminEnv from console_env,
and only when a command runs, so --help works while the database is down. The AdminEnv
carries what the console hands the gateway too: the backend secret, the served model's
name and this host's replica URLs.
"""

from __future__ import annotations

import sys

import click

from proxy import admin
from proxy.adminsupport import AdminEnv
from proxy.clierrors import EXIT_BAD_INPUT, CliError
from runtime import bootstrap
from runtime.database import Database, DatabaseError
from runtime.gateway import served_model_name
from runtime.pgcluster import ClusterError
from runtime.settings import ConfigError, Paths, load_settings, paths_from_env

BOOTSTRAP_FLAG = "--bootstrap"


def console_env(paths: Paths, is_bootstrap: bool) -> AdminEnv:
    """The console's database (created and started first with --bootstrap) and gateway."""
    try:
        if is_bootstrap:
            bootstrap.ensure_config(paths)
        settings = load_settings(paths)
        database = Database(settings, echo=lambda line: click.echo(line, err=True))
        dsn = database.ensure_running() if is_bootstrap else database.dsn()
    except ConfigError as error:
        raise CliError(str(error), EXIT_BAD_INPUT) from None
    except (DatabaseError, ClusterError) as error:
        raise CliError(str(error)) from None
    if database.is_managed and not is_bootstrap and not database.cluster().is_running():
        raise CliError(
            "the private PostgreSQL is not running; start it with ./console.sh start "
            "(or bin/bootstrap_user_cli.sh)"
        )
    return AdminEnv(
        dsn=dsn,
        gateway_url=f"http://localhost:{settings.gateway.port}",
        # What the console hands its gateway, so add-backend checks members against the
        # model the gateway serves and list-backends shows this host's replicas.
        backend_secret=settings.gateway.backend_secret,
        model_name=served_model_name(settings),
        local_backends=tuple(url for url in settings.backend_urls.split(",") if url),
    )


def main(argv: list[str]) -> None:
    is_bootstrap = argv[:1] == [BOOTSTRAP_FLAG]
    args = (argv[1:] or ["init-db"]) if is_bootstrap else argv
    admin.cli.main(
        args,
        prog_name="user_management_cli.sh",
        obj=lambda: console_env(paths_from_env(), is_bootstrap),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
