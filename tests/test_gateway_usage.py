"""The usage event and the relayed bytes of a stream, against the fake upstream.

The real model's counts are checked in test_stream_usage.py; here, what the gateway
adds to a stream and what it leaves alone, byte for byte.
"""

from __future__ import annotations

import json

import pytest
from gatewayhelpers import add_user, bearer, chat, log_rows, wait_until

pytest_plugins = ["gatewayfixture"]

INCLUDE_USAGE = {"stream_options": {"include_usage": True}}


def upstream_bytes(chunks: int, content: str) -> bytes:
    """What the fake upstream sends for a stream (see FakeUpstream.chat)."""
    event = {"choices": [{"delta": {"content": content}}]}
    return (b"data: " + json.dumps(event).encode() + b"\n\n") * chunks + b"data: [DONE]\n\n"


@pytest.mark.asyncio
async def test_without_include_usage_the_stream_is_the_backends_bytes(gateway, db, upstream):
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    assert await response.read() == upstream_bytes(upstream.chunks, upstream.content)


@pytest.mark.asyncio
async def test_include_usage_adds_one_usage_event_right_before_done(gateway, db, upstream):
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True, **INCLUDE_USAGE), headers=bearer(key)
    )
    body = await response.read()
    sent = upstream_bytes(upstream.chunks, upstream.content)
    before, _, done = sent.rpartition(b"data: [DONE]")
    assert body.startswith(before) and body.endswith(b"data: [DONE]" + done)
    event = body[len(before) : -len(b"data: [DONE]\n\n")]
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    payload = json.loads(event[6:])
    assert payload["choices"] == []
    # No chat template in this gateway: the prompt is unknown, never guessed.
    assert payload["usage"] == {
        "prompt_tokens": None,
        "completion_tokens": upstream.chunks,
        "total_tokens": None,
    }
    assert upstream.seen[-1].body["stream_options"] == {"include_usage": True}
    request_id = response.headers["X-Request-Id"]
    rows = await wait_until(lambda: log_rows(db, "request_id = $1", request_id), "the row")
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (None, upstream.chunks)
    assert rows[0]["response_bytes"] == len(body)
