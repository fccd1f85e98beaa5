"""Faults of whole processes, through the real console: kill -9 and overlapping cron runs.

The real backend with the fallback model, the real gateway, and the real PostgreSQL.
Tests that stop the database or count its postmaster use the private cluster of a state
root of their own under /tmp; the others use the session's cluster (gateway_home).
Faults inside the gateway (database outage, full disk, SIGTERM) are in
test_faults_outage.py and test_faults_sigterm.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import asyncpg
import openai
import pytest
from conftest import (
    TEST_API_KEY,
    GatewayHome,
    clean_environ,
    free_port,
    link_or_copy,
    processes_matching,
    wait_for,
    wait_until_serving,
)

from runtime.pgcluster import LocalCluster
from runtime.procs import read_pidfile
from runtime.settings import FALLBACK_MODEL_NAME

LONG_STORY = [{"role": "user", "content": "Tell me a very long story about a dragon."}]
CLEAN_ERROR_SECONDS = 10.0  # generous on 2 shared cores; the point is "not a hang"


def rows_of(dsn: str, where: str = "true") -> list[dict]:
    """llama_requests rows; empty while the database is down."""

    async def fetch() -> list[dict]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return [
                dict(r) for r in await conn.fetch(f"SELECT * FROM llama_requests WHERE {where}")
            ]
        finally:
            await conn.close()

    try:
        return asyncio.run(fetch())
    except (OSError, asyncpg.PostgresError):
        return []


def gateway_pid(home: GatewayHome) -> int | None:
    record = read_pidfile(home.root / "runtime" / "run" / "proxy.pid")
    return record.pid if record else None


def gateway_pids(home: GatewayHome) -> list[int]:
    """Every `python -m proxy` whose working directory is this root, whatever the pid file says."""
    found = []
    for pid in processes_matching("-m proxy"):
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == home.root.resolve():
                found.append(pid)
        except OSError:
            continue
    return found


# --- kill -9 of the backend in the middle of a stream -----------------------------------


def kill_backend_mid_stream(home: GatewayHome, key: str) -> tuple[float, str]:
    """Stream a long answer, kill -9 the backend after the first token; (seconds, outcome)."""
    stream = home.client(key, timeout=120).chat.completions.create(
        model="any", messages=LONG_STORY, max_tokens=400, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    os.kill(home.backend_pid(), signal.SIGKILL)
    killed = time.monotonic()
    try:
        for _ in chunks:
            pass
        outcome = "ended"
    except openai.APIError as error:
        outcome = f"error: {error}"
    return time.monotonic() - killed, outcome


def start_in(home: GatewayHome, recovery: str):
    """Start the stack as `start` would (then `ensure` repairs it) or in foreground mode."""
    if recovery == "ensure":
        started = home.run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        return None
    supervisor = home.popen("start", "--foreground", LLAMA_RESTART_BACKOFF_SECONDS="0.2")
    wait_until_serving(home, supervisor, what="the foreground stack")
    return supervisor


@pytest.mark.parametrize("recovery", ["ensure", "foreground"])
def test_backend_killed_mid_stream_gives_a_clean_error_and_comes_back(gateway_home, recovery):
    supervisor = start_in(gateway_home, recovery)
    key = gateway_home.new_user("alice")
    killed_pid, the_gateway = gateway_home.backend_pid(), gateway_pid(gateway_home)
    seconds, outcome = kill_backend_mid_stream(gateway_home, key)
    assert seconds < CLEAN_ERROR_SECONDS, (seconds, outcome)
    assert "broke off" in outcome, outcome
    [row] = wait_for(lambda: rows_of(gateway_home.dsn), what="the stream's row")
    assert row["status_code"] == 502 and "broke off" in row["error"], row
    if recovery == "ensure":
        ensured = gateway_home.run("ensure")
        assert ensured.returncode == 0, ensured.stdout + ensured.stderr
        assert "ensure: backend was degraded" in ensured.stdout
    wait_for(
        lambda: gateway_home.backend_pid() not in (None, killed_pid),
        timeout=120,
        what="a new backend",
    )
    wait_until_serving(gateway_home, what="the new backend")
    reply = gateway_home.client(key).completions.create(model="any", prompt="Hi", max_tokens=2)
    assert reply.choices
    assert gateway_home.backend_pids() == [gateway_home.backend_pid()]
    assert gateway_pid(gateway_home) == the_gateway  # the gateway rode it out
    if supervisor is not None:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0


# --- a state root with its private cluster ----------------------------------------------


@pytest.fixture
def private_home(fallback_model: Path):
    """Gateway mode on the private cluster, in a root under /tmp that postgres can enter."""
    root = Path(tempfile.mkdtemp(prefix="lg-faults-", dir="/tmp"))
    root.chmod(0o755)
    (root / "models").mkdir()
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    home = GatewayHome(root=root, port=free_port(), proxy_port=free_port())
    home.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(home.port),
        "LLAMA_API_KEY": TEST_API_KEY,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        "LLAMA_PROXY_DRAIN_SECONDS": "5",
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(home.proxy_port),
    }
    home.dsn = cluster_of(home).dsn()
    yield home
    home.run("stop", timeout=120)
    for pid in home.backend_pids() + gateway_pids(home):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def cluster_of(home: GatewayHome) -> LocalCluster:
    runtime = home.root / "runtime"
    return LocalCluster(runtime / "pgdata", runtime / "run" / "pg", runtime / "logs" / "db.log")


def ask(home: GatewayHome, key: str) -> str:
    """One small completion through the gateway; its X-Request-Id."""
    raw = home.client(key).completions.with_raw_response.create(
        model="any", prompt="Hi", max_tokens=2
    )
    return raw.headers["X-Request-Id"]


# --- kill -9 of the gateway with rows in its spool ----------------------------------------


def test_gateway_killed_with_a_spool_is_brought_back_by_ensure_and_replays_it(private_home):
    home = private_home
    started = home.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    key = home.new_user("alice")
    sent = [ask(home, key) for _ in range(2)]
    wait_for(lambda: len(rows_of(home.dsn)) == 2, what="the rows before the outage")
    assert cluster_of(home).stop()
    sent += [ask(home, key) for _ in range(3)]  # a cached key works through the outage
    spool = home.root / "runtime" / "spool" / "llama_requests.jsonl"
    wait_for(lambda: spool.exists() and len(spool.read_text().splitlines()) == 3, what="3 rows")
    os.kill(gateway_pid(home), signal.SIGKILL)
    wait_for(lambda: not gateway_pids(home), what="the killed gateway to vanish")
    ensured = home.run("ensure")
    assert ensured.returncode == 0, ensured.stdout + ensured.stderr
    assert "ensure: database was stopped" in ensured.stdout
    assert "ensure: gateway was degraded" in ensured.stdout
    logged = wait_for(
        lambda: {r["request_id"] for r in rows_of(home.dsn)} >= set(sent) and rows_of(home.dsn),
        timeout=60,
        what="the spooled rows to be replayed",
    )
    assert sorted(r["request_id"] for r in logged) == sorted(sent)  # each exactly once
    wait_for(lambda: not spool.exists(), what="the replayed spool to be removed")


# --- ten overlapping restart/ensure runs, as cron would send them -------------------------


def test_ten_overlapping_restarts_and_ensures_leave_one_of_each_and_no_orphan(private_home):
    home = private_home
    started = home.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    os.kill(home.backend_pid(), signal.SIGKILL)  # something for the runs to repair
    os.kill(gateway_pid(home), signal.SIGKILL)
    # Restarts run one after another under the lock, so three keep the test short;
    # test_cron.py has ten restarts at once in single-key mode.
    runs = [home.popen("restart" if n % 3 == 0 else "ensure") for n in range(10)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * 10, outputs
    assert home.run("status").returncode == 0
    assert home.backend_pids() == [home.backend_pid()]
    assert gateway_pids(home) == [gateway_pid(home)]
    pgdata = str(home.root / "runtime" / "pgdata")
    assert len(processes_matching("postgres", "-D", pgdata)) == 1  # one postmaster
    pumps = processes_matching("runtime.logpump", str(home.root))
    logs = sorted(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3] for pid in pumps)
    assert [Path(log.decode()).name for log in logs] == ["backend.log", "proxy.log"]
    assert not (home.root / "runtime" / "run" / "backend.restarting").exists()
    key = home.new_user("after")
    assert ask(home, key)
