"""proxy/rawpool.py: whole answers over kept-alive connections, against a raw HTTP server.

The upstream is a bare asyncio server, so a test decides exactly what each connection
sends and when it closes, and counts the connections it accepted; the last test goes
through a gateway (the real PostgreSQL) to the fake backend (tests/fakeupstream.py).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from fakeupstream import FakeUpstream
from gatewayhelpers import add_user, bearer, chat, wait_until

from proxy import appkeys
from proxy.dispatch import Dispatcher
from proxy.pool import BackendPool
from proxy.rawpool import KeepAlivePool
from proxy.rawupstream import UpstreamBroke

pytest_plugins = ["gatewayfixture"]

ROUTE = "/v1/chat/completions"
BODY = b'{"messages": []}'
JSON = b'{"choices": [{"message": {"content": "hi"}}]}'


def json_answer(body: bytes = JSON, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class KeepAliveUpstream:
    """Answers each request on a connection with `answer`, and keeps the connection open."""

    def __init__(self, answer: bytes = json_answer()) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0  # connections the gateway's side closed
        self.drops_left = 0  # hang up on this many next requests on used connections

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if answered and self.drops_left:
                    self.drops_left -= 1
                    writer.transport.abort()
                    return
                self.requests.append(head)
                writer.write(self.answer)
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1

    def close_all(self) -> None:
        """Close every connection from this side, as uvicorn does after its keep-alive."""
        for writer in self.writers:
            writer.close()


@pytest_asyncio.fixture
async def upstream_at():
    """Start a KeepAliveUpstream; its URL."""
    servers = []

    async def start(upstream: KeepAliveUpstream) -> str:
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def ask(pool: KeepAlivePool, url: str) -> bytes:
    async with await pool.send(url, "POST", ROUTE, BODY, {}, 5, 5) as answer:
        return await answer.read()


@pytest.mark.asyncio
async def test_sequential_whole_requests_reuse_one_kept_alive_connection(upstream_at):
    upstream = KeepAliveUpstream()
    url = await upstream_at(upstream)
    pool = KeepAlivePool()
    assert [await ask(pool, url) for _ in range(3)] == [JSON] * 3
    assert (upstream.connections, len(upstream.requests)) == (1, 3)
    assert all(b"\r\nConnection: keep-alive\r\n" in head for head in upstream.requests)
    assert pool.idle_count(url) == 1
    pool.close()
    await wait_until(lambda: upstream.closed == 1, "the pool to close its idle connection")


@pytest.mark.asyncio
async def test_a_connection_the_backend_closed_while_idle_is_never_handed_out(upstream_at):
    upstream = KeepAliveUpstream()
    url = await upstream_at(upstream)
    pool = KeepAlivePool(idle_seconds=60)  # so only the close can take it off the list
    await ask(pool, url)
    upstream.close_all()
    await wait_until(lambda: pool.idle_count(url) == 0, "the pool to notice the close")
    assert await ask(pool, url) == JSON
    assert upstream.connections == 2
    pool.close()


@pytest.mark.asyncio
async def test_a_connection_that_sends_bytes_while_idle_is_dropped(upstream_at):
    upstream = KeepAliveUpstream()
    url = await upstream_at(upstream)
    pool = KeepAlivePool(idle_seconds=60)
    await ask(pool, url)
    upstream.writers[0].write(json_answer())  # an answer no request asked for
    await wait_until(lambda: pool.idle_count(url) == 0, "the pool to drop the connection")
    assert await ask(pool, url) == JSON
    assert upstream.connections == 2
    pool.close()


@pytest.mark.asyncio
async def test_a_reused_connection_closed_as_the_request_went_out_is_retried_on_a_new_one(
    upstream_at,
):
    upstream = KeepAliveUpstream()
    url = await upstream_at(upstream)
    pool = BackendPool([url], slots=2)
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=5)

    async def ask_through(dispatcher: Dispatcher) -> bytes:
        lease, answer = await dispatcher.send("POST", ROUTE, BODY, {})
        try:
            async with answer:
                return await answer.read()
        finally:
            pool.release(lease, is_failed=False)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        dispatcher = Dispatcher(session, pool, wait_seconds=0, restart_flag=None)
        # Two at once leave two kept-alive connections; then the backend's keep-alive runs
        # out on both just as the next request goes out on one of them.
        assert await asyncio.gather(ask_through(dispatcher), ask_through(dispatcher)) == [JSON] * 2
        upstream.drops_left = 2
        assert await ask_through(dispatcher) == JSON
        dispatcher.close()
    # No error reached the client, the backend is still up, and the retry was not sent on
    # the other pooled connection (as stale as the first) but on a new one.
    assert (upstream.connections, len(upstream.requests), upstream.drops_left) == (3, 3, 1)
    assert pool.backends[0].is_up


@pytest.mark.asyncio
async def test_an_answer_that_says_connection_close_is_not_pooled(upstream_at):
    upstream = KeepAliveUpstream(json_answer(extra="Connection: close\r\n"))
    url = await upstream_at(upstream)
    pool = KeepAlivePool()
    assert await ask(pool, url) == JSON
    assert pool.idle_count(url) == 0
    await wait_until(lambda: upstream.closed == 1, "the gateway to close the connection")
    assert await ask(pool, url) == JSON
    assert upstream.connections == 2
    pool.close()


@pytest.mark.asyncio
async def test_a_chunked_json_answer_is_read_whole_and_its_connection_reused(upstream_at):
    pieces = [JSON[:10], JSON[10:11], JSON[11:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    upstream = KeepAliveUpstream(head + b"\r\n" + chunked)
    url = await upstream_at(upstream)
    pool = KeepAlivePool()
    assert [await ask(pool, url) for _ in range(2)] == [JSON] * 2
    assert upstream.connections == 1
    pool.close()


@pytest.mark.asyncio
async def test_a_request_cancelled_mid_answer_does_not_return_its_connection(upstream_at):
    # The head and half the body; the rest never comes.
    upstream = KeepAliveUpstream(json_answer()[: -len(JSON) // 2])
    url = await upstream_at(upstream)
    pool = KeepAlivePool()
    answer = await pool.send(url, "POST", ROUTE, BODY, {}, 5, 5)
    async with answer:
        reading = asyncio.create_task(answer.read())
        await wait_until(lambda: answer.collected.payloads, "the first half of the body")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    assert pool.idle_count(url) == 0
    await wait_until(lambda: upstream.closed == 1, "the gateway to close the connection")
    pool.close()


@pytest.mark.asyncio
async def test_an_answer_that_breaks_off_closes_its_connection(upstream_at):
    upstream = KeepAliveUpstream(json_answer()[:-3])
    url = await upstream_at(upstream)
    pool = KeepAlivePool()
    answer = await pool.send(url, "POST", ROUTE, BODY, {}, 5, 5)
    async with answer:
        upstream.close_all()
        with pytest.raises(UpstreamBroke, match="mid-answer"):
            await answer.read()
    assert pool.idle_count(url) == 0
    pool.close()


@pytest.mark.asyncio
async def test_idle_connections_are_dropped_after_their_time_and_beyond_the_cap(upstream_at):
    upstream = KeepAliveUpstream()
    url = await upstream_at(upstream)
    pool = KeepAlivePool(max_idle=1, idle_seconds=0.2)
    await asyncio.gather(ask(pool, url), ask(pool, url))  # two at once: two connections
    assert (upstream.connections, pool.idle_count(url)) == (2, 1)
    await wait_until(lambda: upstream.closed == 2, "the idle connection to expire")
    assert pool.idle_count(url) == 0
    pool.close()


class PeerNotingUpstream(FakeUpstream):
    """The fake backend, noting the gateway's end of each connection a request came on."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[object] = []

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self.note_peer)
        return app

    @web.middleware
    async def note_peer(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/openapi.json":  # the prober's own session
            assert request.transport is not None
            self.peers.append(request.transport.get_extra_info("peername"))
        return await handler(request)


@pytest.mark.asyncio
async def test_whole_answers_through_the_gateway_share_one_kept_alive_connection(
    start_gateway, db, aiohttp_server
):
    upstream = PeerNotingUpstream()
    server = await aiohttp_server(upstream.make_app())
    url = str(server.make_url("")).rstrip("/")
    gateway = await start_gateway(backend_url=url)
    key = await add_user(db, "alice")
    for path in ("/v1/chat/completions", "/v1/models", "/v1/chat/completions"):
        if path == "/v1/models":
            response = await gateway.get(path, headers=bearer(key))
        else:
            response = await gateway.post(path, json=chat(), headers=bearer(key))
        assert response.status == 200, await response.text()
        assert (await response.json())["choices" if "chat" in path else "data"]
    assert len(upstream.peers) == 3 and len(set(upstream.peers)) == 1, upstream.peers
    assert [seen.headers["Connection"] for seen in upstream.seen] == ["keep-alive"] * 3
    dispatcher = gateway.app[appkeys.FORWARDER].dispatcher
    assert dispatcher.connections.idle_count(url) == 1
