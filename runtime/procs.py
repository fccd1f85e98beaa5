"""Process bookkeeping: pid files checked against the command line, and group signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    """What a pid file holds: the pid, a string its command line must contain, and details."""

    pid: int
    marker: str
    started_at: float
    details: dict = field(default_factory=dict)


def write_pidfile(path: Path, record: PidRecord) -> None:
    """Write atomically, so a crash never leaves half a pid file."""
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
    """True if the pid runs, is not a zombie, and is still the program we started.

    The command-line check matters because the kernel reuses pids.
    """
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        state = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and record.marker.encode() in cmdline


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
