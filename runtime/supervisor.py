"""One object owns the one llama_cpp.server process: launch, readiness, status, stop."""

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

from runtime import backend
from runtime.procs import (
    PidRecord,
    is_alive,
    read_pidfile,
    remove_pidfile,
    terminate_group,
    write_pidfile,
)
from runtime.settings import Settings

SERVING, DEGRADED, STOPPED = "serving", "degraded", "stopped"
LOG_TAIL_LINES = 15


class StartError(Exception):
    """The backend could not be started; `log_tail` holds the end of its log, if any."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class BackendStatus:
    state: str
    url: str
    pid: int | None = None
    model: str | None = None
    started_at: float | None = None
    detail: str = ""

    @property
    def is_serving(self) -> bool:
        return self.state == SERVING


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


class BackendSupervisor:
    """Starts, probes and stops llama_cpp.server; the pid file is the shared memory."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self.echo = echo
        self.pidfile = settings.paths.run_dir / "backend.pid"
        self.log_path = settings.paths.logs_dir / "backend.log"

    @property
    def url(self) -> str:
        return self.settings.backend_url

    def status(self) -> BackendStatus:
        """What runs now, judged by the pid file, the process table and an HTTP probe."""
        record = read_pidfile(self.pidfile)
        if record is None:
            return BackendStatus(STOPPED, self.url)
        known = dict(
            pid=record.pid,
            model=record.details.get("model"),
            started_at=record.started_at,
            url=record.details.get("url", self.url),
        )
        if not is_alive(record):
            return BackendStatus(
                DEGRADED,
                **known,
                detail=f"process {record.pid} has died; run ./console.sh ensure to start it again",
            )
        if backend.is_answering(known["url"]):
            return BackendStatus(SERVING, **known)
        return BackendStatus(
            DEGRADED,
            **known,
            detail=f"process {record.pid} runs but does not answer (still loading, or hung)",
        )

    def start(self, model_path: Path) -> BackendStatus:
        """Launch the backend and return once it answers; raise StartError otherwise."""
        self.check_port_free()
        self.wait_until_ready(self.launch(model_path), model_path)
        return self.status()

    def launch(self, model_path: Path) -> Launch:
        """Spawn llama_cpp.server in its own process group, its output piped to the log."""
        log_offset = self._write_log_header(model_path)
        process = subprocess.Popen(
            backend.backend_command(self.settings, model_path),
            env=backend.backend_environment(self.settings, self.environ),
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
                marker=backend.SERVER_MODULE,
                started_at=time.time(),
                details={"url": self.url, "model": str(model_path), "log": str(self.log_path)},
            ),
        )
        return launched

    def wait_until_ready(
        self,
        launched: Launch,
        model_path: Path,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Poll /openapi.json until it answers, the process exits, or the timeout passes."""
        timeout = self.settings["LLAMA_START_TIMEOUT_SECONDS"]
        started = time.monotonic()
        next_progress = started + 10
        while time.monotonic() - started < timeout and not is_cancelled():
            if launched.poll() is not None:
                self._fail_start(launched, model_path)
            if backend.is_answering(self.url, timeout=0.5):
                return
            if time.monotonic() >= next_progress:
                self.echo(f"still loading {model_path.name} ({time.monotonic() - started:.0f}s)...")
                next_progress += 10
            time.sleep(0.1)
        self.stop()
        if is_cancelled():
            raise StartError("start cancelled: a stop was requested while the model loaded")
        raise StartError(
            f"the backend did not answer on {self.url} within {timeout:.0f}s; raise "
            f"LLAMA_START_TIMEOUT_SECONDS for a large model",
            self._read_log_tail(launched),
        )

    def stop(self) -> bool:
        """Stop the backend (SIGTERM, grace, SIGKILL of its group); True if one was running."""
        record = read_pidfile(self.pidfile)
        if record is None:
            return False
        was_running = is_alive(record)
        if was_running:
            terminate_group(record.pid, self.settings["LLAMA_STOP_GRACE_SECONDS"])
        remove_pidfile(self.pidfile)
        return was_running

    def check_port_free(self) -> None:
        host, port = self.settings["LLAMA_SERVER_HOST"], self.settings["LLAMA_SERVER_PORT"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # The backend (uvicorn) sets SO_REUSEADDR too, so TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                raise StartError(
                    f"port {port} on {host} is already in use ({error.strerror}); stop what "
                    f"uses it or set LLAMA_SERVER_PORT to a free port"
                ) from None

    def _write_log_header(self, model_path: Path) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"=== {stamp} llamagate: starting llama_cpp.server with "
                f"{model_path} on {self.url}\n".encode()
            )
            return log.tell()

    def _start_log_pump(self, process: subprocess.Popen) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "runtime.logpump",
            str(self.log_path),
            str(self.settings["LLAMA_LOG_MAX_BYTES"]),
            str(self.settings["LLAMA_LOG_BACKUPS"]),
        ]
        # A session of its own, like the backend: the pump reads until the backend's
        # pipe closes, so it never outlives the backend (no orphan to track).
        pump = subprocess.Popen(
            command,
            stdin=process.stdout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        process.stdout.close()
        return pump

    def _fail_start(self, launched: Launch, model_path: Path) -> None:
        remove_pidfile(self.pidfile)
        tail = self._read_log_tail(launched)
        raise StartError(backend.explain_failure(tail, self.settings, model_path), tail)

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
