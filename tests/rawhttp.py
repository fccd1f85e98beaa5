"""HTTP/1.1 over a bare socket, for requests aiohttp's client refuses to send.

Conflicting framing headers, control bytes, a body sent a byte at a time, a connection
that resets in the middle: the tests write these bytes themselves and read the answer
back with as little interpretation as possible.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from gatewayhelpers import DEADLINE


@dataclass
class Answer:
    """One HTTP answer as it came off the wire (header names lower-cased)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        """The OpenAI-shaped error in the body; fails unless the body is exactly that."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        payload = json.loads(self.body)
        assert set(payload) == {"error"}, payload
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"], payload
        assert error["type"] == "invalid_request_error", payload  # the client's fault
        return error


def request_bytes(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    framing: str = "length",
) -> bytes:
    """A request as bytes; framing "length" adds Content-Length, "none" adds nothing."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway"]
    lines += [f"{name}: {value}" for name, value in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


async def connect(client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(client.host, client.port)


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """The next answer (1xx answers skipped); None if the server closed without one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    status = int(status_line.split()[1])
    if 100 <= status < 200:
        return await read_answer(reader)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        return Answer(status, headers, b"")  # a stream: the caller reads it
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


async def exchange(client, data: bytes) -> Answer | None:
    """Send raw bytes on a fresh connection and read one answer within the deadline."""
    reader, writer = await connect(client)
    try:
        writer.write(data)
        return await asyncio.wait_for(read_answer(reader), DEADLINE)
    finally:
        writer.close()


async def is_closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (waits up to the deadline)."""
    try:
        return await asyncio.wait_for(reader.read(1), DEADLINE) == b""
    except ConnectionResetError:
        return True


def reset(writer: asyncio.StreamWriter) -> None:
    """Vanish the rude way: close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
