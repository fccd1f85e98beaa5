"""The canned upstream: `python -m runtime.bench.upstream PORT [--count N] [--service-seconds S]`.

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

The scale-out scenario runs it as N backends at once (`--count N`: ports PORT to
PORT+N-1, one process) that each answer a POST after `--service-seconds`, one at a time
per port, as llama_cpp.server generates for one request at a time. GETs (the gateway's
probes) are answered at once.

Each such backend counts the requests that reach it while another is still in flight
there, as llama_cpp.server would queue them behind its lock: the two-gateway scenario's
proof that no slot was given to two requests at once. `GET /bench/overlaps` answers its
figures since the last such GET (requests, overlapping requests, the most in flight at
once) and starts counting afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal

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
OVERLAPS_PATH = b"/bench/overlaps"
POST_ANSWER = canned_response(COMPLETION)
STREAM_ASK = b'"stream":true'
STREAM_TOKENS = 256
# 4 ms a token per stream: with the relay scenario's 8 streams at once, 2,000 chunks/s,
# which the gateway relays without falling behind (so reads are not coalesced for it).
TOKEN_INTERVAL_SECONDS = 0.004
STREAM_EVENTS = sse_events(STREAM_TOKENS)


class CannedHttp(asyncio.Protocol):
    """Parses just enough HTTP/1.1 (head, Content-Length body) to answer pipelined requests."""

    def __init__(self, service: ServiceTime | None = None) -> None:
        self.service = service

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
            if head.startswith(b"GET " + OVERLAPS_PATH) and self.service is not None:
                self.transport.write(canned_response(self.service.take_figures()))
            elif head.startswith(b"GET "):
                self.transport.write(GET_ANSWER)
            elif self.service is not None:
                # One request at a time: the next one is read when this one is answered.
                self.streaming = asyncio.ensure_future(self.answer_in_turn(self.service))
                return
            else:
                self.transport.write(POST_ANSWER)

    async def answer_in_turn(self, service: ServiceTime) -> None:
        service.arrived()
        try:
            async with service.turn:
                await asyncio.sleep(service.seconds)
        finally:
            service.left()
        self.transport.write(POST_ANSWER)

    async def stream(self) -> None:
        """The canned SSE answer, one chunked-encoding chunk per event, paced like a model."""
        self.transport.write(STREAM_HEAD)
        for event in STREAM_EVENTS:
            await asyncio.sleep(TOKEN_INTERVAL_SECONDS)
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.transport.write(b"0\r\n\r\n")


class ServiceTime:
    """One backend's generation: one request at a time, each taking `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.turn = asyncio.Lock()
        self.in_flight = 0
        self.requests = 0
        self.overlapping = 0  # requests that arrived while another was in flight
        self.most_in_flight = 0

    def arrived(self) -> None:
        self.requests += 1
        if self.in_flight:
            self.overlapping += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def left(self) -> None:
        self.in_flight -= 1

    def take_figures(self) -> dict[str, int]:
        """The counts since the last call; those in flight now count in the next period."""
        figures = {
            "requests": self.requests,
            "overlapping": self.overlapping,
            "most_in_flight": self.most_in_flight,
        }
        self.requests = self.overlapping = 0
        self.most_in_flight = self.in_flight
        return figures


def content_length(head: bytes) -> int:
    """The Content-Length of a request head; 0 when absent (chunked bodies are not sent)."""
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    start += len(b"\r\ncontent-length:")
    stop = lowered.find(b"\r\n", start)
    return int(head[start : stop if stop >= 0 else None].strip() or 0)


async def listen(port: int, count: int = 1, service_seconds: float = 0.0) -> list:
    """Servers on ports port .. port+count-1, each with its own one-at-a-time service time."""
    loop = asyncio.get_running_loop()
    servers = []
    for offset in range(count):
        service = ServiceTime(service_seconds) if service_seconds > 0 else None
        answer = functools.partial(CannedHttp, service)
        servers.append(await loop.create_server(answer, "127.0.0.1", port + offset, backlog=1024))
    return servers


async def serve(port: int, count: int = 1, service_seconds: float = 0.0) -> None:
    """listen(), until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    servers = await listen(port, count, service_seconds)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(f"canned upstream listening on 127.0.0.1:{port} (+{count - 1})", flush=True)
    await stopped.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench.upstream")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1, help="backends on consecutive ports")
    parser.add_argument(
        "--service-seconds", type=float, default=0.0, help="each POST, one at a time per port"
    )
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.count, arguments.service_seconds))


if __name__ == "__main__":
    main()
