"""No single client holds the backend for ever (proxy/deadlines.py).

A client that stops reading is cut off after LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS per
write, and any answer after LLAMA_PROXY_REQUEST_MAX_SECONDS in all; either way the
upstream request is closed, so generation stops, and the next user is served.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from gatewayhelpers import DEADLINE, add_user, bearer, chat, log_rows, wait_until
from rawhttp import request_bytes

from proxy import deadlines
from proxy.deadlines import ClientTooSlow, write_within
from proxy.relay import ClientWriter

pytest_plugins = ["gatewayfixture", "hostilefixture"]
pytestmark = pytest.mark.usefixtures("no_error_is_logged")

CHAT = "/v1/chat/completions"
REQUEST_MAX_SECONDS = 0.5  # LLAMA_PROXY_REQUEST_MAX_SECONDS for the cap tests


def connect_without_reading(gateway, request: bytes) -> socket.socket:
    """A client with a tiny receive buffer that sends `request` and then never reads."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((gateway.host, gateway.port))
    client.sendall(request)
    return client


@pytest.mark.asyncio
async def test_client_that_stops_reading_is_cut_off_logged_499_and_frees_the_backend(
    hostile_gateway, alice_key, db, upstream, assert_serves
):
    # Events of 16 KB, as fast as the gateway takes them: megabytes within a second, far
    # more than the socket buffers between the gateway and a client that reads nothing.
    upstream.chunks, upstream.content = 100_000, "x" * 16_000
    body = json.dumps(chat(stream=True, max_tokens=4000)).encode()
    headers = [("Authorization", f"Bearer {alice_key}")]
    client = connect_without_reading(hostile_gateway, request_bytes("POST", CHAT, headers, body))
    try:
        await wait_until(lambda: upstream.cut_short == 1, "the backend to see the hang-up")
        rows = await wait_until(lambda: log_rows(db), "the stalled stream's row")
    finally:
        client.close()
    assert rows[0]["status_code"] == 499
    assert "the client stopped reading" in rows[0]["error"]
    bob = await add_user(db, "bob")
    upstream.content = "tok"
    await assert_serves(hostile_gateway, bob)


@pytest.mark.asyncio
async def test_stream_past_the_time_cap_ends_with_an_error_event_and_a_504_row(
    start_gateway, db, upstream
):
    gateway = await start_gateway(request_max_seconds=REQUEST_MAX_SECONDS)
    key = await add_user(db, "alice")
    upstream.gate = asyncio.Semaphore(1)  # one chunk, then the backend "generates" for ever
    response = await gateway.post(CHAT, json=chat(stream=True), headers=bearer(key))
    assert response.status == 200
    text = (await asyncio.wait_for(response.read(), DEADLINE)).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "request_too_long"
    assert "LLAMA_PROXY_REQUEST_MAX_SECONDS" in error["message"]
    await wait_until(lambda: upstream.cut_short == 1, "the backend to see the hang-up")
    rows = await wait_until(lambda: log_rows(db), "the stream's row")
    assert (rows[0]["status_code"], rows[0]["completion_tokens"]) == (504, 1)


@pytest.mark.asyncio
async def test_whole_answer_past_the_time_cap_gets_504_and_the_next_request_is_served(
    start_gateway, db, upstream
):
    gateway = await start_gateway(request_max_seconds=REQUEST_MAX_SECONDS)
    key = await add_user(db, "alice")
    upstream.gate = asyncio.Semaphore(0)  # the backend never finishes this answer
    response = await gateway.post(CHAT, json=chat(), headers=bearer(key))
    assert response.status == 504
    error = (await response.json())["error"]
    assert (error["code"], error["type"]) == ("request_too_long", "server_error")
    rows = await wait_until(lambda: log_rows(db), "the 504's row")
    assert rows[0]["status_code"] == 504
    upstream.gate = None
    assert (await gateway.post(CHAT, json=chat(), headers=bearer(key))).status == 200


# --- write_within without a gateway: when a write needs its timer -----------------------


class BufferedTransport(asyncio.WriteTransport):
    """A transport holding `buffered` bytes not yet sent, with asyncio's default limits."""

    def __init__(self, buffered: int) -> None:
        super().__init__()
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.sent = getattr(self, "sent", b"") + data


class Answer:
    """A response whose writes return at once, or, if `is_stuck`, never (a full client).

    Like aiohttp's for a stream to an HTTP/1.1 client: chunked, not compressed.
    """

    compression = False
    headers = {"Transfer-Encoding": "chunked"}

    def __init__(self, is_stuck: bool = False) -> None:
        self.is_stuck = is_stuck
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if self.is_stuck:
            await asyncio.Event().wait()
        self.written.append(data)


@pytest.mark.asyncio
async def test_a_write_that_fits_the_clients_buffer_sets_no_timer(monkeypatch):
    timers = []
    real_timeout = asyncio.timeout
    monkeypatch.setattr(deadlines.asyncio, "timeout", lambda s: timers.append(s) or real_timeout(s))
    answer = Answer()
    for _ in range(100):
        await write_within(answer, b"x" * 100, 30.0, BufferedTransport(0))
    assert len(answer.written) == 100
    assert timers == []


@pytest.mark.asyncio
async def test_a_write_past_the_low_water_mark_still_has_its_deadline():
    transport = BufferedTransport(16 * 1024 - 10)  # 10 bytes under: a 100-byte write is not
    with pytest.raises(ClientTooSlow, match="LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS"):
        await asyncio.wait_for(write_within(Answer(is_stuck=True), b"x" * 100, 0.05, transport), 5)


@pytest.mark.asyncio
async def test_relayed_chunks_after_the_first_go_straight_to_a_client_that_keeps_up():
    answer, transport = Answer(), BufferedTransport(0)
    client = ClientWriter(answer, transport, 30.0)
    for index in range(50):
        await client.write(b"data: %d\n\n" % index)
    # The first write sends aiohttp's headers; the others skip its two coroutines each,
    # framed exactly as aiohttp frames a chunk.
    assert answer.written == [b"data: 0\n\n"]
    expected = b"".join(
        b"%x\r\ndata: %d\n\n\r\n" % (len(b"data: %d\n\n" % i), i) for i in range(1, 50)
    )
    assert transport.sent == expected


@pytest.mark.asyncio
async def test_a_relayed_chunk_past_the_low_water_mark_still_has_its_deadline():
    answer, transport = Answer(), BufferedTransport(0)
    client = ClientWriter(answer, transport, 0.05)
    await client.write(b"data: first\n\n")
    answer.is_stuck, transport.buffered = True, 16 * 1024 - 10
    with pytest.raises(ClientTooSlow, match="LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS"):
        await asyncio.wait_for(client.write(b"x" * 100), 5)
    assert not hasattr(transport, "sent")
