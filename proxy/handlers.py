"""The gateway's request handlers and the middleware that logs and shapes every answer."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy import appkeys
from proxy.auth import Identity, extract_key
from proxy.errors import GatewayError, error_response, not_found
from proxy.forward import CLIENT_GONE
from proxy.inflight import run_unless_ended
from proxy.queue import QueueFull, QueueRejected
from proxy.recheck import end_in_flight, recheck_at_grant
from proxy.requestbody import GENERATION_ROUTES, rewrite_body
from proxy.requestlog import RequestRecord
from proxy.tokengate import (
    add_token_headers,
    charge_tokens,
    charge_tokens_nowait,
    enforce_token_limits,
)

log = logging.getLogger(__name__)

# Probes are not requests for the model: they would drown the log.
UNLOGGED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MODELS_CACHE_SECONDS = 60.0
EMBEDDINGS_ROUTE = "/v1/embeddings"
# What llama_cpp.server 0.3 says (in a 500) to /v1/embeddings when started without them.
EMBEDDINGS_OFF_SIGN = b"must be created with embedding=True"


@web.middleware
async def observe_request(request: web.Request, handler) -> web.StreamResponse:
    """Give each request an id and a log row, and turn every failure into an OpenAI error."""
    record = RequestRecord(
        request_id=uuid.uuid4().hex,
        created_at=datetime.now(UTC),
        method=request.method,
        path=request.path[:512],
        client_addr=request.remote,
        started=time.monotonic(),
        request_bytes=request.content_length or 0,
    )
    request[appkeys.RECORD] = record
    try:
        response = await handler(request)
        # Before a whole answer leaves, so that the next request anywhere sees the charge.
        await charge_tokens(request, record)
    except GatewayError as error:
        response = _error(record, error)
    except web.HTTPException as error:
        response = _error(record, _from_http_exception(request, error))
    except asyncio.CancelledError:
        record.status_code = CLIENT_GONE
        record.error = record.error or "client disconnected"
        charge_tokens_nowait(request, record)
        _finish(request, record)
        raise
    except Exception:
        log.exception("request %s: unexpected error", record.request_id)
        failure = GatewayError(500, "internal gateway error; see the gateway log", "server_error")
        response = _error(record, failure)
    record.status_code = record.status_code or response.status
    if isinstance(response, web.Response) and response.body is not None:
        record.response_bytes = len(response.body)
    _finish(request, record)
    return response


def _error(record: RequestRecord, error: GatewayError) -> web.Response:
    record.error = error.message
    return error_response(error)


def _from_http_exception(request: web.Request, error: web.HTTPException) -> GatewayError:
    if error.status == 404:
        return not_found(request.path)
    if error.status == 405:
        return GatewayError(405, f"{request.method} is not allowed on {request.path}")
    if error.status == 413:
        return too_large(request)
    return GatewayError(error.status, error.reason)


def too_large(request: web.Request) -> GatewayError:
    limit = request.app[appkeys.CONFIG].max_body_bytes
    return GatewayError(413, f"the request body is over the limit of {limit} bytes")


def _finish(request: web.Request, record: RequestRecord) -> None:
    if record.path in UNLOGGED_PATHS:
        return
    finished = time.monotonic()
    request.app[appkeys.REQUEST_LOG].add(record.to_row(finished))
    request.app[appkeys.METRICS].observe(
        record.path if record.status_code != 404 else "unknown",
        record.status_code,
        record.username,
        finished - record.started,
        record.prompt_tokens,
        record.completion_tokens,
    )


async def add_gateway_headers(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id and the rate-limit headers on every answer, streams included."""
    record = request.get(appkeys.RECORD)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id
    decision = request.get(appkeys.DECISION)
    if decision is not None:
        response.headers.update(decision.headers)
    add_token_headers(request, response)


async def authenticate(request: web.Request) -> Identity:
    authenticator = request.app[appkeys.AUTHENTICATOR]
    failures = request.app[appkeys.AUTH_FAILURES]
    address = request.remote or "unknown"
    retry_after = failures.retry_after(address)
    if retry_after is not None and not _carries_cached_valid_key(request):
        raise GatewayError(
            429,
            f"too many requests with a missing or invalid API key from {address}; "
            f"retry after {math.ceil(retry_after)}s",
            "rate_limit_exceeded",
            "too_many_auth_failures",
            retry_after=retry_after,
        )
    request[appkeys.AUTH_GENERATION] = authenticator.cache.generation
    try:
        identity = await authenticator.authenticate(extract_key(request.headers))
    except GatewayError as error:
        if error.status == 401:
            failures.note_failure(address)
        raise
    record = request[appkeys.RECORD]
    record.username, record.key_id = identity.username, identity.key_id
    return identity


def _carries_cached_valid_key(request: web.Request) -> bool:
    try:
        secret_key = extract_key(request.headers)
    except GatewayError:
        return False
    return request.app[appkeys.AUTHENTICATOR].is_cached_valid(secret_key)


