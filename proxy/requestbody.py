"""What the gateway changes in a request body before the backend sees it.

**The max_tokens ceiling,** so that no one completion holds the backend for ever.
llama_cpp.server 0.3 reads a null, zero or negative `max_tokens` as "until the context is
full", and so a missing one in a chat request (a text completion defaults to 16). So the
gateway fills in the ceiling (LLAMA_PROXY_MAX_TOKENS) wherever the backend would generate
without limit, and refuses a request that asks for more with a 400 that names the
ceiling. Refusing, not clamping: an answer silently cut at the ceiling would look like a
model that stopped early, where the error tells the client what to change.

**The model's name.** A request that names no model is answered with the model's
absolute path in `model`; the gateway names it (LLAMA_PROXY_MODEL_NAME, the alias).

The body is changed only when one of these applies, and then only at its end.
"""

from __future__ import annotations

import json

from proxy.errors import GatewayError

CHAT_ROUTE = "/v1/chat/completions"
GENERATION_ROUTES = frozenset({CHAT_ROUTE, "/v1/completions"})
# Routes whose answers carry the `model` the request named, or else the model's path.
NAMED_ROUTES = GENERATION_ROUTES | {"/v1/embeddings"}
# Routes on which llama_cpp.server generates without limit when max_tokens is left out.
UNLIMITED_WHEN_ABSENT = frozenset({CHAT_ROUTE})


def is_whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ceiling_to_fill_in(route: str, parsed: dict, ceiling: int) -> int | None:
    """The max_tokens to send instead of the client's, or None to keep it; raises 400.

    `parsed` is the request body (a JSON object); a ceiling of 0 means none.
    """
    if ceiling == 0 or route not in GENERATION_ROUTES:
        return None
    if "max_tokens" not in parsed and route not in UNLIMITED_WHEN_ABSENT:
        return None
    asked = parsed.get("max_tokens")
    if asked is None or (is_whole_number(asked) and asked <= 0):
        return ceiling
    if not is_whole_number(asked):
        # The backend would coerce "100000" to a number, past the ceiling.
        raise GatewayError(
            400,
            f"max_tokens must be a whole number (got {json.dumps(asked)[:40]})",
            code="invalid_max_tokens",
        )
    if asked > ceiling:
        raise GatewayError(
            400,
            f"max_tokens {asked} is over this gateway's ceiling of {ceiling} "
            f"(LLAMA_PROXY_MAX_TOKENS); ask for {ceiling} or fewer",
            code="max_tokens_too_large",
        )
    return None


def rewrite_body(route: str, parsed: dict, body: bytes, ceiling: int, model_name: str) -> bytes:
    """The body to send upstream: as it came, or with max_tokens and model filled in."""
    changes: dict[str, object] = {}
    max_tokens = ceiling_to_fill_in(route, parsed, ceiling)
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    if model_name and route in NAMED_ROUTES and parsed.get("model") is None:
        changes["model"] = model_name
    if not changes:
        return body
    return with_members_appended(body, parsed, changes)


def with_members_appended(body: bytes, parsed: dict, changes: dict[str, object]) -> bytes:
    """`body` with `changes` added as its last members, without re-encoding the rest.

    A duplicate key is harmless: llama_cpp.server (json.loads) keeps the last one. A
    body that does not start and end as a plain UTF-8 object (a BOM, UTF-16) is
    re-encoded whole instead.
    """
    stripped = body.strip()
    if not (stripped.startswith(b"{") and stripped.endswith(b"}")):
        return json.dumps({**parsed, **changes}).encode()
    members = json.dumps(changes).encode()[1:-1]
    return stripped[:-1] + (b", " if parsed else b"") + members + b"}"
