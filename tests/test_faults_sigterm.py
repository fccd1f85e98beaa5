"""SIGTERM to `python -m proxy` during streams: drain, then exit 0 with every row written.

The gateway runs as its own process, as the console runs it, in front of a backend whose
streams wait for the test; the database is the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import free_port
from gatewayhelpers import BACKEND_KEY, add_user, bearer, chat, wait_until
from gatewayprocess import GatewayProcess, start_gateway_process

from proxy.requestlog import RequestLog, RequestRecord, Spool

pytest_plugins = ["gatewayfixture"]

ROW = RequestRecord("request-1", datetime(2026, 1, 1, tzinfo=UTC), "POST", "/", None, 0).to_row(0)
DEADLINE = 20.0  # generous: 2 shared cores; only there to turn a hang into a failure


# --- SIGTERM to `python -m proxy` during streams ----------------------------------------


class SlowStreams:
    """A backend whose streams send one chunk, then wait for `release` before the rest."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n'
        await response.write(event)
        await self.release.wait()
        await response.write(event + b"data: [DONE]\n\n")
        return response


@pytest_asyncio.fixture
async def slow_backend(aiohttp_server) -> tuple[SlowStreams, str]:
    backend = SlowStreams()
    server = await aiohttp_server(backend.make_app())
    return backend, str(server.make_url("")).rstrip("/")


@pytest_asyncio.fixture
async def gateway_process(pg_dsn, db, slow_backend, tmp_path):
    """Start `python -m proxy` on its own (tests/gatewayprocess.py), before the slow backend."""
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(free_port()),
        "LLAMA_PROXY_BACKEND_URL": slow_backend[1],
        "LLAMA_API_KEY": BACKEND_KEY,
        "POSTGRES_AUTH_DSN": pg_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(tmp_path / "requests.spool"),
        "LLAMA_PROXY_BACKEND_CONCURRENCY": "2",  # both streams at once
    }
    started: list[GatewayProcess] = []

    async def start(drain_seconds: float) -> GatewayProcess:
        drain = {"LLAMA_PROXY_DRAIN_SECONDS": str(drain_seconds)}
        gateway = await start_gateway_process({**settings, **drain}, tmp_path / "proxy.log")
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()


async def _answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def open_stream(session: aiohttp.ClientSession, url: str, key: str):
    response = await session.post(
        url + "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    assert response.status == 200
    first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), DEADLINE)
    return response, first


@pytest.mark.asyncio
async def test_sigterm_lets_streams_finish_then_exits_0_with_their_rows_written(
    gateway_process, db, slow_backend
):
    backend, _ = slow_backend
    key = await add_user(db, "alice")
    gateway = await gateway_process(drain_seconds=15)
    url = gateway.url
    async with aiohttp.ClientSession() as session:
        streams = [await open_stream(session, url, key) for _ in range(2)]
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(1.0)  # the streams outlive the signal...
        assert gateway.process.poll() is None
        assert not await _answers(url + "/healthz")  # ...but no new request is taken
        backend.release.set()  # ...and then finish
        for response, first in streams:
            rest = await asyncio.wait_for(response.content.read(), DEADLINE)
            assert (first + rest).endswith(b"data: [DONE]\n\n")
    assert await asyncio.to_thread(gateway.process.wait, DEADLINE) == 0
    drain = time.monotonic() - signalled
    assert drain < 15, drain
    ids = {response.headers["X-Request-Id"] for response, _ in streams}
    logged = await db.fetch("SELECT request_id, status_code FROM llama_requests")
    assert {(row["request_id"], row["status_code"]) for row in logged} == {(i, 200) for i in ids}


@pytest.mark.asyncio
async def test_sigterm_cuts_a_stream_that_outlives_the_drain_and_still_logs_it(
    gateway_process, db, slow_backend
):
    key = await add_user(db, "alice")
    gateway = await gateway_process(drain_seconds=1)
    url = gateway.url
    async with aiohttp.ClientSession() as session:
        response, _first = await open_stream(session, url, key)
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await asyncio.to_thread(gateway.process.wait, DEADLINE) == 0
        took = time.monotonic() - signalled
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(response.content.read(), DEADLINE)
    [row] = await db.fetch("SELECT * FROM llama_requests")
    assert row["request_id"] == response.headers["X-Request-Id"]
    assert row["status_code"] == 499, dict(row)  # cut off: not logged as served
    assert took < 1 + 5, took  # the drain, plus aiohttp's wait for the cancelled handler


# --- the request log at shutdown ---------------------------------------------------------


@pytest.mark.asyncio
async def test_rows_of_a_flush_cut_short_by_shutdown_are_written_by_close(tmp_path):
    written: list[tuple] = []
    is_slow = True

    async def insert(batch) -> None:
        if is_slow:
            await asyncio.sleep(60)  # a database that takes its time
        written.extend(batch)

    journal = RequestLog(insert, Spool(tmp_path / "requests.spool"))
    journal.add(ROW)
    flusher = asyncio.create_task(journal.run())
    await wait_until(lambda: not journal.buffer, "the flush to take the row")
    flusher.cancel()  # what the app's cleanup does at shutdown
    await asyncio.gather(flusher, return_exceptions=True)
    is_slow = False
    await journal.close()
    assert written == [ROW]
