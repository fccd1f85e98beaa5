"""Hostile input: fuzzed API keys, bodies and routes each get a 4xx (never a 500, never a
hang), and the gateway serves on.

Requests aiohttp's client will not send are written as raw bytes (tests/rawhttp.py); the
fixtures are in hostilefixture.py. Clients that misbehave on the wire (ambiguous framing,
slow or vanishing clients) are in test_hostile_clients.py. Behaviour already covered
elsewhere is not repeated here: the route allowlist and traversal paths, 405s, over-limit
bodies with and without Content-Length and non-JSON bodies are in test_gateway_forward.py;
malformed auth headers one by one are in test_gateway_auth.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from gatewayhelpers import DEADLINE, bearer, chat, log_rows, wait_until
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from rawhttp import connect, exchange, read_answer, request_bytes

from proxy.forward import JSON_ROUTES, MODELS_ROUTE
from proxy.keys import key_id_of

pytest_plugins = ["gatewayfixture", "hostilefixture"]
pytestmark = pytest.mark.usefixtures("no_error_is_logged")

CHAT = "/v1/chat/completions"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# --- API keys, fuzzed --------------------------------------------------------------------

KEY_MARK = "\x01KEY\x01"  # stands for alice's real key; generated text has no control bytes
ID_MARK = "\x01ID\x01"  # stands for its public key id
AUTH_NAMES = st.sampled_from(["Authorization", "authorization", "X-API-Key", "x-api-key"])
HEADER_TEXT = st.text(  # any printable text, non-ASCII included; sent as UTF-8
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40
)
URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
JUNK_AUTH_VALUES = st.one_of(
    st.sampled_from(["", "Bearer", "Bearer ", "bearer \t", "Basic", "Token x", "Bearer a b"]),
    HEADER_TEXT,
    HEADER_TEXT.map("Bearer {}".format),
    st.integers(300, 8000).map(lambda n: "Bearer " + "k" * n),  # huge, within aiohttp's limit
    # The right prefix and key id, a wrong secret.
    st.text(URLSAFE, min_size=1, max_size=60).map(f"Bearer lgk_{ID_MARK}_{{}}".format),
    st.text("0123456789abcdef", min_size=12, max_size=12).map("lgk_{}_secret".format),
)
KEY_AUTH_VALUES = st.sampled_from(
    [KEY_MARK, f"Bearer {KEY_MARK}", f"Basic {KEY_MARK}", f"{KEY_MARK}x", f"Bearer {KEY_MARK}!"]
)
# Half of the values hold the real key, well or badly presented.
AUTH_VALUES = st.booleans().flatmap(
    lambda has_key: KEY_AUTH_VALUES if has_key else JUNK_AUTH_VALUES
)
AUTH_HEADERS = st.lists(st.tuples(AUTH_NAMES, AUTH_VALUES), max_size=3)


def is_the_one_valid_key(headers: list[tuple[str, str]]) -> bool:
    """Only alice's key, alone, in the right header and form, lets a request in."""
    if len(headers) != 1:
        return False
    name, value = headers[0]
    wanted = KEY_MARK if name.lower() == "x-api-key" else f"Bearer {KEY_MARK}"
    return value == wanted


