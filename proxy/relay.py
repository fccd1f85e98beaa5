"""What both relays of an answer to the client share: the writer, and [DONE]'s handling.

Every answer from a backend now arrives on a raw connection (proxy/rawupstream.py,
proxy/rawpool.py); an event stream is relayed in the socket's callbacks by
proxy/rawrelay.py, which writes through ClientWriter and holds back a [DONE] cut short
with split_done_prefix.

Writes go through ClientWriter: while the client keeps up, a chunk is framed and handed
to its socket directly, skipping aiohttp's two coroutine layers per write; otherwise it
is written with its deadline (proxy/deadlines.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.deadlines import fits_in_buffer, write_within
from proxy.usage import DONE_LINE

BeforeDone = Callable[[], Awaitable[bytes]]


class ClientWriter:
    """Writes a stream's chunks to the client, each at once, within the write deadline.

    aiohttp's response.write awaits two coroutines per chunk and checks for a drain;
    relaying a token costs little more than that. So once the first write has sent the
    headers, a chunk that leaves the client's socket buffer at or under its low-water
    mark is framed here (HTTP/1.1 chunked encoding, which is all aiohttp would add) and
    handed to the socket: nothing can wait, so no deadline is needed (see write_within).
    Anything else, and every write to a closing socket (which then raises), goes through
    write_within.
    """

    def __init__(
        self,
        response: web.StreamResponse,
        transport: asyncio.BaseTransport | None,
        seconds: float,
    ) -> None:
        self.response = response
        self.transport = transport if isinstance(transport, asyncio.WriteTransport) else None
        self.seconds = seconds
        self.is_direct = False  # until a write through aiohttp has sent the headers

    def try_write(self, data: bytes) -> bool:
        """Hand `data` to the client's socket now if that needs no wait; False if not."""
        transport = self.transport
        if transport is not None and self.is_direct and fits_in_buffer(transport, len(data)):
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            return True
        return False

    async def write(self, data: bytes) -> None:
        if self.try_write(data):
            return
        transport = self.transport
        await write_within(self.response, data, self.seconds, transport)
        self.is_direct = (
            transport is not None
            and not self.response.compression
            and self.response.headers.get("Transfer-Encoding") == "chunked"
        )


def split_done_prefix(chunk: bytes) -> tuple[bytes, bytes]:
    """(what to send now, what to hold) where the held part may be a [DONE] cut short.

    A read can end inside the line `data: [DONE]`; sent at once, that piece could no
    longer be preceded by the usage event. Only such a piece is held, until the next
    read: any other bytes go out as they came.
    """
    tail_start = chunk.rfind(b"\n") + 1
    tail = chunk[tail_start:]
    if tail and DONE_LINE.startswith(tail):
        return chunk[:tail_start], tail
    return chunk, b""
