"""How long one request may hold the backend: a deadline per write, and a cap in all.

llama_cpp.server generates for one request at a time, so a request that never ends takes
the box from everyone. There are two ways to make one. A client can stop reading: its
TCP window fills, every write to it waits for ever, and the backend keeps generating
into the gateway's buffers. Each write therefore gets LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS,
after which the client is dropped (logged 499) and the upstream closed. Or an answer can
simply be very long: every request gets LLAMA_PROXY_REQUEST_MAX_SECONDS from the moment
it is sent upstream (queueing has its own timeout), after which it is cut off (504).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from proxy.errors import GatewayError

TOO_LONG_CODE = "request_too_long"


@dataclass(frozen=True)
class Deadlines:
    """The two time limits of one forwarded request, in seconds."""

    client_write_seconds: float = 30.0
    request_max_seconds: float = 600.0

    def too_long_message(self) -> str:
        return (
            f"the answer took longer than the {self.request_max_seconds:g} seconds this "
            f"gateway allows (LLAMA_PROXY_REQUEST_MAX_SECONDS); ask for fewer tokens"
        )

    def too_long(self) -> GatewayError:
        return GatewayError(504, self.too_long_message(), "server_error", TOO_LONG_CODE)


class ClientTooSlow(Exception):
    """The client took no part of the answer within the write deadline."""


async def write_within(
    response: web.StreamResponse,
    data: bytes,
    seconds: float,
    transport: asyncio.BaseTransport | None = None,
) -> None:
    """Write to the client; raise ClientTooSlow if it has not taken the data in time.

    Given the client's transport, a write that leaves its buffer at or under the
    low-water mark goes out without a timer: aiohttp waits only while the transport has
    paused writing, which it does above the high-water mark and undoes only at or under
    the low one. A timer per write cost about as much as the rest of relaying a chunk.
    """
    if transport is not None and fits_in_buffer(transport, len(data)):
        await response.write(data)
        return
    try:
        async with asyncio.timeout(seconds):
            await response.write(data)
    except TimeoutError:
        raise ClientTooSlow(
            f"the client stopped reading: it took nothing of the answer for {seconds:g} "
            f"seconds (LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS)"
        ) from None


def fits_in_buffer(transport: asyncio.BaseTransport, size: int) -> bool:
    """True if `size` more bytes leave the write buffer at or under its low-water mark."""
    if transport.is_closing() or not isinstance(transport, asyncio.WriteTransport):
        return False
    return transport.get_write_buffer_size() + size <= transport.get_write_buffer_limits()[0]


async def finish_within(response: web.StreamResponse, seconds: float) -> None:
    """End the answer; like write_within, a client that does not take it is too slow."""
    try:
        async with asyncio.timeout(seconds):
            await response.write_eof()
    except TimeoutError:
        raise ClientTooSlow(
            f"the client stopped reading: it did not take the end of the answer within "
            f"{seconds:g} seconds (LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS)"
        ) from None


def drop_client(request: web.Request) -> None:
    """Hang up on a client that stopped reading, dropping what is buffered for it.

    A polite close would wait to flush that buffer, which the client never takes.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()


@contextlib.asynccontextmanager
async def within_cap(deadline: float, deadlines: Deadlines) -> AsyncIterator[None]:
    """Cancel the work inside at `deadline` (loop time) and raise a 504 instead."""
    cap = asyncio.timeout_at(deadline)
    try:
        async with cap:
            yield
    except TimeoutError:
        if not cap.expired():
            raise
        raise deadlines.too_long() from None