@pytest.mark.asyncio
@FUZZ
@given(headers=AUTH_HEADERS)
async def test_fuzzed_api_key_headers_get_openai_401_unless_exactly_one_valid_key(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, headers
):
    key_id = key_id_of(alice_key)
    sent = [
        (name, value.replace(KEY_MARK, alice_key).replace(ID_MARK, key_id))
        for name, value in headers
    ]
    before = chats_seen(upstream)
    answer = await exchange(
        hostile_gateway, request_bytes("POST", CHAT, sent, json.dumps(chat()).encode())
    )
    event("one valid key" if is_the_one_valid_key(headers) else "refused")
    if is_the_one_valid_key(headers):
        assert answer.status == 200
        assert chats_seen(upstream) == before + 1
    else:
        assert answer.status == 401, answer
        assert answer.error()["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
        assert alice_key not in answer.body.decode()
        assert chats_seen(upstream) == before
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "header",
    [
        "Authorization: Bearer " + "k" * 9000,  # over aiohttp's 8190-byte field limit
        "Authorization: Bearer lgk_\x00\x7f",  # control bytes
        "X-API-Key: lgk_ab\rcd",  # a lone CR
    ],
    ids=["over-the-field-limit", "control-bytes", "lone-cr"],
)
async def test_header_the_http_parser_refuses_gets_400_and_reaches_nobody(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, header
):
    # aiohttp's parser answers these itself, in plain text, before any middleware runs.
    data = request_bytes("POST", CHAT, [tuple(header.split(": ", 1))], b"{}")
    answer = await exchange(hostile_gateway, data)
    assert answer.status == 400
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


