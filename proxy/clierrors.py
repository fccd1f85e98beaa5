"""How both CLIs, the console and the admin CLI, turn errors into a message and an exit code.

It lives in proxy/ because the gateway's package must not import the console's. Each CLI's
click group subclasses ErrorMappingGroup and names its domain errors there, so that its
commands raise domain errors and only the group turns them into CliErrors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import click

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_STARTING = 1, 2, 3, 4


class CliError(click.ClickException):
    """A message for the operator, printed as `error: ...` (then any detail), with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE, detail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.detail = detail

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
        if self.detail:
            click.echo(self.detail, err=True)


class ErrorMappingGroup(click.Group):
    """A click group that turns its commands' domain errors into CliErrors, in one place."""

    domain_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except self.domain_errors as error:
            raise self.cli_error(error) from None

    def cli_error(self, error: Exception) -> CliError:
        """The message and exit code for one of domain_errors; subclasses choose."""
        return CliError(str(error))
