"""Forwarding: allowlist, bad bodies, headers, streams, fair queue, outages, own routes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from conftest import free_port
from gatewayhelpers import (
    BACKEND_KEY,
    DEADLINE,
    add_user,
    bearer,
    chat,
    gateway_config,
    log_rows,
    wait_until,
)
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import appkeys
from proxy.forward import UsageCounter
from proxy.health import _may_read_metrics

pytest_plugins = ["gatewayfixture"]


def assert_openai_error(body: dict, error_type: str = "invalid_request_error") -> None:
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == error_type


async def raw_request(client, method: str, target: str, key: str) -> tuple[int, dict]:
    """Send a request line exactly as given (no client-side path cleaning); status, JSON."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"{method} {target} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def next_event(response) -> bytes:
    return await asyncio.wait_for(response.content.readuntil(b"\n\n"), DEADLINE)


def queue_of(client):
    return client.app[appkeys.QUEUE]


# --- UsageCounter: pure logic ------------------------------------------------------------


def test_usage_counter_takes_usage_from_a_whole_answer():
    counter = UsageCounter()
    counter.feed_json(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 5}}')
    assert (counter.prompt_tokens, counter.completion_tokens) == (7, 5)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"usage": "many"}', b""])
def test_usage_counter_ignores_answers_without_usage(body):
    counter = UsageCounter()
    counter.feed_json(body)
    assert (counter.prompt_tokens, counter.completion_tokens) == (None, None)


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_usage_counter_counts_content_chunks_across_any_split():
    stream = sse(
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": "b"}}]},
        {"choices": [{"text": "c"}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
    )
    for size in (1, 3, 7, len(stream)):
        counter = UsageCounter()
        for start in range(0, len(stream), size):
            counter.feed_stream(stream[start : start + size])
        counter.finish_stream()
        assert counter.completion_tokens == 3, size
        assert counter.prompt_tokens is None


def test_usage_counter_prefers_usage_in_the_final_chunk():
    counter = UsageCounter()
    counter.feed_stream(
        sse(
            {"choices": [{"delta": {"content": "a"}}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
        )
    )
    counter.finish_stream()
    assert (counter.prompt_tokens, counter.completion_tokens) == (9, 4)


# --- routes ------------------------------------------------------------------------------


UNLISTED = [
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/../docs"),
    ("GET", "/%2e%2e/docs"),
    ("GET", "/v1/models/../../openapi.json"),
    ("GET", "/v1/models/%2e%2e/%2e%2e/docs"),
    ("GET", "//docs"),
    ("POST", "/v1/chat/completions/../../docs"),
    ("GET", "/v1/internal"),
]


@pytest.mark.asyncio
async def test_unlisted_route_gets_openai_404_and_never_reaches_the_backend(
    gateway, db, upstream, subtests
):
    key = await add_user(db, "alice")
    for method, target in UNLISTED:
        with subtests.test(f"{method} {target}"):
            status, body = await raw_request(gateway, method, target, key)
            assert status == 404
            assert_openai_error(body)
            assert body["error"]["code"] == "not_found"
    assert upstream.seen == []


@pytest.mark.asyncio
async def test_wrong_method_gets_405_json(gateway, db, upstream, subtests):
    key = await add_user(db, "alice")
    for method, path in [
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/embeddings"),
    ]:
        with subtests.test(f"{method} {path}"):
            response = await gateway.request(method, path, headers=bearer(key))
            assert response.status == 405
            assert_openai_error(await response.json())
    assert upstream.seen == []


@pytest.mark.asyncio
async def test_client_credentials_are_replaced_by_the_backend_key(gateway, db, upstream):
    key = await add_user(db, "alice")
    extra = {"Cookie": "session=abc", "Proxy-Authorization": "Basic eDp5"}
    for headers in (bearer(key) | extra, {"X-API-Key": key} | extra):
        body = chat(max_tokens=8)  # within the ceiling: passed on untouched
        response = await gateway.post("/v1/chat/completions?debug=1", json=body, headers=headers)
        assert response.status == 200
        seen = upstream.seen[-1]
        assert seen.path == "/v1/chat/completions"
        assert seen.headers["Authorization"] == f"Bearer {BACKEND_KEY}"
        lowered = {name.lower() for name in seen.headers}
        assert not lowered & {"x-api-key", "cookie", "proxy-authorization"}
        assert key not in str(list(seen.headers.items()))
        assert seen.headers["X-Request-Id"] == response.headers["X-Request-Id"]
        assert seen.body == body
    assert len(upstream.seen) == 2


@pytest.mark.asyncio
async def test_every_response_carries_its_own_request_id(gateway, db):
    key = await add_user(db, "alice")
    responses = [
        await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key)),
        await gateway.post("/v1/chat/completions", json=chat()),
        await gateway.get("/nowhere", headers=bearer(key)),
        await gateway.get("/v1/chat/completions", headers=bearer(key)),
        await gateway.post("/v1/chat/completions", data=b"{", headers=bearer(key)),
        await gateway.post(
            "/v1/chat/completions", json=chat(pad="x" * 20_000), headers=bearer(key)
        ),
        await gateway.get("/healthz"),
    ]
    assert [r.status for r in responses] == [200, 401, 404, 405, 400, 413, 200]
    ids = [r.headers["X-Request-Id"] for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)


# --- bad bodies --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_body_over_the_limit_gets_413_with_or_without_content_length(
    start_gateway, db, upstream
):
    gateway = await start_gateway(max_body_bytes=2000)
    key = await add_user(db, "alice")
    fits = await gateway.post(
        "/v1/chat/completions", json=chat(pad="x" * 1500), headers=bearer(key)
    )
    assert fits.status == 200
    response = await gateway.post(
        "/v1/chat/completions", json=chat(pad="x" * 3000), headers=bearer(key)
    )
    assert response.status == 413
    assert_openai_error(await response.json())

    async def chunked_body():
        yield b'{"model": "m", "pad": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    response = await gateway.post("/v1/chat/completions", data=chunked_body(), headers=bearer(key))
    assert response.status == 413
    assert "Content-Length" not in response.request_info.headers
    assert_openai_error(await response.json())
    assert len(upstream.seen) == 1


@pytest.mark.asyncio
async def test_body_that_is_not_a_json_object_gets_400(gateway, db, upstream, subtests):
    key = await add_user(db, "alice")
    for body in (b"not json", b'{"model": ', b"[1, 2]", b'"text"', b"", b"\xff\xfe"):
        with subtests.test(body=body):
            response = await gateway.post(
                "/v1/chat/completions",
                data=body,
                headers={**bearer(key), "Content-Type": "application/json"},
            )
            assert response.status == 400
            assert_openai_error(await response.json())
    assert upstream.seen == []


# --- streams -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sse_chunks_arrive_unbuffered(gateway, db, upstream):
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 4
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    for k in range(1, upstream.chunks + 1):
        upstream.allow(1)
        event = await next_event(response)
        # The client holds chunk k while the backend has not been allowed chunk k+1.
        assert upstream.chunks_sent == k
        assert json.loads(event.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
    assert await next_event(response) == b"data: [DONE]\n\n"


@pytest.mark.asyncio
async def test_relaying_a_stream_sets_no_timer_per_chunk(gateway, db, upstream, monkeypatch):
    # A timer per read (the upstream's silence) and per write (the client's deadline) cost
    # about a fifth of relaying a chunk; both deadlines hold with a timer per period.
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 30
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    loop = asyncio.get_running_loop()
    timers = []
    real_call_at = loop.call_at
    monkeypatch.setattr(
        loop,
        "call_at",
        lambda when, *args, **kw: timers.append(when) or real_call_at(when, *args, **kw),
    )
    async with asyncio.timeout(DEADLINE):  # one timer for the test's own reads
        for _ in range(upstream.chunks):
            upstream.allow(1)
            await response.content.readuntil(b"\n\n")  # one read, one write in the gateway
        assert await response.content.readuntil(b"\n\n") == b"data: [DONE]\n\n"
    assert len(timers) < upstream.chunks // 3, len(timers)


@pytest.mark.asyncio
async def test_a_backend_silent_mid_stream_ends_it_with_an_error_event_after_the_timeout(
    start_gateway, db, upstream
):
    gateway = await start_gateway(upstream_timeout_seconds=0.5)
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 10
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    request_id = response.headers["X-Request-Id"]
    for _ in range(3):  # reads spread over more than the timeout do not trip it
        upstream.allow(1)
        await next_event(response)
        await asyncio.sleep(0.2)  # the backend's pace, not synchronisation
    silent_since = time.monotonic()
    event = await next_event(response)  # the backend says nothing more
    waited = time.monotonic() - silent_since
    assert json.loads(event.removeprefix(b"data: "))["error"]["code"] == "backend_failed"
    assert 0.5 - 0.2 <= waited < DEADLINE
    await wait_until(lambda: upstream.cut_short == 1, "the backend to see the hang-up")
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", request_id), "the request's log row"
    )
    assert rows[0]["status_code"] == 504


@pytest.mark.asyncio
async def test_client_disconnect_mid_stream_stops_the_backend_and_logs_499(gateway, db, upstream):
    upstream.gate = asyncio.Semaphore(0)
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    request_id = response.headers["X-Request-Id"]
    upstream.allow(1)
    await next_event(response)
    response.close()  # the client goes away; the backend still waits to send chunk 2
    await wait_until(lambda: upstream.cut_short == 1, "the backend to see the disconnect")
    assert upstream.chunks_sent == 1
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", request_id), "the request's log row"
    )
    assert rows[0]["status_code"] == 499
    assert queue_of(gateway).stats().active == 0


