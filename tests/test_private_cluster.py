"""Gateway mode with no POSTGRES_AUTH_*: the console runs its own PostgreSQL cluster.

The state root lives in a directory of its own under /tmp (not pytest's tmp_path, whose
parents are closed to the unprivileged user PostgreSQL runs as).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import openai
import pytest
from conftest import (
    TEST_API_KEY,
    ConsoleHome,
    clean_environ,
    free_port,
    link_or_copy,
    processes_matching,
    wait_for,
)

from runtime.pgcluster import LocalCluster
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def private_home(fallback_model: Path):
    root = Path(tempfile.mkdtemp(prefix="lg-home-", dir="/tmp"))
    root.chmod(0o755)
    (root / "models").mkdir()
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    home = ConsoleHome(root=root, port=free_port())
    proxy_port = free_port()
    home.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(home.port),
        "LLAMA_API_KEY": TEST_API_KEY,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        "LLAMA_PROXY_ENABLED": "1",
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(proxy_port),
    }
    home.proxy_url = f"http://127.0.0.1:{proxy_port}"
    yield home
    home.run("stop", timeout=120)
    shutil.rmtree(root, ignore_errors=True)


def cluster_of(home: ConsoleHome) -> LocalCluster:
    runtime = home.root / "runtime"
    return LocalCluster(runtime / "pgdata", runtime / "run" / "pg", runtime / "logs" / "db.log")


def count_rows(dsn: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval("SELECT count(*) FROM llama_requests")
        finally:
            await conn.close()

    try:
        return asyncio.run(count())
    except (OSError, asyncpg.PostgresError):
        return -1


def create_user_with_the_shell_script(home: ConsoleHome, username: str) -> str:
    created = subprocess.run(
        [str(CODE_DIR / "bin" / "user_management_cli.sh"), "create-user", "--username", username],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    keys = [word for word in created.stdout.split() if word.startswith("lgk_")]
    assert keys, created.stdout
    return keys[0]


def test_a_fresh_root_serves_behind_the_gateway_and_logs_the_stream(private_home):
    started = private_home.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert (private_home.root / "runtime" / "pgdata" / "PG_VERSION").is_file()
    key = create_user_with_the_shell_script(private_home, "alice")
    client = openai.OpenAI(base_url=f"{private_home.proxy_url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    dsn = cluster_of(private_home).dsn()
    wait_for(lambda: count_rows(dsn) == 1, what="the request's row")

    stopped = private_home.run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not cluster_of(private_home).is_running()
    assert processes_matching("postgres", str(private_home.root)) == []
    assert private_home.run("status").returncode == 3


def test_rows_written_while_postgres_is_down_arrive_when_it_returns(private_home):
    assert private_home.run("start").returncode == 0
    key = create_user_with_the_shell_script(private_home, "bob")
    client = openai.OpenAI(base_url=f"{private_home.proxy_url}/v1", api_key=key, max_retries=0)
    ask = lambda: client.completions.create(model="any", prompt="Hi", max_tokens=2)  # noqa: E731
    for _ in range(3):
        ask()
    cluster = cluster_of(private_home)
    assert cluster.stop()
    for _ in range(5):
        ask()  # the key was checked moments ago: it keeps working during the outage
    spool = private_home.root / "runtime" / "spool" / "llama_requests.jsonl"
    wait_for(spool.exists, what="rows spooled to disk")
    cluster.start()
    wait_for(lambda: count_rows(cluster.dsn()) == 8, timeout=60, what="all 8 rows")
    wait_for(lambda: not spool.exists(), what="the spool to be emptied")


def test_status_json_names_each_part(private_home):
    assert private_home.run("start").returncode == 0
    status = private_home.run("status", "--json")
    parts = json.loads(status.stdout)
    assert status.returncode == 0
    assert {parts["database"]["state"], parts["backend"]["state"], parts["gateway"]["state"]} == {
        "serving"
    }
    assert os.path.basename(parts["backend"]["model"]) == FALLBACK_MODEL_NAME


def test_bootstrap_script_creates_the_cluster_and_the_schema(private_home):
    result = subprocess.run(
        [str(CODE_DIR / "bin" / "bootstrap_user_cli.sh")],
        env=private_home.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cluster = cluster_of(private_home)
    assert cluster.is_running()
    assert count_rows(cluster.dsn()) == 0  # the table exists, and is empty
