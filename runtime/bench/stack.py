"""A private llamagate for the bench: temp state root, free ports, and cleanup that always runs.

The bench must never touch the operator's runtime/ or a running service, so everything
lives in a new directory under /tmp (LLAMAGATE_ROOT) with ports of its own. The stack is
started and restarted by the console itself (`python -m runtime start|restart|stop`, what
./console.sh execs), so the bench measures exactly what an operator runs. Every process
is registered on an ExitStack as it starts, so Ctrl-C, SIGTERM or a failure midway still
stops each one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.bench.errors import BenchError
from runtime.bootstrap import ensure_fallback_model
from runtime.database import Database
from runtime.gateway import GatewaySupervisor
from runtime.procs import read_pidfile
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME, KEY_NAMES, Paths, load_settings
from runtime.supervisor import StartError

# Nobody waits for minutes in a bench: a short drain keeps stop quick.
STACK_SETTINGS = {
    "LLAMA_PROXY_ENABLED": "1",
    "LLAMA_PROXY_HOST": "127.0.0.1",
    "LLAMA_STOP_GRACE_SECONDS": "5",
    "LLAMA_PROXY_DRAIN_SECONDS": "5",
}
# Scenario 1's gateway admits this many requests to the upstream at once, so that its
# fair queue lets all 32 connections through instead of serialising them.
OVERHEAD_CONCURRENCY = 64


def free_port() -> int:
    """A port nothing listens on now; the tests take theirs from here too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing answered on 127.0.0.1:{port} within {timeout:.0f}s")


def clean_environ() -> dict[str, str]:
    """This process's environment without llamagate keys, so the operator's cannot leak in."""
    dropped = KEY_NAMES | {"LLAMAGATE_ROOT", "HOST", "PORT", "MODEL", "API_KEY"}
    return {name: value for name, value in os.environ.items() if name not in dropped}


