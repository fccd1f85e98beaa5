"""What the console's commands share: the group that maps errors to exit codes, settings
loading, the lock."""

from __future__ import annotations

from collections.abc import Callable

import click

from proxy.clierrors import EXIT_BAD_INPUT, EXIT_FAILURE, CliError, ErrorMappingGroup
from runtime import bootstrap
from runtime.database import DatabaseError
from runtime.modelfiles import ModelError
from runtime.pgcluster import ClusterError
from runtime.settings import ConfigError, Paths, Settings, load_settings
from runtime.supervisor import StartError


class ConsoleGroup(ErrorMappingGroup):
    """Turns what the commands raise into one line (plus a log's tail) and an exit code."""

    domain_errors = (StartError, ModelError, ConfigError, DatabaseError, ClusterError)

    def cli_error(self, error: Exception) -> CliError:
        if isinstance(error, ConfigError | ModelError):
            return CliError(str(error), EXIT_BAD_INPUT)
        tail = getattr(error, "log_tail", "")
        log = getattr(error, "log_path", None) or "the log"
        detail = f"--- last lines of {log} ---\n{tail}" if tail else ""
        return CliError(str(error), EXIT_FAILURE, detail)


def load(
    paths: Paths,
    model: str | None = None,
    *,
    is_writing: bool = False,
    backend_only: bool | None = None,
) -> Settings:
    """Settings for a command; mutating commands first create config.env if it is missing.

    backend_only: start's --backend-only/--no-backend-only; None keeps the remembered mode.
    """
    if is_writing:
        bootstrap.ensure_config(paths)
        # Once, for a config.env from before LLAMA_PROXY_BACKEND_SECRET existed.
        if bootstrap.ensure_backend_secret(paths):
            key, path = bootstrap.BACKEND_SECRET_KEY, paths.config_env
            click.echo(bootstrap.SECRET_WRITTEN.format(key=key, path=path), err=True)
    flags = {"LLAMA_MODEL": model} if model else {}
    return load_settings(paths, flags=flags, backend_only=backend_only)


def load_leniently(paths: Paths) -> Settings:
    """Settings for status and stop, which must work even when the configuration is broken."""
    try:
        return load_settings(paths)
    except ConfigError as error:
        click.echo(f"warning: {error}", err=True)
        return load_settings(paths, is_strict=False)


def wait_message(paths: Paths) -> Callable[[], None]:
    return lambda: click.echo(
        f"waiting for another console run to finish ({paths.run_dir / 'console.lock'})...", err=True
    )
