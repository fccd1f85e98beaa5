"""Cron safety: overlapping runs take turns, and ensure repairs what is down."""

from __future__ import annotations

import os
import signal
import subprocess

from conftest import CODE_DIR, wait_for

from runtime.lock import console_lock


def test_ten_simultaneous_restarts_leave_one_backend_and_no_orphan(serving):
    runs = [serving.popen("restart") for _ in range(10)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * 10, outputs
    assert serving.backend_pids() == [serving.backend_pid()]
    assert len(serving.log_pumps()) == 1
    assert serving.run("status").returncode == 0


def test_ensure_on_a_healthy_system_is_silent(shared_serving):
    pid = shared_serving.backend_pid()
    result = shared_serving.run("ensure")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert shared_serving.backend_pid() == pid


def test_ensure_brings_back_a_killed_backend(serving):
    old_pid = serving.backend_pid()
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: not serving.backend_pids(), what="the killed backend to vanish")
    assert serving.run("status").returncode == 1
    result = serving.run("ensure")
    assert result.returncode == 0, result.stderr
    assert "degraded" in result.stdout
    assert serving.backend_pid() not in (None, old_pid)
    assert serving.backend_pids() == [serving.backend_pid()]
    assert serving.run("status").returncode == 0


def test_ensure_starts_a_stopped_system(home):
    result = home.run("ensure")
    assert result.returncode == 0, result.stderr
    assert home.run("status").returncode == 0


def test_ensure_exits_quietly_while_another_run_holds_the_lock(home):
    with console_lock(home.root / "runtime" / "run", wait=False) as is_locked:
        assert is_locked
        result = home.run("ensure")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert home.backend_pids() == []


def test_cron_helper_logs_to_cron_log_and_starts_the_backend(home):
    # Like cron: a minimal environment and a different working directory.
    env = {
        key: home.env[key]
        for key in (
            "LLAMAGATE_ROOT",
            "LLAMA_SERVER_PORT",
            "LLAMA_API_KEY",
            "LLAMA_PROXY_ENABLED",
            "HOME",
        )
    }
    result = subprocess.run(
        [str(CODE_DIR / "bin" / "cron.sh"), "ensure"],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert "serving" in (home.root / "runtime" / "logs" / "cron.log").read_text()
    assert home.run("status").returncode == 0
