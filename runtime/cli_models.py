"""The console's model commands: models, pull, rm, use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from proxy.clierrors import EXIT_BAD_INPUT, CliError
from runtime.cli_support import load, wait_message
from runtime.lock import console_lock
from runtime.modelfiles import (
    ModelError,
    find_readable_model,
    list_model_files,
    read_model_info,
    resolve_model,
)
from runtime.settings import Paths, Settings
from runtime.supervisor import BackendSupervisor


@click.command()
@click.pass_obj
def models(paths: Paths) -> None:
    """List the GGUF files in models/ with their metadata; * marks the active one.

    The active model is the one the backend serves, or else the configured LLAMA_MODEL.

    \b
    Example:
        ./console.sh models
    """
    settings = load(paths)
    files = list_model_files(paths.models_dir)
    if not files:
        click.echo(
            f"no models in {paths.models_dir}; run runtime/install.sh for the fallback "
            f"model, or ./console.sh pull REPO"
        )
        return
    active = active_model(settings)
    click.echo(f"  {'NAME':<40} {'SIZE':>9}  {'ARCH':<10} {'QUANT':<8} {'CONTEXT':>7}")
    for path in files:
        marker = "*" if path.resolve() == active else " "
        try:
            info = read_model_info(path)
        except ModelError as error:
            click.echo(f"{marker} {path.name:<40} unreadable: {error}")
            continue
        context = info.context_length if info.context_length is not None else "?"
        click.echo(
            f"{marker} {info.name:<40} {info.size_bytes / 1e6:>6.0f} MB  "
            f"{info.architecture:<10} {info.quantization:<8} {context:>7}"
        )


def active_model(settings: Settings) -> Path | None:
    """The model being served, or else the configured one."""
    return served_model(settings) or configured_model(settings)


def served_model(settings: Settings) -> Path | None:
    status = BackendSupervisor(settings).status()
    return Path(status.model).resolve() if status.model and status.pid else None


def configured_model(settings: Settings) -> Path | None:
    try:
        return resolve_model(settings.server.model, settings.paths.models_dir)
    except ModelError:
        return None


@click.command()
@click.argument("repo")
@click.argument("pattern", required=False)
@click.pass_obj
def pull(paths: Paths, repo: str, pattern: str | None) -> None:
    """Download a GGUF model from a Hugging Face repo into models/.

    PATTERN picks files when the repo has several (a glob). HF_TOKEN is honoured for
    gated repos, HF_ENDPOINT for a mirror, and HF_HUB_OFFLINE=1 uses only the cache.

    \b
    Example:
        ./console.sh pull bartowski/SmolLM2-360M-Instruct-GGUF '*Q4_K_M.gguf'
    """
    # huggingface_hub otherwise sends telemetry to the endpoint; it reads this on import.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from runtime.hub import HubError, pull_model

    try:
        pulled = pull_model(repo, pattern, paths.models_dir, echo=click.echo)
    except HubError as error:
        # Not in ConsoleGroup's list: that would import huggingface_hub for every command.
        raise CliError(str(error)) from None
    for path in pulled:
        click.echo(f"pulled {path}")


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def rm(paths: Paths, name: str, yes: bool) -> None:
    """Remove a model file from models/. The model being served cannot be removed.

    \b
    Example:
        ./console.sh rm old-model.Q8_0.gguf -y
    """
    settings = load(paths)
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        path = resolve_model(name, paths.models_dir)
        if path.parent != paths.models_dir.resolve():
            raise CliError(
                f"{path} is outside {paths.models_dir}; rm only removes models from there",
                EXIT_BAD_INPUT,
            )
        if path in (served_model(settings), configured_model(settings)):
            raise CliError(
                f"{path.name} is the configured or served model; ./console.sh use another "
                f"model (and restart) first",
                EXIT_BAD_INPUT,
            )
        if not yes and not (sys.stdin and sys.stdin.isatty()):
            raise CliError(
                f"not removing {path.name} without confirmation; pass -y", EXIT_BAD_INPUT
            )
        if not yes:
            click.confirm(f"remove {path} ({path.stat().st_size / 1e6:.0f} MB)?", abort=True)
        path.unlink()
    click.echo(f"removed {path}")


@click.command()
@click.argument("name")
@click.pass_obj
def use(paths: Paths, name: str) -> None:
    """Make NAME the default model (LLAMA_MODEL in runtime/config.env).

    \b
    Example:
        ./console.sh use SmolLM2-135M-Instruct.Q4_1.gguf && ./console.sh restart
    """
    from runtime.configfile import set_config_value

    path = find_readable_model(name, paths.models_dir)
    settings = load(paths, is_writing=True)
    value = path.name if path.parent == paths.models_dir.resolve() else str(path)
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        set_config_value(paths.config_env, "LLAMA_MODEL", value)
    click.echo(f"LLAMA_MODEL={value} written to {paths.config_env}")
    source = settings.source_of("LLAMA_MODEL")
    if source not in ("default", str(paths.config_env)):
        click.echo(f"warning: LLAMA_MODEL is also set in the {source}, which takes precedence")
    if BackendSupervisor(settings).status().pid:
        click.echo("run ./console.sh restart to serve it")
