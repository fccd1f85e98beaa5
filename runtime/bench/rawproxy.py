"""A floor: `python -m runtime.bench.rawproxy PORT TARGET_PORT`, HTTP forwarding on bare asyncio.

Each client connection gets one keep-alive connection to 127.0.0.1:TARGET_PORT. A
request is cut out of the client's bytes by its head and Content-Length, written to the
target as it is, and the answer, cut out the same way, is written back: asyncio
protocols and nothing else, no HTTP library. It answers only what the canned upstream
sends (Content-Length bodies, no chunked encoding); that is all the bench asks of it.

Next to the bare aiohttp forwarder (runtime/bench/bareproxy.py) it shows how much of the
gateway's added latency is its HTTP library on this machine, and what a gateway whose
edge was written on asyncio's protocols could reach here.
"""

from __future__ import annotations

import asyncio

from runtime.bench.floorcli import parse_ports, serve_protocol

HEAD_END = b"\r\n\r\n"


def cut_message(buffer: bytes) -> tuple[bytes, bytes] | None:
    """(one whole HTTP message, the rest) from the start of buffer; None if incomplete."""
    end = buffer.find(HEAD_END)
    if end < 0:
        return None
    length = 0
    for line in buffer[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    size = end + len(HEAD_END) + length
    if len(buffer) < size:
        return None
    return buffer[:size], buffer[size:]


class TargetSide(asyncio.Protocol):
    """The connection to the target: resolves `answer` with each whole answer."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answer: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        cut = cut_message(self.buffer)
        if cut is not None and self.answer is not None and not self.answer.done():
            message, self.buffer = cut
            self.answer.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("the target closed the connection"))


class ClientSide(asyncio.Protocol):
    """A client's connection: its requests are forwarded one at a time, in order."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.buffer = b""
        self.is_busy = False
        self.target: TargetSide | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.is_busy:
            self.forward_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None and self.target.transport is not None:
            self.target.transport.close()

    def forward_next(self) -> None:
        cut = cut_message(self.buffer)
        if cut is None:
            return
        request, self.buffer = cut
        self.is_busy = True
        asyncio.ensure_future(self.forward(request))

    async def forward(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.target is None:
                _, self.target = await loop.create_connection(
                    TargetSide, "127.0.0.1", self.target_port
                )
            self.target.answer = loop.create_future()
            self.target.transport.write(request)
            self.transport.write(await self.target.answer)
        except ConnectionError:
            self.transport.close()
            return
        self.is_busy = False
        self.forward_next()


def main() -> None:
    port, target_port = parse_ports(
        "runtime.bench.rawproxy",
        "HTTP forwarding on bare asyncio protocols: the bench's floor without an HTTP library.",
    )
    serve_protocol(lambda: ClientSide(target_port), port)


if __name__ == "__main__":
    main()
