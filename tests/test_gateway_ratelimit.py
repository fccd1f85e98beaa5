"""Rate limits: an exact sliding window per user, shared by every gateway on one database."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from gatewayhelpers import DEADLINE, add_user, bearer, chat, wait_until

from proxy import appkeys, store
from proxy.ratelimit import SharedLimiter, SlidingWindow

pytest_plugins = ["gatewayfixture"]

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


# --- SlidingWindow: pure logic with a given clock ---------------------------------------


def test_sliding_window_admits_exactly_the_limit_then_says_when_the_next_fits():
    window = SlidingWindow(10.0)
    decisions = [window.allow("alice", 3, now) for now in (0.0, 1.0, 2.0)]
    assert [d.is_allowed for d in decisions] == [True, True, True]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    refused = window.allow("alice", 3, 3.0)
    assert not refused.is_allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(7.0)  # when the stamp from t=0 leaves
    assert refused.reset_seconds == pytest.approx(9.0)  # when the whole allowance is back
    assert not window.allow("alice", 3, 9.999).is_allowed
    assert window.allow("alice", 3, 10.0).is_allowed


def test_sliding_window_refuses_a_burst_across_a_fixed_window_boundary():
    window = SlidingWindow(10.0)
    assert all(window.allow("alice", 3, 9.5).is_allowed for _ in range(3))
    # A fixed window would start afresh at t=10 and let 3 more through: 6 in 0.5 s.
    assert not window.allow("alice", 3, 10.0).is_allowed
    assert not window.allow("alice", 3, 19.4).is_allowed
    assert window.allow("alice", 3, 19.5).is_allowed


def test_sliding_window_counts_each_user_apart():
    window = SlidingWindow(10.0)
    assert window.allow("alice", 1, 0.0).is_allowed
    assert not window.allow("alice", 1, 0.0).is_allowed
    assert window.allow("bob", 1, 0.0).is_allowed


def test_sliding_window_retry_after_follows_a_lowered_limit():
    window = SlidingWindow(10.0)
    for now in (0.0, 1.0, 2.0):
        window.allow("alice", 3, now)
    refused = window.allow("alice", 2, 3.0)
    # Two stamps must leave before a third fits under a limit of 2: the one from t=1.
    assert refused.retry_after == pytest.approx(8.0)


def test_decision_headers_round_the_reset_up():
    decision = SlidingWindow(10.0).allow("alice", 5, 0.25)
    assert decision.headers == {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": "10",
    }


# --- SharedLimiter with a take_slots of the test's own -----------------------------------


@pytest.mark.asyncio
async def test_shared_limiter_batches_concurrent_requests_into_few_round_trips():
    calls = []

    async def take_slots(users, wanted, limits, windows, extra, hold):
        calls.append(list(zip(users, wanted, strict=True)))
        await asyncio.sleep(0)
        return {
            user: store.SlotGrant(user, min(w, lim), min(w, lim), 1.0, 1.0, 1.0)
            for user, w, lim in zip(users, wanted, limits, strict=True)
        }

    limiter = SharedLimiter(take_slots, 60.0)
    decisions = await asyncio.gather(*(limiter.acquire("alice", 4) for _ in range(10)))
    assert sum(d.is_allowed for d in decisions) == 4
    assert len(calls) <= 2
    assert sum(wanted for call in calls for _, wanted in call) == 10


@pytest.mark.asyncio
async def test_shared_limiter_falls_back_to_an_exact_local_window_when_the_database_is_down():
    async def take_slots(*_batch):
        raise ConnectionRefusedError("database down")

    limiter = SharedLimiter(take_slots, 60.0)
    decisions = [await limiter.acquire("alice", 2) for _ in range(3)]
    assert [d.is_allowed for d in decisions] == [True, True, False]
    assert limiter.is_database_down


@pytest.mark.asyncio
async def test_a_request_cancelled_while_its_batch_is_asked_does_not_fail_the_others():
    answered = asyncio.Event()

    async def take_slots(users, wanted, limits, windows, extra, hold):
        await answered.wait()
        pairs = zip(users, wanted, strict=True)
        return {u: store.SlotGrant(u, w, w, 1.0, 1.0, 1.0) for u, w in pairs}

    limiter = SharedLimiter(take_slots, 60.0)
    gone = asyncio.create_task(limiter.acquire("alice", 5))
    stays = asyncio.create_task(limiter.acquire("alice", 5))
    await asyncio.sleep(0)  # both are in the batch now
    gone.cancel()  # its client hung up
    answered.set()
    assert (await stays).is_allowed


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def granting_everything(calls: list):
    """A take_slots that grants every slot and lease it is asked for, noting each call."""

    async def take_slots(users, wanted, limits, windows, extra, hold):
        calls.append(dict(zip(users, zip(wanted, extra, strict=True), strict=True)))
        return {
            user: store.SlotGrant(user, w, w + x, 1.0, 1.0, 1.0, leased=x)
            for user, w, x in zip(users, wanted, extra, strict=True)
        }

    return take_slots


@pytest.mark.asyncio
async def test_a_steady_user_spends_leased_slots_without_a_round_trip_each():
    calls = []
    limiter = SharedLimiter(granting_everything(calls), 60.0)
    decisions = [await limiter.acquire("alice", 10_000) for _ in range(500)]
    assert all(d.is_allowed for d in decisions)
    assert len(calls) < 50, f"{len(calls)} round trips for 500 requests"
    # Never more leased than 1% of the limit at once.
    assert max(extra for call in calls for _, extra in call.values()) <= 100


@pytest.mark.asyncio
async def test_small_limits_are_never_leased():
    calls = []
    limiter = SharedLimiter(granting_everything(calls), 60.0)
    for _ in range(20):
        await limiter.acquire("alice", 99)
    assert len(calls) == 20
    assert all(extra == 0 for call in calls for _, extra in call.values())


@pytest.mark.asyncio
async def test_a_leased_slot_is_never_spent_after_its_lease_ends():
    calls, clock = [], FakeClock()
    limiter = SharedLimiter(granting_everything(calls), 60.0, clock=clock)
    for _ in range(50):
        await limiter.acquire("alice", 10_000)
    assert limiter.leases["alice"].slots(clock.now) > 0
    before = len(calls)
    clock.now += SharedLimiter.LEASE_SECONDS  # the lease's stamps end now
    await limiter.acquire("alice", 10_000)
    assert len(calls) == before + 1, "an expired lease was spent instead of asking"


@pytest.mark.asyncio
async def test_leases_never_let_two_gateways_exceed_a_shared_limit(db):
    take = lambda *batch: store.take_rate_slots(db, *batch)  # noqa: E731
    first, second = SharedLimiter(take, 60.0), SharedLimiter(take, 60.0)
    admitted = 0
    for index in range(1_300):
        limiter = first if index % 3 else second
        admitted += (await limiter.acquire("alice", 1_000)).is_allowed
    assert admitted <= 1_000
    # Unspent leases are held back: at most 1% of the limit per gateway.
    assert admitted >= 1_000 - 2 * 10
    assert await store.count_rate_slots(db, "alice", 60.0) == 1_000


# --- through the gateway, against the real database -------------------------------------


@pytest.mark.asyncio
async def test_request_over_the_limit_gets_429_with_rate_limit_headers(start_gateway, db, upstream):
    gateway = await start_gateway(rate_limit=3)
    key = await add_user(db, "alice")
    remaining = []
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert response.status == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        remaining.append(response.headers["X-RateLimit-Remaining"])
        assert 0 < int(response.headers["X-RateLimit-Reset"]) <= 60
    assert remaining == ["2", "1", "0"]
    refused = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in refused.headers
    assert len(upstream.seen) == 3


async def fill_window(db, username: str, ages: list[float]) -> None:
    """Put admissions made `ages` seconds ago into the user's shared window."""
    now = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    await db.execute(
        "INSERT INTO rate_windows (username, stamps) VALUES ($1, $2)",
        username,
        [now - age for age in sorted(ages, reverse=True)],
    )


