"""One object per supervised process (the backend, the gateway): launch, readiness, status, stop.

`ProcessSupervisor` holds what both share: the pid file checked against the command line,
a session of its own, output through a rotating log pump, an HTTP readiness probe,
SIGTERM-grace-SIGKILL, and its state (runtime/states.py), changed only by checked moves.
Subclasses say what to run and how to probe it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime import backend, proctable
from runtime.procs import (
    PidRecord,
    is_alive,
    read_pidfile,
    remove_pidfile,
    terminate_group,
    write_pidfile,
)
from runtime.replicas import Replica
from runtime.settings import Settings
from runtime.states import ComponentStatus, State, checked_move

LOG_TAIL_LINES = 15


class StartError(Exception):
    """The backend could not be started; `log_tail` holds the end of its log, if any."""

    def __init__(self, message: str, log_tail: str = "", log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.log_path = log_path


@dataclass(frozen=True)
class Launch:
    """A started backend: its process, its log pump, and where its part of the log begins."""

    process: subprocess.Popen
    pump: subprocess.Popen
    log_offset: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()


class ProcessSupervisor:
    """Starts, probes and stops one child; the pid file is the shared memory."""

    name = ""  # also the name of its pid file and log file
    marker = ""  # a string its command line must contain
    start_timeout_key = "LLAMA_START_TIMEOUT_SECONDS"

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self.echo = echo
        self.pidfile = settings.paths.run_dir / f"{self.name}.pid"
        self.log_path = settings.paths.logs_dir / f"{self.name}.log"
        # What this object has done to its process, or last observed (see observe()).
        self.state = State.STOPPED
        self.launched: Launch | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def listen_address(self) -> tuple[str, int, str]:
        """(host, port, the config key that sets the port), for the port check."""
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    def details(self) -> dict[str, str]:
        """What the pid file remembers about this run, besides the url and the log."""
        return {}

    @property
    def stop_grace_seconds(self) -> float:
        """How long stop waits after SIGTERM before SIGKILL."""
        return self.settings.console.stop_grace_seconds

    def is_answering(self, url: str, timeout: float = 1.0) -> bool:
        raise NotImplementedError

    def explain_failure(self, log_tail: str) -> str:
        return f"the {self.name} exited during start-up; the end of its log follows"

    def status(self) -> ComponentStatus:
        """What runs now, judged by the pid file, the process table and an HTTP probe."""
        record = read_pidfile(self.pidfile)
        if record is None:
            return ComponentStatus(State.STOPPED, self.url)
        known = dict(
            pid=record.pid,
            model=record.details.get("model"),
            started_at=record.started_at,
            url=record.details.get("url", self.url),
        )
        if not is_alive(record):
            return ComponentStatus(
                State.DEGRADED,
                **known,
                detail=f"process {record.pid} has died; run ./console.sh ensure to start it again",
            )
        if self.is_answering(known["url"]):
            return ComponentStatus(State.SERVING, **known)
        timeout = self.settings[self.start_timeout_key]
        with contextlib.suppress(OSError, ValueError, IndexError):
            age = proctable.seconds_running(record.pid)
            if age < timeout:
                return ComponentStatus(
                    State.STARTING,
                    **known,
                    detail=f"process {record.pid} is still starting ({age:.0f}s of the "
                    f"{timeout:.0f}s that {self.start_timeout_key} allows)",
                )
        return ComponentStatus(
            State.DEGRADED,
            **known,
            detail=f"process {record.pid} runs but has not answered within "
            f"{self.start_timeout_key} ({timeout:.0f}s): it hangs",
        )

    def observe(self) -> ComponentStatus:
        """status(), adopted as this object's state: whoever started the process, it is ours now."""
        current = self.status()
        self.state = current.state
        return current

    def move_to(self, target: State) -> None:
        """Make a move that states.MOVES allows; anything else is a bug (TransitionError)."""
        self.state = checked_move(self.name, self.state, target)

    def start(self, is_cancelled: Callable[[], bool] = lambda: False) -> ComponentStatus:
        """Launch and return once it answers; else raise StartError, leaving nothing behind."""
        self.move_to(State.STARTING)
        try:
            self.check_port_free()
            self.launched = self.launch()
            self.wait_until_ready(self.launched, is_cancelled)
        except StartError:
            self.move_to(State.FAILED)
            self.stop()
            raise
        self.move_to(State.SERVING)
        return self.status()

    def poll_exit(self) -> int | None:
        """The exit code of the process this object launched, once it has exited (FAILED then)."""
        returncode = self.launched.poll() if self.launched else None
        if returncode is not None and self.state == State.SERVING:
            self.move_to(State.FAILED)
        return returncode

    def launch(self) -> Launch:
        """Spawn the child in a session of its own, its output piped to the log."""
        log_offset = self._write_log_header()
        process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            cwd=self.settings.paths.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        launched = Launch(process, self._start_log_pump(process), log_offset)
        write_pidfile(
            self.pidfile,
            PidRecord(
                pid=process.pid,
                marker=self.marker,
                started_at=time.time(),
                details={"url": self.url, "log": str(self.log_path), **self.details()},
            ),
        )
        return launched

    def wait_until_ready(
        self, launched: Launch, is_cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        """Poll until it answers, the process exits, or the start timeout passes."""
        timeout = self.settings.console.start_timeout_seconds
        started = time.monotonic()
        next_progress = started + 10
        while time.monotonic() - started < timeout and not is_cancelled():
            if launched.poll() is not None:
                self._fail_start(launched)
            if self.is_answering(self.url, timeout=0.5):
                return
            if time.monotonic() >= next_progress:
                self.echo(f"still starting the {self.name} ({time.monotonic() - started:.0f}s)...")
                next_progress += 10
            time.sleep(0.1)
        self._end_process()  # first, so that the log pump ends and the tail is complete
        if is_cancelled():
            raise StartError(f"start cancelled: a stop was requested while the {self.name} started")
        raise StartError(
            f"the {self.name} did not answer on {self.url} within {timeout:.0f}s; raise "
            f"{self.start_timeout_key} if it needs longer",
            self._read_log_tail(launched),
            self.log_path,
        )

    def stop(self) -> bool:
        """SIGTERM, a grace period, then SIGKILL of its group; True if one was running."""
        was_running = self._end_process()
        self.move_to(State.STOPPED)
        return was_running

    def _end_process(self) -> bool:
        record = read_pidfile(self.pidfile)
        was_running = record is not None and is_alive(record)
        if was_running:
            terminate_group(record.pid, self.stop_grace_seconds)
        remove_pidfile(self.pidfile)
        return was_running

    def check_port_free(self) -> None:
        host, port, port_key = self.listen_address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Both servers set SO_REUSEADDR too, so TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise StartError(
                    f"port {port} on {host} is already in use ({error.strerror}); stop what "
                    f"uses it or set {port_key} to a free port"
                ) from None

    def _write_log_header(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            what = " ".join(f"{k}={v}" for k, v in self.details().items())
            log.write(
                f"=== {stamp} llamagate: starting the {self.name} on {self.url} {what}\n".encode()
            )
            return log.tell()

    def _start_log_pump(self, process: subprocess.Popen) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "runtime.logpump",
            str(self.log_path),
            str(self.settings.console.log_max_bytes),
            str(self.settings.console.log_backups),
        ]
        # A session of its own, like the child: the pump reads until the child's pipe
        # closes, so it never outlives it (no orphan to track).
        pump = subprocess.Popen(
            command,
            stdin=process.stdout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        process.stdout.close()
        return pump

    def _fail_start(self, launched: Launch) -> None:
        remove_pidfile(self.pidfile)
        tail = self._read_log_tail(launched)
        raise StartError(self.explain_failure(tail), tail, self.log_path)

    def _read_log_tail(self, launched: Launch) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            launched.pump.wait(timeout=5)
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                offset = launched.log_offset
                log.seek(offset if offset <= size else 0)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


class BackendSupervisor(ProcessSupervisor):
    """One llama_cpp.server process: replica 0 (the backend) unless told another."""

    name = "backend"
    marker = backend.SERVER_MODULE

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        echo: Callable[[str], None] = print,
        model_path: Path | None = None,
        replica: Replica | None = None,
    ) -> None:
        self.replica = replica or settings.replicas[0]
        self.name = self.replica.name  # before the pid and log files are named after it
        super().__init__(settings, environ, echo)
        self.model_path = model_path

    @property
    def url(self) -> str:
        return self.replica.url

    @property
    def listen_address(self) -> tuple[str, int, str]:
        key = "LLAMA_SERVER_PORT"
        if self.settings.server.replicas > 1:
            key += f" (the {self.settings.server.replicas} replicas use the ports from it up)"
        return self.replica.host, self.replica.port, key

    def command(self) -> list[str]:
        return backend.backend_command(self.settings, self._model(), self.replica)

    def environment(self) -> dict[str, str]:
        return backend.backend_environment(self.settings, self.environ, self.replica)

    def details(self) -> dict[str, str]:
        details = {"model": str(self._model())} if self.model_path else {}
        if self.replica.gpu:
            details["gpu"] = self.replica.gpu
        return details

    def is_answering(self, url: str, timeout: float = 1.0) -> bool:
        return backend.is_answering(url, timeout)

    def explain_failure(self, log_tail: str) -> str:
        return backend.explain_failure(log_tail, self.settings, self._model(), self.replica.port)

    def _model(self) -> Path:
        if self.model_path is None:
            raise ValueError("BackendSupervisor needs model_path to launch")
        return self.model_path
