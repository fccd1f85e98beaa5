"""Bad input to the console: one clear line, a meaningful exit code, and nothing changed."""

from __future__ import annotations

import os
import socket

from conftest import TEST_API_KEY  # noqa: F401  (documents which key the home uses)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_nothing_started(home) -> None:
    assert home.run("status").returncode == 3
    assert home.backend_pids() == []
    assert not (home.root / "runtime" / "run" / "backend.pid").exists()


def test_missing_model_is_named_with_the_fix(home):
    result = home.run("start", LLAMA_MODEL="no-such-model.gguf")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "no-such-model.gguf" in line and "console.sh models" in line
    assert_nothing_started(home)


def test_model_given_by_flag_that_is_not_in_models_is_refused(home):
    result = home.run("start", "--model", "other.gguf")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "'other.gguf' is not in" in line and "SmolLM2" in line
    assert_nothing_started(home)


def test_file_that_is_not_gguf_is_refused_before_start(home):
    (home.models_dir / "junk.gguf").write_bytes(os.urandom(4096))
    result = home.run("start", "--model", "junk.gguf")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "junk.gguf" in line and "not a GGUF file" in line
    assert_nothing_started(home)


def test_truncated_model_gives_one_clear_line(home):
    source = home.models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(source, "rb") as whole:
        (home.models_dir / "truncated.gguf").write_bytes(whole.read(2_000_000))
    result = home.run("start", "--model", "truncated.gguf")
    assert result.returncode in (1, 2)
    [line] = error_lines(result)
    assert "truncated.gguf" in line
    assert_nothing_started(home)


def test_port_in_use_is_named(home):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", home.port))
        squatter.listen()
        result = home.run("start")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert f"port {home.port}" in line and "LLAMA_SERVER_PORT" in line
    assert_nothing_started(home)


def test_invalid_config_value_names_key_and_file(home):
    home.run("status")
    config = home.root / "runtime" / "config.env"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("LLAMA_N_CTX=lots\n")
    result = home.run("start")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "LLAMA_N_CTX" in line and str(config) in line
    assert config.read_text() == "LLAMA_N_CTX=lots\n"
    assert_nothing_started(home)


def test_invalid_port_from_environment_says_so(home):
    result = home.run("start", LLAMA_SERVER_PORT="eighty")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "LLAMA_SERVER_PORT" in line and "environment" in line


def test_restart_with_a_bad_model_leaves_the_running_backend_alone(shared_serving):
    pid = shared_serving.backend_pid()
    result = shared_serving.run("restart", "--model", "missing.gguf")
    assert result.returncode == 2
    assert "missing.gguf" in error_lines(result)[0]
    assert shared_serving.backend_pid() == pid
    assert shared_serving.run("status").returncode == 0


def test_backend_crash_during_start_shows_the_log_tail(home):
    # A flag llama_cpp.server rejects makes it exit at once, after the console's checks.
    result = home.run("start", LLAMA_EXTRA_ARGS="--no_such_flag 1")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "LLAMA_EXTRA_ARGS" in line and "--no_such_flag" in line
    assert "last lines of" in result.stderr
    assert_nothing_started(home)
