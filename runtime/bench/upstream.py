"""The fast canned upstream for scenario 1: `python -m runtime.bench.upstream PORT`.

Scenario 1 measures what the gateway adds, so the upstream must cost as little as
possible and cost the same on both paths. A raw asyncio Protocol answers keep-alive
HTTP/1.1 with prebuilt bytes: no framework, no JSON work per request. It runs in its
own process so that it never shares an event loop (or a core's time slice) with the
bench or the gateway.

GET answers a model list (the gateway's /v1/models cache and readiness probe use GET);
every other method answers a canned chat completion with usage, as the gateway's
request log expects.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

MODELS = {"object": "list", "data": [{"id": "canned", "object": "model", "owned_by": "bench"}]}
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "canned",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}


def canned_response(payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


GET_ANSWER = canned_response(MODELS)
POST_ANSWER = canned_response(COMPLETION)


class CannedHttp(asyncio.Protocol):
    """Parses just enough HTTP/1.1 (head, Content-Length body) to answer pipelined requests."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = content_length(head)
            if len(self.buffer) < end + 4 + length:
                return  # the body has not all arrived yet
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(GET_ANSWER if head.startswith(b"GET ") else POST_ANSWER)


def content_length(head: bytes) -> int:
    """The Content-Length of a request head; 0 when absent (chunked bodies are not sent)."""
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    start += len(b"\r\ncontent-length:")
    stop = lowered.find(b"\r\n", start)
    return int(head[start : stop if stop >= 0 else None].strip() or 0)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedHttp, "127.0.0.1", port, backlog=1024)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(f"canned upstream listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stopped.wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
