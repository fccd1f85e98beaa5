"""The console's actions on the running service: start, stop, restart, ensure, status.

In gateway mode the service is three parts, started in this order and stopped in the
reverse one: the database (the private cluster, unless the operator has their own), the
backend, and the gateway. In single-key mode it is the backend alone.

Callers hold the console lock. Errors are domain errors; cli.py turns them into messages
and exit codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.database import Database
from runtime.gateway import GatewaySupervisor
from runtime.modelfiles import find_readable_model
from runtime.procs import is_alive, read_pidfile
from runtime.settings import ConfigError, Settings
from runtime.supervisor import DEGRADED, SERVING, STOPPED, BackendSupervisor, ComponentStatus

FOREGROUND_PIDFILE = "supervisor.pid"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class StartResult:
    status: ComponentStatus  # the backend
    was_running: bool
    gateway: ComponentStatus | None = None


def model_to_serve(settings: Settings) -> Path:
    """The configured model, resolved and checked to be a readable GGUF file."""
    return find_readable_model(settings.server.model, settings.paths.models_dir)


def check_ready_to_start(settings: Settings) -> Path:
    """Everything that can be checked before a process is spawned; returns the model."""
    if not settings.server.api_key:
        raise ConfigError(
            f"LLAMA_API_KEY is empty (from {settings.source_of('LLAMA_API_KEY')}); set a "
            f"secret there, or delete {settings.paths.config_env} and run ./console.sh start "
            f"to generate one"
        )
    return model_to_serve(settings)


def start(settings: Settings, echo: Echo) -> StartResult:
    """Start whatever is not serving yet; return once everything answers."""
    model_path = check_ready_to_start(settings)
    if not settings.is_gateway_mode:
        return StartResult(*ensure_backend(settings, model_path, echo))
    gateway = GatewaySupervisor(settings, echo=echo)
    was_gateway_up = gateway.status().is_serving
    if not was_gateway_up:
        gateway.stop()
        # Before anything starts: a busy port must not leave a backend behind.
        gateway.check_port_free()
    database = Database(settings, echo)
    was_database_up = not database.is_managed or database.cluster().is_running()
    gateway.dsn = database.ensure_running()
    backend_status, was_backend_up = ensure_backend(settings, model_path, echo)
    if not was_gateway_up:
        echo(f"starting the gateway on {gateway.url}")
        gateway.start()
    was_running = was_database_up and was_backend_up and was_gateway_up
    return StartResult(backend_status, was_running, gateway.status())


def ensure_backend(
    settings: Settings, model_path: Path, echo: Echo
) -> tuple[ComponentStatus, bool]:
    """Start the backend unless it serves; its status, and whether it was serving already."""
    backend = BackendSupervisor(settings, echo=echo, model_path=model_path)
    current = backend.status()
    if current.is_serving:
        return current, True
    if backend.stop():
        echo(f"stopped a backend that did not answer (pid {current.pid})")
    echo(f"starting llama_cpp.server with {model_path.name} on {backend.url}")
    with holding_requests(settings):
        backend.start()
    return backend.status(), False


@contextlib.contextmanager
def holding_requests(settings: Settings) -> Iterator[None]:
    """While the backend is down on purpose, the gateway holds requests instead of failing."""
    flag = settings.paths.restart_flag
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    try:
        yield
    finally:
        flag.unlink(missing_ok=True)


def stop(settings: Settings, echo: Echo) -> bool:
    """Stop the gateway, the backend and the private database; True if any was running."""
    was_running = GatewaySupervisor(settings, echo=echo).stop()
    was_running = BackendSupervisor(settings, echo=echo).stop() or was_running
    database = Database(settings, echo)
    if database.is_managed and database.stop():
        echo("stopped the private PostgreSQL cluster")
        was_running = True
    return was_running


def restart(settings: Settings, echo: Echo) -> StartResult:
    """Restart the backend; the gateway stays up and holds requests meanwhile.

    The model is checked first, so a bad one leaves the old backend serving.
    """
    check_ready_to_start(settings)
    with holding_requests(settings):
        if BackendSupervisor(settings, echo=echo).stop():
            echo("stopped the backend")
        return start(settings, echo)


def stop_foreground(settings: Settings, echo: Echo) -> bool:
    """Ask a running foreground supervisor to stop everything; True once it has."""
    from runtime.foreground import stop_foreground as signal_and_wait

    record = read_pidfile(settings.paths.run_dir / FOREGROUND_PIDFILE)
    return record is not None and signal_and_wait(record, settings, echo)


def is_foreground_running(settings: Settings) -> bool:
    record = read_pidfile(settings.paths.run_dir / FOREGROUND_PIDFILE)
    return record is not None and is_alive(record)


def component_statuses(settings: Settings) -> dict[str, ComponentStatus]:
    """Each part of the service and its state, in start order."""
    statuses = {}
    if settings.is_gateway_mode:
        statuses["database"] = Database(settings).status()
    statuses["backend"] = BackendSupervisor(settings).status()
    if settings.is_gateway_mode:
        statuses["gateway"] = GatewaySupervisor(settings).status()
    return statuses


def overall_state(settings: Settings, statuses: dict[str, ComponentStatus]) -> str:
    """serving if every part serves; stopped if every part the console runs is stopped."""
    states = {status.state for status in statuses.values()}
    if states == {SERVING}:
        return SERVING
    # The operator's own database keeps running when llamagate is stopped.
    owned = {
        status.state
        for name, status in statuses.items()
        if name != "database" or not settings.external_dsn
    }
    return STOPPED if owned == {STOPPED} else DEGRADED


def needs_start(settings: Settings) -> dict[str, ComponentStatus]:
    """For ensure: the parts that are not serving; empty when all is well."""
    if is_foreground_running(settings):
        # A foreground supervisor restarts its own children; cron must not compete.
        return {}
    return {
        name: status
        for name, status in component_statuses(settings).items()
        if status.state != SERVING
    }