@pytest.mark.asyncio
async def test_client_disconnect_mid_stream_stops_the_backend_behind_python_m_proxy(
    proxy_process, db, upstream
):
    # The same hang-up as above, against the server as production runs it: TestServer
    # cancels handlers of vanished clients whatever proxy/server.py says, python -m proxy
    # only because server_options() asks it to.
    upstream.gate = asyncio.Semaphore(0)
    key = await add_user(db, "alice")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy_process.url + "/v1/chat/completions",
            json=chat(stream=True),
            headers=bearer(key),
        )
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        upstream.allow(1)
        await next_event(response)
        response.close()  # the client goes away; the backend still waits to send chunk 2
        await wait_until(lambda: upstream.cut_short == 1, "the backend to see the disconnect")
    assert upstream.chunks_sent == 1
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", request_id), "the request's log row"
    )
    assert rows[0]["status_code"] == 499


@pytest.mark.asyncio
async def test_client_that_hangs_up_right_after_done_is_logged_as_served(gateway, db, upstream):
    # The openai client closes its connection as soon as it reads [DONE]; the backend's
    # end of stream may come later. The answer was complete, so the row says 200.
    upstream.end_of_stream = asyncio.Event()
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    request_id = response.headers["X-Request-Id"]
    while await next_event(response) != b"data: [DONE]\n\n":
        pass
    response.close()
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", request_id), "the request's log row"
    )
    upstream.end_of_stream.set()
    assert (rows[0]["status_code"], rows[0]["completion_tokens"]) == (200, upstream.chunks)


