"""Hostile clients on the wire: ambiguous framing, slow clients and clients that vanish
each get a 4xx or a logged 499 (never a 500, never a hang), and the gateway serves on.

Requests aiohttp's client will not send are written as raw bytes (tests/rawhttp.py); the
fixtures are in hostilefixture.py. Fuzzed keys, bodies and routes are in
test_hostile_input.py; a client leaving mid-stream politely or while queued is in
test_gateway_forward.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from gatewayhelpers import DEADLINE, add_user, chat, log_rows, wait_until
from rawhttp import connect, is_closed_by_server, read_answer, request_bytes, reset

pytest_plugins = ["gatewayfixture", "hostilefixture"]
pytestmark = pytest.mark.usefixtures("no_error_is_logged")

CHAT = "/v1/chat/completions"


# --- framing: requests that could be read two ways ---------------------------------------

SMUGGLED = b"GET /docs HTTP/1.1\r\nHost: gateway\r\n\r\n"
AMBIGUOUS_FRAMING = {
    "cl-and-te": [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
    "te-and-cl": [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
    "two-lengths": [("Content-Length", "4"), ("Content-Length", "40")],
    "unknown-te": [("Transfer-Encoding", "gzip")],
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", AMBIGUOUS_FRAMING)
async def test_ambiguous_framing_gets_400_and_smuggles_nothing(
    hostile_gateway, alice_key, upstream, assert_serves, case
):
    # If the gateway read the body one way and a proxy in front another, the request
    # after it could be smuggled past: so the request is refused and the connection closed.
    headers = [("Authorization", f"Bearer {alice_key}"), *AMBIGUOUS_FRAMING[case]]
    body = b"0\r\n\r\n" + SMUGGLED
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, headers, body, framing="none"))
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    assert answer.status == 400  # aiohttp's parser answers these itself, in plain text
    assert await is_closed_by_server(reader)
    writer.close()
    assert upstream.seen == []
    await assert_serves(hostile_gateway, alice_key)


# --- slow clients --------------------------------------------------------------------------


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send data a byte a second, the slowloris way, until done or cut off."""
    for index in range(len(data)):
        if writer.is_closing():
            return
        writer.write(data[index : index + 1])
        await asyncio.sleep(1.0)


@pytest.mark.asyncio
async def test_body_sent_a_byte_a_second_gets_408_while_others_are_served(
    hostile_gateway, alice_key, db, upstream, assert_serves, chats_seen
):
    bob = await add_user(db, "bob")
    headers = [("Authorization", f"Bearer {alice_key}"), ("Content-Length", "1000")]
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, headers, framing="none"))
    slowloris = asyncio.create_task(trickle(writer, json.dumps(chat(pad="x" * 900)).encode()))
    await assert_serves(hostile_gateway, bob)  # while the slow body trickles in
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    slowloris.cancel()
    writer.close()
    assert answer.status == 408
    assert answer.error()["code"] == "timeout"
    assert chats_seen(upstream) == 1  # bob's
    rows = await wait_until(lambda: log_rows(db, "status_code = 408"), "the 408's log row")
    assert rows[0]["username"] == "alice"
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
async def test_keyless_body_sent_a_byte_a_second_gets_401_at_once_not_408(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen
):
    # The key is checked before the body is read: a keyless slowloris is refused while its
    # body still trickles in, instead of holding a connection until the client timeout.
    headers = [("Content-Length", "1000")]
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, headers, framing="none"))
    slowloris = asyncio.create_task(trickle(writer, json.dumps(chat(pad="x" * 900)).encode()))
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    assert not slowloris.done()  # answered long before the body could have arrived
    slowloris.cancel()
    writer.close()
    assert answer.status == 401
    assert answer.error()["code"] == "invalid_api_key"
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
async def test_request_head_sent_a_byte_a_second_is_cut_off_while_others_are_served(
    hostile_gateway, alice_key, db, assert_serves
):
    bob = await add_user(db, "bob")
    head = request_bytes("POST", CHAT, [("Authorization", f"Bearer {alice_key}")] * 20, b"{}")
    reader, writer = await connect(hostile_gateway)
    slowloris = asyncio.create_task(trickle(writer, head))
    await assert_serves(hostile_gateway, bob)  # while the slow head trickles in
    # aiohttp gives no hook to answer here, so the gateway hangs up without a word.
    assert await is_closed_by_server(reader)
    assert not slowloris.done()  # cut off, not finished: the head was far from complete
    slowloris.cancel()
    writer.close()
    await assert_serves(hostile_gateway, alice_key)


# --- clients that vanish -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_that_vanishes_mid_body_is_logged_499_and_reaches_nobody(
    hostile_gateway, alice_key, db, upstream, assert_serves, chats_seen, how
):
    headers = [
        ("Authorization", f"Bearer {alice_key}"),
        ("Content-Length", "1000"),
        ("Expect", "100-continue"),  # "100 Continue" says the request is being handled
    ]
    # An ordinary request first warms the key cache: the next request is quick.
    await assert_serves(hostile_gateway, alice_key)
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, headers, framing="none"))
    continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert continued.startswith(b"HTTP/1.1 100")
    writer.write(b'{"model": "m", "messages": [')
    await writer.drain()
    reset(writer) if how == "reset" else writer.close()
    rows = await wait_until(
        lambda: log_rows(db, "status_code <> 200"), "the vanished request's row"
    )
    assert (rows[0]["status_code"], rows[0]["error"]) == (499, "client disconnected")
    assert chats_seen(upstream) == 1  # the warm-up's
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
async def test_client_that_resets_mid_stream_stops_the_backend_and_is_logged_499(
    hostile_gateway, alice_key, db, upstream, assert_serves
):
    # test_gateway_forward.py covers a client that closes politely mid-stream; this one
    # resets the connection instead.
    upstream.gate = asyncio.Semaphore(0)
    body = json.dumps(chat(stream=True)).encode()
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, [("Authorization", f"Bearer {alice_key}")], body))
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    assert answer.status == 200
    upstream.allow(1)
    await asyncio.wait_for(reader.readuntil(b"\n\n"), DEADLINE)  # the first event
    reset(writer)
    await wait_until(lambda: upstream.cut_short == 1, "the backend to see the hang-up")
    rows = await wait_until(lambda: log_rows(db), "the stream's log row")
    assert rows[0]["status_code"] == 499
    upstream.gate = None
    await assert_serves(hostile_gateway, alice_key)
