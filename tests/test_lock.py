"""runtime/lock.py: the console lock, held against another process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.lock import LOCK_NAME, console_lock
from runtime.settings import CODE_DIR

# Takes the lock, says "held", and keeps it until its stdin is closed.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""

# The same, through console_lock itself (another console run).
CONSOLE_HOLDER = """
import sys
from pathlib import Path
from runtime.lock import console_lock
with console_lock(Path(sys.argv[1]).parent) as is_locked:
    print("held" if is_locked else "not held", flush=True)
    sys.stdin.read()
"""

# Tries the lock without waiting and prints whether it got it.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("busy")
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runtime" / "run"


@pytest.fixture(params=[HOLDER, CONSOLE_HOLDER], ids=["flock", "console_lock"])
def holder(request, run_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process that holds the lock until it is released."""
    run_dir.mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-c", request.param, str(run_dir / LOCK_NAME)],
        cwd=CODE_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "held\n"
    yield process
    release(process)


def release(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.stdin.close()
        process.wait(timeout=10)


def probe(run_dir: Path) -> str:
    command = [sys.executable, "-c", PROBE, str(run_dir / LOCK_NAME)]
    return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()


def test_lock_is_refused_at_once_while_another_process_holds_it(run_dir, holder):
    with console_lock(run_dir, wait=False) as is_locked:
        assert is_locked is False


def test_lock_is_granted_once_the_other_process_releases_it(run_dir, holder):
    release(holder)
    with console_lock(run_dir, wait=False) as is_locked:
        assert is_locked is True


def test_lock_is_granted_when_free_and_creates_the_run_dir(run_dir):
    with console_lock(run_dir, wait=False) as is_locked:
        assert is_locked is True
    assert (run_dir / LOCK_NAME).is_file()


def test_held_lock_excludes_other_processes_until_released(run_dir):
    with console_lock(run_dir) as is_locked:
        assert is_locked is True
        assert probe(run_dir) == "busy"
    assert probe(run_dir) == "free"


def test_waiting_lock_reports_that_it_waits_and_gets_the_lock(run_dir, holder):
    waited = []

    def on_wait() -> None:
        waited.append(True)
        release(holder)

    with console_lock(run_dir, on_wait=on_wait) as is_locked:
        assert is_locked is True
        assert probe(run_dir) == "busy"
    assert waited == [True]
