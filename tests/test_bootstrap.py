"""runtime/bootstrap.py (the first config.env) and runtime/configfile.py (editing it)."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest
from conftest import wait_for

from runtime.bootstrap import (
    CONFIG_LOCK_NAME,
    ensure_backend_secret,
    ensure_config,
    render_config,
)
from runtime.cli_support import load
from runtime.configfile import set_config_value
from runtime.settings import KEYS, Paths, load_settings


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(root=tmp_path / "root")


def test_ensure_config_writes_config_env_with_mode_600(paths):
    assert ensure_config(paths) is True
    assert paths.config_env.is_file()
    assert mode_of(paths.config_env) == 0o600


def test_every_key_is_written_with_a_comment_just_before_it(paths):
    ensure_config(paths)
    lines = paths.config_env.read_text().splitlines()
    for key in KEYS:
        [index] = [i for i, line in enumerate(lines) if line.startswith(f"{key.name}=")]
        assert lines[index - 1].startswith("# "), f"{key.name} has no comment above it"
        assert len(lines[index - 1]) > len("# ") + 5


def test_generated_api_key_is_long_and_differs_between_roots(tmp_path):
    first, second = Paths(root=tmp_path / "a"), Paths(root=tmp_path / "b")
    ensure_config(first)
    ensure_config(second)
    first_key = load_settings(first, {}, {})["LLAMA_API_KEY"]
    second_key = load_settings(second, {}, {})["LLAMA_API_KEY"]
    assert len(first_key) >= 32 and len(second_key) >= 32
    assert first_key != second_key
    assert load_settings(first, {}, {}).source_of("LLAMA_API_KEY") == str(first.config_env)


def test_second_ensure_config_leaves_the_file_byte_for_byte_unchanged(paths):
    ensure_config(paths)
    before = paths.config_env.read_bytes()
    assert ensure_config(paths) is False
    assert paths.config_env.read_bytes() == before
    assert mode_of(paths.config_env) == 0o600


def test_ensure_config_never_overwrites_an_operators_file(paths):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text("LLAMA_SERVER_PORT=9001\n")
    assert ensure_config(paths) is False
    assert paths.config_env.read_text() == "LLAMA_SERVER_PORT=9001\n"


def test_rendered_config_parses_back_to_the_defaults_with_the_key(paths):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text(render_config("my-api-key-0123456789"))
    settings = load_settings(paths, {}, {})
    assert settings["LLAMA_API_KEY"] == "my-api-key-0123456789"
    defaults = load_settings(Paths(root=paths.root / "empty"), {}, {})
    for key in KEYS:
        # LLAMA_N_THREADS is written empty, and says what empty meant after the path.
        assert settings.source_of(key.name).startswith(str(paths.config_env)), key.name
        if key.name != "LLAMA_API_KEY":
            assert settings[key.name] == defaults[key.name], key.name


@pytest.fixture
def config_env(paths: Paths) -> Path:
    ensure_config(paths)
    return paths.config_env


def comment_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


def test_set_config_value_replaces_an_existing_key_in_place(config_env):
    before = config_env.read_text().splitlines()
    set_config_value(config_env, "LLAMA_SERVER_PORT", "9123")
    after = config_env.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert changed == [("LLAMA_SERVER_PORT=8000", "LLAMA_SERVER_PORT=9123")]
    assert load_settings(Paths(root=config_env.parent.parent), {}, {})["LLAMA_SERVER_PORT"] == 9123


def test_set_config_value_appends_a_missing_key(tmp_path):
    path = tmp_path / "config.env"
    path.write_text("# a comment\nLLAMA_SERVER_PORT=8000\n")
    path.chmod(0o600)
    set_config_value(path, "LLAMA_MODEL", "other.gguf")
    assert path.read_text() == "# a comment\nLLAMA_SERVER_PORT=8000\nLLAMA_MODEL=other.gguf\n"


def test_set_config_value_keeps_comments_and_mode_600(config_env):
    comments = comment_lines(config_env)
    set_config_value(config_env, "LLAMA_MODEL", "x.gguf")
    set_config_value(config_env, "LLAMA_N_CTX", "1024")
    assert comment_lines(config_env) == comments
    assert mode_of(config_env) == 0o600
    assert not list(config_env.parent.glob("*.tmp"))


def test_set_config_value_does_not_touch_a_key_with_a_longer_name(tmp_path):
    path = tmp_path / "config.env"
    path.write_text("LLAMA_MODEL_ALIAS=alias\nLLAMA_MODEL=a.gguf\n")
    set_config_value(path, "LLAMA_MODEL", "b.gguf")
    assert path.read_text() == "LLAMA_MODEL_ALIAS=alias\nLLAMA_MODEL=b.gguf\n"


@pytest.mark.parametrize(
    "value",
    ["/models/my model.gguf", "a #not a comment", "it's", 'say "hi"', "C:\\x\\", ""],
)
def test_set_config_value_quotes_a_value_so_that_it_reads_back_unchanged(config_env, value):
    set_config_value(config_env, "LLAMA_MODEL_ALIAS", value)
    settings = load_settings(Paths(root=config_env.parent.parent), {}, {})
    assert settings["LLAMA_MODEL_ALIAS"] == value
    assert mode_of(config_env) == 0o600


SECRET_KEY = "LLAMA_PROXY_BACKEND_SECRET"


def secret_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(f"{SECRET_KEY}=")]


def test_a_new_config_env_has_a_generated_backend_secret_of_its_own(tmp_path):
    first, second = Paths(root=tmp_path / "a"), Paths(root=tmp_path / "b")
    ensure_config(first)
    ensure_config(second)
    first_secret = load_settings(first, {}, {})[SECRET_KEY]
    assert len(first_secret) >= 32
    assert first_secret != load_settings(second, {}, {})[SECRET_KEY]
    assert first_secret != load_settings(first, {}, {})["LLAMA_API_KEY"]
    assert ensure_backend_secret(first, {}) is False


@pytest.mark.parametrize("old_line", ["", f"{SECRET_KEY}=\n"], ids=["missing", "empty"])
def test_an_old_config_env_gets_a_backend_secret_once_and_keeps_the_rest(paths, old_line):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text(f"# mine\nLLAMA_SERVER_PORT=9001\n{old_line}")
    paths.config_env.chmod(0o600)

    assert ensure_backend_secret(paths, {}) is True
    written = paths.config_env.read_text()
    assert ensure_backend_secret(paths, {}) is False

    assert paths.config_env.read_text() == written
    assert written.startswith("# mine\nLLAMA_SERVER_PORT=9001\n")
    [line] = secret_lines(paths.config_env)
    assert len(load_settings(paths, {}, {})[SECRET_KEY]) >= 32
    assert mode_of(paths.config_env) == 0o600


def test_a_backend_secret_set_elsewhere_even_empty_is_left_alone(paths):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text("LLAMA_SERVER_PORT=9001\n")
    assert ensure_backend_secret(paths, {SECRET_KEY: "from-the-environment"}) is False
    assert ensure_backend_secret(paths, {SECRET_KEY: ""}) is False
    assert paths.config_env.read_text() == "LLAMA_SERVER_PORT=9001\n"
    assert ensure_backend_secret(Paths(root=paths.root / "none"), {}) is False


def test_a_mutating_console_command_says_once_that_it_wrote_the_secret(paths, monkeypatch, capsys):
    monkeypatch.delenv(SECRET_KEY, raising=False)
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text("LLAMA_SERVER_PORT=9001\n")

    load(paths, is_writing=True)
    first = capsys.readouterr().err
    settings = load(paths, is_writing=True)

    assert f"note: wrote a new {SECRET_KEY} into {paths.config_env}" in first
    assert "every gateway and admin host on one database needs the same value" in first
    assert capsys.readouterr().err == ""
    assert settings.gateway.backend_secret == load_settings(paths, {}, {})[SECRET_KEY]


def is_a_flock_waited_for() -> bool:
    """Whether this process (a thread of it) is blocked on a flock: /proc/locks lists a
    waiter with "->" before its lock type, and its pid."""
    lines = Path("/proc/locks").read_text().splitlines()
    return any("-> FLOCK" in line and f" {os.getpid()} " in line for line in lines)


def test_two_consoles_at_once_write_one_backend_secret(paths):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text("LLAMA_SERVER_PORT=9001\n")
    paths.run_dir.mkdir(parents=True)
    results: list[bool] = []
    lock_fd = os.open(paths.run_dir / CONFIG_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # the first console, busy writing its secret
        second = threading.Thread(target=lambda: results.append(ensure_backend_secret(paths, {})))
        second.start()
        wait_for(is_a_flock_waited_for, timeout=5, what="the second console to wait for the lock")
        set_config_value(paths.config_env, SECRET_KEY, "the-first-consoles-secret")
    finally:
        os.close(lock_fd)
    second.join(10)

    assert results == [False]
    assert load_settings(paths, {}, {})[SECRET_KEY] == "the-first-consoles-secret"


def test_a_config_env_with_a_bad_value_gets_no_backend_secret(paths):
    paths.runtime_dir.mkdir(parents=True)
    paths.config_env.write_text("LLAMA_N_CTX=lots\n")
    assert ensure_backend_secret(paths, {}) is False
    assert paths.config_env.read_text() == "LLAMA_N_CTX=lots\n"
