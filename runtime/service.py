"""The console's actions on the running service: start, stop, restart, ensure, status.

In gateway mode the service is three parts, started in this order and stopped in the
reverse one: the database (the private cluster, unless the operator has their own), the
backend (LLAMA_SERVER_REPLICAS processes of llama_cpp.server, runtime/replicas.py), and
the gateway. With LLAMA_SERVER_REPLICAS=0 (a gateway-only host) there is no backend. In
single-key mode, and on a host started with --backend-only (runtime/runmode.py), it is
the backend alone. `Stack.start` is the one start
path: start, restart, ensure and the foreground supervisor all use it.

Callers hold the console lock. Errors are domain errors; cli.py turns them into messages
and exit codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.database import Database
from runtime.gateway import GatewaySupervisor
from runtime.modelfiles import find_readable_model
from runtime.procs import is_alive, read_pidfile
from runtime.replicas import indexes_on_disk
from runtime.runmode import is_remembered_backend_only, remember_mode
from runtime.settings import ConfigError, Settings
from runtime.states import ComponentStatus, State
from runtime.supervisor import BackendSupervisor, StartError

FOREGROUND_PIDFILE = "supervisor.pid"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class StartResult:
    status: ComponentStatus | None  # the backend (replica 0); None on a gateway-only host
    was_running: bool
    gateway: ComponentStatus | None = None
    replicas: tuple[ComponentStatus, ...] = ()  # every replica, replica 0 first


def check_ready_to_start(settings: Settings) -> Path | None:
    """Everything that can be checked before a process is spawned; the model, if readable.

    A gateway-only host (LLAMA_SERVER_REPLICAS=0) loads no model and keys no backend.
    """
    if not settings.has_replicas:
        return None
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
        self.backends = [
            BackendSupervisor(settings, echo=echo, replica=replica) for replica in settings.replicas
        ]
        self.gateway = GatewaySupervisor(settings, echo=echo) if is_gateway_mode else None

    @property
    def backend(self) -> BackendSupervisor | None:
        """Replica 0, the one backend unless LLAMA_SERVER_REPLICAS says more (or 0: None)."""
        return self.backends[0] if self.backends else None

    def surplus_backends(self) -> list[BackendSupervisor]:
        """Replicas that have a pid file but are beyond LLAMA_SERVER_REPLICAS (it shrank)."""
        configured = len(self.backends)
        return [
            BackendSupervisor(self.settings, echo=self.echo, replica=self.settings.replica(index))
            for index in indexes_on_disk(self.settings.paths.run_dir)
            if index >= configured
        ]

    def start(
        self, is_cancelled: Callable[[], bool] = lambda: False, *, restart: bool = False
    ) -> StartResult:
        """Start each part that does not serve (restart: the backend in any case); in order.

        The gateway comes last: once it answers, everything behind it does, and a model
        that fails to load leaves no gateway up. Its port is checked first all the same,
        so that a busy one leaves nothing behind. The model is checked before anything
        else, so a bad one leaves the old backend serving.
        """
        model_path = check_ready_to_start(self.settings)
        for backend in self.backends:
            backend.model_path = model_path
        was_gateway_up = self._prepare_gateway()
        was_database_up = self._ensure_database()
        self._stop_surplus_backends()
        was_backend_up = self._ensure_backends(is_cancelled, restart)
        if not was_gateway_up:
            self.echo(f"starting the gateway on {self.gateway.url}")
            self.gateway.start(is_cancelled)
        return StartResult(
            self.backend.status() if self.backend else None,
            was_database_up and was_backend_up and was_gateway_up,
            self.gateway.status() if self.gateway else None,
            tuple(backend.status() for backend in self.backends),
        )

    def _prepare_gateway(self) -> bool:
        """True if the gateway serves the configured replicas; else stop it, check its port."""
        if self.gateway is None:
            return True
        if self.gateway.observe().is_serving:
            served = self.gateway.served_backends()
            if served in (None, self.settings.backend_urls):
                return True
            # It learns the replicas only when it starts; it drains before it stops.
            self.echo(
                f"the gateway serves the replicas {served}; restarting it for "
                f"{self.settings.backend_urls} (LLAMA_SERVER_REPLICAS changed)"
            )
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

    def _ensure_backends(self, is_cancelled: Callable[[], bool], restart: bool) -> bool:
        """Start each replica that does not serve, then (restart) replace the serving ones.

        One at a time, each serving before the next is stopped, so a pool never drops to
        zero. The restart flag makes the gateway hold requests only while no replica
        serves: with one replica, for the whole restart. Every port to open is checked
        first, so a busy one stops nothing and starts nothing.
        """
        currents = {backend.name: backend.observe() for backend in self.backends}
        down = [backend for backend in self.backends if not currents[backend.name].is_serving]
        serving = [backend for backend in self.backends if currents[backend.name].is_serving]
        for backend in down:
            self._stop_leftover(backend, currents[backend.name])
            backend.check_port_free()
        for backend in down + (serving if restart else []):
            others_serve = any(
                other.observe().is_serving for other in self.backends if other is not backend
            )
            with contextlib.nullcontext() if others_serve else holding_requests(self.settings):
                self._replace_backend(backend, is_cancelled)
        return not down and not restart

    def _stop_leftover(self, backend: BackendSupervisor, current: ComponentStatus) -> None:
        """Stop what is left of a replica that does not serve (dead, hung, or starting)."""
        if backend.stop():
            self.echo(f"stopped {self._label(backend)}, which did not answer (pid {current.pid})")

    def _replace_backend(
        self, backend: BackendSupervisor, is_cancelled: Callable[[], bool]
    ) -> None:
        """Stop the replica if it runs, start it, and return once it serves."""
        if backend.stop():
            self.echo(f"stopped {self._label(backend)}")
        model = backend.model_path
        count = len(self.backends)
        self.echo(
            f"starting llama_cpp.server with {model.name} on {backend.url}"
            + (f" (replica {backend.replica.index} of {count})" if count > 1 else "")
        )
        backend.start(is_cancelled)

    def _label(self, backend: BackendSupervisor) -> str:
        if len(self.backends) == 1 and backend.replica.index == 0:
            return "the backend"
        return f"replica {backend.replica.index} ({backend.name})"

    def _stop_surplus_backends(self) -> None:
        """Stop the replicas beyond LLAMA_SERVER_REPLICAS, left over from a larger count."""
        for backend in self.surplus_backends():
            if backend.stop():
                self.echo(
                    f"stopped {backend.name}, beyond LLAMA_SERVER_REPLICAS="
                    f"{self.settings.server.replicas}"
                )

    def stop(self) -> bool:
        """Stop the gateway, the backend and the private database; True if any was running.

        In either mode: a part left over from the other mode must not be stranded.
        """
        gateway = self.gateway or GatewaySupervisor(self.settings, echo=self.echo)
        was_running = gateway.stop()
        for backend in self.backends + self.surplus_backends():
            was_running = backend.stop() or was_running
        database = self.database or Database(self.settings, self.echo)
        if database.is_managed and database.stop():
            self.echo("stopped the private PostgreSQL cluster")
            was_running = True
        return was_running


def start(settings: Settings, echo: Echo) -> StartResult:
    """Start whatever is not serving yet; return once everything answers."""
    return Stack(settings, echo).start()


def adopt_mode(settings: Settings) -> None:
    """Remember settings' mode (backend only or not) for later commands; callers hold the lock.

    A change of mode while a part of the other one runs is refused (StartError): a
    gateway and a database would be stranded, or replicas left listening where the
    other mode does not expect them.
    """
    run_dir = settings.paths.run_dir
    remembered = is_remembered_backend_only(run_dir)
    if remembered != settings.is_backend_only:
        running = dataclasses.replace(settings, is_backend_only=remembered)
        if overall_state(running, component_statuses(running)) != State.STOPPED:
            flag = "--backend-only" if settings.is_backend_only else "--no-backend-only"
            raise StartError(
                f"parts of this host's {running.mode_name} mode still run (see ./console.sh "
                f"status); run ./console.sh stop first, then ./console.sh start {flag}"
            )
    remember_mode(run_dir, settings.is_backend_only)


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
    backends = stack.backends + stack.surplus_backends()
    parts = [stack.database, *backends, stack.gateway]
    names = ["database", *(backend.name for backend in backends), "gateway"]
    return {
        name: part.status() for name, part in zip(names, parts, strict=True) if part is not None
    }


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
