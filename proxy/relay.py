"""Relaying a stream of server-sent events: each read goes out as it came, one write each.

Reads are taken as the socket gives them (`readany`: every event that has arrived, in
one piece), counted as bytes (proxy/usage.py) and written without waiting for more, so
the stream stays unbuffered. The one exception is the stream's end: the part of a read
before `data: [DONE]` goes out at once, then `before_done()` runs while the request
still holds its backend slot (it counts the prompt's tokens and may return a usage
event), and only then does [DONE] go out. Clients hang up right after [DONE], and
anything awaited after it would be cancelled with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from proxy.deadlines import write_within
from proxy.requestlog import RequestRecord
from proxy.usage import DONE_LINE, UsageCounter

BeforeDone = Callable[[], Awaitable[bytes]]


async def pass_chunks(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    transport: asyncio.BaseTransport | None,
    record: RequestRecord,
    counter: UsageCounter,
    write_seconds: float,
    before_done: BeforeDone,
) -> None:
    """Relay the upstream's events to the client until [DONE] or the end of the stream."""
    content = upstream.content
    held = b""
    while chunk := await content.readany():
        if held:
            chunk, held = held + chunk, b""
        chunk, held = split_done_prefix(chunk)
        if not chunk:
            continue
        counter.feed_stream(chunk)
        record.response_bytes += len(chunk)
        if counter.saw_done:
            # The answer is complete. Waiting for the backend's end of stream first would
            # race the client's hang-up and log a finished answer as cut short.
            start = max(counter.done_offset, 0)
            if start:
                await write_within(response, chunk[:start], write_seconds, transport)
            extra = await before_done()
            record.response_bytes += len(extra)
            await write_within(response, extra + chunk[start:], write_seconds, transport)
            return
        await write_within(response, chunk, write_seconds, transport)
    if held:
        record.response_bytes += len(held)
        await write_within(response, held, write_seconds, transport)


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
