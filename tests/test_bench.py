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

from conftest import clean_environ, processes_matching

from runtime.settings import CODE_DIR

TINY = ["--seconds", "1", "--stream-prompts", "2", "--stream-tokens", "4"]
TINY += ["--flood", "2", "--flood-tokens", "4", "--probes", "1"]
# (scenario, start of the metric, whether direct and gateway both carry a figure)
EXPECTED_ROWS = [
    ("1 overhead", "p50 latency, 1 connection", True),
    ("1 overhead", "p99 latency, 1 connection", True),
    ("1 overhead", "requests/s, 32 connections", True),
    ("1 overhead", "latency at 32 connections", True),
    ("5 memory", "gateway RSS", False),
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
