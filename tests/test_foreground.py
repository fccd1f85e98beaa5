"""start --foreground: supervision for systemd."""

from __future__ import annotations

import os
import signal

from conftest import wait_for, wait_until_serving

from runtime.procs import is_alive, read_pidfile


def start_foreground(home, **env):
    supervisor = home.popen("start", "--foreground", LLAMA_RESTART_BACKOFF_SECONDS="0.2", **env)
    wait_until_serving(home, supervisor, what="the foreground backend")
    return supervisor


def test_crashed_backend_is_restarted(home):
    supervisor = start_foreground(home)
    first = home.backend_pid()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: home.backend_pid() not in (None, first), timeout=120, what="a new backend")
    wait_until_serving(home, what="the restarted backend")
    assert home.backend_pids() == [home.backend_pid()]
    supervisor.send_signal(signal.SIGTERM)
    output = supervisor.communicate(timeout=60)[0]
    assert "restarting in" in output


def test_sigterm_stops_the_backend_and_exits_0(home):
    supervisor = start_foreground(home)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert home.backend_pids() == []
    assert home.log_pumps() == []
    assert home.run("status").returncode == 3


def test_gives_up_after_repeated_crashes_with_a_clear_message(home):
    supervisor = start_foreground(home, LLAMA_RESTART_MAX_CRASHES="3")
    model = home.models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Replace the file (not its hard-linked contents) so every restart fails.
    model.unlink()
    model.write_bytes(b"not a model")
    os.kill(home.backend_pid(), signal.SIGKILL)
    assert supervisor.wait(timeout=120) != 0
    output = supervisor.stdout.read()
    assert "giving up" in output and "crashed 3 times" in output
    assert home.backend_pids() == []


def test_stop_command_stops_a_foreground_supervisor(home):
    supervisor = start_foreground(home)
    result = home.run("stop")
    assert result.returncode == 0
    assert supervisor.wait(timeout=60) == 0
    assert home.backend_pids() == []


def test_stop_command_works_even_with_a_broken_config(home):
    supervisor = start_foreground(home)
    result = home.run("stop", LLAMA_N_CTX="lots")
    assert result.returncode == 0, result.stderr
    assert "LLAMA_N_CTX" in result.stderr
    assert supervisor.wait(timeout=60) == 0
    assert home.backend_pids() == []


def test_ensure_leaves_a_foreground_supervisor_in_charge(home):
    supervisor = start_foreground(home)
    pid = home.backend_pid()
    result = home.run("ensure")
    assert (result.returncode, result.stdout) == (0, "")
    assert home.backend_pid() == pid
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0


def test_restart_waits_double_after_each_crash_and_gives_up_at_the_limit(tmp_path):
    from runtime.foreground import ForegroundSupervisor
    from runtime.settings import Paths, load_settings

    settings = load_settings(
        Paths(root=tmp_path),
        environ={"LLAMA_RESTART_BACKOFF_SECONDS": "0.5", "LLAMA_RESTART_MAX_CRASHES": "4"},
    )
    supervisor = ForegroundSupervisor(settings, echo=lambda line: None)
    delays = [supervisor._record_crash() for _ in range(4)]
    assert delays == [0.5, 1.0, 2.0, None]


def test_foreground_in_gateway_mode_runs_and_stops_the_gateway_too(gateway_home):
    supervisor = start_foreground(gateway_home)
    key = gateway_home.new_user("systemd")
    assert gateway_home.client(key).models.list().data
    gateway = read_pidfile(gateway_home.root / "runtime" / "run" / "proxy.pid")
    assert gateway is not None and is_alive(gateway)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not is_alive(gateway)
    assert gateway_home.run("status").returncode == 3


def test_a_crash_of_any_replica_is_seen_and_named(tmp_path):
    from runtime.foreground import ForegroundSupervisor
    from runtime.settings import Paths, load_settings

    settings = load_settings(Paths(root=tmp_path), environ={"LLAMA_SERVER_REPLICAS": "2"})
    supervisor = ForegroundSupervisor(settings, echo=lambda line: None)
    first, second = supervisor.stack.backends
    first.poll_exit = lambda: None  # replica 0 serves on
    second.poll_exit = lambda: -9  # replica 1 was killed
    rounds = []

    def one_round() -> None:
        rounds.append(1)
        supervisor.is_stop_requested = len(rounds) >= 3  # no endless wait if it is missed

    supervisor._keep_gateway_up = one_round
    assert supervisor._wait_for_exit() == ("backend-1", -9)
