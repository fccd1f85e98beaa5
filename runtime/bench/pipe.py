"""The floor: `python -m runtime.bench.pipe PORT TARGET_PORT`, a bare TCP pipe in Python.

It forwards bytes both ways between each client and the target, and does nothing else:
no HTTP parsing, no auth, no queue, no log. Any gateway written in Python on asyncio does
at least this much per request and per streamed chunk: a wake-up, a read and a write on
each side. What the pipe costs on a machine is therefore the floor under the gateway's
own figures there: scenario 1's added latency and scenario 6's CPU per chunk. The bench
prints both next to the gateway's, so that a target can be read against this machine.
"""

from __future__ import annotations

import asyncio

from runtime.bench.floorcli import parse_ports, serve_protocol


class Half(asyncio.Protocol):
    """One side of a piped connection: what it reads, its peer writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True  # keep our writing side open until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Back-pressure: a peer that cannot take more stops our reading, as a relay must.
    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class ClientHalf(Half):
    """The client's side; it reads nothing until its connection to the target is made."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, target = await loop.create_connection(Half, "127.0.0.1", self.target_port)
        except OSError:
            self.transport.close()
            return
        self.peer, target.peer = target, self
        self.transport.resume_reading()


def main() -> None:
    port, target_port = parse_ports(
        "runtime.bench.pipe",
        "A bare TCP pipe to 127.0.0.1:TARGET_PORT: the bench's floor for Python.",
    )
    serve_protocol(lambda: ClientHalf(target_port), port)


if __name__ == "__main__":
    main()
