"""The relay-cost scenario: the gateway's own CPU time per relayed stream chunk.

The scenario-1 gateway relays `streams` (default STREAMS) streamed answers from the canned upstream
(runtime/bench/upstream.py: 256 one-token events each, paced like a model), CONCURRENT at
a time. The figure is the gateway process's CPU time (user + system, /proc/PID/stat)
over the run, divided by the content chunks the clients received: everything the
gateway does for a stream (auth, queue, request log, relaying) is charged to its chunks,
as it is in production. The clients count chunks themselves, so a gateway that dropped
or merged events could not look cheaper. The same streams then go through a bare Python
TCP pipe (runtime/bench/pipe.py), whose CPU per chunk is the floor on this machine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from runtime import proctable
from runtime.bench.errors import BenchError
from runtime.bench.report import Row
from runtime.bench.upstream import STREAM_TOKENS

CHAT_PATH = "/v1/chat/completions"
STREAMS = 32
CONCURRENT = 8
MAX_MICROSECONDS_PER_CHUNK = 60.0  # the target, from issue 12 and DESIGN.md
CONTENT_MARK = b'"content": "'
DESCRIPTION = (
    f"relay cost, streams of {STREAM_TOKENS} one-token events from the canned upstream, "
    f"{CONCURRENT} at once; gateway CPU (utime + stime, /proc/PID/stat) / chunks"
)


async def relay_one(session: aiohttp.ClientSession, url: str, key: str) -> int:
    """One streamed chat through the gateway; its content chunks, or a BenchError."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "Go."}], "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    chunks = 0
    async with session.post(url + CHAT_PATH, json=body, headers=headers) as answer:
        if answer.status != 200:
            raise BenchError(f"the relay scenario's stream got HTTP {answer.status}")
        async for line in answer.content:
            if line.startswith(b"data: [DONE]"):
                return chunks
            chunks += CONTENT_MARK in line
    raise BenchError("a stream of the relay scenario broke off before [DONE]")


async def relay_streams(url: str, key: str, streams: int, concurrent: int) -> int:
    """`streams` streams, `concurrent` at a time; the content chunks received."""
    queue = iter(range(streams))
    total = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal total
        for _ in queue:  # the clients share one iterator: `streams` streams in all
            chunks = await relay_one(session, url, key)
            total += chunks  # not `total += await ...`, which would read total before the wait

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrent)))
    return total


@dataclass(frozen=True)
class RelayRun:
    """What one relaying process spent on a run of streams."""

    chunks: int
    user_seconds: float
    system_seconds: float
    wall_seconds: float

    def microseconds_per_chunk(self, seconds: float | None = None) -> float:
        spent = self.user_seconds + self.system_seconds if seconds is None else seconds
        return spent / self.chunks * 1e6


def relay_run(url: str, key: str, pid: int, streams: int) -> RelayRun:
    """`streams` streams through `url`, after a warm-up; the CPU that process `pid` spent."""
    concurrent = min(CONCURRENT, streams)
    asyncio.run(relay_streams(url, key, concurrent, concurrent))  # warm-up
    (user_before, system_before), started = proctable.cpu_seconds(pid), time.monotonic()
    chunks = asyncio.run(relay_streams(url, key, streams, concurrent))
    user_after, system_after = proctable.cpu_seconds(pid)
    if chunks != streams * STREAM_TOKENS:
        raise BenchError(f"the relay scenario got {chunks} chunks, not {streams * STREAM_TOKENS}")
    return RelayRun(
        chunks, user_after - user_before, system_after - system_before, time.monotonic() - started
    )


def measure_relay(
    gateway_url: str, key: str, gateway_pid: int, pipe_url: str, pipe_pid: int, streams: int
) -> list[Row]:
    """The relay-cost rows for the gateway process `gateway_pid`, and the bare pipe's floor."""
    gateway = relay_run(gateway_url, key, gateway_pid, streams)
    pipe = relay_run(pipe_url, key, pipe_pid, streams)
    per_chunk = gateway.microseconds_per_chunk()
    concurrent = min(CONCURRENT, streams)
    cpu = gateway.user_seconds + gateway.system_seconds
    scenario = "6 relay cost"
    return [
        Row(scenario, f"gateway CPU per content chunk ({streams} streams, {concurrent} at once)",
            "us", None, per_chunk, None, f"<= {MAX_MICROSECONDS_PER_CHUNK:.0f} us",
            per_chunk <= MAX_MICROSECONDS_PER_CHUNK),
        Row(scenario, "of which in the kernel (stime: socket reads and writes)", "us", None,
            gateway.microseconds_per_chunk(gateway.system_seconds)),
        Row(scenario, "content chunks relayed per second", "chunk/s", None,
            gateway.chunks / gateway.wall_seconds),
        Row(scenario, "gateway CPU share while relaying", "core", None,
            cpu / gateway.wall_seconds),
        Row(scenario, "bare Python TCP pipe's CPU per content chunk (floor)", "us", None,
            pipe.microseconds_per_chunk()),
        Row(scenario, "of which in the kernel, bare pipe", "us", None,
            pipe.microseconds_per_chunk(pipe.system_seconds)),
    ]  # fmt: skip
