"""The installer as console.sh runs it: a failed install does not pile up queued cron runs.

The checkout here is a copy of console.sh and runtime/install.sh in a temp dir, with no
venv, and a python3 on PATH that fails (after a gate opens, so that other runs can
queue behind the install lock meanwhile). It counts its calls, which shows whether a
run repeated the install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import processes_matching, wait_for

from runtime.settings import CODE_DIR

FAILING_PYTHON = """#!/bin/sh
echo called >> "$PYTHON_CALLS"
while [ ! -e "$PYTHON_GATE" ]; do sleep 0.05; done
exit 1
"""


def fake_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "repo"
    (repo / "runtime").mkdir(parents=True)
    shutil.copy2(CODE_DIR / "console.sh", repo / "console.sh")
    shutil.copy2(CODE_DIR / "runtime" / "install.sh", repo / "runtime" / "install.sh")
    shutil.copy2(CODE_DIR / "pyproject.toml", repo / "pyproject.toml")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(FAILING_PYTHON)
    (fake_bin / "python3").chmod(0o755)
    env = {
        "PATH": f"{fake_bin}:/usr/local/bin:/usr/bin:/bin",
        "PYTHON_CALLS": str(tmp_path / "calls"),
        "PYTHON_GATE": str(tmp_path / "gate"),
    }
    return repo, env


def run_console(repo: Path, env: dict[str, str]) -> subprocess.Popen:
    # stdin is not a terminal, as under cron.
    return subprocess.Popen(
        [str(repo / "console.sh"), "status"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def python_calls(env: dict[str, str]) -> int:
    calls = Path(env["PYTHON_CALLS"])
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_runs_queued_behind_a_failing_install_fail_fast_with_its_reason(tmp_path):
    repo, env = fake_checkout(tmp_path)
    lock = str(repo / "runtime" / ".install.lock")
    first = run_console(repo, env)
    wait_for(lambda: python_calls(env) == 1, what="the first install to check python3")
    queued = [run_console(repo, env) for _ in range(3)]
    # The first run's flock holds the lock; three more wait for it.
    wait_for(lambda: len(processes_matching("flock", lock)) == 4, what="three queued runs")
    Path(env["PYTHON_GATE"]).touch()  # the first install now fails

    _, first_err = first.communicate(timeout=60)
    assert first.returncode != 0
    assert "Python 3.11 or newer is needed" in first_err
    calls_of_the_failed_install = python_calls(env)
    for run in queued:
        _, err = run.communicate(timeout=60)
        assert run.returncode != 0
        assert "the install failed" in err and "Python 3.11 or newer is needed" in err
        assert "retry now with" in err
    assert python_calls(env) == calls_of_the_failed_install, "a queued run repeated the install"

    # Running the installer by hand retries at once.
    retried = subprocess.run(
        [str(repo / "runtime" / "install.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retried.returncode != 0
    assert python_calls(env) > calls_of_the_failed_install


def test_a_failure_marker_older_than_the_quiet_time_is_retried(tmp_path):
    repo, env = fake_checkout(tmp_path)
    Path(env["PYTHON_GATE"]).touch()
    marker = repo / "runtime" / ".install.failed"
    marker.write_text("an old failure\n")
    an_hour_ago = os.path.getmtime(marker) - 3600
    os.utime(marker, (an_hour_ago, an_hour_ago))
    run = run_console(repo, env)
    _, err = run.communicate(timeout=60)
    assert run.returncode != 0
    assert python_calls(env) > 0
    assert "Python 3.11 or newer is needed" in marker.read_text()


def uses_external_postgres(root: Path) -> int:
    """The installer's answer for a state root: 0 if the settings name a server of one's own."""
    env = {"PATH": os.environ["PATH"], "LLAMAGATE_ROOT": str(root)}
    script = CODE_DIR / "runtime" / "install.sh"
    command = ["bash", "-c", 'source "$1" && uses_external_postgres', "bash", str(script)]
    return subprocess.run(command, env=env, timeout=60, check=False).returncode


def test_the_installer_asks_the_settings_loader_whether_postgresql_is_needed(tmp_path):
    root = tmp_path / "root"
    (root / "runtime").mkdir(parents=True)
    (root / "runtime" / "config.env").write_text("POSTGRES_AUTH_DSN=postgresql://gate@db/llama\n")
    assert uses_external_postgres(root) == 0
    # An empty key in .env hides config.env's for the console, so for the installer too.
    (root / ".env").write_text("POSTGRES_AUTH_DSN=\n")
    assert uses_external_postgres(root) == 1