# --- backend trouble ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_backend_down_gets_openai_502(start_gateway, db):
    gateway = await start_gateway(backend_url=f"http://127.0.0.1:{free_port()}")
    key = await add_user(db, "alice")
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status == 502
    body = await response.json()
    assert_openai_error(body, "server_error")
    assert body["error"]["code"] == "backend_unavailable"


class CountingConnections:
    """Wraps the dispatcher's keep-alive pool to count its attempts at the backend."""

    def __init__(self, connections) -> None:
        self.connections = connections
        self.requests = 0

    async def send(self, *args, **kwargs):
        self.requests += 1
        return await self.connections.send(*args, **kwargs)

    def close(self) -> None:
        self.connections.close()


@pytest.mark.asyncio
async def test_request_during_a_restart_waits_for_the_backend(
    start_gateway, db, upstream, aiohttp_server, tmp_path
):
    flag = tmp_path / "restarting"
    flag.touch()
    port = free_port()
    gateway = await start_gateway(
        backend_url=f"http://127.0.0.1:{port}", restart_flag=flag, backend_wait_seconds=10
    )
    key = await add_user(db, "alice")
    dispatcher = gateway.app[appkeys.FORWARDER].dispatcher
    dispatcher.connections = attempts = CountingConnections(dispatcher.connections)
    pending = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    )
    await wait_until(lambda: attempts.requests >= 3, "the gateway to retry the backend")
    assert not pending.done()
    await aiohttp_server(upstream.make_app(), port=port)  # the backend is back
    response = await asyncio.wait_for(pending, DEADLINE)
    assert response.status == 200
    assert len(upstream.seen) == 1


