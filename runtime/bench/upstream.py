"""The fast canned upstream for scenario 1: `python -m runtime.bench.upstream PORT`.

Scenario 1 measures what the gateway adds, so the upstream must cost as little as
possible and cost the same on both paths. A raw asyncio Protocol answers keep-alive
HTTP/1.1 with prebuilt bytes: no framework, no JSON work per request. It runs in its
own process so that it never shares an event loop (or a core's time slice) with the
bench or the gateway.

GET answers a model list (the gateway's /v1/models cache and readiness probe use GET);
every other method answers a canned chat completion with usage, as the gateway's
request log expects. A request whose body asks for `"stream": true` (the relay-cost
scenario) gets STREAM_TOKENS server-sent events shaped like llama_cpp.server 0.3's, one
token per event, each written on its own every TOKEN_INTERVAL_SECONDS as a model would,
then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from runtime.bench.sse import STREAM_HEAD, sse_events

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
STREAM_ASK = b'"stream":true'
STREAM_TOKENS = 256
# 4 ms a token per stream: with the relay scenario's 8 streams at once, 2,000 chunks/s,
# which the gateway relays without falling behind (so reads are not coalesced for it).
TOKEN_INTERVAL_SECONDS = 0.004
STREAM_EVENTS = sse_events(STREAM_TOKENS)


class CannedHttp(asyncio.Protocol):
    """Parses just enough HTTP/1.1 (head, Content-Length body) to answer pipelined requests."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.streaming: asyncio.Task | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

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
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if STREAM_ASK in body.replace(b" ", b""):
                # One stream per connection at a time, as the gateway sends them.
                self.streaming = asyncio.ensure_future(self.stream())
                return
            self.transport.write(GET_ANSWER if head.startswith(b"GET ") else POST_ANSWER)

    async def stream(self) -> None:
        """The canned SSE answer, one chunked-encoding chunk per event, paced like a model."""
        self.transport.write(STREAM_HEAD)
        for event in STREAM_EVENTS:
            await asyncio.sleep(TOKEN_INTERVAL_SECONDS)
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.transport.write(b"0\r\n\r\n")


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
