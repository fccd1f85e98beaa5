"""What the gateway itself decides on forwarded routes: the max_tokens ceiling
(proxy/tokenceiling.py), embeddings on a backend without them, and HEAD on /v1/models.
"""

from __future__ import annotations

import json

import pytest
from gatewayhelpers import add_user, bearer, chat, log_rows, wait_until

from proxy.errors import GatewayError
from proxy.requestbody import rewrite_body

pytest_plugins = ["gatewayfixture"]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
CEILING = 100


# --- the max_tokens ceiling and the model's name: pure logic ---------------------------


def rewritten(route: str, request: dict, ceiling: int = CEILING, name: str = "") -> dict:
    body = json.dumps(request).encode()
    return json.loads(rewrite_body(route, request, body, ceiling, name))


def is_untouched(route: str, request: dict, ceiling: int = CEILING, name: str = "") -> bool:
    body = json.dumps(request).encode()
    return rewrite_body(route, request, body, ceiling, name) is body


@pytest.mark.parametrize("asked", [None, 0, -1])
def test_chat_that_would_generate_without_limit_gets_the_ceiling(asked):
    request = chat() if asked is None else chat(max_tokens=asked)
    assert rewritten(CHAT, request) == {**chat(), "max_tokens": CEILING}


@pytest.mark.parametrize("asked", [None, 0])
def test_completion_with_null_or_zero_gets_the_ceiling(asked):
    request = {"prompt": "Hi", "max_tokens": asked}
    assert rewritten(COMPLETIONS, request) == {"prompt": "Hi", "max_tokens": CEILING}


def test_completion_without_max_tokens_keeps_the_backends_default_of_16():
    assert is_untouched(COMPLETIONS, {"prompt": "Hi"})


@pytest.mark.parametrize("asked", [1, CEILING])
def test_max_tokens_within_the_ceiling_passes_untouched(asked):
    assert is_untouched(CHAT, chat(max_tokens=asked))


def test_no_ceiling_passes_every_body_untouched():
    assert is_untouched(CHAT, chat(), ceiling=0)


def test_routes_that_do_not_generate_keep_their_max_tokens():
    assert is_untouched("/extras/tokenize", {"input": "hi", "max_tokens": 10**6})


def test_max_tokens_over_the_ceiling_is_refused_naming_it():
    with pytest.raises(GatewayError) as refused:
        rewritten(CHAT, chat(max_tokens=CEILING + 1))
    assert (refused.value.status, refused.value.code) == (400, "max_tokens_too_large")
    assert f"ceiling of {CEILING}" in refused.value.message
    assert "LLAMA_PROXY_MAX_TOKENS" in refused.value.message


@pytest.mark.parametrize("asked", ["100000", 5.0, True, [1]])
def test_max_tokens_that_is_not_a_whole_number_is_refused(asked):
    # The backend would read "100000" as a number, past the ceiling.
    with pytest.raises(GatewayError) as refused:
        rewritten(CHAT, chat(max_tokens=asked))
    assert (refused.value.status, refused.value.code) == (400, "invalid_max_tokens")


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_a_request_that_names_no_model_gets_the_models_name(route):
    request = {"input": "hi", "max_tokens": 5}
    assert rewritten(route, request, name="house.gguf")["model"] == "house.gguf"
    assert rewritten(route, {**request, "model": None}, name="house.gguf")["model"] == "house.gguf"


def test_a_named_model_is_kept_and_no_name_configured_changes_nothing():
    assert is_untouched(CHAT, chat(max_tokens=5), name="house.gguf")  # chat() names "m"
    assert is_untouched(EMBEDDINGS, {"input": "hi"}, name="")


def test_the_ceiling_is_appended_so_the_rest_of_the_body_is_not_re_encoded():
    body = b'{"messages": [{"role": "user", "content": "caf\\u00e9"}], "max_tokens": null}\n'
    out = rewrite_body(CHAT, json.loads(body), body, CEILING, "")
    assert out == body.strip()[:-1] + b', "max_tokens": 100}'
    assert json.loads(out)["max_tokens"] == CEILING  # the last of two keys wins, as upstream


def test_a_body_that_is_not_plain_utf8_is_re_encoded_whole():
    body = "\ufeff{}".encode()  # a byte-order mark: json.loads reads it, appending would not
    assert json.loads(rewrite_body(CHAT, {}, body, CEILING, "")) == {"max_tokens": CEILING}


# --- through the gateway -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_gateway_fills_in_the_ceiling_and_refuses_more(start_gateway, db, upstream):
    gateway = await start_gateway(max_tokens=CEILING)
    key = await add_user(db, "alice")
    served = await gateway.post(CHAT, json=chat(stream=True), headers=bearer(key))
    assert served.status == 200
    await served.read()
    assert upstream.seen[-1].body == {**chat(stream=True), "max_tokens": CEILING}
    refused = await gateway.post(CHAT, json=chat(max_tokens=CEILING + 1), headers=bearer(key))
    assert refused.status == 400
    assert (await refused.json())["error"]["code"] == "max_tokens_too_large"
    assert len(upstream.seen) == 1
    rows = await wait_until(lambda: log_rows(db, "status_code = 400"), "the 400's row")
    assert rows[0]["error"].startswith(f"max_tokens {CEILING + 1} is over")


@pytest.mark.asyncio
async def test_embeddings_on_a_backend_without_them_get_400_saying_how(gateway, db, upstream):
    upstream.has_embeddings = False
    key = await add_user(db, "alice")
    response = await gateway.post(EMBEDDINGS, json={"input": "hi"}, headers=bearer(key))
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "embeddings_disabled"
    assert "--embedding true" in error["message"] and "LLAMA_EXTRA_ARGS" in error["message"]
    rows = await wait_until(lambda: log_rows(db), "the 400's row")
    assert (rows[0]["status_code"], rows[0]["error"]) == (400, error["message"])


@pytest.mark.asyncio
async def test_embeddings_on_a_backend_with_them_are_relayed(gateway, db, upstream):
    key = await add_user(db, "alice")
    response = await gateway.post(EMBEDDINGS, json={"input": "hi"}, headers=bearer(key))
    assert response.status == 200
    assert (await response.json())["object"] == "list"


@pytest.mark.asyncio
async def test_gateway_names_the_model_in_requests_that_name_none(start_gateway, db, upstream):
    gateway = await start_gateway(model_name="house.gguf")
    key = await add_user(db, "alice")
    response = await gateway.post(EMBEDDINGS, json={"input": "hi"}, headers=bearer(key))
    assert response.status == 200
    assert upstream.seen[-1].body == {"input": "hi", "model": "house.gguf"}


@pytest.mark.asyncio
async def test_head_on_models_neither_fills_nor_empties_the_models_cache(gateway, db, upstream):
    key = await add_user(db, "alice")
    head = await gateway.head("/v1/models", headers=bearer(key))
    listed = await gateway.get("/v1/models", headers=bearer(key))
    assert listed.status == 200
    assert await listed.json() == {"object": "list", "data": [{"id": "m"}]}
    # The allowlist has GET /v1/models, and llama_cpp.server answers HEAD with 405 too.
    assert head.status == 405
    assert (await gateway.head("/v1/models", headers=bearer(key))).status == 405
    assert [(seen.method, seen.path) for seen in upstream.seen] == [("GET", "/v1/models")]
