"""A small HTTP/1.1 client for streamed answers: one request, on its own connection.

aiohttp's client parses a streamed body in its protocol, feeds a StreamReader and wakes
the relay's task for every read; per relayed token that was most of the gateway's
cost. Here the socket's bytes reach an asyncio.Protocol's data_received, which parses
the response head, takes the chunked framing off (proxy/dechunk.py) and hands each
read's payload straight to a sink (proxy/rawrelay.py), in the same callback.

Each stream gets a connection of its own (`Connection: close`): its setup is spread
over hundreds of events, and no pooled connection can be stale. Whole answers reuse
kept-alive connections instead (proxy/rawpool.py), each answer parsed by a RawAnswer.
Before the head has arrived, failures raise UpstreamUnreachable or UpstreamNoAnswer
(proxy/dispatch.py then tries another backend); a body that breaks off later ends the
sink with UpstreamBroke.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ssl
from collections.abc import Callable
from typing import Protocol, TypeVar, cast
from urllib.parse import urlsplit

from multidict import CIMultiDict

from proxy.dechunk import BadChunking, ChunkedDecoder

P = TypeVar("P", bound=asyncio.Protocol)

# Far more than llama_cpp.server's few headers; a longer head is not an HTTP answer.
MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The backend failed a streamed request; the message says how."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the backend (refused, unreachable, or connecting took too long)."""


class UpstreamNoAnswer(UpstreamError):
    """The backend closed the connection, or sent no HTTP answer, before its first byte."""


class UpstreamBroke(UpstreamError):
    """The answer's body broke off or was malformed after its head."""


class BodySink(Protocol):
    def take(self, payload: bytes) -> None: ...

    def end(self, error: UpstreamError | None) -> None: ...


class Collected:
    """A sink that keeps the body: before a relay takes over, and for `read()`."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.error: UpstreamError | None = None
        self.is_ended = False
        self.ended = asyncio.get_running_loop().create_future()

    def take(self, payload: bytes) -> None:
        self.payloads.append(payload)

    def end(self, error: UpstreamError | None) -> None:
        self.is_ended, self.error = True, error
        if not self.ended.done():
            self.ended.set_result(None)


class RawAnswer(asyncio.Protocol):
    """The answer on one connection: its status and headers, then its body to a sink."""

    def __init__(self) -> None:
        self.head = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.received = b""  # the head, until it is whole
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.decoder: ChunkedDecoder | None = None
        self.length_left: int | None = None  # for a Content-Length body
        self.collected = Collected()
        self.sink: BodySink = self.collected
        self.is_ended = False
        # The body ended where its framing said, with nothing after it: the connection
        # could carry another answer (proxy/rawpool.py).
        self.is_whole = False
        self.has_surplus = False  # bytes past a Content-Length body

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.is_ended:
            return
        if not self.head.done():
            self._take_head(data)
            return
        try:
            payload = self.decoder.feed(data) if self.decoder is not None else self._count(data)
        except BadChunking as error:
            self._end(UpstreamBroke(f"the backend's chunked answer is malformed: {error}"))
            return
        if payload:
            self.sink.take(payload)
        if self.decoder is not None and self.decoder.is_done or self.length_left == 0:
            self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            reason = f" ({exc!r})" if exc is not None else ""
            self.head.set_exception(
                UpstreamNoAnswer(f"the backend closed the connection before answering{reason}")
            )
        elif self.decoder is None and self.length_left is None:
            self._end(None)  # a body that runs to the connection's end
        else:
            self._end(UpstreamBroke("the backend closed the connection mid-answer"))

    # --- for the forwarder and the relay ----------------------------------------------

    async def __aenter__(self) -> RawAnswer:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection; a backend still generating sees its client go and stops."""
        self.is_ended = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def relay_to(self, sink: BodySink) -> None:
        """From now on the body goes to `sink`, starting with what arrived before."""
        early, self.sink = self.collected, sink
        for payload in early.payloads:
            sink.take(payload)
        if early.is_ended:
            sink.end(early.error)

    async def read(self) -> bytes:
        """The whole body (an answer that is not a stream); raises UpstreamError."""
        self.resume()
        await self.collected.ended
        if self.collected.error is not None:
            raise self.collected.error
        return b"".join(self.collected.payloads)

    # --- inside --------------------------------------------------------------------------

    def _take_head(self, data: bytes) -> None:
        received = self.received + data
        head_end = received.find(b"\r\n\r\n")
        if head_end < 0:
            if len(received) > MAX_HEAD_BYTES:
                self._fail_head(f"an answer head longer than {MAX_HEAD_BYTES} bytes")
            else:
                self.received = received
            return
        self.received = b""
        try:
            self._parse_head(received[:head_end])
        except ValueError as error:
            self._fail_head(str(error))
            return
        assert self.transport is not None
        self.head.set_result(None)
        self.data_received(received[head_end + 4 :])
        # Until a relay takes the body, or read() does. A body that came whole with its
        # head (most whole answers) needs no pause: two system calls fewer per request.
        if not self.is_ended:
            self.transport.pause_reading()

    def _parse_head(self, head: bytes) -> None:
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        status = rest[:3]
        if not version.startswith("HTTP/1.") or not status.isdigit():
            raise ValueError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
        self.status = int(status)
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"a header line without a colon: {line[:60]!r}")
            self.headers.add(name.strip(), value.strip())
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.decoder = ChunkedDecoder()
        elif "Content-Length" in self.headers:
            self.length_left = int(self.headers["Content-Length"])
        elif self.status in (204, 304) or self.status < 200:
            self.length_left = 0

    def _count(self, data: bytes) -> bytes:
        if self.length_left is not None:
            self.has_surplus = len(data) > self.length_left
            data = data[: self.length_left]
            self.length_left -= len(data)
        return data

    def _fail_head(self, reason: str) -> None:
        self.is_ended = True
        self.head.set_exception(UpstreamNoAnswer(f"the backend's answer is not HTTP: {reason}"))
        if self.transport is not None:
            self.transport.abort()

    def _end(self, error: UpstreamError | None) -> None:
        if self.is_ended:
            return
        self.is_ended = True
        is_framed = self.decoder is not None or self.length_left is not None
        self.is_whole = error is None and is_framed and not self.has_surplus
        self.sink.end(error)


