"""Scenarios 2 to 4, with the real backend (the fallback model) behind the stack's gateway.

Each scenario runs the same requests straight at llama_cpp.server (with its internal
key) and through the gateway (with bench users' keys), in the same run, so that the
model's speed on this machine cancels out of the comparison.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass

import aiohttp

from runtime.bench.client import StreamTiming, Target, chat, long_completion, new_session, stream
from runtime.bench.client import whole as timed
from runtime.bench.errors import BenchError
from runtime.bench.report import ADDED, RATIO, Row

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PROMPTS = (
    "Say hello.",
    "Name three colours.",
    "What is a lighthouse?",
    "Describe the sea in one sentence.",
    "Give me a tip for sleeping well.",
    "What do cats like?",
    "Write a haiku about rain.",
    "Why is the sky blue?",
)
SHORT_TOKENS = 4  # B's request, and the restart scenario's steady stream
RETRY_PAUSE_SECONDS = 0.05  # after a failed request, so a refused port does not spin
MIN_TOKENS_RATIO = 0.98
ADDED_TTFT_MS = 2.0
PASSES = 4  # over the prompts in scenario 2


async def measure_streaming(direct: Target, gateway: Target, prompts: int, tokens: int):
    """Scenario 2: tokens/s and time to first token, same prompts and seeds on both paths.

    The paths alternate request by request (direct, gateway, direct, ... then the other
    way round on the next pass), so a drift in the machine's speed weighs on both alike,
    and each path gets each prompt PASSES / 2 times. Consecutive requests never repeat a
    prompt (with 2 prompts or more), so neither path gains from llama.cpp's reuse of the
    previous prompt's evaluated prefix.
    """
    timings: dict[str, list[StreamTiming]] = {direct.name: [], gateway.name: []}
    async with new_session() as session:
        await stream(session, direct, CHAT_PATH, chat("Warm up.", 2, seed=0, stream=True))
        for turn in range(PASSES):
            for index in range(prompts):
                target = (direct, gateway)[(index + turn) % 2]
                body = chat(PROMPTS[index % len(PROMPTS)], tokens, seed=index, stream=True)
                timings[target.name].append(await stream(session, target, CHAT_PATH, body))
    rate = {name: median(t.tokens_per_second for t in runs) for name, runs in timings.items()}
    ttft = {name: median(t.first_token * 1000 for t in runs) for name, runs in timings.items()}
    ratio = rate[gateway.name] / rate[direct.name] if rate[direct.name] else 0.0
    added = ttft[gateway.name] - ttft[direct.name]
    return [
        Row("2 streaming", f"tokens/s per stream ({tokens} tokens)", "tok/s",
            rate[direct.name], rate[gateway.name], RATIO, f">= {MIN_TOKENS_RATIO}",
            ratio >= MIN_TOKENS_RATIO),
        Row("2 streaming", "time to first token (p50)", "ms", ttft[direct.name],
            ttft[gateway.name], ADDED, f"<= {ADDED_TTFT_MS:.0f} ms added",
            added <= ADDED_TTFT_MS),
    ]  # fmt: skip


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


@dataclass(frozen=True)
class Fairness:
    flood: int  # A's requests in flight
    tokens: int  # each of A's requests generates exactly this many
    probes: int  # B's requests, one at a time
    settle_seconds: float = 0.5  # for all of A's requests to reach the queue


async def measure_fairness(
    direct: Target, gateway_a: Target, gateway_b: Target, plan: Fairness
) -> list[Row]:
    """Scenario 3: B's wait behind A's flood, through the gateway and straight at the backend.

    B's wait is B's latency under the flood minus B's latency alone. "One of A's
    requests" is timed under the same flood, as the median gap between A's answers (the
    backend answers one at a time, so the gap is one request's service time), because on
    a small machine the flood itself (16 client streams, the gateway) slows the model
    down. A's request on an idle backend is shown too.
    """
    async with new_session(plan.flood + 8) as session:
        a_alone, b_alone = await alone(session, direct, plan.tokens)
        waits, a_gaps = {}, {}
        for name, a, b in (("gateway", gateway_a, gateway_b), ("direct", direct, direct)):
            latencies, a_done = await flood_and_probe(session, a, b, plan)
            waits[name] = [latency - b_alone for latency in latencies]
            gaps = [later - earlier for earlier, later in itertools.pairwise(a_done)]
            a_gaps[name] = median(gaps) if gaps else a_alone
            await b_request(session, direct, 0)  # a barrier: the backend has drained
    one_a = a_gaps["gateway"]
    return [
        Row("3 fairness", "one of A's requests, idle backend", "s", a_alone, None),
        Row("3 fairness", "one of A's requests under the flood", "s", a_gaps["direct"], one_a),
        Row("3 fairness", f"B's wait, A has {plan.flood} in flight (p50)", "s",
            median(waits["direct"]), median(waits["gateway"]), None,
            f"<= {one_a:.2f} s (one A request)", median(waits["gateway"]) <= one_a),
        Row("3 fairness", "B's wait (max)", "s", max(waits["direct"]), max(waits["gateway"])),
    ]  # fmt: skip


async def alone(session: aiohttp.ClientSession, direct: Target, tokens: int):
    """Median seconds of one A request and one B request on an idle backend.

    Each B follows an A, as under the flood: B right after B would reuse its own
    evaluated prompt (llama.cpp keeps the previous prefix) and look faster than it is.
    """
    a_times, b_times = [], []
    for seed in (1, 2, 3):
        a_times.append(await a_request(session, direct, tokens, seed))
        b_times.append(await b_request(session, direct, seed))
    return median(a_times), median(b_times)


async def a_request(session: aiohttp.ClientSession, a: Target, tokens: int, seed: int) -> float:
    return (await stream(session, a, COMPLETIONS_PATH, long_completion(tokens, seed))).total


async def b_request(session: aiohttp.ClientSession, b: Target, seed: int) -> float:
    return await timed(session, b, CHAT_PATH, chat("Say hi.", SHORT_TOKENS, seed))


async def flood_and_probe(
    session: aiohttp.ClientSession, a: Target, b: Target, plan: Fairness
) -> tuple[list[float], list[float]]:
    """Keep plan.flood of A's requests in flight while B sends plan.probes, one at a time.

    Returns B's latencies, and when each of A's requests finished while B was probing.
    """
    is_done = asyncio.Event()
    a_done: list[float] = []
    probing_since = 0.0

    async def keep_one_in_flight(slot: int) -> None:
        for seed in range(slot * 1000, slot * 1000 + 1000):
            if is_done.is_set():
                return
            await a_request(session, a, plan.tokens, seed)
            if probing_since and not is_done.is_set():
                a_done.append(time.perf_counter())

    def check(flooder: asyncio.Task) -> None:
        # A flood that quietly shrank would make B's wait look short: fail the bench.
        if not flooder.cancelled() and flooder.exception() and not is_done.is_set():
            raise BenchError(f"one of A's requests failed: {flooder.exception()}")

    flooders = [asyncio.create_task(keep_one_in_flight(slot)) for slot in range(plan.flood)]
    try:
        await asyncio.sleep(plan.settle_seconds)
        probing_since = time.perf_counter()
        latencies = [await b_request(session, b, seed) for seed in range(plan.probes)]
        for flooder in flooders:
            if flooder.done():
                check(flooder)
        return latencies, sorted(a_done)
    finally:
        # Cancelling closes A's connections: the gateway drops them from its queue and the
        # backend stops generating, so the next phase starts on an idle backend.
        is_done.set()
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)


@dataclass
class Steady:
    """One steady request stream: what it got during the restart."""

    answered: int = 0
    failed: int = 0
    longest_wait: float = 0.0  # from the first try after an answer to the next answer
    errors: set[str] | None = None


async def keep_asking(session: aiohttp.ClientSession, target: Target, is_done: asyncio.Event):
    """Send short requests one after another until is_done; count answers and failures."""
    result = Steady(errors=set())
    waiting_since = None
    seed = 0
    while not is_done.is_set():
        started = time.perf_counter()
        waiting_since = waiting_since or started
        seed += 1
        try:
            await timed(session, target, CHAT_PATH, chat("Say hi.", SHORT_TOKENS, seed))
        except (TimeoutError, aiohttp.ClientError) as error:
            result.failed += 1
            result.errors.add(getattr(error, "status", None) and f"HTTP {error.status}"
                              or type(error).__name__)  # fmt: skip
            await asyncio.sleep(RETRY_PAUSE_SECONDS)
            continue
        result.answered += 1
        result.longest_wait = max(result.longest_wait, time.perf_counter() - waiting_since)
        waiting_since = None
    return result


async def measure_restart(
    direct: Target, gateway: Target, restart: list[str], env: dict[str, str], settle: float
) -> tuple[list[Row], str]:
    """Scenario 4: a steady stream on each path while `restart` (the console) runs.

    Returns the rows and a note. The direct stream shows what clients of a bare
    llama_cpp.server would see during the same restart.
    """
    async with new_session() as session:
        is_done = asyncio.Event()
        streams = {t.name: asyncio.create_task(keep_asking(session, t, is_done))
                   for t in (direct, gateway)}  # fmt: skip
        await asyncio.sleep(settle)
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *restart, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        took = time.perf_counter() - started
        await asyncio.sleep(settle)
        is_done.set()
        got = {name: await task for name, task in streams.items()}
    if process.returncode != 0:
        tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-5:])
        raise BenchError(f"./console.sh restart failed during scenario 4: {tail}")
    d, g = got[direct.name], got[gateway.name]
    note = (
        f"scenario 4: the restart took {took:.1f}s; answered {g.answered} through the gateway "
        f"and {d.answered} direct; failures: gateway {sorted(g.errors) or 'none'}, "
        f"direct {sorted(d.errors) or 'none'}"
    )
    rows = [
        Row("4 restart", "failed requests during restart", "count", d.failed, g.failed, None,
            "0", g.failed == 0),
        Row("4 restart", "longest wait for an answer", "s", d.longest_wait, g.longest_wait),
    ]  # fmt: skip
    return rows, note
