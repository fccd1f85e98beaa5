"""The supervisor's bookkeeping: pid files that lie, log rotation, the installer."""

from __future__ import annotations

import json
import subprocess
import time

import openai
from conftest import CODE_DIR, TEST_API_KEY


def test_pid_file_naming_another_program_is_not_trusted(home):
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        pidfile = home.root / "runtime" / "run" / "backend.pid"
        pidfile.parent.mkdir(parents=True)
        pidfile.write_text(
            json.dumps(
                {
                    "pid": stranger.pid,
                    "marker": "llama_cpp.server",
                    "started_at": time.time(),
                    "details": {},
                }
            )
        )
        assert home.run("status").returncode == 1
        assert home.run("stop").returncode == 0
        assert stranger.poll() is None, "stop killed a process that was not the backend"
        assert home.run("start").returncode == 0
        assert home.backend_pid() != stranger.pid
    finally:
        stranger.kill()


def test_backend_log_is_rotated_by_size(home):
    result = home.run("start", LLAMA_LOG_MAX_BYTES="1500", LLAMA_LOG_BACKUPS="2")
    assert result.returncode == 0, result.stderr
    client = openai.OpenAI(base_url=f"{home.url}/v1", api_key=TEST_API_KEY, max_retries=0)
    for _ in range(8):
        client.completions.create(model="any", prompt="Hi", max_tokens=1)
    logs = home.root / "runtime" / "logs"
    assert (logs / "backend.log.1").is_file()
    assert not (logs / "backend.log.3").exists()
    assert (logs / "backend.log").stat().st_size <= 1500 + 1024


def test_logs_command_shows_the_backend_log(serving):
    result = serving.run("logs", "-n", "5")
    assert result.returncode == 0
    assert 0 < len(result.stdout.splitlines()) <= 5


def test_installer_is_idempotent():
    # The checkout's venv, config and model exist already (console.sh installed them):
    # a second run must change nothing and say it is done.
    config = CODE_DIR / "runtime" / "config.env"
    before = config.read_bytes()
    result = subprocess.run(
        [str(CODE_DIR / "runtime" / "install.sh")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "install: done"
    assert "installing llamagate" not in result.stdout and "creating" not in result.stdout
    assert config.read_bytes() == before
    assert oct(config.stat().st_mode & 0o777) == "0o600"


def test_stop_kills_a_backend_that_lingers_after_sigterm(serving):
    # llama_cpp.server waits for open connections on SIGTERM with no timeout; a live
    # stream keeps it alive, so only the SIGKILL after the grace period can stop it.
    client = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=TEST_API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=4000,
        stream=True,
    )
    next(iter(stream))
    result = serving.run("stop", LLAMA_STOP_GRACE_SECONDS="1")
    assert result.returncode == 0, result.stderr
    assert serving.backend_pids() == []
    assert serving.log_pumps() == []
    stream.close()
