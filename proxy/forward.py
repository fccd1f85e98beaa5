"""Forwarding one admitted request to a backend and its answer back, unbuffered.

Which backend, and what happens when one fails before answering, is proxy/dispatch.py's
business; this module relays what the backend answers.

Only the fixed route path is sent upstream (never the client's raw path or query), with
the internal backend key instead of the client's credentials. Server-sent events are
written through chunk by chunk as they arrive. If the client goes away mid-stream the
upstream response is closed, which makes llama_cpp.server stop generating. So it is if
the client stops reading, or the answer runs past its time cap (proxy/deadlines.py).

A request that asks for a stream gets its answer over a connection of its own, relayed
in the socket's callbacks (proxy/rawupstream.py, proxy/rawrelay.py); any other request
goes over a pooled keep-alive connection (proxy/rawpool.py), and its answer is read
whole (or, should it be an event stream after all, relayed the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web

from proxy.chattemplate import ChatTemplate
from proxy.deadlines import (
    TOO_LONG_CODE,
    ClientTooSlow,
    Deadlines,
    drop_client,
    finish_within,
    within_cap,
    write_within,
)
from proxy.dispatch import Dispatcher
from proxy.errors import GatewayError, bad_gateway, error_body
from proxy.pool import Backend
from proxy.promptcount import PromptCounter, wants_usage
from proxy.rawrelay import StreamRelay
from proxy.rawupstream import RawAnswer, UpstreamError
from proxy.relay import ClientWriter
from proxy.requestlog import RequestRecord
from proxy.usage import UsageCounter

log = logging.getLogger(__name__)

JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/extras/tokenize",
    "/extras/tokenize/count",
    "/extras/detokenize",
)
MODELS_ROUTE = "/v1/models"
CLIENT_GONE = 499
# A relayed answer that ended with these, and not over the request cap, was the backend's fault.
BACKEND_FAILED_STATUSES = (502, 504)


class Forwarder:
    """Sends each request to a backend the dispatcher finds, and relays its answer."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        backend_key: str,
        deadlines: Deadlines | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.backend_key = backend_key
        self.deadlines = deadlines or Deadlines()
        self.prompt_counter = PromptCounter(dispatcher.session, backend_key, chat_template)

    async def forward(
        self, request: web.Request, route: str, body: bytes, record: RequestRecord
    ) -> web.StreamResponse:
        """Send the request upstream and relay the answer; the record gets the outcome."""
        # The Authorization header is the backend's own: the dispatcher adds it.
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": record.request_id,
            # Bytes are relayed as they come; a compressed answer would need its header too.
            "Accept-Encoding": "identity",
        }
        deadline = asyncio.get_running_loop().time() + self.deadlines.request_max_seconds
        async with within_cap(deadline, self.deadlines):
            lease, upstream = await self.dispatcher.send(
                request.method, route, body, headers, is_stream=record.stream
            )
        is_failed = True
        try:
            async with upstream:
                content_type = upstream.headers.get("Content-Type", "application/json")
                if content_type.startswith("text/event-stream"):
                    response = await self._relay_stream(
                        request, upstream, content_type, record, deadline, route, body,
                        lease.backend,
                    )  # fmt: skip
                else:
                    async with within_cap(deadline, self.deadlines):
                        response = await self._relay_whole(upstream, content_type, record)
            is_failed = self._is_backend_failure(record)
            return response
        except GatewayError as error:
            is_failed = error.status == 502  # the backend broke off a whole answer
            raise
        except BaseException:
            is_failed = False  # the client went, or the request ran over its cap
            raise
        finally:
            self.dispatcher.pool.release(lease, is_failed)

    def _is_backend_failure(self, record: RequestRecord) -> bool:
        return (
            record.status_code in BACKEND_FAILED_STATUSES
            and record.error != self.deadlines.too_long_message()
        )

    async def _relay_whole(
        self, upstream: RawAnswer, content_type: str, record: RequestRecord
    ) -> web.Response:
        try:
            async with asyncio.timeout(self.dispatcher.session.timeout.sock_read):
                data = await upstream.read()
        except (UpstreamError, TimeoutError) as error:
            raise bad_gateway(f"the model backend broke off its answer ({error!r})") from None
        if content_type.startswith("application/json"):
            counter = UsageCounter()
            counter.feed_json(data)
            record.prompt_tokens = counter.prompt_tokens
            record.completion_tokens = counter.completion_tokens
        record.response_bytes = len(data)
        return web.Response(
            status=upstream.status, body=data, headers={"Content-Type": content_type}
        )

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: RawAnswer,
        content_type: str,
        record: RequestRecord,
        deadline: float,
        route: str,
        body: bytes,
        backend: Backend,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            headers={
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        await response.prepare(request)
        counter = UsageCounter()
        asked = _parsed(body) if upstream.status == 200 else None

        async def before_done() -> bytes:
            """Count the prompt (the slot is still ours); the usage event, if asked for."""
            # Only a local replica is asked: a shared member may be another server, with
            # another key, and need not have llama_cpp.server's tokenize route.
            if asked is not None and counter.prompt_tokens is None and backend.member_id is None:
                counter.prompt_tokens = await self.prompt_counter.count(backend.url, route, asked)
            counter.finish_stream()
            if asked is None or counter.has_usage or not wants_usage(asked):
                return b""
            return counter.usage_event()

        cap = asyncio.timeout_at(deadline)
        write_seconds = self.deadlines.client_write_seconds
        silence_seconds = self.dispatcher.session.timeout.sock_read
        try:
            async with cap:
                client = ClientWriter(response, request.transport, write_seconds)
                relay = StreamRelay(upstream, client, record, counter, before_done, silence_seconds)
                await relay.run()
        except ClientTooSlow as slow:
            # Leaving the `async with upstream` closes the upstream, so generation stops.
            self._drop_slow_client(request, record, slow)
            return response
        except ConnectionResetError:
            # The client went away: leaving the `async with` closes the upstream too.
            record.status_code = CLIENT_GONE
            record.error = "client disconnected mid-stream"
            return response
        except (aiohttp.ClientError, UpstreamError, TimeoutError) as error:
            await self._end_with_error(response, record, error, is_over_cap=cap.expired())
        finally:
            counter.finish_stream()
            record.prompt_tokens = counter.prompt_tokens
            record.completion_tokens = counter.completion_tokens
        try:
            await finish_within(response, write_seconds)
        except ConnectionResetError:
            pass  # the client may already have hung up after [DONE]
        except ClientTooSlow as slow:
            self._drop_slow_client(request, record, slow)
        return response

    async def _end_with_error(
        self,
        response: web.StreamResponse,
        record: RequestRecord,
        error: Exception,
        is_over_cap: bool,
    ) -> None:
        """Log a stream that ended badly as not served, and tell the client in the stream."""
        code = "backend_failed"
        if is_over_cap:
            record.status_code, record.error = 504, self.deadlines.too_long_message()
            code = TOO_LONG_CODE
        else:
            record.status_code = 504 if isinstance(error, TimeoutError) else 502
            detail = f": {error}" if isinstance(error, UpstreamError) else ""
            record.error = f"the backend broke off the stream ({type(error).__name__}{detail})"
        log.warning("request %s: %s", record.request_id, record.error)
        # The status line has long been sent, so the error goes into the stream itself.
        event = b"data: " + error_body(record.error, "server_error", code)
        with contextlib.suppress(ConnectionResetError, ClientTooSlow):
            await write_within(response, event + b"\n\n", self.deadlines.client_write_seconds)

    @staticmethod
    def _drop_slow_client(request: web.Request, record: RequestRecord, slow: ClientTooSlow) -> None:
        record.status_code, record.error = CLIENT_GONE, str(slow)
        log.info("request %s: %s", record.request_id, record.error)
        drop_client(request)


def _parsed(body: bytes) -> dict | None:
    """The request body as a JSON object (the handler has checked it is one), else None."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