async def enforce_rate_limit(request: web.Request, identity: Identity) -> None:
    config = request.app[appkeys.CONFIG]
    limit = identity.rate_limit or config.rate_limit
    decision = await request.app[appkeys.LIMITER].acquire(identity.username, limit)
    request[appkeys.DECISION] = decision
    if not decision.is_allowed:
        raise GatewayError(
            429,
            f"rate limit reached: {limit} requests per {config.rate_window_seconds:g} seconds; "
            f"retry after {decision.retry_after:.1f}s",
            "rate_limit_exceeded",
            "rate_limit_exceeded",
            retry_after=decision.retry_after,
        )


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the size limit and the client timeout (else 413, 408, 400)."""
    config = request.app[appkeys.CONFIG]
    if (request.content_length or 0) > config.max_body_bytes:
        raise too_large(request)
    try:
        # One deadline for the whole body, not per read: a client that sends a byte a
        # second (slowloris) must not hold its connection for ever.
        async with asyncio.timeout(config.client_timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request) from None
    except TimeoutError:
        raise GatewayError(
            408,
            f"the request body did not arrive within {config.client_timeout_seconds:g} seconds",
            code="timeout",
        ) from None
    except RequestPayloadError as error:
        # aiohttp's parser gave up on the body (e.g. a Content-Encoding that does not decode).
        reason = str(error).splitlines()[-1].strip()[:100]
        raise GatewayError(
            400, f"the request body could not be read: {reason}", code="invalid_body"
        ) from None


async def read_json_body(request: web.Request) -> bytes:
    """The body, checked to be a JSON object within the size limit; notes model and stream.

    The body returned is what the backend gets: see proxy/requestbody.py.
    """
    body = await read_body(request)
    record = request[appkeys.RECORD]
    record.request_bytes = len(body)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise GatewayError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_json")
    if isinstance(parsed.get("model"), str):
        record.model = parsed["model"][:200]
    if request.path in GENERATION_ROUTES:
        record.stream = parsed.get("stream") is True
    config = request.app[appkeys.CONFIG]
    return rewrite_body(request.path, parsed, body, config.max_tokens, config.model_name)


async def forward_json(request: web.Request) -> web.StreamResponse:
    """POST routes: auth, rate limit, body checks, then the fair queue and the backend."""
    identity = await authenticate(request)
    await enforce_rate_limit(request, identity)
    await enforce_token_limits(request, identity)
    body = await read_json_body(request)
    response = await forward_in_turn(request, identity, body)
    if request.path == EMBEDDINGS_ROUTE:
        refuse_if_embeddings_are_off(response)
    return response


def refuse_if_embeddings_are_off(response: web.StreamResponse) -> None:
    """A 400 that says how to turn embeddings on, instead of the backend's bare 500.

    The backend's own answer decides, not how the console started it: the gateway stays
    up while the backend restarts with other flags.
    """
    body = response.body if isinstance(response, web.Response) else None
    if response.status == 500 and isinstance(body, bytes) and EMBEDDINGS_OFF_SIGN in body:
        raise GatewayError(
            400,
            "this model was started without embeddings; the operator can enable them by "
            "adding --embedding true to LLAMA_EXTRA_ARGS and running ./console.sh restart",
            code="embeddings_disabled",
        )


async def forward_in_turn(
    request: web.Request, identity: Identity, body: bytes
) -> web.StreamResponse:
    record = request[appkeys.RECORD]
    route = request.match_info.route.resource.canonical
    inflight = request.app[appkeys.INFLIGHT]
    entry = request[appkeys.INFLIGHT_ENTRY] = inflight.add(identity.key_id, identity.username)
    try:
        cap = concurrency_cap(identity, request.app[appkeys.CONFIG].user_concurrency)
        async with request.app[appkeys.QUEUE].slot(identity.username, cap) as waited:
            record.queue_ms = waited * 1000
            request.app[appkeys.METRICS].queue_wait.observe(waited)
            await recheck_at_grant(request, identity, entry)
            relay = request.app[appkeys.FORWARDER].forward(request, route, body, record)
            response = await run_unless_ended(entry, relay)
            return response if response is not None else await end_in_flight(entry, record)
    except QueueRejected as rejected:
        raise GatewayError(
            rejected.status,
            f"the gateway is busy: {rejected.reason}; retry after {rejected.retry_after}s",
            "server_error" if rejected.status == 503 else "rate_limit_exceeded",
            "queue_full" if isinstance(rejected, QueueFull) else "queue_timeout",
            retry_after=rejected.retry_after,
        ) from None
    finally:
        inflight.remove(entry)


def concurrency_cap(identity: Identity, default: int) -> int:
    """How many of the user's requests may be at the backend at once (0: no cap)."""
    return default if identity.concurrency_limit is None else identity.concurrency_limit


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models, answered from a short cache without queueing; a cache miss waits in
    the queue like any request, because the backend answers it under its global lock."""
    identity = await authenticate(request)
    await enforce_rate_limit(request, identity)
    cache = request.app[appkeys.MODELS_CACHE]
    if cache and time.monotonic() - cache["at"] < MODELS_CACHE_SECONDS:
        return web.Response(body=cache["body"], content_type="application/json")
    response = await forward_in_turn(request, identity, b"")
    if isinstance(response, web.Response) and response.status == 200:
        cache.update(at=time.monotonic(), body=response.body)
    return response
