"""Auth at the gateway: which keys are let in, how refusals look, and how fast revocation lands."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from gatewayhelpers import add_user, bearer, chat, wait_until
from multidict import CIMultiDict

from proxy import appkeys, store
from proxy.auth import extract_key
from proxy.config import database_dsn, redact_dsn
from proxy.errors import GatewayError
from proxy.keys import digest_key, generate_key, is_plausible_key, key_id_of

pytest_plugins = ["gatewayfixture"]


def assert_refused(response, body: dict, secret: str | None = None) -> None:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    if secret:
        assert secret not in str(body)
        assert secret not in str(response.headers)


# --- extract_key and the key format: pure logic ---------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([("Authorization", "Bearer lgk_k")], "lgk_k"),
        ([("Authorization", "bearer   lgk_k  ")], "lgk_k"),
        ([("X-API-Key", " lgk_k ")], "lgk_k"),
    ],
)
def test_extract_key_reads_bearer_or_x_api_key(headers, expected):
    assert extract_key(CIMultiDict(headers)) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer   ")],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "lgk_k")],
        [("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
        [("Authorization", "Bearer a"), ("X-API-Key", "a")],
        [("X-API-Key", "a"), ("X-API-Key", "b")],
    ],
    ids=["none", "bearer-alone", "bearer-blank", "basic", "no-scheme", "two-auth", "both", "two-x"],
)
def test_extract_key_refuses_missing_malformed_or_ambiguous_headers(headers):
    with pytest.raises(GatewayError) as refused:
        extract_key(CIMultiDict(headers))
    assert refused.value.status == 401
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}


def test_generated_key_carries_its_public_id_and_256_bits_of_secret():
    new_key = generate_key()
    assert key_id_of(new_key.secret_key) == new_key.key_id
    assert new_key.digest == digest_key(new_key.secret_key)
    prefix = f"lgk_{new_key.key_id}_"
    assert new_key.secret_key.startswith(prefix)
    secret = new_key.secret_key.removeprefix(prefix)  # urlsafe base64 may hold "_" itself
    assert len(secret) >= 43  # 32 bytes in urlsafe base64
    assert generate_key().secret_key != new_key.secret_key


@pytest.mark.parametrize(
    "text", ["", "sk-abc", "lgk_", "lgk_ABCDEF012345_x", "lgk_0123456789a", "lgk_zz3456789abc_x"]
)
def test_key_id_of_rejects_keys_without_a_hex_id(text):
    assert key_id_of(text) is None
    assert not is_plausible_key(text)


def test_overlong_key_is_not_plausible():
    assert not is_plausible_key(generate_key().secret_key + "x" * 200)


def test_redact_dsn_hides_the_password_only():
    dsn = "postgresql://gate:s3cret@db.example:5432/llama"
    assert redact_dsn(dsn) == "postgresql://gate:***@db.example:5432/llama"
    assert redact_dsn("postgresql://gate@db/llama") == "postgresql://gate@db/llama"


def test_database_dsn_prefers_the_dsn_and_quotes_the_parts():
    assert database_dsn({"POSTGRES_AUTH_DSN": "postgresql://a@b/c"}) == "postgresql://a@b/c"
    assert database_dsn({}) == ""
    parts = {
        "POSTGRES_AUTH_HOST": "db",
        "POSTGRES_AUTH_PORT": 5433,
        "POSTGRES_AUTH_DB": "llama",
        "POSTGRES_AUTH_USER": "gate",
        "POSTGRES_AUTH_PASSWORD": "p@ss:w/rd",
    }
    dsn = database_dsn(parts)
    assert dsn == "postgresql://gate:p%40ss%3Aw%2Frd@db:5433/llama"
    assert "p@ss" not in redact_dsn(dsn)


# --- through the gateway, against the real database -------------------------------------


@pytest.mark.asyncio
async def test_valid_key_is_accepted_in_either_header(gateway, db, upstream):
    key = await add_user(db, "alice")
    for headers in (bearer(key), {"X-API-Key": key}):
        response = await gateway.post("/v1/chat/completions", json=chat(), headers=headers)
        assert response.status == 200, headers
    assert len(upstream.seen) == 2


REFUSALS = {
    "missing": lambda key: {},
    "unknown": lambda key: bearer(generate_key().secret_key),
    "garbage": lambda key: bearer("not-a-key"),
    "bearer-alone": lambda key: {"Authorization": "Bearer"},
    "basic": lambda key: {"Authorization": f"Basic {key}"},
    "two-headers": lambda key: {**bearer(key), "X-API-Key": key},
}


@pytest.mark.asyncio
async def test_bad_auth_header_is_refused_with_openai_401(gateway, db, upstream, subtests):
    key = await add_user(db, "alice")
    for case, make_headers in REFUSALS.items():
        with subtests.test(case):
            response = await gateway.post(
                "/v1/chat/completions", json=chat(), headers=make_headers(key)
            )
            assert_refused(response, await response.json(), key)
    assert upstream.seen == []


@pytest.mark.asyncio
async def test_key_whose_digest_differs_from_a_stored_one_in_its_last_byte_is_refused(
    gateway, db, upstream
):
    # A SHA-256 near-miss cannot be found by search, so it is made the other way round:
    # the stored row carries the presented key's id and digest, but with its last byte
    # flipped. A lookup that compared only a prefix of the digest would let this key in.
    presented = generate_key()
    near_miss = presented.digest[:-1] + bytes([presented.digest[-1] ^ 0x01])
    await db.execute("INSERT INTO users (username) VALUES ('alice')")
    await db.execute(
        "INSERT INTO api_keys (key_id, user_id, digest) "
        "SELECT $1, id, $2 FROM users WHERE username = 'alice'",
        presented.key_id,
        near_miss,
    )
    assert (await store.fetch_key(db, near_miss)).username == "alice"  # the row is there
    assert await store.fetch_key(db, presented.digest) is None
    response = await gateway.post(
        "/v1/chat/completions", json=chat(), headers=bearer(presented.secret_key)
    )
    assert_refused(response, await response.json(), presented.secret_key)
    assert upstream.seen == []


DEAD = {
    "revoked": {"key_sql": "NULL, now()"},
    "expired": {"key_sql": "now() - interval '1 second', NULL"},
    "disabled": {"is_disabled": True},
}


@pytest.mark.asyncio
async def test_dead_key_or_user_is_refused_with_openai_401(gateway, db, upstream, subtests):
    for state, user_options in DEAD.items():
        with subtests.test(state):
            key = await add_user(db, state, **user_options)
            response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
            body = await response.json()
            assert_refused(response, body, key)
            assert state in body["error"]["message"]
    assert upstream.seen == []


@pytest.mark.asyncio
async def test_key_expiring_later_is_accepted(gateway, db):
    key = await add_user(db, "alice", key_sql="now() + interval '1 hour', NULL")
    response = await gateway.get("/v1/models", headers=bearer(key))
    assert response.status == 200


async def cached_and_listening(client, key: str) -> None:
    """Wait until the gateway listens for changes, then get the key into its cache.

    Only then does the refusal below depend on the notification: without it, the cached
    verdict would keep the key working for minutes.
    """
    cache = client.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")
    response = await client.get("/v1/models", headers=bearer(key))
    assert response.status == 200
    assert digest_key(key) in cache.entries


async def refused_within(client, key: str, seconds: float) -> float:
    """Poll until the key is refused; how long that took, failing past `seconds`."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def is_refused() -> bool:
        response = await client.get("/v1/models", headers=bearer(key))
        return response.status == 401

    await wait_until(is_refused, "the key to be refused", timeout=seconds)
    return loop.time() - started


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "change",
    [
        "UPDATE api_keys SET revoked_at = now()",
        "UPDATE users SET is_disabled = true",
    ],
    ids=["revoke-key", "disable-user"],
)
async def test_revocation_is_refused_within_one_second(gateway, db, pg_dsn, change):
    key = await add_user(db, "alice")
    await cached_and_listening(gateway, key)
    conn = await asyncpg.connect(pg_dsn)  # as psql or the admin CLI would, elsewhere
    try:
        await conn.execute(change)
    finally:
        await conn.close()
    await refused_within(gateway, key, 1.0)


@pytest.mark.asyncio
async def test_revocation_reaches_every_gateway_within_one_second(start_gateway, db, pg_dsn):
    key = await add_user(db, "alice")
    other_key = await add_user(db, "bob")
    first, second = await start_gateway(), await start_gateway()
    for client in (first, second):
        await cached_and_listening(client, key)
        await cached_and_listening(client, other_key)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", key_id_of(key)
        )
    finally:
        await conn.close()
    await asyncio.gather(refused_within(first, key, 1.0), refused_within(second, key, 1.0))
    for client in (first, second):
        response = await client.get("/v1/models", headers=bearer(other_key))
        assert response.status == 200
