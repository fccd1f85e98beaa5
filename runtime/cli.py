"""The console's commands. Each docstring is that command's --help.

Exit codes: 0 success, 1 a failure (the service could not be started, a file could not
be read), 2 bad input (an invalid config value, an unknown model, a wrong option), 3 from
`status` when stopped, 4 from `status` while a part is still starting.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from proxy.clierrors import EXIT_FAILURE, EXIT_STARTING, EXIT_STOPPED, CliError
from runtime import cli_models, service
from runtime.cli_support import ConsoleGroup, load, load_leniently, wait_message
from runtime.lock import console_lock
from runtime.pglocation import find_place
from runtime.replicas import replica_name
from runtime.settings import Paths, Settings, paths_from_env
from runtime.states import ComponentStatus, State

# Not 1: a model that is still loading is not a fault, so a health check can wait instead
# of alerting; and not 0, so `status && ...` still means "serving".
STATUS_EXIT_CODES = {State.SERVING: 0, State.STOPPED: EXIT_STOPPED, State.STARTING: EXIT_STARTING}


def report_started(result: service.StartResult, settings: Settings) -> None:
    status = result.status
    public = result.gateway or status
    if result.was_running:
        click.echo(f"already serving at {public.url} (pid {public.pid}); nothing to do")
        return
    model = os.path.basename(status.model or "") if status else ""
    if settings.is_backend_only:
        report_backend_only(result, model, settings)
        return
    if result.gateway is None:
        click.echo(f"serving {model} at {status.url} (pid {status.pid})")
        click.echo(
            "clients send the key from LLAMA_API_KEY in runtime/config.env as "
            "'Authorization: Bearer KEY'; see agents.md"
        )
        return
    if status is None:
        click.echo(f"the gateway serves at {public.url}/v1 (pid {public.pid}), with no backend")
        click.echo(
            "  on this host (LLAMA_SERVER_REPLICAS=0): it serves with the backends added "
            "with ./bin/user_management_cli.sh add-backend; see agents.md, Scaling"
        )
    else:
        click.echo(f"serving {model} behind the gateway at {public.url}/v1 (pid {public.pid})")
    if len(result.replicas) > 1:
        urls = ", ".join(replica.url for replica in result.replicas)
        click.echo(f"{len(result.replicas)} replicas of llama_cpp.server: {urls}")
    click.echo(
        "create a user and their key with: ./bin/user_management_cli.sh create-user "
        "--username NAME; see agents.md"
    )


def report_backend_only(result: service.StartResult, model: str, settings: Settings) -> None:
    """A generating host: where its replicas listen and how a gateway host adds them."""
    from runtime.backendonly import loopback_warning, started_lines

    for line in started_lines(settings, model, len(result.replicas)):
        click.echo(line)
    warning = loopback_warning(settings)
    if warning:
        click.echo(warning, err=True)


@click.group(cls=ConsoleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """llamagate: share one local GGUF model safely.

    \b
    Start serving (installs everything on first use):
        ./console.sh start
    Give someone a key:
        ./bin/user_management_cli.sh create-user --username alice
    Then see what runs:
        ./console.sh status
    """
    ctx.obj = paths_from_env()


@cli.command()
@click.option("--model", "-m", metavar="M", help="A path, or a file name in models/.")
@click.option("--foreground", is_flag=True, help="Stay attached and restart crashes (systemd).")
@click.option(
    "--backend-only/--no-backend-only",
    default=None,
    help="Run only the replicas, on LLAMA_SERVER_HOST, for the gateways of other hosts "
    "(remembered; --no-backend-only goes back to the configured stack).",
)
@click.pass_obj
def start(paths: Paths, model: str | None, foreground: bool, backend_only: bool | None) -> None:
    """Start what is configured; return once it answers.

    In gateway mode (the default) that is the database (the private cluster unless
    POSTGRES_AUTH_* points elsewhere), the backend and the gateway; with
    LLAMA_SERVER_REPLICAS=0 no backend (a gateway-only host, whose backends are added
    with add-backend). --backend-only makes a host that only generates: the
    LLAMA_SERVER_REPLICAS replicas listen on LLAMA_SERVER_HOST with LLAMA_API_KEY, no
    database, no gateway; it prints the add-backend lines for the gateway host. The
    mode is remembered, so status, stop, restart, ensure and --foreground need no
    flag; a change of mode needs a stop first. A second start while everything serves
    says so and exits 0.

    \b
    Example:
        ./console.sh start
        ./console.sh start --model SmolLM2-135M-Instruct.Q4_1.gguf
        ./console.sh start --foreground      # under systemd
        ./console.sh start --backend-only    # a GPU host for other hosts' gateways
    """
    settings = load(paths, model, is_writing=True, backend_only=backend_only)
    if foreground:
        sys.exit(run_foreground(settings))
    if service.is_foreground_running(settings):
        click.echo("a foreground supervisor already runs the backend; nothing to do")
        return
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        service.adopt_mode(settings)
        result = service.start(settings, click.echo)
    report_started(result, settings)


def run_foreground(settings: Settings) -> int:
    from runtime.foreground import ForegroundSupervisor

    supervisor = ForegroundSupervisor(settings, click.echo, on_wait=wait_message(settings.paths))
    return supervisor.run()


@cli.command()
@click.pass_obj
def stop(paths: Paths) -> None:
    """Stop the gateway, the backend and the private database, in that order.

    Each process gets SIGTERM, a grace period, then SIGKILL of its process group.

    \b
    Example:
        ./console.sh stop
    """
    settings = load_leniently(paths)
    if service.is_foreground_running(settings):
        # Not under the lock: the supervisor takes the lock itself while it relaunches.
        was_running = service.stop_foreground(settings, click.echo)
        if not was_running:
            raise CliError(
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
    """Restart the backend. A bad model is refused before anything is stopped.

    The gateway stays up: requests in flight finish, and requests that arrive
    meanwhile wait (up to LLAMA_PROXY_BACKEND_WAIT_SECONDS) instead of failing.
    With LLAMA_SERVER_REPLICAS above 1 the restart is rolling: one replica at a
    time, each serving again before the next is stopped, so the others serve.

    \b
    Example:
        ./console.sh restart
    """
    settings = load(paths, model, is_writing=True)
    if service.is_foreground_running(settings):
        raise CliError(
            "a foreground supervisor (systemd) runs the backend; restart it "
            "there, e.g. systemctl restart llamagate"
        )
    if not settings.has_replicas:
        click.echo(
            "LLAMA_SERVER_REPLICAS=0: this host runs no backend, so there is nothing to "
            "restart; restart the backends added with add-backend on their own hosts"
        )
        return
    with console_lock(paths.run_dir, on_wait=wait_message(paths)):
        result = service.restart(settings, click.echo)
    report_started(result, settings)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
def status(paths: Paths, as_json: bool) -> None:
    """Show whether each part serves. Exit 0 all serving, 3 all stopped, 4 starting, 1 otherwise.

    In gateway mode the parts are the database, the backend and the gateway; each
    replica of the backend is a part of its own (backend, backend-1, ...), so one
    replica down is degraded (exit 1) while the others serve. A part
    that runs but does not answer yet is starting (exit 4) until LLAMA_START_TIMEOUT_SECONDS
    has passed since it was launched, and degraded (exit 1) after that. A host
    started with --backend-only has its replicas alone ("mode: backend only"); a
    gateway-only host (LLAMA_SERVER_REPLICAS=0) the database and the gateway.

    \b
    Example:
        ./console.sh status && echo up
        ./console.sh status --json
    """
    settings = load_leniently(paths)
    statuses = service.component_statuses(settings)
    state = service.overall_state(settings, statuses)
    if as_json:
        parts = {name: asdict(status) for name, status in statuses.items()}
        click.echo(json.dumps({"state": state, **parts}, indent=2))
    else:
        if settings.is_backend_only or not settings.has_replicas:
            click.echo(f"{'mode:':<10} {describe_mode(settings)}")
        for name, status in statuses.items():
            click.echo(describe_status(name, status))
    sys.exit(STATUS_EXIT_CODES.get(state, EXIT_FAILURE))


def describe_mode(settings: Settings) -> str:
    """The line status prints for the two modes that differ from the configured stack."""
    if settings.is_backend_only:
        return (
            f"backend only (start --backend-only): the replicas on {settings.server.host}, "
            f"for the gateways of other hosts; no database, no gateway here"
        )
    return "gateway only (LLAMA_SERVER_REPLICAS=0): no backend on this host"


def describe_status(name: str, status: ComponentStatus) -> str:
    line = f"{name + ':':<10} {status.state}"
    if status.pid:
        uptime = time.time() - (status.started_at or time.time())
        line += f"  pid {status.pid}  {status.url}  up {uptime:.0f}s"
        if status.model:
            line += f"  model {os.path.basename(status.model)}"
    elif status.state != State.STOPPED or name == "database":
        line += f"  {status.url}"
    if status.detail:
        line += f"\n  {status.detail}"
    return line


@cli.command()
@click.argument("component", type=click.Choice(["backend", "proxy", "db"]), default="backend")
@click.argument("replica", type=click.IntRange(min=0), required=False)
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
def logs(paths: Paths, component: str, replica: int | None, follow: bool, lines: int) -> None:
    """Show the end of a log in runtime/logs/ (db: wherever the private cluster lives).

    With LLAMA_SERVER_REPLICAS above 1, `logs backend` shows every replica's log, each
    under a header, and `logs backend N` replica N's alone (0 is backend.log, N is
    backend-N.log).

    \b
    Example:
        ./console.sh logs -n 100
        ./console.sh logs backend -f
        ./console.sh logs backend 1  # replica 1
        ./console.sh logs proxy      # the gateway
        ./console.sh logs db         # the private PostgreSQL
    """
    if component == "db":
        found = [find_place(paths).log_path]
    else:
        found = [paths.logs_dir / f"{name}.log" for name in log_names(paths, component, replica)]
    missing = [log for log in found if not log.is_file()]
    if missing:
        raise CliError(f"no log yet at {missing[0]}; it appears once ./console.sh start has run")
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(log) for log in found]
    os.execvp("tail", argv)


def log_names(paths: Paths, component: str, replica: int | None) -> list[str]:
    """The stems of the logs to show: one component's, or every configured replica's."""
    if component != "backend":
        if replica is not None:
            raise CliError(f"only the backend has replicas; run ./console.sh logs {component}")
        return [component]
    if replica is not None:
        return [replica_name(replica)]
    count = load_leniently(paths).server.replicas
    if count == 0:
        raise CliError(
            "LLAMA_SERVER_REPLICAS=0: this host runs no backend, so it has no backend log; "
            "see ./console.sh logs proxy, or logs backend N for a replica that ran before"
        )
    return [replica_name(index) for index in range(count)]


@cli.command()
@click.pass_obj
def ensure(paths: Paths) -> None:
    """For cron: start whatever is down. Silent, exit 0, when all is well.

    Also exits 0 quietly when another console run holds the lock.

    \b
    Example crontab line:
        * * * * * /srv/llamagate/bin/cron.sh ensure
    """
    settings = load(paths, is_writing=True)
    with console_lock(paths.run_dir, wait=False) as is_locked:
        if not is_locked:
            return
        down = service.needs_start(settings)
        if not down:
            return
        for name, status in down.items():
            detail = f": {status.detail}" if status.detail else ""
            click.echo(f"ensure: {name} was {status.state}{detail}")
        result = service.start(settings, click.echo)
    report_started(result, settings)


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


def size_option(name: str, default: float, what: str):
    """A --NAME option that sets how big a bench run is; the smoke test makes them tiny."""
    number = click.FloatRange(min=1) if isinstance(default, float) else click.IntRange(min=1)
    return click.option(name, default=default, show_default=True, type=number, help=what)


@cli.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
@size_option("--seconds", 10.0, "Length of each wrk run (scenario 1) and run (scenario 9).")
@size_option("--stream-prompts", 4, "Prompts per pass, paths alternating (scenario 2).")
@size_option("--stream-tokens", 64, "Tokens per stream (scenario 2).")
@size_option("--flood", 16, "A's requests in flight (scenario 3).")
@size_option("--flood-tokens", 64, "Tokens per request of A's (scenario 3).")
@size_option("--probes", 3, "B's requests, one at a time (scenario 3).")
@size_option("--relay-streams", 32, "Streams of 256 chunks relayed (scenario 6, relay cost).")
@size_option("--capacity-seconds", 60.0, "Length of each setup's run (scenario 7, capacity).")
@size_option("--capacity-tokens", 128, "Tokens per generation (scenario 7).")
@size_option("--scaleout-seconds", 10.0, "Length of each backend count's run (scenario 8).")
@click.option(
    "--only",
    metavar="NAME[,NAME]",
    help="Run only these scenarios: overhead, relay, scaleout, twogateways, streaming, "
    "fairness, restart, capacity.",
)
def bench(json_path: str | None, only: str | None, **sizes: float) -> None:
    """Measure the gateway against the direct path, side by side; print the table.

    Runs a private stack (temp LLAMAGATE_ROOT, free ports, the fallback model), never
    the configured service, and stops all of it at the end, on Ctrl-C too. Needs wrk
    (apt-get install wrk). About 10 minutes on 2 cores, 4 of them capacity. Exit 0 when
    it ran, even if a target is MISSED; 1 when it could not run.

    \b
    Example:
        ./console.sh bench
        ./console.sh bench --json bench.json --seconds 5
        ./console.sh bench --only relay,overhead
        ./console.sh bench --only capacity,scaleout --capacity-seconds 20
    """
    from runtime.bench.errors import BenchError
    from runtime.bench.report import render_table
    from runtime.bench.scenarios import BenchOptions, parse_only, run_bench

    try:
        chosen = {"only": parse_only(only)} if only is not None else {}
        report = run_bench(BenchOptions(**sizes, **chosen), click.echo)
    except BenchError as error:
        # Not in ConsoleGroup's list: that would import the bench for every command.
        raise CliError(str(error)) from None
    click.echo(render_table(report))
    if json_path:
        report.write_json(Path(json_path))
        click.echo(f"wrote {json_path}")


for command in (cli_models.models, cli_models.pull, cli_models.rm, cli_models.use):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="console.sh")
