"""Which parts this host runs, remembered in run/mode: the configured stack, or backend only.

`./console.sh start --backend-only` makes a generating host: the replicas of
llama_cpp.server alone, reachable from the gateway hosts, with no database and no gateway.
The choice is run state, not configuration: it is written by the start that makes it and
read by every later command (status, info, logs, stop, restart, ensure from cron, the
foreground supervisor), so that none of them needs the flag again and cron never starts a
database and a gateway on a host that only generates. It outlives `stop` for the same
reason; `start --no-backend-only` (while stopped) goes back to the configured stack.
"""

from __future__ import annotations

from pathlib import Path

BACKEND_ONLY = "backend-only"
MODE_FILE = "mode"


def mode_path(run_dir: Path) -> Path:
    return run_dir / MODE_FILE


def is_remembered_backend_only(run_dir: Path) -> bool:
    """True if the last start that chose a mode chose --backend-only."""
    try:
        return mode_path(run_dir).read_text().strip() == BACKEND_ONLY
    except FileNotFoundError:
        return False


def remember_mode(run_dir: Path, is_backend_only: bool) -> None:
    """Write the mode for later commands; the configured stack is the file's absence."""
    path = mode_path(run_dir)
    if not is_backend_only:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BACKEND_ONLY + "\n")
