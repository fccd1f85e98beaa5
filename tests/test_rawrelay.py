"""proxy/rawupstream.py and proxy/rawrelay.py: a stream relayed in the socket's callbacks.

The upstream is the fake backend (tests/fakeupstream.py) or, for bytes no HTTP server
would send, a raw asyncio server; the client is a stand-in transport whose buffer the
test fills, so back-pressure is decided exactly.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from fakeupstream import FakeUpstream

from proxy.deadlines import ClientTooSlow
from proxy.dechunk import ChunkedDecoder
from proxy.rawrelay import StreamRelay
from proxy.rawupstream import (
    UpstreamBroke,
    UpstreamNoAnswer,
    UpstreamUnreachable,
    open_answer,
    tls_context,
)
from proxy.relay import ClientWriter
from proxy.usage import UsageCounter

ROUTE = "/v1/chat/completions"
BODY = b'{"messages": [], "stream": true}'
LOW_WATER = 16 * 1024
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class ClientTransport(asyncio.WriteTransport):
    """The client's socket: `buffered` bytes not yet sent; writes are kept."""

    def __init__(self, buffered: int = 0) -> None:
        super().__init__()
        self.buffered = buffered
        self.sent = b""

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (LOW_WATER, 4 * LOW_WATER)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.sent += data


class ClientResponse:
    """aiohttp's StreamResponse as the relay uses it; `on_write` runs in each write."""

    compression = False
    headers = {"Transfer-Encoding": "chunked"}

    def __init__(self, on_write=None) -> None:
        self.on_write = on_write
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if self.on_write is not None:
            await self.on_write()
        self.written.append(data)


class Record:
    response_bytes = 0


async def no_usage() -> bytes:
    return b""


def relay_for(answer, response, transport, write_seconds=30.0, silence=None) -> StreamRelay:
    client = ClientWriter(response, transport, write_seconds)
    return StreamRelay(answer, client, Record(), UsageCounter(), no_usage, silence)


