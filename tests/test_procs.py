"""Pid files: a recorded process is trusted only while it is the very process recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from runtime.procs import PidRecord, is_alive, process_start_ticks, read_pidfile, write_pidfile

MARKER = "llama_cpp.server"


@pytest.fixture
def lookalike() -> Iterator[subprocess.Popen]:
    """A live process whose command line carries the backend's marker."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(300)", MARKER],
    )
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    # Popen returns while execve may still be setting up the new command line.
    wait_for(lambda: MARKER.encode() in cmdline.read_bytes(), what="the lookalike's exec")
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_written_pid_file_records_the_start_time_and_is_trusted(tmp_path, lookalike):
    pidfile = tmp_path / "backend.pid"
    write_pidfile(pidfile, PidRecord(lookalike.pid, MARKER, started_at=time.time()))
    record = read_pidfile(pidfile)
    assert record.start_ticks == process_start_ticks(lookalike.pid)
    assert is_alive(record)


def test_a_reused_pid_with_another_start_time_is_not_trusted(tmp_path, lookalike):
    ticks = process_start_ticks(lookalike.pid)
    record = PidRecord(lookalike.pid, MARKER, started_at=time.time(), start_ticks=ticks - 100)
    assert not is_alive(record)


def test_an_old_pid_file_is_trusted_only_if_the_process_started_before_it(tmp_path, lookalike):
    # Written before start_ticks existed: only the wall-clock started_at is there.
    pidfile = tmp_path / "backend.pid"
    old = {"pid": lookalike.pid, "marker": MARKER, "started_at": time.time(), "details": {}}
    pidfile.write_text(json.dumps(old))
    assert is_alive(read_pidfile(pidfile))
    # A record written an hour before this process started named some earlier process.
    pidfile.write_text(json.dumps({**old, "started_at": time.time() - 3600}))
    assert not is_alive(read_pidfile(pidfile))


def test_console_neither_trusts_nor_signals_a_pid_whose_start_time_differs(home, lookalike):
    pidfile = home.root / "runtime" / "run" / "backend.pid"
    ticks = process_start_ticks(lookalike.pid)
    record = PidRecord(lookalike.pid, MARKER, time.time(), {}, start_ticks=ticks + 1)
    write_pidfile(pidfile, record)
    status = home.run("status", "--json")
    assert json.loads(status.stdout)["backend"]["detail"].endswith(
        "has died; run ./console.sh ensure to start it again"
    )
    assert home.run("stop").returncode == 0
    assert lookalike.poll() is None, "stop signalled a process that only reused the pid"