@pytest.mark.asyncio
async def test_retry_after_is_the_true_wait_not_the_window(start_gateway, db):
    gateway = await start_gateway(rate_limit=3, rate_window_seconds=60)
    key = await add_user(db, "alice")
    await fill_window(db, "alice", [50.0, 10.0, 5.0])
    refused = await gateway.get("/v1/models", headers=bearer(key))
    assert refused.status == 429
    # The admission from 50 s ago leaves the 60 s window in 10 s; the window is full
    # again in 55 s. Neither is the window length.
    assert 9 <= int(refused.headers["Retry-After"]) <= 11
    assert 54 <= int(refused.headers["X-RateLimit-Reset"]) <= 56


@pytest.mark.asyncio
async def test_request_is_admitted_again_once_retry_after_has_passed(start_gateway, db):
    gateway = await start_gateway(rate_limit=2, rate_window_seconds=2)
    key = await add_user(db, "alice")
    for _ in range(2):
        assert (await gateway.get("/v1/models", headers=bearer(key))).status == 200
    started = time.monotonic()
    refused = await gateway.get("/v1/models", headers=bearer(key))
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 2

    async def is_admitted() -> bool:
        return (await gateway.get("/v1/models", headers=bearer(key))).status == 200

    await wait_until(is_admitted, "a slot to free", timeout=3.0)
    assert time.monotonic() - started <= 2.5


