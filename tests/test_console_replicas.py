"""The console running two replicas of the real llama_cpp.server behind the gateway.

One start for the whole module (two fallback-model backends and a gateway on a database of
the session's cluster); each test leaves both replicas serving, except the last, which
stops everything. The tests that kill or restart a replica do it under load through the
gateway (tests/gatewayload.py), which must not see a failed request.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    TEST_API_KEY,
    GatewayHome,
    clean_environ,
    free_port,
    link_or_copy,
    processes_matching,
    two_free_ports,
    wait_for,
)
from gatewayload import ShortRequestLoad, long_completion, read_stream
from pgfixture import fresh_database

from runtime.backend import is_answering
from runtime.procs import read_pidfile
from runtime.replicas import default_threads
from runtime.settings import FALLBACK_MODEL_NAME

NAMES = ("backend", "backend-1")


class PoolHome(GatewayHome):
    """A GatewayHome with two replicas; `port` is replica 0's, `url` the gateway's."""

    key = ""  # a gateway user's key, created by the fixture

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port + index}" for index in range(2)]

    def pid_of(self, name: str) -> int | None:
        record = read_pidfile(self.root / "runtime" / "run" / f"{name}.pid")
        return record.pid if record else None

    def pids(self) -> list[int | None]:
        return [self.pid_of(name) for name in NAMES]

    def processes_on(self, index: int) -> list[int]:
        return processes_matching("llama_cpp.server", f"--port {self.port + index} ")

    def gateway_backends(self) -> str:
        """The replica URLs the running gateway was given."""
        return environ_of(self.pid_of("proxy"))["LLAMA_PROXY_BACKEND_URL"]

    def status_json(self) -> dict:
        return json.loads(self.run("status", "--json").stdout)

    def backend_metric(self, name: str, index: int) -> float:
        """A per-backend series from the gateway's /metrics, for replica `index`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        pattern = rf'^llamagate_backend_{name}(?:_total)?{{[^}}]*backend="{index}"[^}}]*}} (\S+)$'
        [value] = re.findall(pattern, text, flags=re.MULTILINE)
        return float(value)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, fallback_model: Path, pg_cluster):
    """Two replicas and the gateway, started once for the module; stopped afterwards."""
    root = tmp_path_factory.mktemp("pool") / "home"
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    port = two_free_ports()
    proxy_port = wait_for(lambda: next((p for p in [free_port()] if p != port + 1), None))
    with fresh_database(pg_cluster) as dsn:
        home = PoolHome(root=root, port=port, proxy_port=proxy_port, dsn=dsn)
        home.env = {
            **clean_environ(),
            "LLAMAGATE_ROOT": str(root),
            "LLAMA_SERVER_PORT": str(home.port),
            "LLAMA_SERVER_REPLICAS": "2",
            "LLAMA_REPLICA_GPUS": "0,1",
            "LLAMA_API_KEY": TEST_API_KEY,
            "LLAMA_STOP_GRACE_SECONDS": "5",
            "LLAMA_PROXY_HOST": "127.0.0.1",
            "LLAMA_PROXY_PORT": str(proxy_port),
            "POSTGRES_AUTH_DSN": dsn,
        }
        started = home.run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        try:
            home.key = home.new_user("load", rate_limit=1_000_000)
            yield home
        finally:
            home.run("stop", timeout=120)
            for index in range(2):
                for pid in home.processes_on(index):
                    os.kill(pid, signal.SIGKILL)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_two_replicas_serve_on_consecutive_ports_with_their_own_pid_log_and_gpu(pool):
    pids = pool.pids()
    assert None not in pids and len(set(pids)) == 2
    for index, (name, url, pid) in enumerate(zip(NAMES, pool.urls, pids, strict=True)):
        assert is_answering(url), f"{name} does not answer on {url}"
        assert pool.processes_on(index) == [pid]
        log = (pool.root / "runtime" / "logs" / f"{name}.log").read_text()
        assert f"starting the {name} on {url}" in log
        assert environ_of(pid)["CUDA_VISIBLE_DEVICES"] == str(index)
    assert pool.gateway_backends() == ",".join(pool.urls)


