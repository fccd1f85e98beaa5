"""The bench's own HTTP client for the model scenarios (2 to 4), on aiohttp.

Those scenarios are bound by the model (tens of tokens per second), not by the client,
so an asyncio client in the bench process is accurate enough there; scenario 1, which is
bound by the gateway itself, uses wrk instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from runtime.bench.errors import BenchError

# SmolLM2's end-of-text and end-of-turn tokens. Banning them makes a "long" request
# generate exactly max_tokens, so every one of A's requests costs the same.
NO_EOS = {"0": -100.0, "2": -100.0}


@dataclass(frozen=True)
class Target:
    """One way in: straight at the backend (its internal key) or through the gateway."""

    name: str  # "direct" or "gateway"
    url: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}


@dataclass(frozen=True)
class StreamTiming:
    """One streamed completion, seconds from sending the request."""

    first_token: float
    total: float
    tokens: int  # chunks that carried text: one token each with llama_cpp.server

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total if self.total else 0.0


def chat(prompt: str, max_tokens: int, seed: int, stream: bool = False) -> dict:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 0.7,
        "stream": stream,
    }


def long_completion(max_tokens: int, seed: int) -> dict:
    """A's request: a streamed completion of exactly max_tokens tokens."""
    return {
        "model": "bench",
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": max_tokens,
        "seed": seed,
        "logit_bias": NO_EOS,
        "stream": True,
    }


async def stream(session: aiohttp.ClientSession, target: Target, path: str, body: dict):
    """Send a streamed request and time it.

    A BenchError if the answer is not a whole stream (a status other than 200, or no
    [DONE]): timing a broken stream would report nonsense as a figure.
    """
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    is_complete = False
    async with session.post(target.url + path, json=body, headers=target.headers) as answer:
        if answer.status != 200:
            text = (await answer.text())[:200]
            raise BenchError(f"{target.name} answered HTTP {answer.status} to {path}: {text}")
        async for line in answer.content:
            if line.startswith(b"data: [DONE]"):
                is_complete = True
                break
            if line.startswith(b"data: ") and _has_text(json.loads(line[6:])):
                tokens += 1
                first = first or time.perf_counter() - started
    if not is_complete or not tokens:
        raise BenchError(f"a stream from the {target.name} path to {path} broke off")
    return StreamTiming(first, time.perf_counter() - started, tokens)


def _has_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or []:
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text:
            return True
    return False


async def whole(session: aiohttp.ClientSession, target: Target, path: str, body: dict) -> float:
    """Send a request and read the whole answer; its latency in seconds, or raise."""
    started = time.perf_counter()
    async with session.post(target.url + path, json=body, headers=target.headers) as answer:
        await answer.read()
        if answer.status != 200:
            raise aiohttp.ClientResponseError(
                answer.request_info, (), status=answer.status, message=f"HTTP {answer.status}"
            )
    return time.perf_counter() - started


def new_session(connections: int = 64) -> aiohttp.ClientSession:
    """A session with room for every concurrent request, and no total timeout."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
    )
