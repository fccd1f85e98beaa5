"""Smoke test of ./console.sh bench: it runs with tiny settings and produces every row.

Only that it runs end to end and cleans up: the figures themselves mean nothing at this
size (speed lives in the bench, never in timed tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import clean_environ, processes_matching

from runtime.bench.capacity import Capacity, capacity_rows, percentile, setups_for
from runtime.bench.errors import BenchError
from runtime.bench.rawproxy import cut_message
from runtime.bench.scaleout import scaleout_rows
from runtime.bench.scenarios import SCENARIOS, BenchOptions, parse_only
from runtime.bench.sharedfigures import (
    Latencies,
    Overlaps,
    Throughput,
    TwoGatewayFigures,
    twogateway_rows,
)
from runtime.bench.stack import free_port
from runtime.bench.upstream import OVERLAPS_PATH, listen
from runtime.settings import CODE_DIR

TINY = ["--seconds", "1", "--stream-prompts", "2", "--stream-tokens", "4"]
TINY += ["--flood", "2", "--flood-tokens", "4", "--probes", "1", "--relay-streams", "1"]
TINY += ["--scaleout-seconds", "1"]
# Capacity restarts the stack twice (about 40 s even when tiny): left out of the smoke
# run for the suite's time; its arithmetic is tested below, and the bench runs it.
TINY += ["--only", ",".join(name for name in SCENARIOS if name != "capacity")]
# (scenario, start of the metric, whether direct and gateway both carry a figure)
EXPECTED_ROWS = [
    ("1 overhead", "p50 latency, 1 connection", True),
    ("1 overhead", "p99 latency, 1 connection", True),
    ("1 overhead", "requests/s, 32 connections", True),
    ("1 overhead", "latency at 32 connections", True),
    ("1 overhead", "p99 latency, 1 connection, bare Python TCP pipe (floor)", True),
    ("1 overhead", "p99 latency, 1 connection, bare aiohttp forwarder (floor)", True),
    ("1 overhead", "p99 latency, 1 connection, bare asyncio HTTP forwarder (floor)", True),
    ("1 overhead", "requests/s, 32 connections, bare asyncio HTTP forwarder (floor)", True),
    ("1 overhead", "requests/s, 32 connections, bare aiohttp forwarder (floor)", True),
    ("5 memory", "gateway RSS", False),
    ("6 relay cost", "gateway CPU per content chunk", False),
    ("6 relay cost", "bare Python TCP pipe's CPU per content chunk (floor)", False),
    ("2 streaming", "tokens/s", True),
    ("2 streaming", "time to first token", True),
    ("3 fairness", "B's wait", True),
    ("4 restart", "failed requests", True),
    ("4 restart", "longest wait", True),
    ("8 scale-out", "1 backend, requests/s", True),
    ("8 scale-out", "8 backends, requests/s against linear", True),
    ("9 two gateways", "2 gateways, requests/s against 1 gateway", True),
    ("9 two gateways", "overlapping requests on member 2, 2 gateways", False),
    ("9 two gateways", "failed requests, all runs", False),
    ("9 two gateways", "p99 latency, 1 client, shared member against local replica", True),
]


def test_the_bench_runs_with_tiny_settings_and_reports_every_scenario(tmp_path: Path):
    json_path = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "runtime", "bench", *TINY, "--json", str(json_path)],
        cwd=CODE_DIR,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(json_path.read_text())
    for scenario, metric, has_both in EXPECTED_ROWS:
        rows = [
            row
            for row in report["rows"]
            if row["scenario"] == scenario and row["metric"].startswith(metric)
        ]
        assert rows, f"no row {scenario}: {metric}"
        assert isinstance(rows[0]["gateway"], int | float), rows[0]
        if has_both:
            assert isinstance(rows[0]["direct"], int | float), rows[0]
        assert metric in done.stdout  # the printed table has the same rows
    assert report["targets"]["met"] + report["targets"]["missed"] >= 8
    root = re.search(r"private stack in (\S+)", done.stdout).group(1)
    assert not Path(root).exists()
    assert processes_matching(root) == []


def test_only_runs_the_named_scenarios_and_refuses_unknown_names_listing_the_choices():
    chosen = BenchOptions(only=parse_only("relay, overhead"))
    assert [name for name in SCENARIOS if chosen.runs(name)] == ["overhead", "relay"]
    assert all(BenchOptions().runs(name) for name in SCENARIOS)
    for text in ("relay,nope", "", ","):
        with pytest.raises(
            BenchError, match="from: overhead, relay, scaleout, twogateways, streaming"
        ) as refused:
            parse_only(text)
        assert repr(text) in str(refused.value)


def test_only_with_an_unknown_scenario_exits_1_before_starting_anything():
    done = subprocess.run(
        [sys.executable, "-m", "runtime", "bench", "--only", "relya"],
        cwd=CODE_DIR,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "'relya'" in done.stderr and "relay" in done.stderr
    assert "private stack" not in done.stdout


def test_capacity_compares_two_replicas_with_one_of_one_thread_against_its_targets():
    setups = setups_for(4)
    assert [(s.replicas, s.threads) for s in setups] == [(1, 4), (1, 1), (2, 1)]
    figures = {
        setups[0].label: Capacity(70.0, 30, 2.0, 4.0),
        setups[1].label: Capacity(60.0, 30, 2.0, 4.0),
        setups[2].label: Capacity(110.0, 60, 1.0, 2.5),
    }
    rows = capacity_rows(setups, figures)
    tokens, p50, p95 = rows[:3]
    assert (tokens.direct, tokens.gateway, tokens.met) == (60.0, 110.0, True)  # 1.83x >= 1.7x
    assert (p95.direct, p95.gateway, p95.met) == (4.0, 2.5, False)  # 0.625x > 0.6x
    assert p50.met is None
    assert [row.gateway for row in rows[3:]] == [70.0, 2.0, 4.0]  # the all-cores replica


def test_percentile_is_the_nearest_rank_and_scaleout_is_measured_against_linear():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([], 0.95) == 0.0
    rows = scaleout_rows({1: 5.0, 2: 9.0, 4: 17.0})
    assert [(row.direct, row.gateway, row.met) for row in rows] == [
        (5.0, 5.0, None),
        (10.0, 9.0, True),
        (20.0, 17.0, False),  # 85% of linear
    ]


def test_the_raw_forwarder_cuts_whole_messages_by_head_and_content_length():
    request = b"POST /v1/x HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 5\r\n\r\nhello"
    assert cut_message(request[:20]) is None  # the head is not whole yet
    assert cut_message(request[:-1]) is None  # nor the body
    assert cut_message(request + b"GET / HTTP") == (request, b"GET / HTTP")  # pipelined
    no_body = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert cut_message(no_body) == (no_body, b"")


def test_two_gateways_are_measured_against_one_and_each_overlap_misses_its_target():
    quiet = [Overlaps(20, 0, 1), Overlaps(21, 0, 1)]
    figures = TwoGatewayFigures(
        one=Throughput(9.5, 95, 0),
        two=Throughput(8.0, 80, 1),  # 84% of one gateway
        overlaps_one=quiet,
        overlaps_two=[Overlaps(40, 0, 1), Overlaps(41, 2, 2)],
        latencies=Latencies([1.0, 1.2, 5.0, 1.1], [1.5, 2.5, 5.2, 1.8], failed=0),
    )
    rows = twogateway_rows(figures)
    one, two = rows[:2]
    assert (one.direct, one.gateway, one.met) == (10.0, 9.5, None)  # ideal: 2 members / 0.2 s
    assert (two.direct, two.gateway, two.met) == (9.5, 8.0, False)
    overlaps = [(row.metric, row.gateway, row.met) for row in rows[2:6]]
    first_member_alone = "overlapping requests on member 1, 1 gateway (of 20; most at once 1)"
    assert overlaps[0] == (first_member_alone, 0, True)
    second_member_shared = "overlapping requests on member 2, 2 gateways (of 41; most at once 2)"
    assert overlaps[3] == (second_member_shared, 2, False)
    failed, p50, p99 = rows[6:]
    assert (failed.gateway, failed.met) == (1, False)
    assert (p50.direct, p50.gateway, p50.met) == (1.1, 1.8, True)  # +0.7 ms
    assert (p99.direct, p99.gateway, p99.met) == (5.0, 5.2, True)
    worse = Latencies([1.0, 1.1], [1.0, 2.2], failed=0)  # p99 +1.1 ms
    rows = twogateway_rows(TwoGatewayFigures(figures.one, figures.one, quiet, quiet, worse))
    assert [row.met for row in rows] == [None, True, True, True, True, True, True, True, False]


async def overlaps_of(port: int) -> dict:
    url = f"http://127.0.0.1:{port}{OVERLAPS_PATH.decode()}"
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return await answer.json()


async def post_chat(session: aiohttp.ClientSession, port: int) -> None:
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}) as answer:
        assert answer.status == 200


def test_a_canned_member_counts_requests_that_reach_it_while_another_is_in_flight():
    async def scenario() -> list[dict]:
        port = free_port()
        servers = await listen(port, count=1, service_seconds=0.05)
        try:
            async with aiohttp.ClientSession() as session:
                await post_chat(session, port)
                await post_chat(session, port)  # one after the other: no overlap
                sequential = await overlaps_of(port)
                await asyncio.gather(*(post_chat(session, port) for _ in range(3)))
                concurrent = await overlaps_of(port)
            return [sequential, concurrent, await overlaps_of(port)]
        finally:
            for server in servers:
                server.close()

    sequential, concurrent, fresh = asyncio.run(scenario())
    assert sequential == {"requests": 2, "overlapping": 0, "most_in_flight": 1}
    assert concurrent == {"requests": 3, "overlapping": 2, "most_in_flight": 3}
    assert fresh == {"requests": 0, "overlapping": 0, "most_in_flight": 0}  # counted afresh
