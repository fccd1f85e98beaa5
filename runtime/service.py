"""The console's actions on the running service: start, stop, restart, ensure, status.

In gateway mode the service is three parts, started in this order and stopped in the
reverse one: the database (the private cluster, unless the operator has their own), the
backend, and the gateway. In single-key mode it is the backend alone. `Stack.start` is
the one start path: start, restart, ensure and the foreground supervisor all use it.

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
from runtime.states import ComponentStatus, State
from runtime.supervisor import BackendSupervisor

FOREGROUND_PIDFILE = "supervisor.pid"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class StartResult:
    status: ComponentStatus  # the backend
    was_running: bool
    gateway: ComponentStatus | None = None


def check_ready_to_start(settings: Settings) -> Path:
    """Everything that can be checked before a process is spawned; the model, if readable."""
    if not settings.server.api_key:
        raise ConfigError(
            f"LLAMA_API_KEY is empty (from {settings.source_of('LLAMA_API_KEY')}); set a "
            f"secret there, or delete {settings.paths.config_env} and run ./console.sh start "
            f"to generate one"
        )
    return find_readable_model(settings.server.model, settings.paths.models_dir)


class Stack:
    """The parts of the service, one supervisor object per part, and the one start path."""

    def __init__(self, settings: Settings, echo: Echo = print) -> None:
        self.settings = settings
        self.echo = echo
        is_gateway_mode = settings.is_gateway_mode
        self.database = Database(settings, echo) if is_gateway_mode else None
        self.backend = BackendSupervisor(settings, echo=echo)
        self.gateway = GatewaySupervisor(settings, echo=echo) if is_gateway_mode else None

    def start(
        self, is_cancelled: Callable[[], bool] = lambda: False, *, restart: bool = False
    ) -> StartResult:
        """Start each part that does not serve (restart: the backend in any case); in order.

        The gateway comes last: once it answers, everything behind it does, and a model
        that fails to load leaves no gateway up. Its port is checked first all the same,
        so that a busy one leaves nothing behind. The model is checked before anything
        else, so a bad one leaves the old backend serving.
        """
        self.backend.model_path = check_ready_to_start(self.settings)
        was_gateway_up = self._prepare_gateway()
        was_database_up = self._ensure_database()
        was_backend_up = self._ensure_backend(is_cancelled, restart)
        if not was_gateway_up:
            self.echo(f"starting the gateway on {self.gateway.url}")
            self.gateway.start(is_cancelled)
        return StartResult(
            self.backend.status(),
            was_database_up and was_backend_up and was_gateway_up,
            self.gateway.status() if self.gateway else None,
        )

    def _prepare_gateway(self) -> bool:
        """True if the gateway serves; else clear what is left of it and check its port."""
        if self.gateway is None or self.gateway.observe().is_serving:
            return True
        self.gateway.stop()
        self.gateway.check_port_free()
        return False

    def _ensure_database(self) -> bool:
        """Start the private cluster if it is down; True if it (or the operator's) was up."""
        if self.database is None:
            return True
        was_up = not self.database.is_managed or self.database.cluster().is_running()
        self.gateway.dsn = self.database.ensure_running()
        return was_up

    def _ensure_backend(self, is_cancelled: Callable[[], bool], restart: bool) -> bool:
        """Start the backend unless it serves (or restart); True if it was left serving."""
        current = self.backend.observe()
        if current.is_serving and not restart:
            return True
        with holding_requests(self.settings):
            if self.backend.stop():
                self.echo(
                    "stopped the backend"
                    if current.is_serving
                    else f"stopped a backend that did not answer (pid {current.pid})"
                )
            model = self.backend.model_path
            self.echo(f"starting llama_cpp.server with {model.name} on {self.backend.url}")
            self.backend.start(is_cancelled)
        return False

    def stop(self) -> bool:
        """Stop the gateway, the backend and the private database; True if any was running.

        In either mode: a part left over from the other mode must not be stranded.
        """
        gateway = self.gateway or GatewaySupervisor(self.settings, echo=self.echo)
        was_running = gateway.stop()
        was_running = self.backend.stop() or was_running
        database = self.database or Database(self.settings, self.echo)
        if database.is_managed and database.stop():
            self.echo("stopped the private PostgreSQL cluster")
            was_running = True
        return was_running


def start(settings: Settings, echo: Echo) -> StartResult:
    """Start whatever is not serving yet; return once everything answers."""
    return Stack(settings, echo).start()


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
    return Stack(settings, echo).stop()


def restart(settings: Settings, echo: Echo) -> StartResult:
    """Restart the backend; the gateway stays up and holds requests meanwhile.

    The model is checked first, so a bad one leaves the old backend serving.
    """
    return Stack(settings, echo).start(restart=True)


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
    stack = Stack(settings)
    parts = {"database": stack.database, "backend": stack.backend, "gateway": stack.gateway}
    return {name: part.status() for name, part in parts.items() if part is not None}


def overall_state(settings: Settings, statuses: dict[str, ComponentStatus]) -> State:
    """serving if every part serves; stopped if every part the console runs is stopped;
    starting while a part starts and none is in trouble (the later ones may not have begun).
    """
    states = {status.state for status in statuses.values()}
    if states == {State.SERVING}:
        return State.SERVING
    # The operator's own database keeps running when llamagate is stopped.
    owned = {
        status.state
        for name, status in statuses.items()
        if name != "database" or not settings.external_dsn
    }
    if owned == {State.STOPPED}:
        return State.STOPPED
    if State.STARTING in states and states <= {State.STARTING, State.SERVING, State.STOPPED}:
        return State.STARTING
    return State.DEGRADED


def needs_start(settings: Settings) -> dict[str, ComponentStatus]:
    """For ensure: the parts that are not serving; empty when all is well."""
    if is_foreground_running(settings):
        # A foreground supervisor restarts its own children; cron must not compete.
        return {}
    return {
        name: status
        for name, status in component_statuses(settings).items()
        if status.state != State.SERVING
    }
