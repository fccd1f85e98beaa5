"""The console on the two host roles of a pool across hosts, with the real llama_cpp.server.

A host started with `start --backend-only` runs two replicas of the fallback model on
LLAMA_SERVER_HOST=0.0.0.0, keyed with its LLAMA_API_KEY, and nothing else; one start
serves the whole module, and every later command runs without the flag, as cron and
systemd would. A gateway-only host (LLAMA_SERVER_REPLICAS=0) is checked while stopped:
its start needs the gateway of the sharedpool branch (test_scaling_example.py).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    TEST_API_KEY,
    ConsoleHome,
    answers_200,
    clean_environ,
    free_port,
    link_or_copy,
    processes_matching,
    two_free_ports,
    wait_for,
)

from runtime.procs import read_pidfile
from runtime.settings import FALLBACK_MODEL_NAME

NAMES = ("backend", "backend-1")


class BackendHost(ConsoleHome):
    """A state root that runs as a generating host; `port` is replica 0's."""

    started = ""  # what `start --backend-only` printed

    @property
    def run_dir(self) -> Path:
        return self.root / "runtime" / "run"

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port + index}" for index in range(2)]

    def pid_of(self, name: str) -> int | None:
        record = read_pidfile(self.run_dir / f"{name}.pid")
        return record.pid if record else None

    def pids(self) -> list[int | None]:
        return [self.pid_of(name) for name in NAMES]

    def replicas_answer(self) -> bool:
        return all(answers_200(f"{url}/openapi.json") for url in self.urls)

    def has_no_gateway_or_database(self) -> bool:
        return (
            self.pid_of("proxy") is None
            and not (self.root / "runtime" / "pgdata").exists()
            and not processes_matching("-m proxy", str(self.root))
        )

    def status_lines(self) -> tuple[int, list[str]]:
        result = self.run("status")
        return result.returncode, result.stdout.splitlines()


def make_home(root: Path, fallback_model: Path, port: int, **env: str) -> BackendHost:
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    home = BackendHost(root=root, port=port)
    home.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(port),
        "LLAMA_API_KEY": TEST_API_KEY,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        **env,
    }
    return home


@pytest.fixture(scope="module")
def backend_host(tmp_path_factory, fallback_model: Path):
    """Two replicas started with --backend-only, once for the module; stopped afterwards."""
    root = tmp_path_factory.mktemp("backendonly") / "home"
    home = make_home(
        root,
        fallback_model,
        two_free_ports(),
        LLAMA_SERVER_HOST="0.0.0.0",
        LLAMA_SERVER_REPLICAS="2",
    )
    try:
        started = home.run("start", "--backend-only")
        assert started.returncode == 0, started.stdout + started.stderr
        home.started = started.stdout + started.stderr
        yield home
    finally:
        home.run("stop", timeout=120)
        for index in range(2):
            for pid in processes_matching("llama_cpp.server", f"--port {home.port + index} "):
                os.kill(pid, signal.SIGKILL)


def models_status(url: str, key: str | None) -> int:
    request = urllib.request.Request(f"{url}/v1/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_backend_only_runs_the_replicas_alone_on_the_server_host_with_this_hosts_key(
    backend_host,
):
    assert backend_host.replicas_answer()
    assert backend_host.has_no_gateway_or_database()
    for index, url in enumerate(backend_host.urls):
        [pid] = processes_matching("llama_cpp.server", f"--port {backend_host.port + index} ")
        assert "--host 0.0.0.0" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        assert models_status(url, None) == 401
        assert models_status(url, TEST_API_KEY) == 200
    printed = backend_host.started
    assert "backend only: 2 replica(s)" in printed
    for index in range(2):
        assert "add-backend http://" in printed
        assert f":{backend_host.port + index} --name " in printed
    assert "--key-file FILE" in printed and TEST_API_KEY not in printed
    assert "LLAMA_API_KEY, from the environment" in printed
    assert "loopback" not in printed


def test_status_info_and_logs_know_the_mode_without_the_flag(backend_host):
    code, lines = backend_host.status_lines()
    assert code == 0, lines
    assert lines[0].startswith("mode:") and "backend only" in lines[0]
    names = [line.split(":")[0] for line in lines if not line.startswith((" ", "mode:"))]
    assert names == list(NAMES)
    parts = json.loads(backend_host.run("status", "--json").stdout)
    assert parts["state"] == "serving" and "gateway" not in parts and "database" not in parts
    info = backend_host.run("info")
    assert info.returncode == 0, info.stderr
    assert "mode: backend only" in info.stdout
    assert "replicas listen on 0.0.0.0 (LLAMA_SERVER_HOST)" in info.stdout
    logs = backend_host.run("logs", "backend", "1", "-n", "100000")
    assert logs.returncode == 0 and f"on {backend_host.urls[1]}" in logs.stdout


