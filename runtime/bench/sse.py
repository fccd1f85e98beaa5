"""The canned stream of the relay-cost scenario: server-sent events as llama_cpp.server sends.

llama_cpp.server 0.3 (through sse-starlette) answers a streamed chat completion with a
chunked HTTP/1.1 response whose events are `data: {json}` lines ended by a blank line:
one event with the assistant's role, one per generated token, one with the
finish_reason, then `data: [DONE]`. Its JSON is written with json.dumps' default
separators (a space after ':' and ','). The events here have the same shape and size.
"""

from __future__ import annotations

import json

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-store\r\n"
    b"x-accel-buffering: no\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
WORDS = ("Hello", "!", " How", " can", " I", " help", " you", " today", "?", " The")


def chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": "chatcmpl-5a10f292-f0bf-4a52-a402-d227003f5b05",
        "model": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "created": 1796040911,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def sse_events(tokens: int) -> list[bytes]:
    """The events of one streamed answer of `tokens` content chunks, [DONE] last."""
    chunks = [chunk({"role": "assistant"})]
    chunks += [chunk({"content": WORDS[i % len(WORDS)]}) for i in range(tokens)]
    chunks.append(chunk({}, "length"))
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return events + [b"data: [DONE]\n\n"]