async def raw_upstream(answer: bytes, then_close: bool = True):
    """A server that answers any request with `answer` (and closes, or not); its URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if then_close:
            writer.close()
        else:
            await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


class PacingTransport(ClientTransport):
    """Lets the fake backend send its next event once the last reached the client."""

    def __init__(self, upstream: FakeUpstream) -> None:
        super().__init__()
        self.upstream = upstream
        self.writes = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        self.upstream.allow(1)


@pytest.mark.asyncio
async def test_each_event_goes_to_the_client_as_its_own_framed_chunk(aiohttp_server):
    upstream = FakeUpstream(chunks=5)
    upstream.gate = asyncio.Semaphore(1)  # one event per read
    server = await aiohttp_server(upstream.make_app())
    answer = await open_answer(str(server.make_url("")), "POST", ROUTE, BODY, {}, 5, 5)
    assert (answer.status, answer.headers["Content-Type"]) == (200, "text/event-stream")
    transport = PacingTransport(upstream)

    async def headers_sent() -> None:
        upstream.allow(1)

    response = ClientResponse(headers_sent)
    relay = relay_for(answer, response, transport)
    await asyncio.wait_for(relay.run(), 10)
    event = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    # The first event goes through aiohttp (it sends the headers), the others straight to
    # the socket, each framed as aiohttp frames a chunk.
    assert response.written == [event]
    assert transport.sent == b"%x\r\n%s\r\n" % (len(event), event) * 4 + b"e\r\n%s\r\n" % done
    assert relay.counter.content_chunks == 5
    assert relay.record.response_bytes == 5 * len(event) + len(done)


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_pauses_the_backend_and_is_cut_off_at_its_deadline(
    aiohttp_server,
):
    # Each event leaves the backend once the one before has reached the client, so each
    # is a read of its own; the client keeps up for three, then its buffer stays full.
    upstream = FakeUpstream(chunks=50)
    upstream.gate = asyncio.Semaphore(1)
    server = await aiohttp_server(upstream.make_app())
    answer = await open_answer(str(server.make_url("")), "POST", ROUTE, BODY, {}, 5, 5)
    reading_while_stuck: list[bool] = []

    class FillingTransport(ClientTransport):
        writes = 0

        def write(self, data: bytes) -> None:
            super().write(data)
            self.writes += 1
            if self.writes == 3:
                self.buffered = LOW_WATER  # past the low-water mark from now on
                upstream.allow(10)  # the backend goes on generating
            else:
                upstream.allow(1)

    transport = FillingTransport()

    async def through_aiohttp() -> None:
        if not transport.buffered:
            upstream.allow(1)  # the first event, which also sends the headers
            return
        reading_while_stuck.append(answer.transport.is_reading())
        await asyncio.Event().wait()  # a client whose window stays full

    relay = relay_for(answer, ClientResponse(through_aiohttp), transport, write_seconds=0.3)
    with pytest.raises(ClientTooSlow, match="LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS"):
        await asyncio.wait_for(relay.run(), 10)
    # The backend was not read while the client was stuck: nothing piled up in the relay.
    assert reading_while_stuck == [False]
    assert relay.pending == []
    assert transport.writes == 3
    # And its connection was dropped, so a backend still generating stops.
    assert answer.transport.is_closing()


@pytest.mark.asyncio
async def test_an_upstream_that_closes_mid_chunk_ends_the_relay_with_an_error():
    event = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    whole = b"%x\r\n%s\r\n" % (len(event), event)
    server, url = await raw_upstream(SSE_HEAD + whole + b"40\r\ndata: {")
    async with server:
        answer = await open_answer(url, "POST", ROUTE, BODY, {}, 5, 5)
        response = ClientResponse()
        relay = relay_for(answer, response, ClientTransport())
        with pytest.raises(UpstreamBroke, match="closed the connection mid-answer"):
            await asyncio.wait_for(relay.run(), 10)
    # What arrived went out as it came, a chunk's first part too (as aiohttp's readany did).
    assert response.written == [event + b"data: {"]


@pytest.mark.asyncio
async def test_a_malformed_chunk_size_ends_the_relay_with_an_error_naming_it():
    server, url = await raw_upstream(SSE_HEAD + b"zz\r\nabc\r\n", then_close=False)
    async with server:
        answer = await open_answer(url, "POST", ROUTE, BODY, {}, 5, 5)
        relay = relay_for(answer, ClientResponse(), ClientTransport())
        with pytest.raises(UpstreamBroke, match="malformed: bad chunk-size line b'zz'"):
            await asyncio.wait_for(relay.run(), 10)


@pytest.mark.asyncio
async def test_a_backend_silent_past_its_timeout_ends_the_relay_with_a_timeout():
    server, url = await raw_upstream(SSE_HEAD, then_close=False)
    async with server:
        answer = await open_answer(url, "POST", ROUTE, BODY, {}, 5, 5)
        relay = relay_for(answer, ClientResponse(), ClientTransport(), silence=0.2)
        with pytest.raises(TimeoutError, match="sent nothing for 0.2 s"):
            await asyncio.wait_for(relay.run(), 10)


@pytest.mark.asyncio
async def test_failures_before_the_answer_are_told_apart_from_a_broken_body():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    free_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(UpstreamUnreachable, match="ConnectionRefusedError"):
        await open_answer(f"http://127.0.0.1:{free_port}", "POST", ROUTE, BODY, {}, 5, 5)
    server, url = await raw_upstream(b"")  # hangs up without a word
    async with server:
        with pytest.raises(UpstreamNoAnswer, match="closed the connection before answering"):
            await open_answer(url, "POST", ROUTE, BODY, {}, 5, 5)
    server, url = await raw_upstream(b"SSH-2.0-OpenSSH\r\n\r\n")
    async with server:
        with pytest.raises(UpstreamNoAnswer, match="not an HTTP/1.x answer"):
            await open_answer(url, "POST", ROUTE, BODY, {}, 5, 5)


def test_https_backends_share_one_verifying_tls_context():
    # Making a context loads the CA store: a stream to an https backend must not pay that.
    assert tls_context() is tls_context()
    assert tls_context().verify_mode == ssl.CERT_REQUIRED


def dechunked(framed: bytes) -> bytes:
    return ChunkedDecoder().feed(framed)