@pytest.mark.asyncio
async def test_request_during_a_restart_gets_503_when_the_backend_stays_away(
    start_gateway, db, tmp_path
):
    flag = tmp_path / "restarting"
    flag.touch()
    gateway = await start_gateway(
        backend_url=f"http://127.0.0.1:{free_port()}", restart_flag=flag, backend_wait_seconds=0.5
    )
    key = await add_user(db, "alice")
    started = asyncio.get_running_loop().time()
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert asyncio.get_running_loop().time() - started >= 0.5
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = await response.json()
    assert_openai_error(body, "server_error")
    assert body["error"]["code"] == "backend_restarting"


@pytest.mark.asyncio
async def test_a_restart_flag_older_than_any_restart_is_ignored_and_logged_once(
    start_gateway, db, tmp_path, caplog
):
    # Left by a console killed mid-restart: the backend is plainly down, not restarting.
    flag = tmp_path / "restarting"
    flag.touch()
    an_hour_ago = time.time() - 3600
    os.utime(flag, (an_hour_ago, an_hour_ago))
    gateway = await start_gateway(
        backend_url=f"http://127.0.0.1:{free_port()}",
        restart_flag=flag,
        backend_wait_seconds=DEADLINE * 2,
        restart_flag_max_age_seconds=600,
    )
    key = await add_user(db, "alice")
    for _ in range(2):
        response = await asyncio.wait_for(
            gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key)), DEADLINE
        )
        assert response.status == 502
    ready = await (await gateway.get("/readyz")).json()
    assert ready["backend"].startswith("unreachable")
    ignored = [r for r in caplog.records if "ignoring the restart flag" in r.getMessage()]
    assert len(ignored) == 1


# --- the fair queue in front of the backend ----------------------------------------------


@pytest.mark.asyncio
async def test_queued_user_is_served_after_at_most_one_request_of_a_flooding_user(
    gateway, db, upstream
):
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 1
    flooder, other = await add_user(db, "flooder"), await add_user(db, "other")
    queue = queue_of(gateway)

    async def call(key: str, user: str, stream: bool) -> int:
        response = await gateway.post(
            "/v1/chat/completions", json=chat(stream=stream, user=user), headers=bearer(key)
        )
        await response.read()
        return response.status

    tasks = [asyncio.create_task(call(flooder, "flooder", True))]
    await wait_until(lambda: len(upstream.seen) == 1, "the first stream at the backend")
    tasks += [asyncio.create_task(call(flooder, "flooder", True)) for _ in range(4)]
    await wait_until(lambda: queue.stats().waiting == 4, "the flood to queue up")
    tasks.append(asyncio.create_task(call(other, "other", False)))
    await wait_until(lambda: queue.stats().waiting == 5, "the other user's request to queue")
    upstream.allow(1)  # the running stream finishes
    await wait_until(lambda: len(upstream.seen) == 2, "the next request at the backend")
    assert upstream.seen[1].body["user"] == "other"
    upstream.allow(5)  # the other user's answer, then one chunk per flooder stream
    assert await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE) == [200] * 6
    assert [s.body["user"] for s in upstream.seen] == ["flooder", "other"] + ["flooder"] * 4


@pytest.mark.asyncio
async def test_client_that_disconnects_while_queued_leaves_the_queue(gateway, db, upstream):
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 1
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    queue = queue_of(gateway)
    running = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True, user="alice"), headers=bearer(alice)
    )
    queued = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=chat(user="bob"), headers=bearer(bob))
    )
    await wait_until(lambda: queue.stats().waiting == 1, "bob's request to queue")
    queued.cancel()  # bob's client gives up and closes its connection
    await wait_until(lambda: queue.stats().waiting == 0, "bob's request to leave the queue")
    upstream.allow(1)
    assert (await running.read()).endswith(b"data: [DONE]\n\n")
    await wait_until(lambda: queue.stats().active == 0, "the slot to be free")
    assert [s.body["user"] for s in upstream.seen] == ["alice"]
    # The slot was not handed to the request that left: the next one is served at once.
    upstream.allow(1)
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(bob))
    assert response.status == 200