def request_bytes(
    method: str,
    host: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
    is_keep_alive: bool = False,
) -> bytes:
    """The request as it goes on the wire; raises ValueError on a header that could split it."""
    connection = "Connection: keep-alive" if is_keep_alive else "Connection: close"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", connection]
    lines.append(f"Content-Length: {len(body)}")
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n"):
            raise ValueError(f"a line break in the upstream request's header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying context for every https backend: making one loads the CA store,
    milliseconds of CPU that a stream should not pay each time."""
    return ssl.create_default_context()


@dataclasses.dataclass(frozen=True)
class BackendAddress:
    """Where a backend URL points, and what its requests say in their first lines."""

    host: str
    port: int
    netloc: str  # the Host header
    path: str  # prefixed to every route
    tls: ssl.SSLContext | None


@functools.lru_cache(maxsize=256)
def backend_address(url: str) -> BackendAddress:
    """A backend URL taken apart, once per URL rather than once per request."""
    parts = urlsplit(url)
    context = tls_context() if parts.scheme == "https" else None
    port = parts.port or (443 if context is not None else 80)
    return BackendAddress(parts.hostname or "127.0.0.1", port, parts.netloc, parts.path, context)


async def connect(
    address: BackendAddress, make_protocol: Callable[[], P], connect_seconds: float | None
) -> P:
    """A connection to the backend, served by `make_protocol`'s protocol; raises
    UpstreamUnreachable when there is none within `connect_seconds`."""
    loop = asyncio.get_running_loop()
    host, context = address.host, address.tls
    try:
        async with asyncio.timeout(connect_seconds):
            _, protocol = await loop.create_connection(
                make_protocol, host, address.port, ssl=context,
                server_hostname=host if context else None,
            )  # fmt: skip
    except TimeoutError:
        raise UpstreamUnreachable(f"no connection within {connect_seconds:g} s") from None
    except OSError as error:
        raise UpstreamUnreachable(f"{type(error).__name__}: {error.strerror or error}") from None
    return protocol


async def open_answer(
    url: str,
    method: str,
    route: str,
    body: bytes,
    headers: dict[str, str],
    connect_seconds: float | None,
    answer_seconds: float | None,
) -> RawAnswer:
    """Send the request to the backend at `url`; its answer once the head has arrived."""
    address = backend_address(url)
    answer = await connect(address, RawAnswer, connect_seconds)
    transport = answer.transport
    assert transport is not None
    try:
        transport.write(request_bytes(method, address.netloc, address.path + route, body, headers))
        async with asyncio.timeout(answer_seconds):
            await answer.head
    except BaseException:
        transport.abort()
        raise
    return answer
