"""Scenario 1 (what the gateway adds) and scenario 5 (the gateway's memory afterwards).

The same wrk run goes straight to the canned upstream and through a real gateway in
front of that upstream, with auth, rate limit, fair queue and request log all on. The
upstream answers in microseconds, so the difference is the gateway's own cost. Unloaded
means one connection, one request at a time; saturated means 32 connections, where
latency is just connections / throughput, so throughput is the figure that counts.

Three floors run in front of the same upstream too: a bare Python TCP pipe
(runtime/bench/pipe.py), HTTP forwarding on bare asyncio protocols
(runtime/bench/rawproxy.py), and aiohttp's server and client with nothing else
(runtime/bench/bareproxy.py). They show what any Python relay, an HTTP edge without a
library, and the gateway's HTTP library alone cost on this machine, so that the
gateway's figures can be read against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from runtime import proctable
from runtime.bench.client import chat
from runtime.bench.loadgen import WrkResult, run_wrk
from runtime.bench.report import ADDED, RATIO, Row

CHAT_PATH = "/v1/chat/completions"
SATURATING_CONNECTIONS = 32
WARMUP_SECONDS = 1.0
# Targets from DESIGN.md, "Performance".
ADDED_P50_MS = 0.5
ADDED_P99_MS = 2.0
MIN_REQUESTS_PER_SECOND = 3000
MAX_RSS_MB = 80.0


@dataclass(frozen=True)
class Floor:
    """A stand-in in front of the same canned upstream, and where it listens."""

    label: str
    url: str


def measure_overhead(
    upstream_url: str, gateway_url: str, floors: list[Floor], key: str, seconds: float
) -> list[Row]:
    """Rows for scenario 1; the same body and headers on every path."""
    body = json.dumps(chat("Say hello.", 16, seed=1))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def load(url: str, connections: int, duration: float = seconds) -> WrkResult:
        return run_wrk(url + CHAT_PATH, body, headers, connections, duration)

    # The first requests through the gateway check the key in PostgreSQL and open pooled
    # connections; the figures are about the steady state.
    load(gateway_url, SATURATING_CONNECTIONS, WARMUP_SECONDS)
    unloaded = (load(upstream_url, 1), load(gateway_url, 1))
    floors_1 = [load(floor.url, 1) for floor in floors]
    saturated = (
        load(upstream_url, SATURATING_CONNECTIONS),
        load(gateway_url, SATURATING_CONNECTIONS),
    )
    floors_n = [load(floor.url, SATURATING_CONNECTIONS) for floor in floors]
    rows = overhead_rows(unloaded, saturated)
    for floor, floor_1, floor_n in zip(floors, floors_1, floors_n, strict=True):
        rows += floor_rows(floor.label, (unloaded[0], floor_1), (saturated[0], floor_n))
    return rows


def overhead_rows(
    unloaded: tuple[WrkResult, WrkResult], saturated: tuple[WrkResult, WrkResult]
) -> list[Row]:
    (direct_1, gateway_1), (direct_n, gateway_n) = unloaded, saturated
    scenario = "1 overhead"
    added_p50 = gateway_1.p50_ms - direct_1.p50_ms
    added_p99 = gateway_1.p99_ms - direct_1.p99_ms
    conns = SATURATING_CONNECTIONS
    return [
        Row(scenario, "p50 latency, 1 connection", "ms", direct_1.p50_ms, gateway_1.p50_ms,
            ADDED, f"<= {ADDED_P50_MS} ms added", added_p50 <= ADDED_P50_MS),
        Row(scenario, "p99 latency, 1 connection", "ms", direct_1.p99_ms, gateway_1.p99_ms,
            ADDED, f"<= {ADDED_P99_MS:.0f} ms added", added_p99 <= ADDED_P99_MS),
        Row(scenario, "requests/s, 1 connection", "req/s", direct_1.requests_per_second,
            gateway_1.requests_per_second, RATIO),
        Row(scenario, f"requests/s, {conns} connections", "req/s",
            direct_n.requests_per_second, gateway_n.requests_per_second, RATIO,
            f">= {MIN_REQUESTS_PER_SECOND}",
            gateway_n.requests_per_second >= MIN_REQUESTS_PER_SECOND),
        Row(scenario, f"latency at {conns} connections (= {conns} / req/s)", "ms",
            per_request_ms(conns, direct_n), per_request_ms(conns, gateway_n), ADDED),
        Row(scenario, f"p99 latency, {conns} connections", "ms", direct_n.p99_ms,
            gateway_n.p99_ms, ADDED),
        Row(scenario, "errors and non-2xx answers", "count",
            direct_1.errors + direct_n.errors, gateway_1.errors + gateway_n.errors, None,
            "0", gateway_1.errors + gateway_n.errors == 0),
    ]  # fmt: skip


def floor_rows(
    label: str, unloaded: tuple[WrkResult, WrkResult], saturated: tuple[WrkResult, WrkResult]
) -> list[Row]:
    """What one floor adds on this machine, measured in the same run as the gateway: the
    part of the gateway's figures that it, too, would cost here."""
    (direct_1, floor_1), (direct_n, floor_n) = unloaded, saturated
    scenario = "1 overhead"
    conns = SATURATING_CONNECTIONS
    return [
        Row(scenario, f"p50 latency, 1 connection, {label} (floor)", "ms", direct_1.p50_ms,
            floor_1.p50_ms, ADDED),
        Row(scenario, f"p99 latency, 1 connection, {label} (floor)", "ms", direct_1.p99_ms,
            floor_1.p99_ms, ADDED),
        Row(scenario, f"requests/s, {conns} connections, {label} (floor)", "req/s",
            direct_n.requests_per_second, floor_n.requests_per_second, RATIO),
    ]  # fmt: skip


def per_request_ms(connections: int, result: WrkResult) -> float | None:
    rate = result.requests_per_second
    return connections / rate * 1000 if rate else None


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc, in MB (2^20 bytes)."""
    try:
        return int(proctable.status_value(pid, "VmRSS").split()[0]) / 1024
    except ValueError:
        return 0.0


def memory_row(gateway_pid: int) -> Row:
    rss = rss_mb(gateway_pid)
    return Row("5 memory", "gateway RSS after scenario 1", "MB", None, rss, None,
               f"<= {MAX_RSS_MB:.0f} MB", rss <= MAX_RSS_MB)  # fmt: skip
