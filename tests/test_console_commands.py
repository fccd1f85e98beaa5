"""The console's commands through the real CLI, as a subprocess, with nothing served."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from conftest import TEST_API_KEY, link_or_copy

from proxy.chargespool import charge_spool_path
from runtime.bootstrap import ensure_config
from runtime.cli import cli
from runtime.configfile import set_config_value
from runtime.info import render_info
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME, Paths, load_settings


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def write_config(home, **values: str) -> bytes:
    """Create the home's config.env (with a generated key), set values; return its bytes."""
    ensure_config(Paths(root=home.root))
    for key, value in values.items():
        set_config_value(home.config_env, key, value)
    return home.config_env.read_bytes()


def add_second_model(home, name: str = "second.gguf"):
    link_or_copy(home.models_dir / FALLBACK_MODEL_NAME, home.models_dir / name)
    return home.models_dir / name


def assert_nothing_started(home) -> None:
    assert home.backend_pids() == []
    assert not (home.root / "runtime" / "run" / "backend.pid").exists()
    assert not (home.root / "runtime" / "logs" / "backend.log").exists()


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_an_example(home, command):
    result = home.run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_models_lists_the_fallback_model_marked_active_with_metadata(home):
    (home.models_dir / "junk.gguf").write_bytes(os.urandom(4096))
    result = home.run("models")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if FALLBACK_MODEL_NAME in line]
    assert line.startswith("* ")
    assert line.split()[1:] == [FALLBACK_MODEL_NAME, "98", "MB", "llama", "Q4_1", "8192"]
    [junk] = [line for line in result.stdout.splitlines() if "junk.gguf" in line]
    assert junk.startswith("  junk.gguf") and "unreadable" in junk


def test_use_of_an_unknown_model_exits_2_and_changes_nothing(home):
    before = write_config(home)
    result = home.run("use", "no-such-model")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "no-such-model" in line
    assert result.stderr.strip() == line
    assert home.config_env.read_bytes() == before


def test_use_of_a_file_that_is_not_gguf_exits_2_and_changes_nothing(home):
    (home.models_dir / "junk.gguf").write_bytes(os.urandom(4096))
    before = write_config(home)
    result = home.run("use", "junk.gguf")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "junk.gguf" in line and "GGUF" in line
    assert home.config_env.read_bytes() == before


def test_use_writes_llama_model_into_config_env_and_keeps_mode_600(home):
    add_second_model(home)
    result = home.run("use", "second")
    assert result.returncode == 0, result.stderr
    assert "LLAMA_MODEL=second.gguf" in home.config_env.read_text().splitlines()
    assert stat.S_IMODE(home.config_env.stat().st_mode) == 0o600
    settings = load_settings(Paths(root=home.root), {}, {})
    assert settings["LLAMA_MODEL"] == "second.gguf"


def test_use_warns_when_the_environment_overrides_config_env(home):
    result = home.run("use", FALLBACK_MODEL_NAME, LLAMA_MODEL=FALLBACK_MODEL_NAME)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stdout and "environment" in result.stdout


def test_rm_with_yes_removes_the_model_file(home):
    second = add_second_model(home)
    result = home.run("rm", "second.gguf", "-y")
    assert result.returncode == 0, result.stderr
    assert not second.exists()
    assert (home.models_dir / FALLBACK_MODEL_NAME).is_file()


def test_rm_refuses_the_configured_model(home):
    result = home.run("rm", FALLBACK_MODEL_NAME, "-y")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "configured or served" in line
    assert (home.models_dir / FALLBACK_MODEL_NAME).is_file()


def test_rm_of_an_unknown_model_exits_2(home):
    result = home.run("rm", "no-such-model.gguf", "-y")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert "no-such-model.gguf" in line


