"""The supervisor's bookkeeping: pid files that lie, log rotation, the installer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import openai
from conftest import CODE_DIR, TEST_API_KEY, wait_for

from runtime import backend, proctable
from runtime.procs import terminate_group
from runtime.settings import Paths, load_settings
from runtime.supervisor import BackendSupervisor


class StrangerLauncher(BackendSupervisor):
    """Launches `sleep` the way the backend is launched, so the pid file is a real one."""

    def command(self) -> list[str]:
        return ["sleep", "300"]

    def environment(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"]}


def test_pid_file_naming_another_program_is_not_trusted(home):
    # The stranger leads a session of its own, as the backend does, so a killpg would reach
    # it; and its pid file is written by the supervisor's own launch(), so it holds all
    # that a real one holds (start time included). Only the command line gives it away.
    settings = load_settings(Paths(root=home.root), {}, home.env)
    stranger = StrangerLauncher(settings, echo=lambda line: None).launch()
    try:
        assert os.getsid(stranger.pid) == stranger.pid
        assert home.backend_pid() == stranger.pid
        result = home.run("status", "--json")
        assert result.returncode == 1, result.stderr
        backend_status = json.loads(result.stdout)["backend"]
        assert backend_status["state"] == "degraded"
        assert f"process {stranger.pid} has died" in backend_status["detail"]
        assert home.run("stop").returncode == 0
        assert stranger.poll() is None, "stop killed a process that was not the backend"
        assert home.run("start").returncode == 0
        assert home.backend_pid() != stranger.pid
        assert stranger.poll() is None, "start killed a process that was not the backend"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stranger.pid, signal.SIGKILL)
        stranger.process.wait()
        stranger.pump.wait()


class LoadingLauncher(StrangerLauncher):
    """Launches a process that carries the backend's marker and never opens its port,
    as llama_cpp.server does while its model loads."""

    def command(self) -> list[str]:
        port = str(self.settings["LLAMA_SERVER_PORT"])
        script = "import time; time.sleep(300)"
        return [sys.executable, "-c", script, backend.SERVER_MODULE, "--port", port]


def test_status_reports_a_loading_backend_as_starting_then_as_degraded(home):
    settings = load_settings(Paths(root=home.root), {}, home.env)
    loading = LoadingLauncher(settings, echo=lambda line: None).launch()
    try:
        wait_for(lambda: home.backend_pids() == [loading.pid], what="the loading lookalike")
        result = home.run("status", "--json")
        assert result.returncode == 4, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["state"] == "starting"
        assert report["backend"]["state"] == "starting"
        assert "still starting" in report["backend"]["detail"]
        # Past its start timeout, a process that still does not answer hangs.
        wait_for(
            lambda: home.run("status", LLAMA_START_TIMEOUT_SECONDS="1").returncode == 1,
            what="status to call the silent backend degraded",
        )
        hung = json.loads(home.run("status", "--json", LLAMA_START_TIMEOUT_SECONDS="1").stdout)
        assert hung["backend"]["state"] == "degraded"
        assert "LLAMA_START_TIMEOUT_SECONDS" in hung["backend"]["detail"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(loading.pid, signal.SIGKILL)
        loading.process.wait()
        loading.pump.wait()


def sigterm_is_ignored(pid: int) -> bool:
    """True once the process has set SIGTERM to be ignored (its SigIgn mask in /proc)."""
    return bool(int(proctable.status_value(pid, "SigIgn"), 16) & (1 << (signal.SIGTERM - 1)))


def live_members_of_group(pgid: int) -> list[int]:
    """Pids of the group's processes that still run (zombies waiting for a reaper do not)."""
    members = []
    for pid in proctable.all_pids():
        try:
            if proctable.process_group(pid) == pgid and proctable.state(pid) != "Z":
                members.append(pid)
        except OSError:
            continue
    return members


def test_terminate_group_kills_a_group_that_ignores_sigterm_after_the_grace():
    # A shell that ignores SIGTERM, and its sleep, which inherits the ignored signal:
    # only the SIGKILL after the grace period can end them.
    stubborn = subprocess.Popen(["sh", "-c", 'trap "" TERM; sleep 300'], start_new_session=True)
    try:
        wait_for(lambda: sigterm_is_ignored(stubborn.pid), 10, "the shell to ignore SIGTERM")
        has_killed = terminate_group(stubborn.pid, grace_seconds=0.5)
        assert has_killed, "terminate_group did not say that it had to SIGKILL"
        wait_for(lambda: not live_members_of_group(stubborn.pid), 5, "the group to be gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stubborn.pid, signal.SIGKILL)
        stubborn.wait()  # already reaped by terminate_group, Popen copes with that


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


def test_logs_command_shows_the_backend_log(shared_serving):
    result = shared_serving.run("logs", "-n", "5")
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
