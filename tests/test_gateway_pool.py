"""Dispatch across a pool of backends: failover, hung backends, rejoining, overlap, /readyz
and /metrics per backend. Fake upstreams (tests/fakeupstream.py), the real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from conftest import free_port
from fakeupstream import FakeUpstream
from gatewayhelpers import DEADLINE, add_user, bearer, chat, wait_until

from proxy import appkeys
from proxy.config import BACKEND_URL_KEY, ProxyConfigError, load_config

pytest_plugins = ["gatewayfixture"]


class HangingUpstream(FakeUpstream):
    """A fake backend that, once told to, accepts connections and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.hang: asyncio.Event | None = None
        self.hung = 0  # requests (probes included) it has left without an answer

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self.hang_if_told)
        return app

    @web.middleware
    async def hang_if_told(self, request: web.Request, handler) -> web.StreamResponse:
        if self.hang is not None:
            self.hung += 1
            await self.hang.wait()
        return await handler(request)


class DroppingUpstream(FakeUpstream):
    """A fake backend that answers its probes but hangs up on every chat request unanswered."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self.drop_chats)
        return app

    @web.middleware
    async def drop_chats(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            self.dropped += 1
            request.transport.abort()
            raise web.HTTPInternalServerError()  # never sent: the connection is gone
        return await handler(request)


class BreakingUpstream(FakeUpstream):
    """A fake backend whose streams send one event and then break off (a killed backend)."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._note(request, await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "tok"}}]}\n\n')
        request.transport.abort()
        return response


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


def backends_of(gateway):
    return gateway.app[appkeys.BACKENDS].backends


def chats_seen(upstream: FakeUpstream) -> int:
    return sum(seen.path == "/v1/chat/completions" for seen in upstream.seen)


@pytest.mark.asyncio
async def test_requests_go_to_the_other_backend_when_one_refuses_connections(
    start_gateway, db, aiohttp_server
):
    first, second = FakeUpstream(), FakeUpstream()
    first_server = await aiohttp_server(first.make_app())
    second_server = await aiohttp_server(second.make_app())
    gateway = await start_gateway(backend_url=f"{url_of(first_server)},{url_of(second_server)}")
    # No probe may notice first: its refusal must be met by the request itself.
    await gateway.app[appkeys.PROBER].stop()
    await first_server.close()
    key = await add_user(db, "alice")
    statuses = [
        (await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 200]
    assert chats_seen(second) == 3
    refused = backends_of(gateway)[0]
    assert (refused.is_up, refused.requests, refused.errors) == (False, 1, 1)
    assert refused.problem.startswith("ConnectionRefusedError")


# A stream has a connection of its own (proxy/rawupstream.py); any other request's first
# one is new too (no answer has left a kept-alive one yet), so neither is retried there.
@pytest.mark.parametrize(
    ("is_stream", "tries", "problem"),
    [
        (True, 1, "closed the connection before answering"),
        (False, 1, "closed the connection before answering"),
    ],
)
@pytest.mark.asyncio
async def test_a_request_whose_backend_hangs_up_before_answering_goes_to_the_other(
    start_gateway, db, aiohttp_server, is_stream, tries, problem
):
    dropping, healthy = DroppingUpstream(), FakeUpstream()
    servers = [await aiohttp_server(upstream.make_app()) for upstream in (dropping, healthy)]
    gateway = await start_gateway(backend_url=",".join(url_of(server) for server in servers))
    await gateway.app[appkeys.PROBER].stop()  # its probes answer: it would rejoin
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=is_stream), headers=bearer(key)
    )
    assert response.status == 200
    if is_stream:
        assert (await response.read()).endswith(b"data: [DONE]\n\n")
    assert chats_seen(healthy) == 1
    assert dropping.dropped == tries
    dropped = backends_of(gateway)[0]
    assert (dropped.is_up, dropped.requests, dropped.errors) == (False, 1, 1)
    assert problem in dropped.problem


@pytest.mark.asyncio
async def test_a_stream_broken_mid_way_ends_with_an_error_event_and_counts_for_its_backend(
    start_gateway, db, aiohttp_server
):
    breaking = BreakingUpstream()
    gateway = await start_gateway(backend_url=url_of(await aiohttp_server(breaking.make_app())))
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    body = await asyncio.wait_for(response.read(), DEADLINE)
    assert response.status == 200  # sent before the break
    assert b'"code": "backend_failed"' in body
    # The event says how the stream broke, so the operator can tell a death from garbage.
    assert b"(UpstreamBroke: the backend closed the connection mid-answer)" in body
    backend = backends_of(gateway)[0]
    assert (backend.busy, backend.requests, backend.errors) == (0, 1, 1)