def run_without_a_terminal(home, *args: str, is_stdin_closed: bool):
    """The console with stdin at end of file, or with no stdin at all (fd 0 closed)."""
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=CODE_DIR,
        env=home.env,
        stdin=None if is_stdin_closed else subprocess.DEVNULL,
        preexec_fn=(lambda: os.close(0)) if is_stdin_closed else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("is_stdin_closed", [False, True])
def test_rm_without_yes_and_without_a_terminal_deletes_nothing(home, is_stdin_closed):
    second = add_second_model(home)
    result = run_without_a_terminal(home, "rm", "second.gguf", is_stdin_closed=is_stdin_closed)
    assert result.returncode == 2
    assert "pass -y" in result.stderr
    assert "Traceback" not in result.stderr
    assert second.is_file()


def test_use_with_an_unknown_model_on_a_fresh_root_writes_no_config(home):
    result = home.run("use", "nosuch")
    assert result.returncode == 2
    assert not home.config_env.exists()


def test_status_exits_3_when_nothing_runs(home):
    result = home.run("status")
    assert result.returncode == 3
    assert "stopped" in result.stdout


def test_logs_without_a_log_exits_1_with_a_clear_message(home):
    result = home.run("logs")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "no log yet" in line and "backend.log" in line


def test_info_works_with_everything_down_and_hides_the_api_key(home):
    write_config(home)
    generated = load_settings(Paths(root=home.root), {}, {})["LLAMA_API_KEY"]
    result = home.run("info")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "LLAMA_SERVER_PORT" in output and str(home.port) in output
    assert "stopped" in output
    assert TEST_API_KEY not in output and generated not in output
    assert "(set, hidden)" in output


def test_info_keeps_the_configuration_table_aligned_for_long_key_names(tmp_path):
    report = render_info(Paths(root=tmp_path))
    rows = report.split("\n\n")[0].splitlines()[1:]
    assert any(len(line.split()[0]) > 30 for line in rows)  # such as ..._GRACE_SECONDS
    assert {line.rindex(" default") for line in rows} == {rows[0].rindex(" default")}


def test_info_says_whether_token_charges_wait_in_their_spool(tmp_path):
    paths = Paths(root=tmp_path)
    charges = charge_spool_path(paths.spool_path)
    assert f"token-charge spool: {charges} (empty)" in render_info(paths)

    charges.parent.mkdir(parents=True)
    charges.write_text('{"id": "b1", "at": 1.0, "charges": [["alice", "2026-11-30", 12]]}\n')

    report = render_info(paths)
    assert f"token-charge spool: {charges} (token charges waiting for the database)" in report
    assert f"request-log spool: {paths.spool_path} (empty)" in report


def test_info_shows_an_invalid_config_value_and_still_exits_0(home):
    del home.env["LLAMA_SERVER_PORT"]
    write_config(home, LLAMA_SERVER_PORT="abc")
    generated = load_settings(Paths(root=home.root), {}, {"LLAMA_SERVER_PORT": "1"})[
        "LLAMA_API_KEY"
    ]
    result = home.run("info")
    assert result.returncode == 0, result.stderr
    assert "INVALID" in result.stdout
    assert "LLAMA_SERVER_PORT" in result.stdout and str(home.config_env) in result.stdout
    assert TEST_API_KEY not in result.stdout and generated not in result.stdout


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"LLAMA_SERVER_PORT": "abc"}, "LLAMA_SERVER_PORT"),
        ({"LLAMA_N_CTX": "lots"}, "LLAMA_N_CTX"),
        ({"LLAMA_SERVR_HOST": "127.0.0.1"}, "LLAMA_SERVR_HOST"),
    ],
)
def test_start_with_a_bad_config_env_names_key_and_file_and_starts_nothing(home, setting, key):
    del home.env["LLAMA_SERVER_PORT"]
    before = write_config(home, **setting)
    result = home.run("start", timeout=60)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert result.stderr.strip() == line
    assert key in line and str(home.config_env) in line
    assert home.config_env.read_bytes() == before
    assert_nothing_started(home)