@pytest.mark.asyncio
async def test_models_list_is_answered_from_the_cache_without_the_queue(gateway, db, upstream):
    key = await add_user(db, "alice")
    first = await gateway.get("/v1/models", headers=bearer(key))
    upstream.gate = asyncio.Semaphore(0)  # the backend is now busy
    second = await asyncio.wait_for(gateway.get("/v1/models", headers=bearer(key)), DEADLINE)
    assert first.status == second.status == 200
    assert await first.json() == await second.json() == {"object": "list", "data": [{"id": "m"}]}
    assert [s.path for s in upstream.seen] == ["/v1/models"]


# --- the gateway's own routes ------------------------------------------------------------


@pytest.mark.asyncio
async def test_healthz_and_readyz_are_200_when_backend_and_database_answer(gateway):
    health = await gateway.get("/healthz")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    response = await gateway.get("/readyz")
    body = await response.json()
    assert response.status == 200, body
    assert body["ready"] is True
    assert body["backend"] == body["database"] == body["request_log"] == "ok"


@pytest.mark.asyncio
async def test_readyz_is_503_naming_the_backend_when_it_is_down(start_gateway):
    gateway = await start_gateway(backend_url=f"http://127.0.0.1:{free_port()}")
    response = await gateway.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["ready"] is False
    assert body["backend"].startswith("unreachable")
    assert body["database"] == "ok"


@pytest.mark.asyncio
async def test_metrics_from_loopback_count_requests_by_user(gateway, db):
    key = await add_user(db, "alice")
    await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    response = await gateway.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert (
        'llamagate_requests_total{route="/v1/chat/completions",status="200",user="alice"} 1.0'
        in text
    )
    assert 'llamagate_tokens_total{kind="completion",user="alice"} 5.0' in text
    assert "llamagate_queue_waiting 0.0" in text


@pytest.mark.asyncio
async def test_metrics_are_served_with_prometheus_clients_own_content_type(gateway):
    response = await gateway.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST


def metrics_request(
    token: str, remote: str, authorization: str | None, forwarded: dict | None = None
) -> web.Request:
    app = web.Application()
    app[appkeys.CONFIG] = gateway_config(
        "postgresql://x@y/z", "http://b", Path("/unused"), metrics_token=token
    )
    headers = {"Authorization": authorization} if authorization else {}
    headers.update(forwarded or {})
    return make_mocked_request("GET", "/metrics", headers, app=app).clone(remote=remote)


@pytest.mark.parametrize(
    "token, remote, authorization, is_allowed",
    [
        ("", "127.0.0.1", None, True),
        ("", "::1", None, True),
        ("", "203.0.113.9", None, False),
        ("", "203.0.113.9", "Bearer ", False),
        ("s3cret", "203.0.113.9", "Bearer s3cret", True),
        ("s3cret", "203.0.113.9", "Bearer wrong", False),
        ("s3cret", "203.0.113.9", None, False),
        ("s3cret", "127.0.0.1", None, True),
    ],
)
def test_metrics_answer_loopback_or_the_metrics_token(token, remote, authorization, is_allowed):
    assert _may_read_metrics(metrics_request(token, remote, authorization)) is is_allowed


@pytest.mark.parametrize(
    "forwarded",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Real-IP": "203.0.113.9"},
    ],
    ids=["x-forwarded-for", "forwarded", "x-real-ip"],
)
def test_metrics_refuse_a_reverse_proxy_on_loopback_without_the_token(forwarded):
    assert not _may_read_metrics(metrics_request("", "127.0.0.1", None, forwarded))
    assert not _may_read_metrics(metrics_request("s3cret", "::1", None, forwarded))
    assert _may_read_metrics(metrics_request("s3cret", "127.0.0.1", "Bearer s3cret", forwarded))