@pytest.mark.asyncio
async def test_a_backend_that_accepts_but_never_answers_is_marked_down_and_the_other_serves(
    start_gateway, db, aiohttp_server
):
    hanging, healthy = HangingUpstream(), FakeUpstream()
    hanging_server = await aiohttp_server(hanging.make_app())
    healthy_server = await aiohttp_server(healthy.make_app())
    gateway = await start_gateway(
        backend_url=f"{url_of(hanging_server)},{url_of(healthy_server)}",
        backend_probe_timeout_seconds=0.3,
    )
    key = await add_user(db, "alice")
    hanging.hang = asyncio.Event()
    try:
        # Never used, the hanging backend comes first; its probe fails and the request,
        # still waiting for a first byte there, goes to the other backend.
        response = await asyncio.wait_for(
            gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key)), DEADLINE
        )
        assert response.status == 200
        assert chats_seen(healthy) == 1
        hung = backends_of(gateway)[0]
        assert not hung.is_up
        assert (hung.requests, hung.errors) == (1, 1)
        again = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert again.status == 200
        assert chats_seen(healthy) == 2
    finally:
        hanging.hang.set()


@pytest.mark.asyncio
async def test_a_down_backend_rejoins_once_it_answers_its_probe_which_is_never_v1_models(
    start_gateway, db, aiohttp_server
):
    port = free_port()
    other = FakeUpstream()
    other_server = await aiohttp_server(other.make_app())
    gateway = await start_gateway(backend_url=f"http://127.0.0.1:{port},{url_of(other_server)}")
    returning = backends_of(gateway)[0]
    assert not returning.is_up  # nothing listened there when the gateway started
    back = FakeUpstream()
    await aiohttp_server(back.make_app(), port=port)
    await wait_until(lambda: returning.is_up, "the backend to rejoin the pool")
    assert back.probes >= 1
    assert back.seen == [] and other.seen == []  # probes are GET /openapi.json only
    key = await add_user(db, "alice")
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status == 200
    assert chats_seen(back) == 1  # the least recently used backend: it was never used


@pytest.mark.asyncio
async def test_two_requests_run_at_once_on_two_backends_of_one_slot_each(
    start_gateway, db, aiohttp_server
):
    first, second = FakeUpstream(), FakeUpstream()
    for upstream in (first, second):
        upstream.gate = asyncio.Semaphore(0)
        upstream.chunks = 1
    servers = [await aiohttp_server(upstream.make_app()) for upstream in (first, second)]
    gateway = await start_gateway(
        backend_url=",".join(url_of(server) for server in servers), backend_concurrency=1
    )
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")

    async def call(key: str) -> bytes:
        response = await gateway.post(
            "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
        )
        return await response.read()

    calls = [asyncio.create_task(call(alice)), asyncio.create_task(call(bob))]
    # Both are at a backend, and neither has been let finish: they overlap.
    await wait_until(
        lambda: (chats_seen(first), chats_seen(second)) == (1, 1), "a stream at each backend"
    )
    assert [backend.busy for backend in backends_of(gateway)] == [1, 1]
    first.allow(1)
    second.allow(1)
    answers = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
    assert all(answer.endswith(b"data: [DONE]\n\n") for answer in answers)


@pytest.mark.asyncio
async def test_readyz_is_ready_while_one_backend_serves_and_metrics_show_each_backend(
    start_gateway, db, upstream_server
):
    port = free_port()
    gateway = await start_gateway(backend_url=f"http://127.0.0.1:{port},{url_of(upstream_server)}")
    key = await add_user(db, "alice")
    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 200, body
    assert (body["backend"], body["backends"]) == ("ok", {"up": 1, "total": 2})
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status == 200
    metrics = await (await gateway.get("/metrics")).text()
    serving = backends_of(gateway)[1].address
    for line in (
        f'llamagate_backend_up{{address="127.0.0.1:{port}",backend="0"}} 0.0',
        f'llamagate_backend_up{{address="{serving}",backend="1"}} 1.0',
        f'llamagate_backend_busy{{address="{serving}",backend="1"}} 0.0',
        f'llamagate_backend_requests_total{{address="{serving}",backend="1"}} 1.0',
        f'llamagate_backend_errors_total{{address="{serving}",backend="1"}} 0.0',
    ):
        assert line in metrics.splitlines()
    assert f'llamagate_backend_busy_seconds_total{{address="{serving}",backend="1"}}' in metrics


@pytest.mark.asyncio
async def test_readyz_is_503_when_no_backend_serves(start_gateway):
    dead = f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}"
    gateway = await start_gateway(backend_url=dead)
    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 503
    assert body["backend"].startswith("unreachable")
    assert body["backends"] == {"up": 0, "total": 2}


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:8000,http://127.0.0.1:8000", "http://127.0.0.1:8000,", "localhost"]
)
def test_a_bad_backend_url_list_is_refused_naming_the_key(value):
    environ = {"POSTGRES_AUTH_DSN": "postgresql://db/x", BACKEND_URL_KEY: value}
    with pytest.raises(ProxyConfigError, match=BACKEND_URL_KEY):
        load_config(environ)
