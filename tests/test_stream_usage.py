"""Usage in streams, end to end: the real model behind the console's gateway.

One stack (console, gateway, llama_cpp.server with the fallback model, the session's
PostgreSQL) serves the whole module. Every stream's prompt tokens must be what the
backend itself counts for the same request when it answers whole, and a client that asks
for `stream_options.include_usage` gets OpenAI's last usage event before [DONE].
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import (
    TEST_API_KEY,
    GatewayHome,
    clean_environ,
    free_port,
    link_or_copy,
    wait_for,
)
from pgfixture import fresh_database

from runtime.settings import FALLBACK_MODEL_NAME

MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour, and say why you like it."},
]
PROMPT = "The lighthouse keeper opened the door and"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fallback_model: Path, pg_cluster) -> Iterator[GatewayHome]:
    """The console's whole stack in gateway mode, started once for the module."""
    root = tmp_path_factory.mktemp("usage") / "home"
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    with fresh_database(pg_cluster) as dsn:
        home = GatewayHome(root=root, port=free_port(), proxy_port=free_port(), dsn=dsn)
        home.env = {
            **clean_environ(),
            "LLAMAGATE_ROOT": str(root),
            "LLAMA_SERVER_PORT": str(home.port),
            "LLAMA_API_KEY": TEST_API_KEY,
            "LLAMA_STOP_GRACE_SECONDS": "5",
            "LLAMA_PROXY_ENABLED": "1",
            "LLAMA_PROXY_HOST": "127.0.0.1",
            "LLAMA_PROXY_PORT": str(home.proxy_port),
            "POSTGRES_AUTH_DSN": dsn,
        }
        started = home.run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        try:
            yield home
        finally:
            home.run("stop", timeout=60)


@pytest.fixture(scope="module")
def key(stack: GatewayHome) -> str:
    return stack.new_user("streamer")


def row_of(dsn: str, request_id: str) -> dict:
    async def fetch() -> dict | None:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT * FROM llama_requests WHERE request_id = $1", request_id
            )
            return dict(row) if row else None
        finally:
            await conn.close()

    return wait_for(lambda: asyncio.run(fetch()), what=f"the row of request {request_id}")


def post(stack: GatewayHome, key: str, path: str, body: dict) -> tuple[bytes, str]:
    """The raw answer and its X-Request-Id."""
    request = urllib.request.Request(
        stack.url + path,
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.read(), answer.headers["X-Request-Id"]


def events_of(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def whole_prompt_tokens(stack: GatewayHome, key: str, path: str, body: dict) -> int:
    answer, _ = post(stack, key, path, {**body, "max_tokens": 1})
    return json.loads(answer)["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": PROMPT}),
    ],
    ids=["chat", "completions"],
)
def test_a_streams_logged_prompt_tokens_equal_the_whole_answers(stack, key, path, body):
    expected = whole_prompt_tokens(stack, key, path, body)
    raw, request_id = post(stack, key, path, {**body, "max_tokens": 4, "stream": True})
    assert events_of(raw)[-1] == b"[DONE]"
    assert not any(b'"usage"' in e for e in events_of(raw))  # not asked for: none sent
    row = row_of(stack.dsn, request_id)
    assert row["stream"] is True and row["status_code"] == 200
    assert row["prompt_tokens"] == expected
    assert row["completion_tokens"] == 4


def test_include_usage_sends_the_usage_event_right_before_done_in_the_raw_bytes(stack, key):
    expected = whole_prompt_tokens(stack, key, "/v1/chat/completions", {"messages": MESSAGES})
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True, "seed": 3}
    body["stream_options"] = {"include_usage": True}
    raw, request_id = post(stack, key, "/v1/chat/completions", body)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = events_of(raw)
    *chunks, last, done = events
    assert done == b"[DONE]"
    usage_event = json.loads(last)
    first = json.loads(chunks[0])
    assert usage_event["choices"] == []
    for name in ("id", "model", "created", "object"):
        assert usage_event[name] == first[name]
    texts = [json.loads(c)["choices"][0]["delta"].get("content") for c in chunks]
    assert usage_event["usage"] == {
        "prompt_tokens": expected,
        "completion_tokens": len([t for t in texts if t]),
        "total_tokens": expected + len([t for t in texts if t]),
    }
    assert all(b'"usage"' not in c for c in chunks)
    row = row_of(stack.dsn, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        expected,
        usage_event["usage"]["completion_tokens"],
    )


def test_openai_client_streaming_with_include_usage_gets_usage_in_its_last_chunk(stack, key):
    client = stack.client(key)
    whole = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=1)
    stream = client.chat.completions.create(
        model="any",
        messages=MESSAGES,
        max_tokens=6,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *before, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    texts = [c.choices[0].delta.content for c in before if c.choices]
    assert last.usage.completion_tokens == len([t for t in texts if t])
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in before)
    assert last.id == before[0].id
