"""Process bookkeeping: pid files checked against the command line and start time, and
group signals.

A pid is trusted only if the process behind it is the one that was recorded: its command
line contains the marker and it started when the record says. The start time matters
because the kernel reuses pids, and a container restarted with the same pid 1 (or any
process that got a recycled pid) runs the same command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from runtime import proctable

# A record written before start_ticks existed holds only its wall-clock started_at, which
# is written just after the process starts. btime is whole seconds, hence the margin.
LEGACY_START_MARGIN_SECONDS = 2.0


@dataclass(frozen=True)
class PidRecord:
    """What a pid file holds: the pid, a string its command line must contain, and details."""

    pid: int
    marker: str
    started_at: float
    details: dict = field(default_factory=dict)
    # The process's start time in clock ticks since boot (/proc/PID/stat, field 22).
    start_ticks: int | None = None


def write_pidfile(path: Path, record: PidRecord) -> None:
    """Write atomically, so a crash never leaves half a pid file; add the start time."""
    if record.start_ticks is None:
        record = replace(record, start_ticks=process_start_ticks(record.pid))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(asdict(record)))
    partial.replace(path)


def read_pidfile(path: Path) -> PidRecord | None:
    """The record, or None if there is no pid file or it is unreadable."""
    try:
        return PidRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_pidfile(path: Path) -> None:
    path.unlink(missing_ok=True)


def is_alive(record: PidRecord) -> bool:
    """True if the pid runs, is not a zombie, and is still the process we started.

    The command-line and start-time checks matter because the kernel reuses pids.
    """
    try:
        cmdline = proctable.command_line(record.pid)
        fields = proctable.stat_fields(record.pid)
        start_ticks = int(fields[19])
        if record.start_ticks is None:
            boot_time = proctable.boot_time()
    except (OSError, IndexError, ValueError):
        return False
    if fields[0] == "Z" or record.marker not in cmdline:
        return False
    if record.start_ticks is not None:
        return start_ticks == record.start_ticks
    # A process that started after the record was written cannot be the one it names.
    started = boot_time + start_ticks / os.sysconf("SC_CLK_TCK")
    return started <= record.started_at + LEGACY_START_MARGIN_SECONDS


def process_start_ticks(pid: int) -> int | None:
    """When pid started, in clock ticks since boot; None if it is gone."""
    try:
        return proctable.start_ticks(pid)
    except (OSError, IndexError, ValueError):
        return None


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_group(pgid: int, grace_seconds: float) -> bool:
    """SIGTERM the group, wait up to the grace period, then SIGKILL it; True if it was killed."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        _reap_children()
        if not group_exists(pgid):
            return False
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_exists(pgid) and time.monotonic() < deadline:
        _reap_children()
        time.sleep(0.05)
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _reap_children() -> None:
    """Collect our own exited children, so that zombies do not look alive."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
