"""Single-key mode end to end: the real llama_cpp.server, called with the openai client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest
from conftest import TEST_API_KEY

MESSAGES = [{"role": "user", "content": "Say hello."}]


def client(home, api_key: str = TEST_API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{home.url}/v1", api_key=api_key, max_retries=0)


def test_chat_completion_succeeds_with_the_key(shared_serving):
    reply = client(shared_serving).chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, seed=1
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_streamed_chat_completion_succeeds_with_the_key(shared_serving):
    stream = client(shared_serving).chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, seed=1, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 1
    assert "".join(pieces)


@pytest.mark.parametrize("api_key", ["", "wrong-key"])
def test_requests_without_the_key_get_401(shared_serving, api_key):
    with pytest.raises(openai.AuthenticationError) as refused:
        client(shared_serving, api_key or "none").chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=4
        )
    assert refused.value.status_code == 401


def test_async_streaming_client_works(shared_serving):
    import asyncio

    async def collect() -> str:
        async_client = openai.AsyncOpenAI(
            base_url=f"{shared_serving.url}/v1", api_key=TEST_API_KEY, max_retries=0
        )
        stream = await async_client.chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=8, stream=True
        )
        text = "".join(
            [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        )
        await async_client.close()
        return text

    assert asyncio.run(collect())


def test_second_start_says_already_serving_and_exits_0(shared_serving):
    pid = shared_serving.backend_pid()
    again = shared_serving.run("start")
    assert again.returncode == 0
    assert "already serving" in again.stdout
    assert shared_serving.backend_pid() == pid
    assert shared_serving.backend_pids() == [pid]


def test_status_reports_serving_then_stopped(serving):
    status = serving.run("status", "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["state"] == "serving"
    assert report["backend"]["pid"] == serving.backend_pid()
    assert serving.run("stop").returncode == 0
    assert serving.run("status").returncode == 3
    assert serving.backend_pids() == []
    assert serving.log_pumps() == []


def test_readiness_probes_openapi_never_v1_models(shared_serving):
    log = (shared_serving.root / "runtime" / "logs" / "backend.log").read_text()
    assert "GET /openapi.json" in log
    assert "/v1/models" not in log


def test_backend_ignores_host_port_model_and_api_key_from_the_environment(home):
    # llama_cpp.server would obey these over its flags; the supervisor must not pass them on.
    result = home.run(
        "start",
        HOST="0.0.0.0",
        PORT="1",
        MODEL="/nonexistent.gguf",
        API_KEY="leaked",
        api_key="leaked",
    )
    assert result.returncode == 0, result.stderr
    reply = client(home).chat.completions.create(model="any", messages=MESSAGES, max_tokens=2)
    assert reply.choices
    with pytest.raises(openai.AuthenticationError):
        client(home, "leaked").chat.completions.create(model="any", messages=MESSAGES, max_tokens=2)


def test_backend_runs_in_its_own_session_without_the_key_in_argv(shared_serving):
    cmdline = Path(f"/proc/{shared_serving.backend_pid()}/cmdline").read_bytes().decode()
    assert "--interrupt_requests\0false" in cmdline
    # Its own process group and session: a console's Ctrl-C or logout never reaches it.
    assert os.getpgid(shared_serving.backend_pid()) == shared_serving.backend_pid()
    assert os.getsid(shared_serving.backend_pid()) == shared_serving.backend_pid()
    assert TEST_API_KEY not in cmdline
