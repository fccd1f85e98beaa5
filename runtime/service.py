"""The console's actions on the running service: start, stop, restart, ensure.

Callers hold the console lock. Errors are domain errors; cli.py turns them into messages
and exit codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.modelfiles import find_readable_model
from runtime.procs import is_alive, read_pidfile
from runtime.settings import ConfigError, Settings
from runtime.supervisor import SERVING, BackendStatus, BackendSupervisor

FOREGROUND_PIDFILE = "supervisor.pid"


@dataclass(frozen=True)
class StartResult:
    status: BackendStatus
    was_running: bool


def model_to_serve(settings: Settings) -> Path:
    """The configured model, resolved and checked to be a readable GGUF file."""
    return find_readable_model(settings["LLAMA_MODEL"], settings.paths.models_dir)


def check_ready_to_start(settings: Settings) -> Path:
    """Everything that can be checked before a process is spawned; returns the model."""
    if not settings["LLAMA_API_KEY"]:
        raise ConfigError(
            f"LLAMA_API_KEY is empty (from {settings.source_of('LLAMA_API_KEY')}); set a "
            f"secret there, or delete {settings.paths.config_env} and run ./console.sh start "
            f"to generate one"
        )
    return model_to_serve(settings)


def start(settings: Settings, echo: Callable[[str], None]) -> StartResult:
    """Start the backend unless it already serves; return once it answers."""
    supervisor = BackendSupervisor(settings, echo=echo)
    current = supervisor.status()
    if current.is_serving:
        return StartResult(current, was_running=True)
    model_path = check_ready_to_start(settings)
    if supervisor.stop():
        echo(f"stopped a backend that did not answer (pid {current.pid})")
    echo(f"starting llama_cpp.server with {model_path.name} on {supervisor.url}")
    return StartResult(supervisor.start(model_path), was_running=False)


def stop(settings: Settings, echo: Callable[[str], None]) -> bool:
    """Stop the backend; True if one was running."""
    return BackendSupervisor(settings, echo=echo).stop()


def stop_foreground(settings: Settings, echo: Callable[[str], None]) -> bool:
    """Ask a running foreground supervisor to stop everything; True once it has."""
    from runtime.foreground import stop_foreground as signal_and_wait

    record = read_pidfile(settings.paths.run_dir / FOREGROUND_PIDFILE)
    return record is not None and signal_and_wait(record, settings, echo)


def restart(settings: Settings, echo: Callable[[str], None]) -> StartResult:
    """Stop, then start; checks the model first so a bad one leaves the old backend up."""
    check_ready_to_start(settings)
    if stop(settings, echo):
        echo("stopped the backend")
    return start(settings, echo)


def is_foreground_running(settings: Settings) -> bool:
    record = read_pidfile(settings.paths.run_dir / FOREGROUND_PIDFILE)
    return record is not None and is_alive(record)


def needs_start(settings: Settings) -> BackendStatus | None:
    """For ensure: the status if something is down, or None when all is well."""
    if is_foreground_running(settings):
        # A foreground supervisor restarts its own backend; cron must not compete.
        return None
    status = BackendSupervisor(settings).status()
    return None if status.state == SERVING else status
