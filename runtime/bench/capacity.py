"""Scenario 7, capacity: what replicas buy, with the real model, through the gateway.

USERS users each keep one 128-token generation in flight (a new one as soon as the last
ends) for a fixed time, against three setups of the same stack, one after another:
1 replica with 1 thread, 1 replica with every core's threads (the honest baseline: what a
single process gets out of the machine), and 2 replicas with 1 thread each. The figures
are the aggregate tokens/s the users received and the queue wait the gateway itself
measured for each request (`queue_ms` in llama_requests), p50 and p95.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from runtime.bench.client import Target, long_completion, new_session, stream
from runtime.bench.errors import BenchError
from runtime.bench.report import RATIO, Row

COMPLETIONS_PATH = "/v1/completions"
USERS = 8
MIN_TOKENS_RATIO = 1.7
MAX_P95_WAIT_RATIO = 0.6
LOG_FLUSH_SECONDS = 30  # the request log writes in batches, off the request path


@dataclass(frozen=True)
class Setup:
    """One way to run the stack: replicas and threads per replica."""

    label: str
    replicas: int
    threads: int


@dataclass(frozen=True)
class Capacity:
    """What one setup gave: tokens/s over the run, queue waits in seconds."""

    tokens_per_second: float
    requests: int
    p50_wait: float
    p95_wait: float


async def keep_generating(targets: list[Target], tokens: int, seconds: float) -> tuple[int, int]:
    """Each target (a user) keeps one generation in flight until `seconds` have passed.

    Returns (tokens received, requests answered). Requests started before the end run to
    their end, and the caller's clock includes them.
    """
    deadline = time.perf_counter() + seconds

    async def one_user(session, target: Target, slot: int) -> tuple[int, int]:
        received = answered = 0
        while time.perf_counter() < deadline:
            body = long_completion(tokens, seed=slot * 10_000 + answered)
            timing = await stream(session, target, COMPLETIONS_PATH, body)
            received, answered = received + timing.tokens, answered + 1
        return received, answered

    async with new_session(len(targets) + 4) as session:
        results = await asyncio.gather(
            *(one_user(session, target, slot) for slot, target in enumerate(targets))
        )
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def warm_up(targets: list[Target]) -> None:
    """One short request per target at once, so one on each of 2 replicas: a replica's
    first request pays for its warm-up (cold pages of the model, the first prompt)."""
    async with new_session(len(targets)) as session:
        await asyncio.gather(
            *(
                stream(session, target, COMPLETIONS_PATH, long_completion(4, seed=slot))
                for slot, target in enumerate(targets)
            )
        )


async def queue_waits(dsn: str, since: datetime.datetime, expected: int) -> list[float]:
    """The gateway's queue_ms of the capacity users' rows since `since`, in seconds, once all
    `expected` rows are written."""
    connection = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + LOG_FLUSH_SECONDS
        while True:
            rows = await connection.fetch(
                "SELECT queue_ms FROM llama_requests WHERE username LIKE 'capacity-%' "
                "AND created_at >= $1 AND status_code = 200",
                since,
            )
            if len(rows) >= expected:
                return sorted((row["queue_ms"] or 0.0) / 1000 for row in rows)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the request log has {len(rows)} of the capacity scenario's {expected} "
                    f"rows after {LOG_FLUSH_SECONDS}s"
                )
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted values."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, round(share * len(values)) - 1))]


async def measure_one(targets: list[Target], dsn: str, tokens: int, seconds: float) -> Capacity:
    await warm_up(targets[:2])
    since = datetime.datetime.now(datetime.UTC)
    started = time.perf_counter()
    received, answered = await keep_generating(targets, tokens, seconds)
    took = time.perf_counter() - started
    waits = await queue_waits(dsn, since, answered)
    return Capacity(received / took, answered, percentile(waits, 0.5), percentile(waits, 0.95))


def measure_capacity(
    setups: list[Setup],
    reconfigure: Callable[[Setup], None],
    targets: list[Target],
    dsn: str,
    tokens: int,
    seconds: float,
) -> tuple[list[Row], dict[str, Capacity]]:
    """Run every setup in turn (`reconfigure` puts the stack into it); the rows, and each
    setup's figures by label."""
    figures: dict[str, Capacity] = {}
    for setup in setups:
        reconfigure(setup)
        figures[setup.label] = asyncio.run(measure_one(targets, dsn, tokens, seconds))
    return capacity_rows(setups, figures), figures


def setups_for(cores: int) -> list[Setup]:
    """The three setups, in the order they run: the stack as started (1 replica, its default
    threads: every core), then 1 thread, then a second replica (a restart each)."""
    return [
        Setup(f"1 replica x {cores} threads", 1, cores),
        Setup("1 replica x 1 thread", 1, 1),
        Setup("2 replicas x 1 thread", 2, 1),
    ]


def capacity_rows(setups: list[Setup], figures: dict[str, Capacity]) -> list[Row]:
    """1 replica x 1 thread is the baseline ("direct" column) of 2 replicas x 1 thread; the
    all-cores replica is shown on its own."""
    all_cores, one, two = setups
    base, pool, whole = figures[one.label], figures[two.label], figures[all_cores.label]
    name = "7 capacity"
    versus = f"{one.label} -> {two.label}"
    return [
        Row(name, f"tokens/s, {versus}", "tok/s", base.tokens_per_second,
            pool.tokens_per_second, RATIO, f">= {MIN_TOKENS_RATIO}x",
            pool.tokens_per_second >= MIN_TOKENS_RATIO * base.tokens_per_second),
        Row(name, f"queue wait p50, {versus}", "s", base.p50_wait, pool.p50_wait, RATIO),
        Row(name, f"queue wait p95, {versus}", "s", base.p95_wait, pool.p95_wait, RATIO,
            f"<= {MAX_P95_WAIT_RATIO}x", pool.p95_wait <= MAX_P95_WAIT_RATIO * base.p95_wait),
        Row(name, f"tokens/s, {all_cores.label}", "tok/s", None, whole.tokens_per_second),
        Row(name, f"queue wait p50, {all_cores.label}", "s", None, whole.p50_wait),
        Row(name, f"queue wait p95, {all_cores.label}", "s", None, whole.p95_wait),
    ]  # fmt: skip
