"""Gateway mode end to end: the console starts the gateway in front of the real backend.

The database is the test session's real PostgreSQL (POSTGRES_AUTH_DSN); users are made
with the admin CLI as an operator would, and called with the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import openai
import pytest
from conftest import (
    TEST_API_KEY,
    make_console_home,
    make_gateway_home,
    stop_console_home,
    wait_for,
)

from proxy.config import load_config
from runtime.gateway import GatewaySupervisor
from runtime.settings import FALLBACK_MODEL_NAME, Paths, load_settings

MESSAGES = [{"role": "user", "content": "Say hello."}]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def count_rows(dsn: str, where: str = "true", *args) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(f"SELECT count(*) FROM llama_requests WHERE {where}", *args)
        finally:
            await conn.close()

    return asyncio.run(count())


def fetch_rows(dsn: str, where: str = "true") -> list[dict]:
    async def fetch() -> list[dict]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(f"SELECT * FROM llama_requests WHERE {where} ORDER BY id")
            return [dict(row) for row in rows]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_start_serves_the_model_behind_the_gateway(shared_gateway):
    status = shared_gateway.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for part in ("database:", "backend:", "gateway:"):
        assert part in status.stdout
    reply = shared_gateway.client(shared_gateway.new_user("alice")).chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, seed=1
    )
    assert reply.choices[0].message.content


def test_a_streamed_completion_is_logged_with_its_token_counts(shared_gateway):
    key = shared_gateway.new_user("bob")
    stream = shared_gateway.client(key).chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, seed=1, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces)
    rows = wait_for(
        lambda: fetch_rows(shared_gateway.dsn, "username = 'bob' AND stream"),
        what="the logged stream",
    )
    assert rows[0]["status_code"] == 200
    assert rows[0]["completion_tokens"] == len([piece for piece in pieces if piece])
    assert rows[0]["path"] == "/v1/chat/completions"


def test_a_whole_completion_is_logged_with_usage_from_the_backend(shared_gateway):
    key = shared_gateway.new_user("carol")
    reply = shared_gateway.client(key).chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=6, seed=1
    )
    rows = wait_for(
        lambda: fetch_rows(shared_gateway.dsn, "username = 'carol'"), what="the logged row"
    )
    assert rows[0]["prompt_tokens"] == reply.usage.prompt_tokens
    assert rows[0]["completion_tokens"] == reply.usage.completion_tokens


def test_async_client_streams_through_the_gateway(shared_gateway):
    key = shared_gateway.new_user("dave")

    async def collect() -> str:
        client = openai.AsyncOpenAI(base_url=f"{shared_gateway.url}/v1", api_key=key, max_retries=0)
        stream = await client.chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=8, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return text

    assert asyncio.run(collect())


def test_the_backend_key_does_not_open_the_gateway(shared_gateway):
    with pytest.raises(openai.AuthenticationError):
        shared_gateway.client(TEST_API_KEY).models.list()


def test_the_backend_listens_on_loopback_only_and_wants_its_key(shared_gateway):
    backend = f"http://127.0.0.1:{shared_gateway.port}"
    assert http_get(f"{backend}/v1/models")[0] == 401
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    assert http_get(f"{backend}/v1/models", headers)[0] == 200
    listening = Path("/proc/net/tcp").read_text()
    assert f"0100007F:{shared_gateway.port:04X}" in listening
    assert f"00000000:{shared_gateway.port:04X}" not in listening


def test_restart_keeps_the_gateway_up_and_fails_no_request(gateway):
    key = gateway.new_user("steady")
    client = gateway.client(key, timeout=120)
    failures: list[str] = []
    answered = []
    is_done = threading.Event()

    def steady_stream() -> None:
        while not is_done.is_set():
            try:
                client.completions.create(model="any", prompt="Hi", max_tokens=2)
                answered.append(time.monotonic())
            except openai.OpenAIError as error:
                failures.append(repr(error))

    with ThreadPoolExecutor(2) as pool:
        senders = [pool.submit(steady_stream) for _ in range(2)]
        wait_for(lambda: len(answered) >= 3, what="requests before the restart")
        restart = gateway.run("restart")
        before = len(answered)
        wait_for(lambda: len(answered) >= before + 3, what="requests after the restart")
        is_done.set()
        for sender in senders:
            sender.result()
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert failures == []


def test_one_users_flood_does_not_starve_anothers_single_request(shared_gateway):
    flooder = shared_gateway.client(shared_gateway.new_user("flooder", rate_limit=100), timeout=300)
    single = shared_gateway.client(shared_gateway.new_user("single"), timeout=300)
    finished: list[str] = []

    def long_generation(index: int) -> None:
        flooder.completions.create(model="any", prompt=f"Story {index}:", max_tokens=40, seed=index)
        finished.append("A")

    with ThreadPoolExecutor(17) as pool:
        floods = [pool.submit(long_generation, index) for index in range(16)]
        wait_for(lambda: shared_gateway.queue_waiting() >= 10, what="the flood to queue up")
        single.completions.create(model="any", prompt="Hi", max_tokens=2)
        finished.append("B")
        for flood in floods:
            flood.result()
    assert finished.index("B") <= 1, finished


@pytest.fixture
def gateway(gateway_home):
    result = gateway_home.run("start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "behind the gateway" in result.stdout
    return gateway_home


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory, fallback_model, pg_databases):
    """Like gateway, started once for the tests that leave it as they found it (a start of
    the whole stack costs seconds); each of them makes users of its own."""
    home = make_console_home(tmp_path_factory.mktemp("gateway") / "home", fallback_model)
    with pg_databases.empty_database() as dsn:
        gateway_home = make_gateway_home(home, dsn)
        try:
            result = gateway_home.run("start")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "behind the gateway" in result.stdout
            yield gateway_home
        finally:
            stop_console_home(gateway_home)


def http_post(url: str, key: str, payload: dict) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(payload).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_answers_name_the_model_by_its_file_name_never_by_its_path(shared_gateway):
    key = shared_gateway.new_user("erin")
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"messages": MESSAGES, "max_tokens": 2}
    answers = {
        "models": http_get(f"{shared_gateway.url}/v1/models", auth),
        "chat": http_post(f"{shared_gateway.url}/v1/chat/completions", key, chat),
        "stream": http_post(
            f"{shared_gateway.url}/v1/chat/completions", key, {**chat, "stream": True}
        ),
        "completion": http_post(f"{shared_gateway.url}/v1/completions", key, {"prompt": "Hi"}),
    }
    for name, (status, text) in answers.items():
        assert status == 200, (name, text)
        assert str(shared_gateway.root) not in text, name
        assert f'"{FALLBACK_MODEL_NAME}"' in text, name


def test_embeddings_on_a_model_started_without_them_get_400_saying_how(shared_gateway):
    key = shared_gateway.new_user("frank")
    status, text = http_post(f"{shared_gateway.url}/v1/embeddings", key, {"input": "hi"})
    assert status == 400
    assert json.loads(text)["error"]["code"] == "embeddings_disabled"


def test_gateway_metrics_count_requests(shared_gateway):
    key = shared_gateway.new_user("metered")
    shared_gateway.client(key).models.list()
    text = http_get(f"{shared_gateway.url}/metrics")[1]
    assert 'llamagate_requests_total{route="/v1/models",status="200",user="metered"}' in text


def test_a_busy_gateway_port_is_named_and_nothing_is_left_running(gateway_home):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", gateway_home.proxy_port))
        squatter.listen()
        result = gateway_home.run("start")
    assert result.returncode == 1
    assert "LLAMA_PROXY_PORT" in result.stderr
    assert gateway_home.backend_pids() == []


@pytest.mark.parametrize("how", [(), ("--foreground",)], ids=["start", "foreground"])
def test_a_backend_that_fails_to_start_leaves_no_gateway_behind(gateway_home, how):
    # One start path, one order: database, backend, gateway. The gateway is never
    # launched (its log never begun) when the backend cannot start.
    result = gateway_home.run("start", *how, LLAMA_EXTRA_ARGS="--no_such_flag 1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--no_such_flag" in result.stderr
    assert not (gateway_home.root / "runtime" / "logs" / "proxy.log").exists()
    assert gateway_home.run("status").returncode == 3


def test_an_unreachable_database_is_named_without_its_password(gateway_home):
    result = gateway_home.run("start", POSTGRES_AUTH_DSN="postgresql://gate:sekrit@127.0.0.1:1/x")
    assert result.returncode == 1
    assert "gate:***@127.0.0.1:1" in result.stderr
    assert "sekrit" not in result.stdout + result.stderr
    assert gateway_home.backend_pids() == []


def test_the_gateway_honours_the_restart_flag_as_long_as_a_restart_can_take(tmp_path):
    environ = {
        "LLAMA_STOP_GRACE_SECONDS": "7",
        "LLAMA_START_TIMEOUT_SECONDS": "600",
        "LLAMA_API_KEY": TEST_API_KEY,
    }
    settings = load_settings(Paths(tmp_path), environ=environ)
    gateway = GatewaySupervisor(settings, dsn="postgresql://u@/db?host=/tmp", environ=environ)
    config = load_config(gateway.environment())
    assert config.restart_flag_max_age_seconds == 7 + 600 + 35


def test_the_gateway_gets_each_setting_as_written_not_as_the_console_parsed_it(tmp_path):
    environ = {
        "LLAMA_PROXY_ENABLED": "yes",
        "LLAMA_PROXY_RATE_WINDOW_SECONDS": "90",
        "LLAMA_API_KEY": TEST_API_KEY,
    }
    settings = load_settings(Paths(tmp_path), environ=environ)
    gateway = GatewaySupervisor(settings, dsn="postgresql://u@/db?host=/tmp", environ=environ)
    passed = gateway.environment()
    assert (passed["LLAMA_PROXY_ENABLED"], passed["LLAMA_PROXY_RATE_WINDOW_SECONDS"]) == (
        "yes",
        "90",
    )
    assert load_config(passed).rate_window_seconds == 90.0
