"""Drive wrk, the load generator of scenario 1, and read its figures.

wrk (Debian package `wrk`) is written in C with an event loop per thread, so on the same
two cores it can saturate the direct path; the direct figure in the table is the proof
that it is not the bottleneck. A small Lua script sets the POST body and headers, and its
`done` hook prints the summary as one JSON line, which is sturdier than parsing wrk's
human-readable text (whose units change with magnitude).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.bench.errors import BenchError

MARKER = "WRK_JSON "
WRK_FIX = "wrk is not installed; install it with: apt-get install wrk (as root)"

# latency values are microseconds; summary.duration is microseconds too.
DONE_HOOK = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "socket_errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d, "mean_us": %f, "max_us": %d}\\n',
    "WRK_JSON ", summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: counts, and latencies in milliseconds."""

    requests: int
    seconds: float
    errors: int  # socket errors plus answers that were not 2xx/3xx
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def find_wrk() -> str:
    """The wrk executable, or a BenchError that names the fix."""
    found = shutil.which("wrk")
    if not found:
        raise BenchError(WRK_FIX)
    return found


def lua_script(body: str, headers: dict[str, str]) -> str:
    """wrk's request setup: POST with this body and these headers, plus the JSON summary."""

    def quoted(text: str) -> str:
        # A long bracket needs no escaping, as long as the closing bracket is not inside.
        return f"[==[{text}]==]"

    lines = ['wrk.method = "POST"', f"wrk.body = {quoted(body)}"]
    # The spaces matter: "[[" would open a Lua long string.
    lines += [f"wrk.headers[ {quoted(name)} ] = {quoted(value)}" for name, value in headers.items()]
    return "\n".join(lines) + "\n" + DONE_HOOK


def run_wrk(
    url: str,
    body: str,
    headers: dict[str, str],
    connections: int,
    seconds: float,
    threads: int = 1,
) -> WrkResult:
    """Run wrk against url for `seconds` with `connections` keep-alive connections."""
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="llamagate-wrk-") as scratch:
        script = Path(scratch) / "post.lua"
        script.write_text(lua_script(body, headers))
        command = [
            wrk,
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    return parse_output(done.stdout, done.stderr, done.returncode)


def parse_output(stdout: str, stderr: str, returncode: int) -> WrkResult:
    """The WrkResult from the done hook's JSON line; a BenchError if wrk did not finish."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER) :])
            return WrkResult(
                requests=raw["requests"],
                seconds=raw["duration_us"] / 1e6,
                errors=raw["socket_errors"] + raw["status_errors"],
                p50_ms=raw["p50_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
                mean_ms=raw["mean_us"] / 1000,
                max_ms=raw["max_us"] / 1000,
            )
    tail = (stderr or stdout).strip().splitlines()[-3:]
    raise BenchError(f"wrk failed (exit {returncode}): {' '.join(tail) or 'no output'}")