def test_status_and_info_show_each_replica(pool):
    result = pool.run("status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name, url, pid in zip(NAMES, pool.urls, pool.pids(), strict=True):
        [line] = [line for line in lines if line.startswith(f"{name}:")]
        assert "serving" in line and f"pid {pid}" in line and url in line
    parts = pool.status_json()
    assert [parts[name]["state"] for name in NAMES] == ["serving", "serving"]
    info = pool.run("info")
    assert info.returncode == 0, info.stderr
    ports = f"{pool.port}, {pool.port + 1}"
    threads = default_threads(2)
    assert f"backend replicas: 2 (port {ports}), {threads} thread(s) each, GPUs 0, 1" in info.stdout
    for name, url in zip(NAMES, pool.urls, strict=True):
        assert f"\n{name}:\n  url          {url}\n  state        serving" in info.stdout


def test_logs_shows_every_replica_or_the_one_asked_for(pool):
    both = pool.run("logs", "backend", "-n", "3")
    assert both.returncode == 0, both.stderr
    assert "backend.log <==" in both.stdout and "backend-1.log <==" in both.stdout
    one = pool.run("logs", "backend", "1", "-n", "50")
    assert one.returncode == 0, one.stderr
    assert f"on {pool.urls[1]}" in one.stdout and f"on {pool.urls[0]}" not in one.stdout
    refused = pool.run("logs", "proxy", "1")
    assert refused.returncode == 1 and "only the backend has replicas" in refused.stderr


def test_two_replicas_behind_the_gateway_generate_two_streams_at_once(pool):
    streams = [None, None]

    def read(index: int) -> None:
        streams[index] = read_stream(pool.url, pool.key, long_completion(40))

    readers = [threading.Thread(target=read, args=(index,)) for index in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=60)
    assert all(s is not None and s.status == 200 and s.is_done for s in streams), streams
    first, second = (stream.times for stream in streams)
    # Interleaved: each stream has events between two events of the other. One backend
    # would have generated one after the other, with no event of one inside the other.
    assert any(first[0] < at < first[-1] for at in second), (first, second)
    assert any(second[0] < at < second[-1] for at in first), (first, second)


def start_stream_on_each_replica(pool: PoolHome) -> tuple[list[threading.Thread], list]:
    """Two long streams through the gateway, returned once both generate: one on each
    replica, since each replica has one slot."""
    streams: list = [None, None]
    started = [threading.Event(), threading.Event()]

    def read(index: int) -> None:
        streams[index] = read_stream(pool.url, pool.key, long_completion(150), started[index])

    readers = [threading.Thread(target=read, args=(index,), daemon=True) for index in range(2)]
    for reader in readers:
        reader.start()
    wait_for(lambda: all(event.is_set() for event in started), what="both streams to start")
    assert streams == [None, None], "a stream ended before the other started"
    return readers, streams


def test_kill_9_of_a_replica_under_load_fails_only_its_stream_and_ensure_brings_it_back(pool):
    first, second = pool.pids()
    with ShortRequestLoad(pool.url, pool.key) as load:
        readers, streams = start_stream_on_each_replica(pool)
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: not pool.processes_on(1), what="the killed replica to vanish")
        for reader in readers:
            reader.join(timeout=60)
        answered = load.answered
        wait_for(lambda: load.answered_at_least(answered + 6), what="answers after the kill")
    assert load.failures == [], load.failures
    # The stream on the killed replica ends with an error event, the other one whole.
    ends = sorted((s.status, s.is_done, s.error_codes) for s in streams)
    assert ends == [(200, False, ["backend_failed"]), (200, True, [])], ends
    down = pool.run("status")
    assert down.returncode == 1, down.stdout
    assert pool.status_json()["backend-1"]["state"] == "degraded"

    result = pool.run("ensure")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend-1 was degraded" in result.stdout
    assert pool.pid_of("backend") == first, "the replica that served must be left alone"
    assert pool.pid_of("backend-1") not in (None, second)
    assert is_answering(pool.urls[1])
    assert pool.run("status").returncode == 0
    # The gateway sends the new replica requests again (its probe puts it back in the pool).
    served = pool.backend_metric("requests", 1)
    with ShortRequestLoad(pool.url, pool.key) as load:
        wait_for(lambda: pool.backend_metric("requests", 1) > served, what="replica 1 to serve")
    assert load.failures == [], load.failures


class Poller(threading.Thread):
    """Probes every replica's /openapi.json, round after round, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.rounds: list[list[bool]] = []
        self.is_stopping = threading.Event()

    def run(self) -> None:
        while not self.is_stopping.is_set():
            self.rounds.append([is_answering(url, timeout=2) for url in self.urls])
            time.sleep(0.02)  # pacing only: the probes are the measurement


def test_restart_is_rolling_so_one_replica_always_answers_and_no_request_fails(pool):
    before = pool.pids()
    poller = Poller(pool.urls)
    poller.start()
    with ShortRequestLoad(pool.url, pool.key) as load:
        try:
            result = pool.run("restart")
        finally:
            poller.is_stopping.set()
            poller.join(timeout=10)
        answered = load.answered
        wait_for(lambda: load.answered_at_least(answered + 6), what="answers after the restart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failures == [], load.failures
    after = pool.pids()
    assert all(pid is not None and pid not in before for pid in after), (before, after)
    assert poller.rounds and all(any(round_) for round_ in poller.rounds), poller.rounds
    # Each replica was down in some round: the restart did happen under the poller.
    assert [any(not round_[i] for round_ in poller.rounds) for i in range(2)] == [True, True]


def test_a_changed_replica_count_takes_effect_at_the_next_start(pool):
    first, second = pool.pids()
    shrunk = pool.run("start", LLAMA_SERVER_REPLICAS="1", LLAMA_REPLICA_GPUS="")
    assert shrunk.returncode == 0, shrunk.stdout + shrunk.stderr
    assert "stopped backend-1, beyond LLAMA_SERVER_REPLICAS=1" in shrunk.stdout
    assert pool.processes_on(1) == [] and pool.pid_of("backend-1") is None
    assert pool.pid_of("backend") == first
    assert pool.gateway_backends() == pool.urls[0]

    grown = pool.run("ensure")
    assert grown.returncode == 0, grown.stdout + grown.stderr
    assert pool.pid_of("backend") == first and pool.pid_of("backend-1") not in (None, second)
    assert is_answering(pool.urls[1])
    assert pool.gateway_backends() == ",".join(pool.urls)


def test_stop_after_a_shrink_stops_every_replica_its_pid_files_name(pool):
    result = pool.run("stop", LLAMA_SERVER_REPLICAS="1", LLAMA_REPLICA_GPUS="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pool.processes_on(0) == [] and pool.processes_on(1) == []
    assert pool.pids() == [None, None]
