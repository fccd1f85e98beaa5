"""`start --foreground`: stay attached and keep the backend alive, for systemd.

A crashed backend is restarted after an exponentially growing wait; after
LLAMA_RESTART_MAX_CRASHES crashes within LLAMA_RESTART_WINDOW_SECONDS the supervisor
gives up with a non-zero exit, so systemd (or the operator) sees the failure.
SIGTERM or SIGINT stops the backend and exits 0.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from runtime import service
from runtime.database import Database
from runtime.gateway import GatewaySupervisor
from runtime.lock import console_lock
from runtime.modelfiles import ModelError
from runtime.procs import PidRecord, is_alive, read_pidfile, remove_pidfile, write_pidfile
from runtime.settings import Settings
from runtime.supervisor import BackendSupervisor, Launch, StartError

MAX_BACKOFF_SECONDS = 60.0
EXIT_GAVE_UP = 1


class ForegroundSupervisor:
    """Runs until told to stop, restarting the backend when it crashes."""

    def __init__(self, settings: Settings, echo: Callable[[str], None]) -> None:
        self.settings = settings
        self.echo = echo
        self.backend = BackendSupervisor(settings, echo=echo)
        self.gateway = GatewaySupervisor(settings, echo=echo)
        self.pidfile = settings.paths.run_dir / service.FOREGROUND_PIDFILE
        self.crash_times: list[float] = []
        self.is_stop_requested = False

    def handle_term(self, signum: int, frame: object) -> None:
        self.echo(f"received {signal.Signals(signum).name}; stopping")
        self.is_stop_requested = True

    def run(self, model_path: Path) -> int:
        """Start, supervise and finally stop the backend; return the exit code."""
        signal.signal(signal.SIGTERM, self.handle_term)
        signal.signal(signal.SIGINT, self.handle_term)
        write_pidfile(
            self.pidfile, PidRecord(pid=os.getpid(), marker="--foreground", started_at=time.time())
        )
        try:
            self._start_gateway_side()
            process = self._launch(model_path)  # a first failure is not retried
            while not self.is_stop_requested:
                returncode = self._wait_for_exit(process)
                if returncode is None:
                    break
                process = self._recover(returncode)
                if process is None:
                    return 0 if self.is_stop_requested else EXIT_GAVE_UP
            return 0
        except StartError:
            if self.is_stop_requested:
                return 0
            raise
        finally:
            service.stop(self.settings, self.echo)
            remove_pidfile(self.pidfile)

    def _start_gateway_side(self) -> None:
        """In gateway mode: the database, then the gateway (which waits for the backend)."""
        if not self.settings.is_gateway_mode:
            return
        with console_lock(self.settings.paths.run_dir):
            self.gateway.dsn = Database(self.settings, self.echo).ensure_running()
            self.gateway.start()
        self.echo(f"the gateway serves at {self.gateway.url}")

    def _launch(self, model_path: Path) -> Launch:
        self.backend.model_path = model_path
        run_dir = self.settings.paths.run_dir
        with console_lock(run_dir), service.holding_requests(self.settings):
            self.backend.check_port_free()
            process = self.backend.launch()
            self.backend.wait_until_ready(process, is_cancelled=lambda: self.is_stop_requested)
        self.echo(f"serving {model_path.name} at {self.backend.url} (pid {process.pid})")
        return process

    def _keep_gateway_up(self) -> None:
        """Restart the gateway if it has died; it holds no state that a restart loses."""
        record = read_pidfile(self.gateway.pidfile)
        if not self.settings.is_gateway_mode or (record is not None and is_alive(record)):
            return
        self.echo("the gateway has exited; starting it again")
        try:
            with console_lock(self.settings.paths.run_dir):
                self.gateway.start()
        except StartError as error:
            self.echo(f"the gateway did not start: {error}")

    def _wait_for_exit(self, process: Launch) -> int | None:
        """The backend's exit code, or None once a stop is requested."""
        while not self.is_stop_requested:
            returncode = process.poll()
            if returncode is not None:
                return returncode
            self._keep_gateway_up()
            time.sleep(0.2)
        return None

    def _recover(self, returncode: int) -> Launch | None:
        """Restart after a crash, with backoff; None when it is time to give up."""
        while not self.is_stop_requested:
            delay = self._record_crash()
            if delay is None:
                return None
            self.echo(
                f"the backend exited with code {returncode}; restarting in {delay:.1f}s "
                f"(crash {len(self.crash_times)} of "
                f"{self.settings.console.restart_max_crashes} allowed within "
                f"{self.settings.console.restart_window_seconds:.0f}s)"
            )
            if not self._sleep(delay):
                return None
            try:
                return self._launch(service.model_to_serve(self.settings))
            except (StartError, ModelError) as error:
                self.echo(f"restart failed: {error}")
                returncode = -1
        return None

    def _record_crash(self) -> float | None:
        """Note a crash; return the wait before the next try, or None to give up."""
        now = time.monotonic()
        window = self.settings.console.restart_window_seconds
        self.crash_times = [t for t in self.crash_times if now - t < window] + [now]
        limit = self.settings.console.restart_max_crashes
        if len(self.crash_times) >= limit:
            self.echo(
                f"error: giving up: the backend crashed {len(self.crash_times)} times "
                f"within {window:.0f}s; see ./console.sh logs, fix the cause, then start "
                f"again"
            )
            return None
        base = self.settings.console.restart_backoff_seconds
        return min(base * 2 ** (len(self.crash_times) - 1), MAX_BACKOFF_SECONDS)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless a stop is requested meanwhile; False if it was."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.is_stop_requested:
            time.sleep(0.1)
        return not self.is_stop_requested


def stop_foreground(record: PidRecord, settings: Settings, echo: Callable[[str], None]) -> bool:
    """Ask a foreground supervisor to stop; False if it is still running after the wait."""
    if not is_alive(record):
        return True  # a stale record: its pid may belong to someone else now, never signal it
    echo(f"stopping the foreground supervisor (pid {record.pid})")
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.console.stop_grace_seconds + 10
    while is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_alive(record)
