"""Relaying a stream of server-sent events: each read goes out as it came, one write each.

A stream asked for with `"stream": true` is relayed below aiohttp by proxy/rawrelay.py,
which shares ClientWriter and split_done_prefix with this module; pass_chunks relays any
other event stream, from aiohttp's reader.

Reads are taken as the socket gives them (`readany`: every event that has arrived, in
one piece), counted as bytes (proxy/usage.py) and written without waiting for more, so
the stream stays unbuffered. The one exception is the stream's end: the part of a read
before `data: [DONE]` goes out at once, then `before_done()` runs while the request
still holds its backend slot (it counts the prompt's tokens and may return a usage
event), and only then does [DONE] go out. Clients hang up right after [DONE], and
anything awaited after it would be cancelled with them.

The backend's silence is timed here too (SilenceWatch), with one timer per period of
LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS instead of aiohttp's, which it re-arms on every read.

Writes go through ClientWriter: while the client keeps up, a chunk is framed and handed
to its socket directly, skipping aiohttp's two coroutine layers per write; otherwise it
is written with its deadline (proxy/deadlines.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from proxy.deadlines import fits_in_buffer, write_within
from proxy.requestlog import RequestRecord
from proxy.usage import DONE_LINE, UsageCounter

BeforeDone = Callable[[], Awaitable[bytes]]


class SilenceWatch:
    """Raises TimeoutError in the relay once the backend has sent nothing for `seconds`.

    Only the time spent waiting for the backend counts (writing to a slow client has its
    own deadline). A read notes when its wait began; the one timer, when it fires, ends
    the relay or is set again for `seconds` after that. aiohttp's own read timeout,
    turned off for the stream, cancelled and scheduled a timer on every read instead.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.waiting_since = self.loop.time()
        self.is_waiting = False
        self.timeout = asyncio.timeout(None)
        self.handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> SilenceWatch:
        await self.timeout.__aenter__()
        if self.seconds is not None:
            self.handle = self.loop.call_at(self.waiting_since + self.seconds, self._check)
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        if self.handle is not None:
            self.handle.cancel()
        return await self.timeout.__aexit__(*exc_info)

    async def read(self, content: aiohttp.StreamReader) -> bytes:
        """The next bytes the backend sent (b"" at its end), timed."""
        self.waiting_since = self.loop.time()
        self.is_waiting = True
        try:
            return await content.readany()
        finally:
            self.is_waiting = False

    def _check(self) -> None:
        assert self.seconds is not None
        now = self.loop.time()
        due = self.waiting_since + self.seconds if self.is_waiting else now + self.seconds
        if now >= due:
            self.handle = None
            self.timeout.reschedule(now)  # expire now: TimeoutError in the relay
        else:
            self.handle = self.loop.call_at(due, self._check)


def time_silence_here(upstream: aiohttp.ClientResponse) -> None:
    """Turn off aiohttp's per-read timeout for this response (SilenceWatch does its job)."""
    connection = upstream.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = None


async def pass_chunks(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    transport: asyncio.BaseTransport | None,
    record: RequestRecord,
    counter: UsageCounter,
    write_seconds: float,
    before_done: BeforeDone,
    silence_seconds: float | None = None,
) -> None:
    """Relay the upstream's events to the client until [DONE] or the end of the stream."""
    time_silence_here(upstream)
    client = ClientWriter(response, transport, write_seconds)
    async with SilenceWatch(silence_seconds) as watch:
        held = b""
        while chunk := await watch.read(upstream.content):
            if held:
                chunk, held = held + chunk, b""
            chunk, held = split_done_prefix(chunk)
            if not chunk:
                continue
            counter.feed_stream(chunk)
            record.response_bytes += len(chunk)
            if counter.saw_done:
                # The answer is complete. Waiting for the backend's end of stream first
                # would race the client's hang-up and log a finished answer as cut short.
                start = max(counter.done_offset, 0)
                if start:
                    await client.write(chunk[:start])
                extra = await before_done()
                record.response_bytes += len(extra)
                await client.write(extra + chunk[start:])
                return
            await client.write(chunk)
        if held:
            record.response_bytes += len(held)
            await client.write(held)


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
