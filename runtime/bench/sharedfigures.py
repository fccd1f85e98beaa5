"""Scenario 9's figures: throughput through one or two gateways sharing two members, and
what taking and giving back a shared slot adds to one request.

Two canned backends (runtime/bench/upstream.py --service-seconds) each answer one request
at a time in SERVICE_SECONDS and count the requests that reach them while another is in
flight. Registered as shared members of concurrency 1, they can serve at most
2 / SERVICE_SECONDS requests/s, whichever gateway sends them. Run A sends every client's
requests through one gateway, run B splits the same clients between two gateways on the
same database: B should keep within MIN_SHARE of A, with no request ever overlapping
another on a member (each gateway must hold a member's slot row to send it anything).

The added latency compares one client's requests, alternating one by one, through a
gateway whose fast canned upstream is a local replica and through one where the same
upstream is a shared member: the difference is the slot's two database round trips.
Alternating request by request puts both paths under the same load at the same moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from runtime.bench.capacity import percentile
from runtime.bench.client import Target, chat, new_session, whole
from runtime.bench.report import ADDED, RATIO, Row

SCENARIO = "9 two gateways"
CHAT_PATH = "/v1/chat/completions"
SERVICE_SECONDS = 0.2
MEMBERS = 2
CLIENTS_PER_MEMBER = 2  # a request always waits for each member as the last one ends
MIN_SHARE = 0.9
MAX_ADDED_MS = 1.0
WARMUP_REQUESTS = 20  # per path: keys checked in PostgreSQL, connections opened
FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Throughput:
    """One run: requests/s answered, and how many answered and failed."""

    rate: float
    answered: int
    failed: int


@dataclass(frozen=True)
class Overlaps:
    """One member's own count over one run (GET /bench/overlaps of the canned upstream)."""

    requests: int
    overlapping: int  # requests that reached it while another was in flight there
    most_in_flight: int

    @classmethod
    def from_json(cls, figures: dict) -> Overlaps:
        return cls(figures["requests"], figures["overlapping"], figures["most_in_flight"])


@dataclass(frozen=True)
class Latencies:
    """One client's requests, alternating between the two paths; milliseconds."""

    local_ms: list[float]
    shared_ms: list[float]
    failed: int


@dataclass(frozen=True)
class TwoGatewayFigures:
    one: Throughput  # run A
    two: Throughput  # run B
    overlaps_one: list[Overlaps]  # per member, run A
    overlaps_two: list[Overlaps]  # per member, run B
    latencies: Latencies


async def throughput(targets: Sequence[Target], clients: int, seconds: float) -> Throughput:
    """`clients` clients, dealt round-robin over `targets`, each sending one request after
    another for `seconds`; a failed request is counted, and the client goes on.

    Only answers that arrived within the `seconds` count, over exactly that time: the
    requests still queued at the end (up to a member's round of 200 ms each) run to their
    end but would otherwise add a tail of idle members to a short run.
    """
    deadline = time.perf_counter() + seconds

    async def one_client(session: aiohttp.ClientSession, slot: int) -> tuple[int, int]:
        target = targets[slot % len(targets)]
        answered = failed = 0
        while time.perf_counter() < deadline:
            try:
                await whole(session, target, CHAT_PATH, chat("Hi.", 4, slot))
            except FAILURES:
                failed += 1
                continue
            answered += time.perf_counter() < deadline
        return answered, failed

    async with new_session(clients + 4) as session:
        counts = await asyncio.gather(*(one_client(session, slot) for slot in range(clients)))
    answered = sum(count[0] for count in counts)
    failed = sum(count[1] for count in counts)
    return Throughput(answered / seconds, answered, failed)


async def alternating_latencies(local: Target, shared: Target, seconds: float) -> Latencies:
    """One request at a time for `seconds`, local and shared in turn, after a warm-up."""
    paths = {local: [], shared: []}
    failed = 0
    async with new_session(4) as session:
        for _ in range(WARMUP_REQUESTS):
            for target in paths:
                await whole(session, target, CHAT_PATH, chat("Say hello.", 16, 1))
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for target, latencies in paths.items():
                try:
                    latency = await whole(session, target, CHAT_PATH, chat("Say hello.", 16, 1))
                except FAILURES:
                    failed += 1
                    continue
                latencies.append(latency * 1000)
    return Latencies(paths[local], paths[shared], failed)


def twogateway_rows(figures: TwoGatewayFigures) -> list[Row]:
    """Run A against the members' ideal, run B against A, each member's overlaps per run,
    failures, and the shared path's p50/p99 against the local one's."""
    one, two = figures.one, figures.two
    ideal = MEMBERS / SERVICE_SECONDS
    rows = [
        Row(SCENARIO, f"1 gateway, requests/s ({MEMBERS} shared members of "
            f"{SERVICE_SECONDS * 1000:.0f} ms; ideal {ideal:.0f})", "req/s", ideal, one.rate,
            RATIO),
        Row(SCENARIO, "2 gateways, requests/s against 1 gateway", "req/s", one.rate, two.rate,
            RATIO, f">= {MIN_SHARE}x", two.rate >= MIN_SHARE * one.rate),
    ]  # fmt: skip
    for run, overlaps in (
        ("1 gateway", figures.overlaps_one),
        ("2 gateways", figures.overlaps_two),
    ):
        for number, member in enumerate(overlaps, start=1):
            rows.append(
                Row(SCENARIO, f"overlapping requests on member {number}, {run} (of "
                    f"{member.requests}; most at once {member.most_in_flight})", "count", None,
                    member.overlapping, None, "0", member.overlapping == 0)
            )  # fmt: skip
    latencies = figures.latencies
    failed = one.failed + two.failed + latencies.failed
    rows.append(Row(SCENARIO, "failed requests, all runs", "count", None, failed, None, "0",
                    failed == 0))  # fmt: skip
    local, shared = sorted(latencies.local_ms), sorted(latencies.shared_ms)
    for label, share in (("p50", 0.5), ("p99", 0.99)):
        baseline, measured = percentile(local, share), percentile(shared, share)
        rows.append(
            Row(SCENARIO, f"{label} latency, 1 client, shared member against local replica "
                f"({len(shared)} requests each)", "ms", baseline, measured, ADDED,
                f"<= {MAX_ADDED_MS:.0f} ms added", measured - baseline <= MAX_ADDED_MS)
        )  # fmt: skip
    return rows
