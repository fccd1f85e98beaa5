"""What the kernel's process table (/proc) says about a process: one reader for all callers.

Hand-written rather than psutil: the console needs five small facts, and a dependency
with a compiled extension would cost more than these lines. Every reader raises OSError
(or ValueError) once the process is gone; callers decide what that means.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def all_pids() -> list[int]:
    """The pids of every process right now."""
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces."""
    return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; the name before it may hold spaces and ')'."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def state(pid: int) -> str:
    """The one-letter state: R, S, D, Z (a zombie), ..."""
    return stat_fields(pid)[0]


def process_group(pid: int) -> int:
    return int(stat_fields(pid)[2])


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (field 22)."""
    return int(stat_fields(pid)[19])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time the process has used so far: (user, system), fields 14 and 15."""
    fields = stat_fields(pid)
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def seconds_running(pid: int) -> float:
    """How long ago the process started, by the boot clock (no wall-clock jumps)."""
    uptime = float((PROC / "uptime").read_text().split()[0])
    return uptime - start_ticks(pid) / os.sysconf("SC_CLK_TCK")


def program_name(pid: int) -> str:
    """The short name of the program (/proc/PID/comm), e.g. postgres."""
    return (PROC / str(pid) / "comm").read_text().strip()


def status_value(pid: int, name: str) -> str:
    """One value of /proc/PID/status, e.g. status_value(pid, "VmRSS") == "1234 kB"."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        label, _, value = line.partition(":")
        if label == name:
            return value.strip()
    raise ValueError(f"no {name} in /proc/{pid}/status")


def boot_time() -> float:
    """When the machine booted, in seconds since the epoch."""
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime line in /proc/stat")
