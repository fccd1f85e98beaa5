"""Shared fixtures: a private state root per test, free ports, and the console as a subprocess.

Every test that runs the console points LLAMAGATE_ROOT at a temp dir, so the operator's
runtime/ and models/ are never touched. The fallback model is hard-linked (or copied)
from the checkout's models/, where the installer put it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from runtime import proctable
from runtime.bench.stack import free_port, is_port_free
from runtime.bootstrap import ensure_fallback_model
from runtime.procs import read_pidfile
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME, KEY_NAMES

pytest_plugins = ["pgfixture"]

TEST_API_KEY = "test-key-0123456789abcdef0123456789abcdef"


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition"):
    """Poll until condition() is truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def two_free_ports() -> int:
    """A free port whose next one is free too (replica 1's)."""
    return wait_for(
        lambda: next((p for p in [free_port()] if p < 65535 and is_port_free(p + 1)), None),
        what="two consecutive free ports",
    )


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


def wait_until_serving(
    home: ConsoleHome, supervisor: subprocess.Popen | None = None, what: str = "the stack"
) -> None:
    """Wait until home answers (or its supervisor exits), then until `status` says serving."""
    wait_for(
        lambda: home.answers() or (supervisor is not None and supervisor.poll() is not None),
        timeout=120,
        what=f"{what} to serve",
    )
    if supervisor is not None:
        assert supervisor.poll() is None, supervisor.stdout.read()
    wait_for(lambda: home.run("status").returncode == 0, timeout=60, what=f"{what} serving")


def processes_matching(*needles: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains every needle."""
    found = []
    for pid in proctable.all_pids():
        try:
            cmdline, state = proctable.command_line(pid), proctable.state(pid)
        except (OSError, IndexError):
            continue
        if state != "Z" and all(needle in cmdline for needle in needles):
            found.append(pid)
    return found


@dataclass
class ConsoleHome:
    """A private llamagate state root, and a way to run the console against it."""

    root: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def config_env(self) -> Path:
        return self.root / "runtime" / "config.env"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args],
            cwd=CODE_DIR,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime", *args],
            cwd=CODE_DIR,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def answers(self) -> bool:
        """Whether the backend answers its readiness probe: far cheaper to poll than
        `status`, whose every run is a Python start-up competing with the one awaited."""
        return answers_200(f"http://127.0.0.1:{self.port}/openapi.json")

    def backend_pid(self) -> int | None:
        record = read_pidfile(self.root / "runtime" / "run" / "backend.pid")
        return record.pid if record else None

    def backend_pids(self) -> list[int]:
        """Every llama_cpp.server process on this home's port, whatever the pid file says."""
        return processes_matching("llama_cpp.server", f"--port {self.port}")

    def log_pumps(self) -> list[int]:
        return processes_matching("runtime.logpump", str(self.root))


@pytest.fixture(scope="session")
def fallback_model() -> Path:
    return ensure_fallback_model(CODE_DIR / "models")


def clean_environ() -> dict[str, str]:
    """The test runner's environment without any llamagate keys that could leak in."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in KEY_NAMES and k not in ("LLAMAGATE_ROOT", "HOST", "PORT", "MODEL")
    }


def make_console_home(root: Path, fallback_model: Path) -> ConsoleHome:
    """A state root at root with the fallback model, on a free port, in single-key mode."""
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    console_home = ConsoleHome(root=root, port=free_port())
    console_home.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(console_home.port),
        "LLAMA_API_KEY": TEST_API_KEY,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        # Single-key mode unless a test asks for the gateway (see gateway_home).
        "LLAMA_PROXY_ENABLED": "0",
    }
    return console_home


def stop_console_home(console_home: ConsoleHome) -> None:
    """Stop what the console started in this home, and any backend left on its port."""
    console_home.run("stop", timeout=60)
    for pid in console_home.backend_pids():
        os.kill(pid, 9)


@pytest.fixture
def home(tmp_path: Path, fallback_model: Path):
    """A state root with the fallback model, on a free port; stops what it started."""
    console_home = make_console_home(tmp_path / "home", fallback_model)
    yield console_home
    stop_console_home(console_home)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture
def serving(home: ConsoleHome) -> ConsoleHome:
    """A home whose backend has been started and answers."""
    result = home.run("start")
    assert result.returncode == 0, result.stdout + result.stderr
    return home


@pytest.fixture(scope="session")
def shared_serving(tmp_path_factory, fallback_model: Path) -> Iterator[ConsoleHome]:
    """Like serving, but started once for the whole session: a start costs seconds.

    Only for tests that leave it as they found it: they do not stop, restart or reconfigure
    it, and do not call /v1/models (test_single_key_mode reads the backend log for that).
    """
    console_home = make_console_home(tmp_path_factory.mktemp("shared") / "home", fallback_model)
    try:
        result = console_home.run("start")
        assert result.returncode == 0, result.stdout + result.stderr
        yield console_home
    finally:
        stop_console_home(console_home)


@dataclass
class GatewayHome(ConsoleHome):
    """A ConsoleHome in gateway mode, on the session's PostgreSQL; `url` is the gateway's."""

    proxy_port: int = 0
    dsn: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def answers(self) -> bool:
        """Whether the backend and the gateway both answer their probes."""
        return super().answers() and answers_200(f"{self.url}/healthz")

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        """The admin CLI, as bin/user_management_cli.sh runs it."""
        return subprocess.run(
            [sys.executable, "-m", "runtime.admin", *args],
            cwd=CODE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def new_user(self, username: str, rate_limit: int | None = None) -> str:
        """Create a user with the admin CLI; return their key."""
        limit = ["--rate-limit", str(rate_limit)] if rate_limit else []
        created = self.admin("create-user", "--username", username, "--json", *limit)
        assert created.returncode == 0, created.stdout + created.stderr
        return json.loads(created.stdout)["api_key"]

    def client(self, api_key: str, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout
        )

    def queue_waiting(self) -> int:
        with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as ready:
            return json.load(ready)["queue"]["waiting"]


def make_gateway_home(home: ConsoleHome, dsn: str) -> GatewayHome:
    """home, in gateway mode, in front of the database at dsn."""
    gateway = GatewayHome(root=home.root, port=home.port, proxy_port=free_port(), dsn=dsn)
    gateway.env = {
        **home.env,
        "LLAMA_PROXY_ENABLED": "1",
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(gateway.proxy_port),
        "LLAMA_PROXY_RATE_LIMIT": "1000",
        "POSTGRES_AUTH_DSN": dsn,
    }
    return gateway


@pytest.fixture
def gateway_home(home: ConsoleHome, pg_dsn: str):
    """A home in gateway mode whose database is a fresh one in the session's cluster."""
    gateway = make_gateway_home(home, pg_dsn)
    yield gateway
    gateway.run("stop", timeout=60)
