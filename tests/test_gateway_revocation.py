"""Revocation reaches admitted work: streams in flight end, queued requests are refused.

Two gateways share one database and one fake upstream whose gate holds each stream open
for as long as a test wants. The change is made by plain SQL on a connection of its own,
as the admin CLI or psql would make it, so only the notification tells the gateways.
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest
from gatewayhelpers import DEADLINE, add_user, bearer, chat, log_rows, wait_until

from proxy import appkeys, listener
from proxy.keys import key_id_of
from proxy.migrations import AUTH_CHANNEL

pytest_plugins = ["gatewayfixture"]

# Each change is made to alice: $1 is her key's id, $2 her name.
CHANGES = {
    "key_revoked": "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND $2 <> ''",
    "user_disabled": "UPDATE users SET is_disabled = true WHERE username = $2 AND $1 <> ''",
    "user_deleted": "DELETE FROM users WHERE username = $2 AND $1 <> ''",
}


async def change(dsn: str, reason: str, key: str) -> None:
    """Make the change on a connection of its own; return once it has committed."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(CHANGES[reason], key_id_of(key), "alice")
    finally:
        await conn.close()


async def next_event(response) -> bytes:
    return await asyncio.wait_for(response.content.readuntil(b"\n\n"), DEADLINE)


async def listening(client) -> None:
    cache = client.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")


@pytest.mark.asyncio
@pytest.mark.parametrize("reason", list(CHANGES))
async def test_streams_in_flight_end_within_one_second_on_every_gateway(
    start_gateway, db, pg_dsn, upstream, reason
):
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 1000
    key = await add_user(db, "alice")
    gateways = [await start_gateway(), await start_gateway()]
    streams = []
    for gateway in gateways:
        await listening(gateway)
        response = await gateway.post(
            "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
        )
        assert response.status == 200
        streams.append(response)
    upstream.allow(2)  # the gate is first come, first served: one chunk for each stream
    for response in streams:
        await next_event(response)
    started = time.monotonic()
    await change(pg_dsn, reason, key)
    # The gate stays shut: only the revocation can end these streams now.
    endings = await asyncio.gather(*(asyncio.wait_for(s.content.read(), 1.0) for s in streams))
    print(f"\n{reason}: both streams ended {(time.monotonic() - started) * 1000:.0f} ms after it")
    for ending in endings:
        event = json.loads(ending.strip().removeprefix(b"data: "))
        assert event["error"]["code"] == "invalid_api_key"
        assert event["error"]["message"].startswith(f"{reason}: ")
    await wait_until(lambda: upstream.cut_short == 2, "the backend to stop generating")
    ids = [s.headers["X-Request-Id"] for s in streams]
    rows = await wait_until(
        lambda: _rows_if_all(log_rows(db, "request_id = ANY($1)", ids), 2), "both log rows"
    )
    assert [row["status_code"] for row in rows] == [401, 401]
    assert all(row["error"].startswith(f"{reason}: ") for row in rows), rows


async def _rows_if_all(rows, count: int):
    found = await rows
    return found if len(found) == count else None


@pytest.mark.asyncio
async def test_a_whole_answer_still_being_generated_becomes_a_401(gateway, db, pg_dsn, upstream):
    upstream.gate = asyncio.Semaphore(0)  # the backend holds its whole answer back
    key = await add_user(db, "alice")
    await listening(gateway)
    asked = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    )
    await wait_until(lambda: len(upstream.seen) == 1, "the request at the backend")
    await change(pg_dsn, "key_revoked", key)
    response = await asyncio.wait_for(asked, 1.0)
    body = await response.json()
    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["message"].startswith("key_revoked: ")
    await wait_until(lambda: gateway.app[appkeys.QUEUE].stats().active == 0, "a free slot")
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", response.headers["X-Request-Id"]), "the row"
    )
    assert rows[0]["status_code"] == 401 and rows[0]["error"].startswith("key_revoked: ")


@pytest.mark.asyncio
async def test_a_queued_request_whose_key_is_revoked_is_refused_at_its_turn(
    gateway, db, pg_dsn, upstream
):
    upstream.gate = asyncio.Semaphore(0)
    upstream.chunks = 1
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    await listening(gateway)
    running = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True, user="bob"), headers=bearer(bob)
    )
    queued = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=chat(user="alice"), headers=bearer(alice))
    )
    queue = gateway.app[appkeys.QUEUE]
    await wait_until(lambda: queue.stats().waiting == 1, "alice's request to queue")
    generation = gateway.app[appkeys.AUTHENTICATOR].cache.generation
    await change(pg_dsn, "key_revoked", alice)
    await wait_until(
        lambda: gateway.app[appkeys.AUTHENTICATOR].cache.generation > generation,
        "the notification",
    )
    upstream.allow(1)  # bob's stream ends, and the turn passes to alice's request
    assert (await running.read()).endswith(b"data: [DONE]\n\n")
    refused = await asyncio.wait_for(queued, DEADLINE)
    body = await refused.json()
    assert refused.status == 401
    assert body["error"]["message"].startswith("key_revoked: ")
    assert [s.body["user"] for s in upstream.seen] == ["bob"]  # alice never reached it
    rows = await wait_until(
        lambda: log_rows(db, "request_id = $1", refused.headers["X-Request-Id"]), "alice's row"
    )
    assert rows[0]["status_code"] == 401 and rows[0]["error"].startswith("key_revoked: ")


@pytest.mark.asyncio
async def test_truncating_the_keys_empties_every_cache(start_gateway, db, pg_dsn):
    key = await add_user(db, "alice")
    gateway = await start_gateway()
    await listening(gateway)
    assert (await gateway.get("/v1/models", headers=bearer(key))).status == 200
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("TRUNCATE users CASCADE")
    finally:
        await conn.close()

    async def is_refused() -> bool:
        return (await gateway.get("/v1/models", headers=bearer(key))).status == 401

    await wait_until(is_refused, "the truncated key to be refused", timeout=1.0)


@pytest.mark.asyncio
async def test_the_listener_survives_an_unexpected_error_and_listens_again(
    start_gateway, monkeypatch
):
    real_listen = listener.listen_until_lost
    calls = []

    async def fail_once(conn, subscriptions):
        assert AUTH_CHANNEL in [s.channel for s in subscriptions]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an error nobody foresaw")
        await real_listen(conn, subscriptions)

    monkeypatch.setattr(listener, "listen_until_lost", fail_once)
    gateway = await start_gateway()
    await wait_until(
        lambda: gateway.app[appkeys.AUTHENTICATOR].cache.is_listening,
        "the listener to listen again after the error",
    )
    assert len(calls) == 2
