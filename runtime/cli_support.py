"""What the console's commands share: errors with exit codes, settings loading, the lock."""

from __future__ import annotations

from collections.abc import Callable

import click

from runtime import bootstrap
from runtime.database import DatabaseError
from runtime.modelfiles import ModelError
from runtime.settings import ConfigError, Paths, Settings, load_settings
from runtime.supervisor import StartError

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 3
# What starting can raise; start_failure turns each into a message and an exit code.
START_ERRORS = (StartError, ModelError, ConfigError, DatabaseError)


class ConsoleError(click.ClickException):
    """A message for the operator, with the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE, detail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.detail = detail

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
        if self.detail:
            click.echo(self.detail, err=True)


def load(paths: Paths, model: str | None = None, *, is_writing: bool = False) -> Settings:
    """Settings for a command; mutating commands first create config.env if it is missing."""
    if is_writing:
        bootstrap.ensure_config(paths)
    try:
        return load_settings(paths, flags={"LLAMA_MODEL": model} if model else {})
    except ConfigError as error:
        raise ConsoleError(str(error), EXIT_BAD_INPUT) from None


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


def start_failure(error: Exception, settings: Settings) -> ConsoleError:
    """Turn a domain error from starting into one line (plus the log's tail)."""
    if isinstance(error, ConfigError | ModelError):
        return ConsoleError(str(error), EXIT_BAD_INPUT)
    log = getattr(error, "log_path", None) or settings.paths.logs_dir / "backend.log"
    tail = getattr(error, "log_tail", "")
    detail = f"--- last lines of {log} ---\n{tail}" if tail else ""
    return ConsoleError(str(error), EXIT_FAILURE, detail)
