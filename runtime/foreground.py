"""`start --foreground`: stay attached and keep the backend alive, for systemd.

A crashed backend (any replica) is restarted after an exponentially growing wait; after
LLAMA_RESTART_MAX_CRASHES crashes within LLAMA_RESTART_WINDOW_SECONDS the supervisor
gives up with a non-zero exit, so systemd (or the operator) sees the failure.
SIGTERM or SIGINT stops the backend and exits 0.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from runtime import service
from runtime.database import DatabaseError
from runtime.lock import console_lock
from runtime.modelfiles import ModelError
from runtime.procs import PidRecord, is_alive, read_pidfile, remove_pidfile, write_pidfile
from runtime.settings import Settings
from runtime.supervisor import StartError

MAX_BACKOFF_SECONDS = 60.0
EXIT_GAVE_UP = 1
# What a start after a crash can raise; the supervisor reports it and tries again.
RESTART_ERRORS = (StartError, ModelError, DatabaseError)


class ForegroundSupervisor:
    """Runs until told to stop, restarting the backend when it crashes."""

    def __init__(
        self,
        settings: Settings,
        echo: Callable[[str], None],
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.echo = echo
        self.on_wait = on_wait
        self.stack = service.Stack(settings, echo)
        self.pidfile = settings.paths.run_dir / service.FOREGROUND_PIDFILE
        self.crash_times: list[float] = []
        self.is_stop_requested = False
        self.is_owner = False

    def handle_term(self, signum: int, frame: object) -> None:
        self.echo(f"received {signal.Signals(signum).name}; stopping")
        self.is_stop_requested = True

    def run(self) -> int:
        """Start everything, keep the backend alive, finally stop everything; the exit code."""
        signal.signal(signal.SIGTERM, self.handle_term)
        signal.signal(signal.SIGINT, self.handle_term)
        try:
            # One hold of the lock from the checks to a serving stack: no other console
            # run can start a part in between.
            with console_lock(self.settings.paths.run_dir, on_wait=self.on_wait):
                self._claim()
                self._start_parts()
            return self._supervise()
        except StartError:
            if self.is_stop_requested:
                return 0
            raise
        finally:
            if self.is_owner:
                self.stack.stop()
                remove_pidfile(self.pidfile)

    def _claim(self) -> None:
        """Refuse a backend this supervisor did not start, or a bad model; else own the service."""
        is_serving = any(backend.status().is_serving for backend in self.stack.backends)
        if is_serving or service.is_foreground_running(self.settings):
            raise StartError(
                "the backend is already running; run ./console.sh stop first, "
                "so that this supervisor owns it"
            )
        service.check_ready_to_start(self.settings)
        service.adopt_mode(self.settings)
        write_pidfile(
            self.pidfile, PidRecord(pid=os.getpid(), marker="--foreground", started_at=time.time())
        )
        self.is_owner = True

    def _start_parts(self) -> None:
        """The one start path; callers hold the lock."""
        self.stack.start(is_cancelled=lambda: self.is_stop_requested)
        for backend in self.stack.backends:
            self.echo(
                f"serving {backend.model_path.name} at {backend.url} (pid {backend.launched.pid})"
            )
        if self.stack.gateway:
            self.echo(f"the gateway serves at {self.stack.gateway.url}")

    def _supervise(self) -> int:
        """Wait for crashes and recover from them; the exit code once it is time to stop."""
        while not self.is_stop_requested:
            exited = self._wait_for_exit()
            if exited is None:
                break
            if not self._recover(*exited):
                return 0 if self.is_stop_requested else EXIT_GAVE_UP
        return 0

    def _keep_gateway_up(self) -> None:
        """Restart the gateway if it has died; it holds no state that a restart loses."""
        gateway = self.stack.gateway
        record = read_pidfile(gateway.pidfile) if gateway else None
        if gateway is None or (record is not None and is_alive(record)):
            return
        self.echo("the gateway has exited; starting it again")
        try:
            with console_lock(self.settings.paths.run_dir):
                self.stack.start()
        except RESTART_ERRORS as error:
            self.echo(f"the gateway did not start: {error}")

    def _wait_for_exit(self) -> tuple[str, int] | None:
        """Which backend exited and its exit code, or None once a stop is requested."""
        while not self.is_stop_requested:
            for backend in self.stack.backends:
                returncode = backend.poll_exit()
                if returncode is not None:
                    return backend.name, returncode
            self._keep_gateway_up()
            time.sleep(0.2)
        return None

    def _recover(self, name: str, returncode: int) -> bool:
        """Restart after a crash, with backoff; False when it is time to give up.

        The crashes of all replicas count together: a cause they share (a port, the
        model) makes each of them crash, and must end in giving up too.
        """
        while not self.is_stop_requested:
            delay = self._record_crash()
            if delay is None:
                return False
            self.echo(
                f"the {name} exited with code {returncode}; restarting in {delay:.1f}s "
                f"(crash {len(self.crash_times)} of "
                f"{self.settings.console.restart_max_crashes} allowed within "
                f"{self.settings.console.restart_window_seconds:.0f}s)"
            )
            if not self._sleep(delay):
                return False
            try:
                with console_lock(self.settings.paths.run_dir):
                    self._start_parts()
                return True
            except RESTART_ERRORS as error:
                self.echo(f"restart failed: {error}")
                returncode = -1
        return False

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
