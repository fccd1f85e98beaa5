"""Smoke test of ./console.sh bench: it runs with tiny settings and produces every row.

Only that it runs end to end and cleans up: the figures themselves mean nothing at this
size (speed lives in the bench, never in timed tests).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_environ, processes_matching

from runtime.bench.capacity import Capacity, capacity_rows, percentile, setups_for
from runtime.bench.errors import BenchError
from runtime.bench.rawproxy import cut_message
from runtime.bench.scaleout import scaleout_rows
from runtime.bench.scenarios import SCENARIOS, BenchOptions, parse_only
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
            BenchError, match="from: overhead, relay, scaleout, streaming"
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