@pytest.mark.asyncio
async def test_stream_carries_rate_limit_headers_before_the_first_byte(start_gateway, db, upstream):
    gateway = await start_gateway(rate_limit=3)
    upstream.gate = asyncio.Semaphore(0)  # no chunk leaves until the headers are checked
    key = await add_user(db, "alice")
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "2"
    assert "X-RateLimit-Reset" in response.headers
    assert upstream.chunks_sent == 0
    upstream.allow(upstream.chunks)
    assert (await response.read()).endswith(b"data: [DONE]\n\n")


@pytest.mark.asyncio
async def test_per_user_rate_limit_overrides_the_default(start_gateway, db):
    gateway = await start_gateway(rate_limit=3)
    for username, own_limit in (("lower", 2), ("higher", 5)):
        key = await add_user(db, username, rate_limit=own_limit)
        statuses = []
        for _ in range(own_limit + 1):
            response = await gateway.get("/v1/models", headers=bearer(key))
            statuses.append(response.status)
            assert response.headers["X-RateLimit-Limit"] == str(own_limit)
        assert statuses == [200] * own_limit + [429], username


@pytest.mark.asyncio
async def test_two_gateways_never_let_a_user_exceed_the_limit_together(start_gateway, db, upstream):
    first, second = await start_gateway(rate_limit=5), await start_gateway(rate_limit=5)
    key = await add_user(db, "alice")

    async def call(client) -> int:
        response = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(call(first if i % 2 else second) for i in range(20)))
    assert sorted(statuses) == [200] * 5 + [429] * 15
    assert len(upstream.seen) == 5
    # And afterwards, each gateway alone still refuses: the window is shared.
    for client in (first, second):
        assert await call(client) == 429


@pytest.mark.asyncio
async def test_shutdown_cancels_a_rate_limit_round_trip_in_flight(start_gateway, db):
    gateway = await start_gateway()
    key = await add_user(db, "alice")
    limiter = gateway.app[appkeys.LIMITER]
    request = asyncio.create_task(asyncio.sleep(0))
    try:
        # Hold alice's window row, so that the limiter's round trip waits on its lock.
        async with db.acquire() as holder, holder.transaction():
            await holder.execute("INSERT INTO rate_windows (username) VALUES ('alice')")
            request = asyncio.create_task(
                gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
            )
            await wait_until(
                lambda: db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE '%llamagate_lease_slots%'"
                ),
                "the limiter's round trip to wait on the row lock",
            )
            # The pool closes only once every connection is back: the round trip must end.
            await asyncio.wait_for(gateway.close(), DEADLINE)
            assert limiter.flusher.cancelled()
    finally:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await request
