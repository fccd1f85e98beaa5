"""The console's commands. Each docstring is that command's --help.

Exit codes: 0 success, 1 a failure (the service could not be started, a file could not
be read), 2 bad input (an invalid config value, an unknown model, a wrong option), 3 from
`status` when stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from runtime import bootstrap, service
from runtime.lock import console_lock
from runtime.modelfiles import ModelError, list_model_files, read_model_info, resolve_model
from runtime.settings import ConfigError, Paths, Settings, load_settings, paths_from_env
from runtime.supervisor import SERVING, STOPPED, BackendSupervisor, StartError

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 3
STATUS_EXIT_CODES = {SERVING: 0, STOPPED: EXIT_STOPPED}


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


def wait_message(paths: Paths):
    return lambda: click.echo(
        f"waiting for another console run to finish ({paths.run_dir / 'console.lock'})...", err=True
    )


def start_failure(error: Exception, settings: Settings) -> ConsoleError:
    """Turn a domain error from starting into one line (plus the log's tail)."""
    if isinstance(error, ConfigError | ModelError):
        return ConsoleError(str(error), EXIT_BAD_INPUT)
    log = settings.paths.logs_dir / "backend.log"
    tail = getattr(error, "log_tail", "")
    detail = f"--- last lines of {log} ---\n{tail}" if tail else ""
    return ConsoleError(str(error), EXIT_FAILURE, detail)


def report_started(result: service.StartResult) -> None:
    status = result.status
    if result.was_running:
        click.echo(f"already serving at {status.url} (pid {status.pid}); nothing to do")
        return
    click.echo(f"serving {os.path.basename(status.model or '')} at {status.url} (pid {status.pid})")
    click.echo(
        "clients send the key from LLAMA_API_KEY in runtime/config.env as "
        "'Authorization: Bearer KEY'; see agents.md"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """llamagate: share one local GGUF model safely.

    \b
    Start serving (installs everything on first use):
        ./console.sh start
    Then see what runs:
        ./console.sh status
    """
    ctx.obj = paths_from_env()


@cli.command()
@click.option("--model", "-m", metavar="M", help="A path, or a file name in models/.")
@click.option("--foreground", is_flag=True, help="Stay attached and restart crashes (systemd).")
@click.pass_obj
def start(paths: Paths, model: str | None, foreground: bool) -> None:
    """Start the backend; return once it answers.

    A second start while it already serves says so and exits 0.

    \b
    Example:
        ./console.sh start
        ./console.sh start --model SmolLM2-135M-Instruct.Q4_1.gguf
        ./console.sh start --foreground      # under systemd
    """
    settings = load(paths, model, is_writing=True)
    if foreground:
        sys.exit(run_foreground(settings))
    if service.is_foreground_running(settings):
        click.echo("a foreground supervisor already runs the backend; nothing to do")
        return
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        try:
            result = service.start(settings, click.echo)
        except (StartError, ModelError, ConfigError) as error:
            raise start_failure(error, settings) from None
    report_started(result)


def run_foreground(settings: Settings) -> int:
    from runtime.foreground import ForegroundSupervisor

    with console_lock(settings.paths.run_dir, on_wait=wait_message(settings.paths)):
        is_running = BackendSupervisor(settings).status().is_serving
        if is_running or service.is_foreground_running(settings):
            raise ConsoleError(
                "the backend is already running; run ./console.sh stop first, "
                "so that this supervisor owns it"
            )
        try:
            model_path = service.check_ready_to_start(settings)
        except (ModelError, ConfigError) as error:
            raise start_failure(error, settings) from None
    try:
        return ForegroundSupervisor(settings, click.echo).run(model_path)
    except StartError as error:
        raise start_failure(error, settings) from None


@cli.command()
@click.pass_obj
def stop(paths: Paths) -> None:
    """Stop the backend: SIGTERM, a grace period, then SIGKILL of its process group.

    \b
    Example:
        ./console.sh stop
    """
    settings = load_leniently(paths)
    if service.is_foreground_running(settings):
        # Not under the lock: the supervisor takes the lock itself while it relaunches.
        was_running = service.stop_foreground(settings, click.echo)
        if not was_running:
            raise ConsoleError(
                "the foreground supervisor did not stop in time; see "
                "./console.sh logs, or stop it through systemd"
            )
    else:
        with console_lock(paths.run_dir, on_wait=wait_message(paths)):
            was_running = service.stop(settings, click.echo)
    click.echo("stopped" if was_running else "not running; nothing to stop")


@cli.command()
@click.option("--model", "-m", metavar="M", help="Restart with this model instead.")
@click.pass_obj
def restart(paths: Paths, model: str | None) -> None:
    """Stop and start again. A bad model is refused before anything is stopped.

    \b
    Example:
        ./console.sh restart
    """
    settings = load(paths, model, is_writing=True)
    if service.is_foreground_running(settings):
        raise ConsoleError(
            "a foreground supervisor (systemd) runs the backend; restart it "
            "there, e.g. systemctl restart llamagate"
        )
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        try:
            result = service.restart(settings, click.echo)
        except (StartError, ModelError, ConfigError) as error:
            raise start_failure(error, settings) from None
    report_started(result)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
def status(paths: Paths, as_json: bool) -> None:
    """Show whether the backend serves. Exit 0 serving, 3 stopped, 1 degraded.

    \b
    Example:
        ./console.sh status && echo up
        ./console.sh status --json
    """
    settings = load_leniently(paths)
    backend = BackendSupervisor(settings).status()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "state": backend.state,
                    "backend": {
                        "state": backend.state,
                        "pid": backend.pid,
                        "url": backend.url,
                        "model": backend.model,
                        "started_at": backend.started_at,
                        "detail": backend.detail,
                    },
                },
                indent=2,
            )
        )
    else:
        line = f"backend: {backend.state}"
        if backend.pid:
            uptime = time.time() - (backend.started_at or time.time())
            line += (
                f"  pid {backend.pid}  {backend.url}  "
                f"model {os.path.basename(backend.model or '')}  up {uptime:.0f}s"
            )
        click.echo(line)
        if backend.detail:
            click.echo(f"  {backend.detail}")
    sys.exit(STATUS_EXIT_CODES.get(backend.state, EXIT_FAILURE))


