"""The gateway under load: every request answered and logged once, nothing leaked, fair turns.

Two runs. Thousands of requests from 100 concurrent clients go through a real
`python -m proxy` process to a fast upstream in this process, and /proc tells whether the
gateway kept file descriptors or memory. Then 200 concurrent streams go through the whole
stack (console, gateway, real model) and must be served round-robin across users and all
end properly. Figures are printed (run with -s to see them) for the reliability notes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import free_port
from fakeupstream import USAGE
from gatewayhelpers import BACKEND_KEY, add_user, bearer, wait_until
from gatewayprocess import GatewayProcess, start_gateway_process

pytest_plugins = ["gatewayfixture"]

CLIENTS = 100
REQUESTS = 5000
WARMUP_REQUESTS = 300
LOAD_USER = "load"
RUN_DEADLINE = 300.0  # seconds; turns a hang into a failure, not a speed target
# The gateway drops a pooled upstream connection after 4 s idle; a count of descriptors
# that has not moved for longer than that is the gateway at rest.
FD_QUIET_SECONDS = 5.0
FD_SLACK = 3
RSS_SLACK_KB = 10 * 1024  # freed memory is not all returned to the OS; a leak grows per request


# --- a fast upstream that echoes, so a crossed answer cannot pass -------------------------


async def echo_chat(request: web.Request) -> web.Response:
    """Answer with the prompt itself, and only to the gateway's internal key."""
    if request.headers.get("Authorization") != f"Bearer {BACKEND_KEY}":
        return web.json_response({"detail": "bad key"}, status=401)
    body = await request.json()
    content = body["messages"][0]["content"]
    message = {"role": "assistant", "content": content}
    return web.json_response({"choices": [{"message": message}], "usage": USAGE})


@pytest_asyncio.fixture
async def echo_upstream(aiohttp_server) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo_chat)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest_asyncio.fixture
async def gateway_process(echo_upstream: str, pg_dsn: str, db, tmp_path: Path):
    """`python -m proxy` in front of the echo upstream, configured as the console would."""
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(free_port()),
        "LLAMA_PROXY_BACKEND_URL": echo_upstream,
        "LLAMA_API_KEY": BACKEND_KEY,
        "POSTGRES_AUTH_DSN": pg_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(tmp_path / "requests.spool"),
        "LLAMA_PROXY_RATE_LIMIT": str(10 * (REQUESTS + WARMUP_REQUESTS)),
        # A few at the upstream at once, and queue caps that admit every client, so that
        # no request is refused for a cap: each one must get its answer.
        "LLAMA_PROXY_BACKEND_CONCURRENCY": "4",
        "LLAMA_PROXY_QUEUE_MAX_PER_USER": str(CLIENTS),
        "LLAMA_PROXY_QUEUE_MAX_TOTAL": str(CLIENTS),
    }
    gateway = await start_gateway_process(settings, tmp_path / "proxy.log")
    yield gateway
    gateway.stop()


# --- the first run: many quick requests -----------------------------------------------------


async def ask(session: aiohttp.ClientSession, url: str, key: str, number: int) -> str | None:
    """One chat request; None if the answer is this request's own, else what went wrong."""
    prompt = f"request {number}"
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key)) as r:
        text = await r.text()
    if r.status != 200:
        return f"{prompt}: {r.status} {text[:200]}"
    content = json.loads(text)["choices"][0]["message"]["content"]
    return None if content == prompt else f"{prompt}: answered {content!r}"


async def send_requests(url: str, key: str, count: int, first: int = 0) -> list[str]:
    """`count` requests from CLIENTS concurrent clients on one session; the failures."""
    numbers = iter(range(first, first + count))
    failures: list[str] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for number in numbers:  # the clients share one iterator: each number is sent once
            if (failure := await ask(session, url, key, number)) is not None:
                failures.append(failure)

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with asyncio.timeout(RUN_DEADLINE):
            await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    return failures