# --- bodies ------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def expected_status(body: bytes) -> int:
    """What the gateway owes a body: 200 (forwarded) for a JSON object, else 400."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return 400
    return 200 if isinstance(parsed, dict) else 400


def is_utf8_json(body: bytes) -> bool:
    try:
        json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | HEADER_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HEADER_TEXT, inner, max_size=4),
    max_leaves=20,
)
# Depths far from Python's recursion limit, so the test and the gateway agree on them.
BODIES = st.one_of(
    st.binary(max_size=300),
    HEADER_TEXT.map(str.encode),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 100).map(nested),
    st.integers(5_000, 12_000).map(nested),
    st.integers(5_000, 50_000).map(lambda depth: b"[" * depth),
)


@pytest.mark.asyncio
@FUZZ
@given(body=BODIES)
async def test_fuzzed_bodies_are_forwarded_only_as_json_objects_else_400(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, body
):
    # JSON in UTF-16 or behind a BOM is JSON to the gateway and llama_cpp.server, not to
    # the fake upstream, which would answer 500.
    assume(expected_status(body) == 400 or is_utf8_json(body))
    before = chats_seen(upstream)
    response = await hostile_gateway.post(
        CHAT, data=body, headers={**bearer(alice_key), "Content-Type": "application/json"}
    )
    event(f"expect {expected_status(body)}")
    if expected_status(body) == 200:
        assert response.status == 200
        assert chats_seen(upstream) == before + 1
    else:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
        assert chats_seen(upstream) == before
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body", [b"[" * 50_000, nested(10_000)], ids=["unclosed-arrays", "nested-objects"]
)
async def test_deeply_nested_json_gets_400_not_500(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, body
):
    response = await hostile_gateway.post(
        CHAT, data=body, headers={**bearer(alice_key), "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


GZIP_BOMB = gzip.compress(b'{"model": "' + b"x" * 2_000_000 + b'"}')  # 2 KB; 2 MB inflated


OVER_THE_LIMIT = {
    # Announced, never sent: the 413 must not wait for the body.
    "declared": ([("Content-Length", str(10**9))], b""),
    # Chunks past the limit (100 KB here) from a client that never ends its body.
    "endless-chunks": (
        [("Transfer-Encoding", "chunked")],
        (b"4000\r\n" + b" " * 0x4000 + b"\r\n") * 7,
    ),
    "gzip-bomb": (
        [("Content-Encoding", "gzip"), ("Content-Length", str(len(GZIP_BOMB)))],
        GZIP_BOMB,
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", OVER_THE_LIMIT)
async def test_body_over_the_limit_gets_413_before_the_client_finishes(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, case
):
    framing, body = OVER_THE_LIMIT[case]
    headers = [("Authorization", f"Bearer {alice_key}"), *framing]
    data = request_bytes("POST", CHAT, headers, body, framing="none")
    reader, writer = await connect(hostile_gateway)
    writer.write(data)  # and the connection stays open: the client has "more" to send
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    writer.close()
    assert answer.status == 413
    answer.error()
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


@pytest.mark.asyncio
async def test_keyless_request_announcing_a_huge_body_gets_401_not_413(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen
):
    # Who asks is settled before anything about the body: a caller without a key learns
    # nothing about the limits, and no body is read for them.
    headers = [("Content-Length", str(10**9))]
    reader, writer = await connect(hostile_gateway)
    writer.write(request_bytes("POST", CHAT, headers, framing="none"))  # no body follows
    answer = await asyncio.wait_for(read_answer(reader), DEADLINE)
    writer.close()
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.error()["code"] == "invalid_api_key"
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


NOT_GZIP = {
    "length": ([("Content-Length", "9")], b"not gzip!"),
    "chunked": ([("Transfer-Encoding", "chunked")], b"9\r\nnot gzip!\r\n0\r\n\r\n"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", NOT_GZIP)
async def test_body_whose_content_encoding_does_not_decode_gets_400_not_500(
    hostile_gateway, alice_key, upstream, assert_serves, chats_seen, framing
):
    framing_headers, body = NOT_GZIP[framing]
    headers = [
        ("Authorization", f"Bearer {alice_key}"),
        ("Content-Encoding", "gzip"),
        *framing_headers,
    ]
    answer = await exchange(
        hostile_gateway, request_bytes("POST", CHAT, headers, body, framing="none")
    )
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_body"
    assert chats_seen(upstream) == 0
    await assert_serves(hostile_gateway, alice_key)


# --- routes, fuzzed ----------------------------------------------------------------------

SEGMENTS = ["v1", "models", "chat", "completions", "extras", "tokenize", "docs"]
SEGMENTS += ["openapi.json", "..", ".", "%2e%2e", "%2E%2e", "%2f", "%5c", "\\", "", "%00"]
TARGETS = st.lists(st.sampled_from(SEGMENTS), max_size=6).map("/".join).map("/{}".format)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
FORWARDED = frozenset(JSON_ROUTES) | {MODELS_ROUTE}


@pytest.mark.asyncio
@FUZZ
@given(method=METHODS, target=TARGETS | TARGETS.map("http://backend{}".format))
async def test_fuzzed_paths_reach_the_backend_only_on_listed_routes(
    hostile_gateway, alice_key, upstream, method, target
):
    headers = [("Authorization", f"Bearer {alice_key}")]
    answer = await exchange(hostile_gateway, request_bytes(method, target, headers, b"{}"))
    event(str(answer.status))
    assert answer.status in (200, 400, 404, 405), answer
    if answer.status in (404, 405):
        answer.error()
    assert {seen.path for seen in upstream.seen} <= FORWARDED
    assert "/docs" not in {seen.path for seen in upstream.seen}


@pytest.mark.asyncio
async def test_nul_or_lone_surrogate_from_a_client_costs_no_one_their_log_row(
    hostile_gateway, alice_key, db
):
    # PostgreSQL refuses both in text; one such row used to sink its whole batch.
    responses = [
        await hostile_gateway.get("/v1/%00", headers=bearer(alice_key)),
        await hostile_gateway.post(
            CHAT, data=b'{"model": "\\ud800\\u0000"}', headers=bearer(alice_key)
        ),
        await hostile_gateway.post(CHAT, json=chat(), headers=bearer(alice_key)),
    ]
    assert [response.status for response in responses] == [404, 200, 200]
    ids = [response.headers["X-Request-Id"] for response in responses]

    async def all_three_rows():
        rows = await log_rows(db, "request_id = ANY($1::text[])", ids)
        return rows if len(rows) == 3 else None

    rows = await wait_until(all_three_rows, "all three log rows")
    # By id, not in order: the anonymous 404 is held a second for folding (refusals.py).
    by_id = {row["request_id"]: row for row in rows}
    assert set(by_id) == set(ids)
    assert by_id[ids[0]]["path"] == "/v1/\\x00"
    assert by_id[ids[1]]["model"] == "\\ud800\\x00"
