"""Token limits and quotas through the gateway, against the real database: exact across
gateways, the day and month boundaries on an injected clock, the headers, /v1/me."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from gatewayhelpers import add_user, bearer, chat, wait_until

from proxy import appkeys, listener
from proxy.tokenbudget import MINUTE

pytest_plugins = ["gatewayfixture"]

TOKENS_PER_ANSWER = 12  # the fake upstream's usage: 7 prompt + 5 completion tokens
TOKEN_HEADERS = (
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Tokens",
)


class FakeClock:
    """An epoch clock the test moves by hand (the database keeps its own)."""

    def __init__(self, moment: str) -> None:
        self.now = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, moment: str) -> None:
        self.now = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()


async def limited_user(db, name: str = "alice", **limits: int) -> str:
    key = await add_user(db, name)
    for column, value in limits.items():
        await db.execute(f"UPDATE users SET {column} = $1 WHERE username = $2", value, name)
    return key


async def post_chat(gateway, key: str, stream: bool = False):
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=stream), headers=bearer(key)
    )
    await response.read()
    return response


@pytest.mark.asyncio
async def test_tokens_per_minute_are_exact_across_two_gateways(start_gateway, db, upstream):
    first, second = await start_gateway(), await start_gateway()
    key = await limited_user(db, tokens_per_minute=3 * TOKENS_PER_ANSWER)
    answers = [await post_chat(gateway, key) for gateway in (first, second, first, second)]
    # 0, 12 and 24 tokens used before the first three: admitted. 36 before the fourth,
    # two of them charged by the other gateway: refused, though that gateway alone
    # has charged only 12.
    assert [answer.status for answer in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    body = await refused.json()
    assert body["error"]["code"] == "tokens_exceeded"
    assert "36 of 36 tokens" in body["error"]["message"]
    # The first answer's tokens leave the minute window about a minute after it.
    assert MINUTE - 10 <= int(refused.headers["Retry-After"]) <= MINUTE
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert len([seen for seen in upstream.seen if seen.path == "/v1/chat/completions"]) == 3
    # And each gateway alone refuses afterwards too.
    assert (await post_chat(first, key)).status == 429


@pytest.mark.asyncio
async def test_one_request_may_overshoot_the_limit_by_its_own_size(gateway, db):
    key = await limited_user(db, tokens_per_minute=TOKENS_PER_ANSWER + 1)
    statuses = [(await post_chat(gateway, key)).status for _ in range(3)]
    # 0 used: admitted; 12 used, under 13: admitted, and it brings the use to 24.
    assert statuses == [200, 200, 429]


@pytest.mark.asyncio
async def test_allowed_answers_carry_the_token_headers_after_their_charge(gateway, db):
    key = await limited_user(db, tokens_per_minute=100)
    first = await post_chat(gateway, key)
    assert first.status == 200
    assert first.headers["X-RateLimit-Limit-Tokens"] == "100"
    assert first.headers["X-RateLimit-Remaining-Tokens"] == str(100 - TOKENS_PER_ANSWER)
    assert first.headers["X-RateLimit-Reset-Tokens"] in ("59s", "1m0s")
    second = await post_chat(gateway, key)
    assert second.headers["X-RateLimit-Remaining-Tokens"] == str(100 - 2 * TOKENS_PER_ANSWER)


@pytest.mark.asyncio
async def test_a_stream_carries_the_token_headers_before_its_first_byte(gateway, db, upstream):
    key = await limited_user(db, daily_token_quota=1000)
    await post_chat(gateway, key)
    upstream.gate = asyncio.Semaphore(0)  # no chunk leaves until the headers are checked
    response = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    assert response.status == 200
    assert response.headers["X-RateLimit-Limit-Tokens"] == "1000"
    assert response.headers["X-RateLimit-Remaining-Tokens"] == str(1000 - TOKENS_PER_ANSWER)
    assert upstream.chunks_sent == 0
    upstream.allow(upstream.chunks)
    assert (await response.read()).endswith(b"data: [DONE]\n\n")


@pytest.mark.asyncio
async def test_users_without_a_token_limit_get_no_token_headers(gateway, db):
    key = await add_user(db, "alice")
    response = await post_chat(gateway, key)
    assert response.status == 200
    assert "X-RateLimit-Limit" in response.headers  # the request limit still applies
    assert not any(header in response.headers for header in TOKEN_HEADERS)


@pytest.mark.asyncio
async def test_the_daily_quota_resets_at_utc_midnight(gateway, db):
    clock = FakeClock("2026-11-30T23:59:50")
    gateway.app[appkeys.TOKEN_LIMITER].clock = clock
    key = await limited_user(db, daily_token_quota=2 * TOKENS_PER_ANSWER)
    statuses = [(await post_chat(gateway, key)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = await post_chat(gateway, key)
    assert (await refused.json())["error"]["code"] == "quota_exceeded"
    assert refused.headers["Retry-After"] == "10"  # until midnight, not a day
    assert refused.headers["X-RateLimit-Reset-Tokens"] == "10s"
    clock.set("2026-12-01T00:00:00")
    assert (await post_chat(gateway, key)).status == 200
    # Each day's tokens reach the database under that day (in the background).
    expected = [("2026-11-30", 2 * TOKENS_PER_ANSWER), ("2026-12-01", TOKENS_PER_ANSWER)]

    async def days_written() -> bool:
        rows = await db.fetch("SELECT day, tokens FROM token_days ORDER BY day")
        return [(str(row["day"]), row["tokens"]) for row in rows] == expected

    await wait_until(days_written, "both days' tokens in token_days")


@pytest.mark.asyncio
async def test_the_monthly_quota_outlasts_a_day_and_resets_on_the_first(gateway, db):
    clock = FakeClock("2026-11-29T12:00:00")
    gateway.app[appkeys.TOKEN_LIMITER].clock = clock
    key = await limited_user(db, monthly_token_quota=TOKENS_PER_ANSWER)
    assert (await post_chat(gateway, key)).status == 200
    clock.set("2026-11-30T23:00:00")  # another day, the same month
    refused = await post_chat(gateway, key)
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "quota_exceeded"
    assert refused.headers["Retry-After"] == "3600"  # until 1 December, 00:00 UTC
    clock.set("2026-12-01T00:00:01")
    assert (await post_chat(gateway, key)).status == 200


@pytest.mark.asyncio
async def test_me_shows_each_token_budget_its_use_and_its_reset(start_gateway, db):
    gateway = await start_gateway(daily_token_quota=500, me_cache_seconds=0.01)
    clock = FakeClock("2026-11-30T18:00:00")
    gateway.app[appkeys.TOKEN_LIMITER].clock = clock
    key = await limited_user(db, tokens_per_minute=100, monthly_token_quota=0)
    for _ in range(2):
        assert (await post_chat(gateway, key)).status == 200
    response = await gateway.get("/v1/me", headers=bearer(key))
    assert response.status == 200
    tokens = (await response.json())["tokens"]
    used = 2 * TOKENS_PER_ANSWER
    assert tokens["per_minute"]["limit"] == 100  # the user's own
    assert tokens["per_minute"]["used"] == used
    assert tokens["per_minute"]["remaining"] == 100 - used
    assert tokens["per_minute"]["resets_in"] in ("59s", "1m0s")
    assert tokens["daily"] == {  # the gateway's default
        "limit": 500,
        "used": used,
        "remaining": 500 - used,
        "resets_at": "2026-12-01T00:00:00Z",
    }
    assert tokens["monthly"] == {  # unlimited for this user, yet counted
        "limit": None,
        "used": used,
        "remaining": None,
        "resets_at": "2026-12-01T00:00:00Z",
    }


@pytest.mark.asyncio
async def test_a_stalled_charge_holds_an_answer_only_briefly(gateway, db, monkeypatch):
    monkeypatch.setattr("proxy.tokengate.CHARGE_WAIT_SECONDS", 0.05)
    key = await limited_user(db, tokens_per_minute=1000)
    assert (await post_chat(gateway, key)).status == 200
    gateway.app[appkeys.TOKEN_LIMITER].note_foreign_charge("another-gateway alice")
    async with db.acquire() as holder, holder.transaction():
        # The next charge waits for this row lock (up to the 5 s command timeout).
        await holder.execute("SELECT 1 FROM token_days WHERE username = 'alice' FOR UPDATE")
        answer = await asyncio.wait_for(post_chat(gateway, key), 3)
        assert answer.status == 200
    await wait_until(
        lambda: db.fetchval("SELECT tokens = 24 FROM token_days WHERE username = 'alice'"),
        "the stalled charge to be written once the lock is gone",
    )


@pytest.mark.asyncio
async def test_the_database_merges_charges_of_the_same_instant(db):
    from datetime import date

    from proxy import tokenstore

    answers = await tokenstore.charge_tokens(
        db, ["alice"] * 30, [5] * 30, [date(2026, 11, 30)] * 30, MINUTE, "gateway"
    )
    assert answers[-1].counts == (150,) and len(answers[-1].stamps) == 1
    assert answers[-1].day_used == answers[-1].month_used == 150


@pytest.mark.asyncio
async def test_a_gateway_holds_one_listen_connection_for_auth_and_token_charges(start_gateway, db):
    gateway = await start_gateway(tokens_per_minute=1000)
    cache, limiter = gateway.app[appkeys.AUTHENTICATOR].cache, gateway.app[appkeys.TOKEN_LIMITER]
    await wait_until(lambda: cache.is_listening and limiter.is_listening, "both to listen")
    # Counted by the application_name the listener gives its connections: the
    # pg_listening_channels() of one session shows only its own, and pg_stat_activity's
    # query column only a connection's last statement (the probe's SELECT 1 soon replaces
    # the LISTENs). This test's database is its own, so no other gateway's is counted.
    count = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = $1",
        listener.APPLICATION_NAME,
    )
    assert count == 1