async def settled_fd_count(gateway: GatewayProcess) -> int:
    """The gateway's descriptor count once it has held still for FD_QUIET_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60.0
    count, since = gateway.fd_count(), loop.time()
    while loop.time() - since < FD_QUIET_SECONDS:
        if loop.time() > deadline:
            raise AssertionError("the gateway's descriptor count never settled")
        await asyncio.sleep(0.2)
        if (now := gateway.fd_count()) != count:
            count, since = now, loop.time()
    return count


async def count_rows(db: asyncpg.Pool) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM llama_requests WHERE username = $1 AND path = $2",
        LOAD_USER,
        "/v1/chat/completions",
    )


@pytest.mark.asyncio
async def test_5000_requests_from_100_clients_are_all_answered_logged_once_and_leak_nothing(
    gateway_process: GatewayProcess, db: asyncpg.Pool
):
    key = await add_user(db, LOAD_USER)
    url = gateway_process.url
    assert await send_requests(url, key, WARMUP_REQUESTS, first=-WARMUP_REQUESTS) == []
    await wait_until(lambda: _rows_are(db, WARMUP_REQUESTS), "the warm-up rows", 60.0)
    fds_before, rss_before = await settled_fd_count(gateway_process), gateway_process.rss_kb()

    started = time.monotonic()
    failures = await send_requests(url, key, REQUESTS)
    wall = time.monotonic() - started
    assert failures == [], failures[:10]

    await wait_until(lambda: _rows_are(db, WARMUP_REQUESTS + REQUESTS), "the rows", 60.0)
    fds_after, rss_after = await settled_fd_count(gateway_process), gateway_process.rss_kb()
    print(
        f"\nload: {REQUESTS} requests, {CLIENTS} clients, {wall:.1f}s ({REQUESTS / wall:.0f}/s); "
        f"fds {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} kB"
    )
    assert fds_after <= fds_before + FD_SLACK
    assert rss_after - rss_before < RSS_SLACK_KB
    # A clean stop flushes the log; a duplicate written late would show here.
    assert gateway_process.stop() == 0
    assert await count_rows(db) == WARMUP_REQUESTS + REQUESTS
    statuses = await db.fetch(
        "SELECT status_code, count(*) FROM llama_requests GROUP BY status_code"
    )
    assert {row["status_code"]: row["count"] for row in statuses} == {
        200: WARMUP_REQUESTS + REQUESTS
    }


async def _rows_are(db: asyncpg.Pool, expected: int) -> bool:
    count = await count_rows(db)
    assert count <= expected, f"{count} rows logged for {expected} requests"
    return count == expected


# --- the second run: concurrent streams from the real model -------------------------------

STREAM_USERS = [f"user{n}" for n in range(8)]
STREAMS_PER_USER = 25  # 8 x 25 = 200 concurrent streams
STREAMS = len(STREAM_USERS) * STREAMS_PER_USER
# A long generation that holds the backend while the streams queue up behind it; counting
# with the end-of-text tokens banned keeps the model from stopping by itself.
HOLD_BODY = {
    "model": "any",
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    "max_tokens": 1500,
    "stream": True,
    "logit_bias": {"0": -100, "1": -100, "2": -100},
}
TINY_CHAT = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture
def stack(gateway_home):
    """The whole stack, with queue caps that admit every stream at once."""
    gateway_home.env.update(
        {
            "LLAMA_PROXY_QUEUE_MAX_PER_USER": str(STREAMS_PER_USER),
            "LLAMA_PROXY_QUEUE_MAX_TOTAL": str(STREAMS),
        }
    )
    result = gateway_home.run("start")
    assert result.returncode == 0, result.stdout + result.stderr
    return gateway_home


async def queue_waiting(session: aiohttp.ClientSession, url: str) -> int:
    """Requests waiting in the gateway's queue, from /metrics (open to loopback)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    line = next(x for x in text.splitlines() if x.startswith("llamagate_queue_waiting "))
    return int(float(line.split()[1]))


async def stream_chat(
    session: aiohttp.ClientSession, url: str, user: str, key: str, turns: list[str]
) -> tuple[int, str]:
    """One streamed chat; notes its user in `turns` when the answer starts."""
    body = {**TINY_CHAT, "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key)) as r:
        # One request at a time at the backend: answers start in the order turns are granted.
        turns.append(user)
        return r.status, await r.text()


def stream_problem(status: int, text: str) -> str | None:
    """None if the stream is a complete answer: 200, a finish_reason, then [DONE]."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if status != 200 or not events or events[-1] != "[DONE]":
        return f"{status}: {text[-300:]!r}"
    reasons = [c.get("finish_reason") for e in events[:-1] for c in json.loads(e)["choices"]]
    return None if any(reasons) else f"no finish_reason: {text[-300:]!r}"


def assert_round_robin(turns: list[str]) -> None:
    """After every round of len(STREAM_USERS) turns, each user has had about that many."""
    width = len(STREAM_USERS)
    for end in range(width, len(turns) + 1, width):
        counts = {user: turns[:end].count(user) for user in STREAM_USERS}
        rounds = end // width
        # One either way: two answers that start close together may be seen swapped.
        assert all(abs(count - rounds) <= 1 for count in counts.values()), (end, counts)


async def hold_the_backend(session: aiohttp.ClientSession, url: str, key: str):
    """Start a long generation and return its open response once tokens flow."""
    hold = await session.post(f"{url}/v1/completions", json=HOLD_BODY, headers=bearer(key))
    assert hold.status == 200, await hold.text()
    await hold.content.readany()
    return hold


async def stream_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT status_code, stream FROM llama_requests WHERE username = ANY($1)", STREAM_USERS
    )


@pytest.mark.asyncio
async def test_200_concurrent_streams_from_the_real_model_take_fair_turns_and_all_finish(stack):
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2)
    try:
        keys = {user: await add_user(pool, user) for user in STREAM_USERS}
        hold_key = await add_user(pool, "holder")
        turns: list[str] = []
        timeout = aiohttp.ClientTimeout(total=RUN_DEADLINE)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            hold = await hold_the_backend(session, stack.url, hold_key)
            # Each user's streams arrive together, user after user: served first come first
            # served, user0 would get all 25 turns before user1 got one.
            tasks = [
                asyncio.create_task(stream_chat(session, stack.url, user, keys[user], turns))
                for user in STREAM_USERS
                for _ in range(STREAMS_PER_USER)
            ]
            await wait_until(lambda: _all_queued(session, stack.url), "every stream queued", 60.0)
            started = time.monotonic()
            hold.close()  # the holder hangs up; the backend goes to the queue
            results = await asyncio.gather(*tasks)
            wall = time.monotonic() - started
        problems = [p for p in itertools.starmap(stream_problem, results) if p]
        print(f"\nstreams: {STREAMS - len(problems)}/{STREAMS} finished in {wall:.1f}s")
        assert problems == [], problems[:5]
        assert_round_robin(turns)
        rows = await wait_until(lambda: _rows_when(pool, STREAMS), "the stream rows", 60.0)
        assert len(rows) == STREAMS
        assert {(row["status_code"], row["stream"]) for row in rows} == {(200, True)}
    finally:
        await pool.close()


async def _all_queued(session: aiohttp.ClientSession, url: str) -> bool:
    return await queue_waiting(session, url) == STREAMS


async def _rows_when(pool: asyncpg.Pool, count: int) -> list[asyncpg.Record] | None:
    rows = await stream_rows(pool)
    return rows if len(rows) >= count else None