@cli.command()
@click.argument("component", type=click.Choice(["backend"]), default="backend")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option(
    "-n",
    "--lines",
    default=50,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many lines to show.",
)
@click.pass_obj
def logs(paths: Paths, component: str, follow: bool, lines: int) -> None:
    """Show the end of a log in runtime/logs/.

    \b
    Example:
        ./console.sh logs -n 100
        ./console.sh logs backend -f
    """
    log = paths.logs_dir / f"{component}.log"
    if not log.is_file():
        raise ConsoleError(f"no log yet at {log}; it appears once ./console.sh start has run")
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(log)]
    os.execvp("tail", argv)


@cli.command()
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
        return resolve_model(settings["LLAMA_MODEL"], settings.paths.models_dir)
    except ModelError:
        return None


@cli.command()
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
        raise ConsoleError(str(error)) from None
    for path in pulled:
        click.echo(f"pulled {path}")


@cli.command()
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
        try:
            path = resolve_model(name, paths.models_dir)
        except ModelError as error:
            raise ConsoleError(str(error), EXIT_BAD_INPUT) from None
        if path.parent != paths.models_dir.resolve():
            raise ConsoleError(
                f"{path} is outside {paths.models_dir}; rm only removes models from there",
                EXIT_BAD_INPUT,
            )
        if path in (served_model(settings), configured_model(settings)):
            raise ConsoleError(
                f"{path.name} is the configured or served model; ./console.sh use another "
                f"model (and restart) first",
                EXIT_BAD_INPUT,
            )
        if not yes and not (sys.stdin and sys.stdin.isatty()):
            raise ConsoleError(
                f"not removing {path.name} without confirmation; pass -y", EXIT_BAD_INPUT
            )
        if not yes:
            click.confirm(f"remove {path} ({path.stat().st_size / 1e6:.0f} MB)?", abort=True)
        path.unlink()
    click.echo(f"removed {path}")


@cli.command()
@click.argument("name")
@click.pass_obj
def use(paths: Paths, name: str) -> None:
    """Make NAME the default model (LLAMA_MODEL in runtime/config.env).

    \b
    Example:
        ./console.sh use SmolLM2-135M-Instruct.Q4_1.gguf && ./console.sh restart
    """
    from runtime.configfile import set_config_value

    try:
        path = resolve_model(name, paths.models_dir)
        read_model_info(path)
    except ModelError as error:
        raise ConsoleError(str(error), EXIT_BAD_INPUT) from None
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


@cli.command()
@click.pass_obj
def ensure(paths: Paths) -> None:
    """For cron: start whatever is down. Silent, exit 0, when all is well.

    Also exits 0 quietly when another console run holds the lock.

    \b
    Example crontab line:
        * * * * * /srv/llamagate/console.sh ensure >>/srv/llamagate/runtime/logs/cron.log 2>&1
    """
    settings = load(paths, is_writing=True)
    with console_lock(paths.run_dir, wait=False) as is_locked:
        if not is_locked:
            return
        down = service.needs_start(settings)
        if down is None:
            return
        click.echo(f"ensure: backend was {down.state}{': ' + down.detail if down.detail else ''}")
        try:
            result = service.start(settings, click.echo)
        except (StartError, ModelError, ConfigError) as error:
            raise start_failure(error, settings) from None
    report_started(result)


@cli.command()
@click.pass_obj
def info(paths: Paths) -> None:
    """Diagnostics: where each setting came from, paths, ports, versions, reachability.

    Works when everything is down.

    \b
    Example:
        ./console.sh info
    """
    from runtime.info import render_info

    click.echo(render_info(paths))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def test(pytest_args: tuple[str, ...]) -> None:
    """Run the test suite (installs the dev extras first if they are missing).

    Extra arguments go to pytest.

    \b
    Example:
        ./console.sh test
        ./console.sh test -k status -x
    """
    from runtime.devtools import run_tests

    sys.exit(run_tests(list(pytest_args)))


def main() -> None:
    cli(prog_name="console.sh")