class Stack:
    """The private stack: database, backend (the fallback model) and gateway, in self.root."""

    def __init__(self, root: Path, exits: contextlib.ExitStack) -> None:
        self.root = root
        self.exits = exits
        self.backend_port = free_port()
        self.gateway_port = free_port()
        self.backend_key = secrets.token_urlsafe(32)
        self.env = {
            **clean_environ(),
            **STACK_SETTINGS,
            "LLAMAGATE_ROOT": str(root),
            "LLAMA_MODEL": FALLBACK_MODEL_NAME,
            "LLAMA_SERVER_PORT": str(self.backend_port),
            "LLAMA_PROXY_PORT": str(self.gateway_port),
            "LLAMA_API_KEY": self.backend_key,
            # Seals the keys of shared members (scenario 9) in the stack's database.
            "LLAMA_PROXY_BACKEND_SECRET": secrets.token_urlsafe(32),
        }

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def console_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runtime", *args]

    def console(self, *args: str, timeout: float = 300) -> str:
        """Run a console command against the private root; its output, or a BenchError."""
        done = subprocess.run(
            self.console_command(*args),
            cwd=CODE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip().splitlines()[-8:]
            raise BenchError(f"./console.sh {' '.join(args)} failed: " + " | ".join(output))
        return done.stdout

    def start(self) -> None:
        # Registered before the start, so a start that fails halfway is still stopped.
        self.exits.callback(self.stop)
        self.console("start")

    def stop(self) -> None:
        # A cleanup step: it must not raise over the error that is unwinding.
        subprocess.run(
            self.console_command("stop"),
            cwd=CODE_DIR,
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def create_user(self, name: str) -> str:
        """A user with a rate limit the bench never reaches; their key."""
        done = subprocess.run(
            [sys.executable, "-m", "runtime.admin", "create-user", "--username", name]
            + ["--rate-limit", "2000000000", "--json"],
            cwd=CODE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"could not create the bench user {name}: {done.stderr.strip()}")
        return json.loads(done.stdout)["api_key"]

    def dsn(self) -> str:
        settings = load_settings(Paths(self.root), environ=self.env)
        return Database(settings, echo=lambda _: None).dsn()

    def gateway_pid(self, root: Path | None = None) -> int:
        record = read_pidfile(Paths(root or self.root).run_dir / "proxy.pid")
        if record is None:
            raise BenchError("the gateway's pid file is missing")
        return record.pid


def start_upstream(exits: contextlib.ExitStack, *options: str, port: int | None = None) -> int:
    """The canned upstream in a process of its own (`options` go to its command line); its
    first port."""
    port = port or free_port()
    start_bench_process(exits, "runtime.bench.upstream", str(port), *options)
    wait_for_port(port)
    return port


def start_floor(exits: contextlib.ExitStack, module: str, target_port: int) -> tuple[str, int]:
    """A floor in front of `target_port` (runtime/bench/pipe.py or bareproxy.py, as
    `module` says): its URL and pid."""
    port = free_port()
    process = start_bench_process(exits, module, str(port), str(target_port))
    wait_for_port(port)
    return f"http://127.0.0.1:{port}", process.pid


def start_bench_process(exits: contextlib.ExitStack, module: str, *args: str) -> subprocess.Popen:
    """`python -m module args` in a session of its own, stopped when `exits` closes."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=CODE_DIR,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    exits.callback(stop_process_group, process)
    return process


def free_port_run(count: int, avoid: int) -> int:
    """The first of `count` consecutive ports that are all free now, none of them `avoid`."""
    for _ in range(100):
        first = free_port()
        ports = range(first, first + count)
        if avoid not in ports and ports[-1] <= 65535 and all(map(is_port_free, ports)):
            return first
    raise BenchError(f"found no {count} consecutive free ports")


def is_port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_process_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def start_overhead_gateway(
    stack: Stack, upstream_port: int, exits: contextlib.ExitStack
) -> tuple[str, int]:
    """A second real gateway in front of the canned upstream, admitting
    OVERHEAD_CONCURRENCY requests to it at once; its URL and pid."""
    overrides = {"LLAMA_PROXY_BACKEND_CONCURRENCY": str(OVERHEAD_CONCURRENCY)}
    return start_side_gateway(stack, "overhead", upstream_port, overrides, exits)


def start_side_gateway(
    stack: Stack,
    name: str,
    upstream_port: int,
    overrides: dict[str, str],
    exits: contextlib.ExitStack,
    port: int | None = None,
) -> tuple[str, int]:
    """A real gateway (`python -m proxy`), configured as the console does it, in front of
    canned upstreams from `upstream_port` on; its URL and pid.

    It has a state root of its own (stack.root / name: pid file, log, spool) and shares the
    stack's database, so the bench users' keys work on every gateway.
    """
    root = stack.root / name
    port = port or free_port()
    environ = {
        **stack.env,
        "LLAMAGATE_ROOT": str(root),
        # The console points its gateway at LLAMA_SERVER_PORT (and the ports after it, one
        # per replica): here, the upstreams.
        "LLAMA_SERVER_PORT": str(upstream_port),
        "LLAMA_PROXY_PORT": str(port),
        **overrides,
    }
    settings = load_settings(Paths(root), environ=environ)
    gateway = GatewaySupervisor(settings, dsn=stack.dsn(), environ=environ, echo=lambda _: None)
    exits.callback(gateway.stop)
    try:
        gateway.start()
    except StartError as error:
        raise BenchError(f"the {name} gateway did not start: {error} {error.log_tail}") from None
    return gateway.url, stack.gateway_pid(root)


@contextlib.contextmanager
def private_root() -> Iterator[Path]:
    """A new state root under /tmp with the fallback model linked in; removed afterwards."""
    # Under /tmp and mode 755: when the bench runs as root, PostgreSQL runs as the
    # postgres user, which must traverse the path to its socket (pytest's dirs are 700).
    root = Path(tempfile.mkdtemp(prefix="llamagate-bench-", dir="/tmp"))
    root.chmod(0o755)
    try:
        model = ensure_fallback_model(CODE_DIR / "models", echo=lambda _: None)
        (root / "models").mkdir()
        try:
            os.link(model, root / "models" / FALLBACK_MODEL_NAME)
        except OSError:
            shutil.copyfile(model, root / "models" / FALLBACK_MODEL_NAME)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every cleanup callback still runs."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
