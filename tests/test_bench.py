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

from runtime.bench.errors import BenchError
from runtime.bench.scenarios import SCENARIOS, BenchOptions, parse_only
from runtime.settings import CODE_DIR

TINY = ["--seconds", "1", "--stream-prompts", "2", "--stream-tokens", "4"]
TINY += ["--flood", "2", "--flood-tokens", "4", "--probes", "1", "--relay-streams", "1"]
# (scenario, start of the metric, whether direct and gateway both carry a figure)
EXPECTED_ROWS = [
    ("1 overhead", "p50 latency, 1 connection", True),
    ("1 overhead", "p99 latency, 1 connection", True),
    ("1 overhead", "requests/s, 32 connections", True),
    ("1 overhead", "latency at 32 connections", True),
    ("5 memory", "gateway RSS", False),
    ("6 relay cost", "gateway CPU per content chunk", False),
    ("2 streaming", "tokens/s", True),
    ("2 streaming", "time to first token", True),
    ("3 fairness", "B's wait", True),
    ("4 restart", "failed requests", True),
    ("4 restart", "longest wait", True),
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
        with pytest.raises(BenchError, match="from: overhead, relay, streaming") as refused:
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
