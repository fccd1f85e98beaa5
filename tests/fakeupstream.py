"""A stand-in for llama_cpp.server, for testing the gateway's logic.

It answers the routes the gateway forwards (and the ones it must never expose), records
every request it receives, and notices when a stream is cut short by its client. With
`gate` set, every SSE chunk and every whole answer first takes one permit, so a test
decides exactly when each byte may leave.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
# llama_cpp.server 0.3's answer to /v1/embeddings when started without --embedding true.
EMBEDDINGS_OFF = {
    "message": "Llama model must be created with embedding=True to call this method",
    "type": "internal_server_error",
    "param": None,
    "code": None,
}


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: dict | None


class FakeUpstream:
    """The fake backend's state: what it saw, what it sent, and the optional gate."""

    def __init__(self, chunks: int = 3) -> None:
        self.chunks = chunks
        self.content = "tok"  # the text of each streamed chunk; make it long to stream a lot
        self.has_embeddings = True  # False: /v1/embeddings fails as llama_cpp.server's does
        self.gate: asyncio.Semaphore | None = None
        self.seen: list[Seen] = []
        self.probes = 0  # GET /openapi.json, the gateway's health probes: kept out of `seen`
        self.chunks_sent = 0
        self.cut_short = 0  # streams whose client went away before [DONE]
        # When set, a stream stays open after [DONE] until this is set (a slow end of stream).
        self.end_of_stream: asyncio.Event | None = None
        # Chat requests being answered right now, and the most at once, by the body's "user".
        self.answering: Counter[str] = Counter()
        self.peak_answering: dict[str, int] = {}

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.answer({"object": "list", "data": [{"id": "m"}]}))
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/docs", self.answer({"docs": "secret"}))
        return app

    def answer(self, payload: dict):
        async def handler(request: web.Request) -> web.Response:
            self._note(request, None)
            return web.json_response(payload)

        return handler

    async def openapi(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response({"openapi": "3.1.0"})

    async def embeddings(self, request: web.Request) -> web.Response:
        self._note(request, await request.json())
        if self.has_embeddings:
            return web.json_response({"object": "list", "data": [], "model": "m"})
        return web.json_response({"error": EMBEDDINGS_OFF}, status=500)

    def allow(self, permits: int = 1) -> None:
        """Let `permits` more chunks or answers leave (only with a gate)."""
        assert self.gate is not None
        for _ in range(permits):
            self.gate.release()

    def _note(self, request: web.Request, body: dict | None) -> None:
        self.seen.append(Seen(request.method, request.path, CIMultiDict(request.headers), body))

    async def _turn(self) -> None:
        if self.gate is not None:
            await self.gate.acquire()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._note(request, body)
        user = str(body.get("user"))
        self.answering[user] += 1
        self.peak_answering[user] = max(self.peak_answering.get(user, 0), self.answering[user])
        try:
            return await self._answer_chat(request, body)
        finally:
            self.answering[user] -= 1
            if not self.answering[user]:
                del self.answering[user]

    async def _answer_chat(self, request: web.Request, body: dict) -> web.StreamResponse:
        if not body.get("stream"):
            await self._turn()
            return web.json_response({"choices": [{"message": {"content": "hi"}}], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(self.chunks):
                await self._turn()
                event = {"choices": [{"delta": {"content": self.content}}]}
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.chunks_sent += 1
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.cut_short += 1
            raise
        if self.end_of_stream is not None:
            await self.end_of_stream.wait()
        return response