def test_ensure_brings_back_a_killed_replica_and_starts_no_gateway(backend_host):
    survivor, victim = backend_host.pids()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not answers_200(f"{backend_host.urls[1]}/openapi.json"), what="the kill")
    ensured = backend_host.run("ensure")
    assert ensured.returncode == 0, ensured.stdout + ensured.stderr
    assert "ensure: backend-1 was" in ensured.stdout
    assert "ensure: gateway" not in ensured.stdout and "ensure: database" not in ensured.stdout
    assert backend_host.replicas_answer() and backend_host.has_no_gateway_or_database()
    assert backend_host.pid_of("backend") == survivor
    assert backend_host.pid_of("backend-1") not in (None, victim)
    assert backend_host.run("ensure").stdout == ""  # all well: silent


def test_a_change_of_mode_while_running_is_refused_and_changes_nothing(backend_host):
    before = backend_host.pids()
    refused = backend_host.run("start", "--no-backend-only")
    assert refused.returncode == 1
    assert "run ./console.sh stop first, then ./console.sh start --no-backend-only" in (
        refused.stderr
    )
    assert backend_host.pids() == before and backend_host.has_no_gateway_or_database()
    assert (backend_host.run_dir / "mode").read_text().strip() == "backend-only"


def test_restart_is_rolling_and_stays_backend_only(backend_host):
    before = backend_host.pids()
    restarted = backend_host.run("restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    after = backend_host.pids()
    assert None not in after and not set(after) & set(before)
    assert backend_host.replicas_answer() and backend_host.has_no_gateway_or_database()
    assert "backend only: 2 replica(s)" in restarted.stdout


def test_the_mode_outlives_stop_so_foreground_mode_starts_the_replicas_alone(backend_host):
    """The last test of the module fixture: it leaves the host stopped."""
    stopped = backend_host.run("stop", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    code, lines = backend_host.status_lines()
    assert code == 3 and "backend only" in lines[0]
    supervisor = backend_host.popen("start", "--foreground")
    try:
        wait_for(
            lambda: backend_host.replicas_answer() or supervisor.poll() is not None,
            timeout=120,
            what="the foreground supervisor's replicas",
        )
        assert supervisor.poll() is None
        assert backend_host.has_no_gateway_or_database()
    finally:
        supervisor.send_signal(signal.SIGTERM)
        output = supervisor.communicate(timeout=60)[0]
    assert supervisor.returncode == 0, output
    assert "the gateway serves" not in output


def test_backend_only_with_no_replica_is_refused_before_anything_starts(tmp_path, fallback_model):
    home = make_home(tmp_path / "home", fallback_model, free_port(), LLAMA_SERVER_REPLICAS="0")
    result = home.run("start", "--backend-only")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--backend-only starts only this host's replicas" in result.stderr
    assert "LLAMA_SERVER_REPLICAS=0 (from the environment)" in result.stderr
    run_dir = home.root / "runtime" / "run"
    assert not run_dir.exists() or not list(run_dir.glob("*.pid"))
    assert not (run_dir / "mode").exists()


def test_a_gateway_only_host_expects_no_backend_in_status_info_logs_and_restart(
    tmp_path, fallback_model
):
    home = make_home(
        tmp_path / "home",
        fallback_model,
        free_port(),
        LLAMA_SERVER_REPLICAS="0",
        LLAMA_PROXY_ENABLED="1",
        LLAMA_PROXY_PORT=str(free_port()),
        POSTGRES_AUTH_DSN="postgresql://llamagate@192.0.2.1:5432/llamagate",
    )
    status = home.run("status")
    assert status.returncode == 3, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert "gateway only" in lines[0]
    assert [line.split(":")[0] for line in lines[1:] if not line.startswith(" ")] == [
        "database",
        "gateway",
    ]
    info = home.run("info")
    assert "mode: gateway only" in info.stdout and "backend replicas: 0" in info.stdout
    logs = home.run("logs", "backend")
    assert logs.returncode == 1 and "this host runs no backend" in logs.stderr
    restart = home.run("restart")
    assert restart.returncode == 0 and "nothing to restart" in restart.stdout
